"""kernels.alloc.heap_reuse: batched forwards reuse heap pages; the lean thresholds come back after."""

import pytest
import torch

from bitsmith.kernels import alloc


class FakeLibc:
    """Records mallopt / malloc_trim calls instead of changing the process's allocator."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def mallopt(self, param: int, value: int) -> int:
        self.calls.append(("mallopt", param, value))
        return 1

    def malloc_trim(self, pad: int) -> int:
        self.calls.append(("trim", pad))
        return 1


@pytest.fixture
def fake(monkeypatch):
    lib = FakeLibc()
    monkeypatch.setattr(alloc, "_glibc", lambda: lib)
    return lib


def test_raises_then_restores_and_trims(fake):
    with alloc.heap_reuse(1 << 20):
        assert fake.calls == [("mallopt", alloc.M_MMAP_THRESHOLD, 1 << 20), ("mallopt", alloc.M_TRIM_THRESHOLD, 1 << 20)]
    assert fake.calls[2:] == [("mallopt", alloc.M_MMAP_THRESHOLD, alloc.LEAN_THRESHOLD),
                              ("mallopt", alloc.M_TRIM_THRESHOLD, alloc.LEAN_THRESHOLD), ("trim", 0)]


def test_nested_uses_act_once_and_restore_on_error(fake):
    with pytest.raises(RuntimeError):
        with alloc.heap_reuse():
            with alloc.heap_reuse():
                with alloc.heap_reuse():
                    pass
                raise RuntimeError("boom")
    assert [c for c in fake.calls if c[0] == "trim"] == [("trim", 0)]
    assert len(fake.calls) == 5  # two raises, two restores, one trim: the inner blocks did nothing
    with alloc.heap_reuse():  # after an error the depth is back to zero: the next block acts again
        pass
    assert len(fake.calls) == 10


def test_real_allocator_computes_the_same():
    """With the real glibc (where present): arithmetic inside is unchanged and the block exits cleanly."""
    x = torch.randn(300, 700, generator=torch.Generator().manual_seed(0))
    expect = torch.nn.functional.silu(x) * x
    with alloc.heap_reuse():
        got = torch.nn.functional.silu(x) * x
    assert torch.equal(got, expect)
