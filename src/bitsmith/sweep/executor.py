"""The executor seam: how a sweep's independent tasks run. One interface, two implementations:

- :class:`SerialExecutor` runs them one after another in this process (no Ray needed; what the
  unit tests and ``--workers 0`` use);
- :class:`RayExecutor` submits them as Ray tasks with declared resources (CPUs, memory, GPUs), to a
  local Ray it starts (``num_cpus`` = workers) or to an existing cluster (``address``), and yields
  results as they finish. Ray re-runs a task whose worker or node died (``max_retries``), and the
  driver stores each result as it arrives, so a lost driver loses only the tasks in flight.

Both yield ``(job, result, error)`` triples in completion order; a task's exception is handed
back as ``error`` (the sweep goes on and reports it), never raised mid-sweep."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from bitsmith.sweep.config import SweepError

__all__ = ["Resources", "Executor", "SerialExecutor", "RayExecutor", "make_executor", "ray_available"]

log = logging.getLogger(__name__)

Outcome = tuple[Any, Any, BaseException | None]  # (job, result or None, error or None)


@dataclass(frozen=True)
class Resources:
    """What one task declares to the scheduler."""

    num_cpus: float = 1.0
    memory: int = 0  # bytes; 0 declares none
    num_gpus: float = 0.0


class Executor(Protocol):
    name: str

    def run(self, fn: Callable[[Any], Any], jobs: list[Any], resources: Resources) -> Iterator[Outcome]: ...

    def close(self) -> None: ...


class SerialExecutor:
    """Every task in this process, in order."""

    name = "serial"

    def run(self, fn: Callable[[Any], Any], jobs: list[Any], resources: Resources) -> Iterator[Outcome]:
        for job in jobs:
            try:
                result = fn(job)
            except Exception as exc:  # noqa: BLE001 - a failed variant is reported, the sweep goes on
                log.exception("task failed")
                yield job, None, exc
            else:
                yield job, result, None

    def close(self) -> None:
        pass


def ray_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("ray") is not None


class RayExecutor:
    """Tasks on Ray. ``address`` None starts a local Ray with ``workers`` CPUs (shut down on
    :meth:`close`); otherwise connects to that cluster (``"auto"`` or ``host:port``) and leaves it running."""

    name = "ray"

    def __init__(self, workers: int, address: str | None = None, max_retries: int = 2) -> None:
        if not ray_available():
            raise SweepError("Ray is not installed; install it with pip install 'bitsmith[sweep]' (or 'ray'), "
                             "or run the sweep in this process with --workers 0")
        import ray

        self.ray, self.max_retries = ray, max_retries
        # workers import the same bitsmith as this driver (a source tree on PYTHONPATH included)
        env = {k: os.environ[k] for k in ("PYTHONPATH", "BITSMITH_CACHE", "HF_HUB_OFFLINE") if k in os.environ}
        runtime_env = {"env_vars": env} if env else None
        self.started = address is None
        try:
            if self.started:
                # Ray starts workers 15 nice levels below the driver; a sweep's tasks are the work itself,
                # so they run at the driver's priority, as the serial executor's do (unless the user says)
                os.environ.setdefault("RAY_worker_niceness", "0")
                # "local": always a new Ray of our own, never a cluster another user started on this machine
                ray.init(address="local", num_cpus=workers, include_dashboard=False, runtime_env=runtime_env, log_to_driver=False,
                         object_store_memory=256 * 1024**2)
            else:
                ray.init(address=address, runtime_env=runtime_env, log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            where = "start a local Ray" if self.started else f"connect to the Ray cluster at {address}"
            raise SweepError(f"could not {where} ({exc}); check the address (ray status) or run with --workers 0") from exc
        self.name = "ray (local)" if self.started else f"ray ({address})"

    def capacity(self) -> dict[str, float]:
        """The cluster's total resources (CPU, memory in bytes, GPU)."""
        return dict(self.ray.cluster_resources())

    def check_fits(self, resources: Resources) -> None:
        """Refuse a task that no node could ever schedule (it would wait forever)."""
        nodes = [n.get("Resources", {}) for n in self.ray.nodes() if n.get("Alive")]
        if not any(n.get("CPU", 0) >= resources.num_cpus and n.get("memory", 0) >= resources.memory
                   and n.get("GPU", 0) >= resources.num_gpus for n in nodes):
            biggest = max(nodes, key=lambda n: n.get("memory", 0), default={})
            raise SweepError(f"no Ray node can run a task that needs {resources.num_cpus:g} CPU, "
                             f"{resources.memory / 1e9:.1f} GB memory and {resources.num_gpus:g} GPU (the largest node "
                             f"offers {biggest.get('CPU', 0):g} CPU and {biggest.get('memory', 0) / 1e9:.1f} GB); "
                             "pass --memory-per-task / --threads-per-task that fit, or add a larger node")

    def run(self, fn: Callable[[Any], Any], jobs: list[Any], resources: Resources) -> Iterator[Outcome]:
        ray = self.ray
        self.check_fits(resources)
        declared: dict[str, Any] = {"num_cpus": resources.num_cpus, "max_retries": self.max_retries}
        if resources.memory:
            declared["memory"] = resources.memory
        if resources.num_gpus:
            declared["num_gpus"] = resources.num_gpus
        remote = ray.remote(fn).options(**declared)
        pending = {remote.remote(job): job for job in jobs}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                job = pending.pop(ref)
                try:
                    yield job, ray.get(ref), None
                except Exception as exc:  # noqa: BLE001 - RayTaskError wraps the task's own error
                    yield job, None, getattr(exc, "cause", None) or exc

    def close(self) -> None:
        if self.ray.is_initialized():
            self.ray.shutdown()


def make_executor(workers: int, address: str | None = None) -> SerialExecutor | RayExecutor:
    """``workers`` 0 without an address: serial in this process; else Ray (local, or ``address``)."""
    if workers < 0:
        raise SweepError(f"--workers must be 0 (serial, no Ray) or more, got {workers}")
    if workers == 0 and address is None:
        return SerialExecutor()
    return RayExecutor(max(workers, 1), address)
