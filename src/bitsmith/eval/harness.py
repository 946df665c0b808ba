"""lm-evaluation-harness on any model bitsmith loads (checkpoint, GPTQ or compressed-tensors folder,
GGUF file, Hugging Face folder, alias): the loaded module is a transformers model, so the harness's
own ``HFLM(pretrained=<module>, tokenizer=...)`` drives it, quantized layers and all.

Offline here, so bitsmith ships two local tasks (``src/bitsmith/data/lm_eval_tasks``, registered with
``TaskManager(include_path=...)``): ``bitsmith_cloze_mc`` (multiple choice) and ``bitsmith_cloze_gen``
(generation). Any task the harness knows runs the same way where its data can be downloaded
(``hellaswag``, ``humaneval``, ...).

Plain Python, without the CLI::

    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from bitsmith.eval.harness import task_manager
    from bitsmith.runtime.load import load_model

    loaded = load_model("ckpt-w4g128")
    lm = HFLM(pretrained=loaded.model, tokenizer=loaded.tokenizer, batch_size=8)  # needs accelerate
    # without accelerate: lm = bitsmith.eval.harness_lm.TorchLM(loaded.model, loaded.tokenizer)
    results = simple_evaluate(model=lm, tasks=["bitsmith_cloze_mc"], task_manager=task_manager())
"""

from __future__ import annotations

import logging
from importlib.resources import files
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

LOCAL_TASKS = ("bitsmith_cloze_mc", "bitsmith_cloze_gen")


class HarnessError(ValueError):
    """A harness request bitsmith cannot run (unknown task, missing lm-eval); the message says why."""


def tasks_dir() -> Path:
    """The folder of bitsmith's local lm-eval task definitions."""
    return Path(str(files("bitsmith") / "data" / "lm_eval_tasks"))


def task_manager(include_defaults: bool = True) -> Any:
    """lm-eval's TaskManager with bitsmith's local tasks added to the harness's own (indexing the
    harness's thousands of tasks takes a while: ``include_defaults=False`` indexes only bitsmith's)."""
    try:
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        raise HarnessError("--lm-eval needs lm-evaluation-harness: pip install 'bitsmith[lm-eval]'") from exc
    return TaskManager(include_path=str(tasks_dir()), include_defaults=include_defaults)


def split_tasks(text: str) -> list[str]:
    """``TASK[,TASK]`` -> task names."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise HarnessError(f"--lm-eval needs task names, e.g. --lm-eval {','.join(LOCAL_TASKS)}")
    return names


def parse_tasks(text: str, manager: Any | None = None) -> tuple[list[str], Any]:
    """(task names, the TaskManager that knows them), each name checked before any model loads; the
    harness's own tasks are indexed only when a name is not one of bitsmith's local tasks."""
    names = split_tasks(text)
    if manager is None:
        manager = task_manager(include_defaults=not set(names) <= set(LOCAL_TASKS))
    known = set(manager.all_tasks)
    unknown = [t for t in names if t not in known]
    if unknown:
        raise HarnessError(f"lm-eval knows no task {', '.join(unknown)}; bitsmith's local tasks are "
                           f"{', '.join(LOCAL_TASKS)} (others need their data from the Hugging Face hub)")
    return names, manager


def harness_lm(loaded: Any, batch_size: int = 8) -> Any:
    """The harness's HFLM around a model bitsmith loaded (its torch module and tokenizer); where HFLM
    cannot be imported (it needs ``accelerate``), bitsmith's plain adapter
    (:class:`bitsmith.eval.harness_lm.TorchLM`, one sequence at a time)."""
    try:
        from lm_eval.models.huggingface import HFLM
    except ImportError as exc:
        from bitsmith.eval.harness_lm import TorchLM

        log.info("lm-eval's HFLM is unavailable (%s); using bitsmith's adapter", exc)
        return TorchLM(loaded.model, loaded.tokenizer)
    return HFLM(pretrained=loaded.model, tokenizer=loaded.tokenizer, batch_size=batch_size)


def run_harness(loaded: Any, tasks: list[str], manager: Any, limit: int | None = None, batch_size: int = 8) -> dict:
    """``lm_eval.simple_evaluate`` on ``loaded``; the harness's result dict (``results``, ``versions``,
    ``n-shot``, ``higher_is_better``, ...), minus the per-sample logs."""
    from lm_eval import simple_evaluate

    results = simple_evaluate(model=harness_lm(loaded, batch_size), tasks=tasks, task_manager=manager,
                              limit=limit, log_samples=False, bootstrap_iters=0)
    if results is None:  # simple_evaluate returns None on non-zero ranks only
        raise HarnessError("lm-eval returned no results")
    return results


def harness_table(results: dict) -> str:
    """The harness's own Markdown table of ``results``."""
    from lm_eval.utils import make_table

    return make_table(results)


def summary(results: dict) -> dict[str, dict[str, float]]:
    """task -> metric -> value (the ``metric,filter`` keys of the harness, JSON-safe: no stderr entries
    and no N/A strings)."""
    out: dict[str, dict[str, float]] = {}
    for task, metrics in results.get("results", {}).items():
        out[task] = {k: float(v) for k, v in metrics.items()
                     if isinstance(v, (int, float)) and not isinstance(v, bool) and "_stderr" not in k}
    return out
