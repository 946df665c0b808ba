"""kernels.alloc.heap_reuse: batched forwards reuse heap pages; the lean thresholds come back after."""

import subprocess
import sys

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


def test_trim_threshold_can_differ_from_the_mmap_threshold(fake):
    with alloc.heap_reuse(1 << 20, 1 << 30):
        assert fake.calls == [("mallopt", alloc.M_MMAP_THRESHOLD, 1 << 20), ("mallopt", alloc.M_TRIM_THRESHOLD, 1 << 30)]
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


class FreeLibc(FakeLibc):
    """A fake glibc whose heap holds ``free`` bytes of free chunks (mallinfo2)."""

    def __init__(self, free: int) -> None:
        super().__init__()
        self.free = free

    def mallinfo2(self):
        return type("MallInfo2", (), {"fordblks": self.free})()


@pytest.mark.parametrize("free, keep, trims", [(100, 0, True), (100, 99, True), (100, 100, False), (5, 1 << 30, False)])
def test_trim_heap_trims_only_beyond_the_slack(monkeypatch, free, keep, trims):
    lib = FreeLibc(free)
    monkeypatch.setattr(alloc, "_glibc", lambda: lib)
    assert alloc.heap_free_bytes() == free
    assert alloc.trim_heap(keep) is trims
    assert lib.calls == ([("trim", 0)] if trims else [])


def test_trim_heap_trims_when_the_free_bytes_are_unknown(fake):
    """A glibc without mallinfo2 (before 2.33): nothing to compare against, so it trims as before."""
    assert alloc.heap_free_bytes() is None
    assert alloc.trim_heap(1 << 30) is True
    assert fake.calls == [("trim", 0)]


def test_without_glibc_nothing_happens(monkeypatch):
    monkeypatch.setattr(alloc, "_glibc", lambda: None)
    assert alloc.heap_free_bytes() is None and alloc.trim_heap() is False


def test_real_heap_free_bytes_is_a_count_where_glibc_has_it():
    free = alloc.heap_free_bytes()
    assert free is None or (isinstance(free, int) and free >= 0)


def test_share_arenas_sets_glibcs_arena_limit_to_one(fake):
    assert alloc.share_arenas()
    assert fake.calls == [("mallopt", alloc.M_ARENA_MAX, 1)]


def test_share_arenas_without_glibc_does_nothing(monkeypatch):
    monkeypatch.setattr(alloc, "_glibc", lambda: None)
    assert not alloc.share_arenas()


ARENAS = """
import ctypes, sys
from concurrent.futures import ThreadPoolExecutor
import torch
if sys.argv[1] == "share":
    from bitsmith.kernels.alloc import share_arenas
    assert share_arenas()
def work(i):
    return sum(float(torch.randn(1 << 18)[0]) for _ in range(20))
for _ in range(3):
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(work, range(8)))
libc = ctypes.CDLL("libc.so.6")
libc.fopen.restype = ctypes.c_void_p
f = libc.fopen(sys.argv[2].encode(), b"w")
libc.malloc_info(0, ctypes.c_void_p(f))
libc.fclose(ctypes.c_void_p(f))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or alloc._glibc() is None, reason="glibc only")
@pytest.mark.parametrize("share", [False, True])
def test_threads_after_share_arenas_use_one_arena(tmp_path, share: bool):
    """With the real glibc, in a fresh process: threads started after share_arenas() allocate from one arena
    (malloc_info lists one heap), and from several without it (the oracle that the count can differ)."""
    info = tmp_path / "malloc.xml"
    subprocess.run([sys.executable, "-c", ARENAS, "share" if share else "default", str(info)], check=True)
    heaps = info.read_text().count("<heap nr=")
    assert heaps == 1 if share else heaps > 1


def test_bitsmith_quantize_shares_arenas_before_its_work(monkeypatch):
    import bitsmith.cli as cli
    import bitsmith.cli.quantize as quantize

    order = []
    monkeypatch.setattr(alloc, "share_arenas", lambda: order.append("share") or True)
    monkeypatch.setattr(quantize, "run", lambda args: order.append("run") or 0)
    assert cli.main(["quantize", "smollm2-135m", "--out", "unused"]) == 0
    assert order == ["share", "run"]
    order.clear()
    monkeypatch.setattr(cli, "ARENA_SHARING_COMMANDS", ())
    cli.main(["quantize", "smollm2-135m", "--out", "unused"])
    assert order == ["run"]
