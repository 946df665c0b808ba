"""Shared test setup: slow tests (real installed models) are skipped when CI=true."""
import os

import pytest


def _interpret_triton_without_a_gpu() -> None:
    """Triton (the optional ``gpu`` extra) reads TRITON_INTERPRET once, when it is first imported, and
    any test may import it first (torch.compile does). Without a GPU its interpreter is the only way
    to run the Triton kernel tests (tests/kernels/test_triton_gemm.py) on CPU tensors, so it is set
    here, before any test runs; with a GPU those tests run the compiled kernel instead."""
    import torch

    if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"


_interpret_triton_without_a_gpu()


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Tests use small tensors: one thread avoids OpenMP wake-up costs on a busy 2-core machine.
    Tests that exercise threading set their own count."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def one_thread():
    """One torch thread for the test, the previous count restored after it (files whose tests also set
    other counts use it through ``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("CI", "").lower() not in ("1", "true", "yes"):
        return
    skip = pytest.mark.skip(reason="slow test on a real model; skipped in CI (CI=true)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def exact_decode():
    """Options for generation exactly as the reference computes it: the exact float gemv for 4/8-bit
    codes instead of the default int8 activations, and a float32 KV cache instead of the default fp16
    one (both trade a few 1e-3 relative error for speed), for tests that compare implementations at
    float tolerance; pass them to load_model / generate / the runners. The approximations are held to
    their own oracles elsewhere."""
    from bitsmith.runtime.options import RuntimeOptions

    return RuntimeOptions(int8_decode=False, kv_cache="fp32")


@pytest.fixture
def glibc_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    """A fake glibc behind ``kernels.alloc``: every ``mallopt``/``malloc_trim`` call is recorded in the
    returned list (in order) instead of changing this process's allocator."""
    from bitsmith.kernels import alloc

    calls: list[tuple] = []

    class Libc:
        def mallopt(self, param: int, value: int) -> int:
            calls.append(("mallopt", param, value))
            return 1

        def malloc_trim(self, pad: int) -> int:
            calls.append(("trim", pad))
            return 1

    monkeypatch.setattr(alloc, "_glibc", lambda: Libc())
    return calls
