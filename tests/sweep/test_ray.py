"""A tiny sweep on a local Ray (2 CPUs): the same results as the serial executor, tasks run in Ray
workers (other processes), and Ray is shut down afterwards. Skipped, with the reason, where Ray is
not installed or cannot start (it needs /tmp space and ~10 s)."""

import os

import pytest

from bitsmith.sweep.config import SweepConfig, expand_variants
from bitsmith.sweep.driver import run_sweep
from bitsmith.sweep.executor import RayExecutor, Resources, SerialExecutor, ray_available
from tests.tiny import make_tiny_model, sample_text

pytestmark = pytest.mark.skipif(not ray_available(), reason="Ray is not installed (pip install 'bitsmith[sweep]')")


@pytest.fixture(scope="module")
def ray_executor():
    try:
        executor = RayExecutor(workers=2)
    except Exception as exc:  # noqa: BLE001 - any start failure is a reason to skip, said in the report
        pytest.skip(f"a local Ray could not start here: {exc}")
    yield executor
    executor.close()
    import ray

    assert not ray.is_initialized()


def test_tiny_sweep_on_local_ray_matches_the_serial_run(ray_executor, tmp_path):
    model = make_tiny_model(tmp_path / "tiny")
    (tmp_path / "a.txt").write_text(sample_text(600, 1))
    config = SweepConfig(model=str(model), variants=expand_variants(["w8", "w3g32"], ["rtn"]),
                         domains=(f"a={tmp_path / 'a.txt'}",), ctx=64, max_windows=2,
                         memory_per_task=500_000_000)
    on_ray = run_sweep(config, tmp_path / "ray", ray_executor, max_kld=0.05)
    serial = run_sweep(config, tmp_path / "serial", SerialExecutor(), max_kld=0.05)
    assert not on_ray.failures and sorted(on_ray.ran) == sorted(serial.ran)
    for r, s in zip(on_ray.results, serial.results):
        assert r["name"] == s["name"] and r["tensor_bytes"] == s["tensor_bytes"]
        assert r["domains"]["a"]["kld_mean"] == pytest.approx(s["domains"]["a"]["kld_mean"], rel=1e-5, abs=1e-9)
        assert r["node"].startswith("ray:") and r["pid"] != os.getpid()
    assert on_ray.recommendation.name == serial.recommendation.name
    again = run_sweep(config, tmp_path / "ray", ray_executor, max_kld=0.05)  # resumed: nothing submitted
    assert again.ran == [] and len(again.reused) == 2


def test_a_task_no_node_can_hold_is_refused_not_queued_forever(ray_executor):
    from bitsmith.sweep.config import SweepError

    with pytest.raises(SweepError, match="no Ray node"):
        list(ray_executor.run(len, [[1]], Resources(num_cpus=1, memory=10**15)))
