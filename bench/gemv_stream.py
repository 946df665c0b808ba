"""How fast the one-row decode gemv streams its packed bytes from memory, per code width and shape, for
two or more kernel libraries side by side (issue 18: 2/3-bit decode in proportion to its bytes).

    python bench/gemv_stream.py [--threads 1] [--rounds 7] [--pool-mb 400] \
        [--lib new=] [--lib old=rev:main] [--lib far4=-DBS_PF_FAR=4] [--specs w4g128,w3g128,w2g64]

Each ``--lib NAME=WHAT`` is a kernel library: empty WHAT is this checkout's (``kernels.build``), ``rev:REV``
the C++ sources of git revision REV built with the same flags (under ``--work``), anything else extra
compiler flags for this checkout's sources (``-DBS_AHEAD=4,-DFOO``). Default: this checkout against
``rev:main``.

Per spec and shape, every library gets its own pool of distinct random matrices (NativeKernel, as a
checkpoint loads them) whose packed bytes (codes + fp16 scales and zeros) add up to ``--pool-mb``, far
above the last-level cache (this machine's L3 is 300 MB: keep the pool above ~350 MB), and a round
calls the gemv once on every matrix of every pool, matrix i of each library in turn (the order flips
every matrix and round), so the bytes come from memory as in decode, where each matrix is read once
per token, and paired calls meet the same load. GB/s = pool bytes / a round's summed call time (median
over rounds); ``time ratio`` = the median over all calls of a library's time / the first library's on
the same matrix index: the figure to trust on a shared machine (an A/A pair of identical libraries
gave 0.997-1.006 at load ~7). ``of read`` divides by the rate at which torch sums a float32 buffer of
the pool's size with the same threads. At 1 thread the clock is the calling thread's CPU time (a
shared machine's preemption does not count; memory stalls do), at more threads wall time (run those
on a quiet machine). Every library is first checked against the int8 oracle on one matrix (a line
starting ``!!`` says it is off). ``--pool-mb`` MB per library are resident at once, plus one read
buffer of the same size. Nothing here is asserted.

``--direct`` calls the C entry (``bs_gemv``) instead of ``NativeKernel``: without NativeKernel's Python
work, ~7-13 us a call here, a large share of a 2048x1536 call (the fused decode step pays none of it).
``--one-buffer`` puts a pool's matrices into one buffer (``kernels.cpu.fuse_native``), which gets
transparent huge pages; alone, a matrix under 4 MB (every 2048x1536 one) gets none.

``--in-cache KB`` measures the kernels' compute instead: per spec and shape, one matrix of the shape's
row length and about KB packed kilobytes (fewer rows) and one of half its rows per library, each called
through ``bs_gemv`` directly, ``--rounds`` x 10 turns of one call of every library and size (the order
reversing every turn), so paired calls meet the same clock speed; keep 3 x KB x libraries under the
core's L2 (2 MB here: ``--in-cache 320`` for two libraries) so that all of them stay resident. From
the 10th percentile of each one's call times (a call not slowed by another process's time slice, which
evicts the L2 on a shared machine), the cost per packed byte is the slope between the two sizes and the
per-call cost (x's preparation, the threads' start, the ctypes call) its intercept, so anything paid
once per call drops out of the slope. Per library: ps per packed byte (= ns per KB), the compute rate
it implies (GB/s of packed bytes; a gemv can stream from memory at R GB/s per core only if this is well
above R), the per-call us, and its cost per byte over the first library's (an A/A pair: 0.985-1.018 at
load 5, ``--rounds 41``). Use it at 1 thread (thread CPU time), where it is meaningful on a loaded
machine; at 2 threads (wall time) only on a quiet one.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import tempfile
import time
from functools import partial
from pathlib import Path

import torch

from bitsmith.kernels import build as kbuild
from bitsmith.kernels.codebook import int8_activations
from bitsmith.kernels.cpu import NativeKernel, advise_huge_pages, fuse_native
from bitsmith.kernels.torch_path import reference_linear
from bitsmith.spec import QuantSpec
from bitsmith.tensor import QuantizedTensor
from bitsmith.formats.packing import pack
from common import work_dir

# Qwen2.5-Coder-1.5B's decode shapes (gate/up joined, down, q/k/v joined), and SmolLM2-135M's
SHAPES = {"gate/up": (17920, 1536), "down": (1536, 8960), "qkv": (2048, 1536),
          # SmolLM2-135M's (overhead-bound: 144 packed bytes a row at w2g64)
          "s-gate/up": (3072, 576), "s-down": (576, 1536), "s-qkv": (960, 576)}


def build_rev(rev: str, work: Path) -> Path:
    """The kernel library of git revision ``rev``'s csrc, built with this checkout's flags into ``work``."""
    root = Path(subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True,
                               check=True, cwd=kbuild.CSRC).stdout.strip())
    rel = kbuild.CSRC.relative_to(root).as_posix()
    sha = subprocess.run(["git", "rev-parse", rev], capture_output=True, text=True, check=True, cwd=root).stdout.strip()
    target = work / f"qmatmul-{sha[:12]}.so"
    if target.exists():
        return target
    with tempfile.TemporaryDirectory() as tmp:
        tar = subprocess.run(["git", "archive", sha, rel], capture_output=True, check=True, cwd=root).stdout
        subprocess.run(["tar", "-x", "-C", tmp], input=tar, check=True)
        sources = sorted(str(p) for p in (Path(tmp) / rel).glob("*.cpp"))
        part = target.with_suffix(".part")
        cmd = [os.environ.get("CXX", "g++"), *kbuild.FLAGS, *sources, "-o", str(part)]
        subprocess.run(cmd, check=True)
        part.rename(target)
    return target


def library(what: str, work: Path):
    """A loaded kernel library for one ``--lib`` value (see the module docstring)."""
    if what.startswith("rev:"):
        return kbuild.load(build_rev(what[4:], work))
    flags = tuple(f for f in what.split(",") if f)
    return kbuild.load(kbuild.build(flags))


def random_packed(out: int, inp: int, spec: QuantSpec, gen: torch.Generator) -> QuantizedTensor:
    codes = torch.randint(0, spec.qmax + 1, (out, inp), generator=gen, dtype=torch.uint8)
    groups = spec.groups_per_row(inp)
    scale = (torch.rand(out, groups, generator=gen) * 0.02 + 1e-3).half()
    zero = None if spec.symmetric else (torch.rand(out, groups, generator=gen) * spec.qmax).half()
    return QuantizedTensor(codes, scale, zero, spec)


def pool(lib, qt: QuantizedTensor, count: int, threads: int) -> list[NativeKernel]:
    """``count`` kernels on copies of one random matrix (timing does not depend on the codes' values)."""
    packed = pack(qt.codes, qt.spec.bits)
    return [NativeKernel(lib, packed, qt.scale.clone(), None if qt.zero is None else qt.zero.clone(), qt.spec,
                         qt.shape[1], True, threads) for _ in range(count)]


class GemvCall:
    """One int8 decode gemv of kernel ``k``'s weights straight through the library's C entry (no Python
    work per call beyond ctypes); it holds ``k``, ``x`` and ``y``, whose memory the C call reads and writes."""

    def __init__(self, lib, k: NativeKernel, x: torch.Tensor, y: torch.Tensor, threads: int) -> None:
        self.tensors = (k, x, y)
        self.fn = lib.bs_gemv  # the kernel's own weight arguments: its bits carry its layout (3-bit mixed)
        self.args = (*k._weight_args(), x.data_ptr(), 1, y.data_ptr(), threads, 1)

    def __call__(self) -> None:
        self.fn(*self.args)


def sweep_s(calls: dict[str, list], clock, flip: bool) -> dict[str, list[float]]:
    """One pass over the pools' calls, matrix i of every library in turn (the order flips with ``flip`` and
    every matrix), so paired calls meet the same load; the seconds of each call per library."""
    names = list(calls)
    times: dict[str, list[float]] = {n: [] for n in names}
    for i in range(len(calls[names[0]])):
        for name in names if (i % 2 == 0) != flip else names[::-1]:
            t0 = clock()
            calls[name][i]()
            times[name].append(clock() - t0)
    return times


def read_s(buf: torch.Tensor, clock) -> float:
    t0 = clock()
    buf.sum()
    return clock() - t0


def measure(libs: dict, spec: QuantSpec, shape: tuple[int, int], args, clock) -> None:
    out, inp = shape
    gen = torch.Generator().manual_seed(0)
    qt = random_packed(out, inp, spec, gen)
    nbytes = qt.stored_bits() / 8
    count = max(2, int(args.pool_mb * 1e6 // nbytes))
    x = torch.randn(1, inp, generator=gen)
    want = reference_linear(int8_activations(x), qt)
    pools = {}
    for name, lib in libs.items():
        pools[name] = pool(lib, qt, count, args.threads)
        if args.one_buffer:  # every matrix a row view of one buffer (huge pages), as fuse_native makes them
            fuse_native(pools[name])
        got = pools[name][0](x)
        err = float((got - want).abs().max() / want.abs().max())
        if err > 1e-4:
            print(f"!! {name} {spec} {shape}: relative error {err:.2e} against the int8 oracle")
    y = torch.empty(1, out)
    calls = {name: [GemvCall(libs[name], k, x, y, args.threads) if args.direct else partial(k, x) for k in ks]
             for name, ks in pools.items()}
    names = list(libs)
    secs: dict[str, list[float]] = {n: [] for n in names}  # per round
    ratios: dict[str, list[float]] = {n: [] for n in names}  # per call, against the first library's
    reads: list[float] = []
    buf = torch.ones(int(count * nbytes) // 4)  # float32 of the pool's size, read by torch for scale
    advise_huge_pages(buf)
    sweep_s(calls, clock, False)  # warm-up: first touch, thread pool
    for r in range(args.rounds):
        times = sweep_s(calls, clock, r % 2 == 1)
        for name in names:
            secs[name].append(sum(times[name]))
            ratios[name] += [a / b for a, b in zip(times[name], times[names[0]])]
        reads.append(read_s(buf, clock))
    total = count * nbytes
    read = total / statistics.median(reads) / 1e9
    for name in names:
        gbs = total / statistics.median(secs[name]) / 1e9
        ratio = statistics.median(ratios[name])
        print(f"| {spec} | {shape[0]}x{shape[1]} | {count} | {total / 1e6:.0f} | {name} | {gbs:.2f} | "
              f"{gbs / read:.0%} | {ratio:.3f} |", flush=True)
    del pools, calls


def interleaved_s(calls: dict[str, list], reps: int, clock) -> dict[str, list[list[float]]]:
    """Per library and size, the seconds of each of ``reps`` calls: every turn calls every library's every
    size once (the order reversing every turn), so that paired calls meet the same clock speed; the
    matrices of all libraries stay in the cache together."""
    order = [(name, i) for name in calls for i in range(len(calls[name]))]
    times = {name: [[] for _ in calls[name]] for name in calls}
    for turn in range(reps):
        for name, i in order if turn % 2 == 0 else order[::-1]:
            t0 = clock()
            calls[name][i]()
            times[name][i].append(clock() - t0)
    return times


def low_decile(values: list[float]) -> float:
    """The 10th percentile: a call's cost without the time-slices of other processes (which evict the
    core's L2 between calls on a shared machine) or a slow spell of the clock."""
    return statistics.quantiles(values, n=10)[0]


def measure_in_cache(libs: dict, spec: QuantSpec, shape: tuple[int, int], args, clock) -> None:
    """Compute cost per packed byte and per call of each library on cache-resident rows of ``shape``'s
    length (see the module docstring), paired call by call in alternating order."""
    out, inp = shape
    gen = torch.Generator().manual_seed(0)
    row_bytes = spec.stored_bits(1, inp) / 8
    big = min(out, max(8, int(args.in_cache * 1e3 / row_bytes) // 8 * 8))
    sizes = (big, big // 2)
    qt = random_packed(big, inp, spec, gen)
    x = torch.randn(1, inp, generator=gen)
    calls: dict[str, list] = {}
    for name, lib in libs.items():
        kernels = [pool(lib, QuantizedTensor(qt.codes[:n], qt.scale[:n], None if qt.zero is None else qt.zero[:n],
                                             spec), 1, args.threads)[0] for n in sizes]
        ys = [torch.empty(1, n) for n in sizes]
        calls[name] = [GemvCall(lib, k, x, y, args.threads) for k, y in zip(kernels, ys)]
        want = reference_linear(int8_activations(x), qt)
        calls[name][0]()
        err = float((ys[0] - want).abs().max() / want.abs().max())
        if err > 1e-4:
            print(f"!! {name} {spec} {shape}: relative error {err:.2e} against the int8 oracle")
    nbytes = [row_bytes * n for n in sizes]
    times = interleaved_s(calls, args.rounds * 10, clock)
    names = list(libs)
    cost = {}  # per library: seconds per packed byte, seconds per call
    for name in names:
        t_big, t_small = (low_decile(t) for t in times[name])
        per_byte = (t_big - t_small) / (nbytes[0] - nbytes[1])
        cost[name] = (per_byte, t_small - per_byte * nbytes[1])
    for name in names:
        ps = cost[name][0] * 1e12
        print(f"| {spec} | {big}x{inp} | {nbytes[0] / 1e3:.0f} | {name} | {ps:.1f} | {1e3 / ps:.1f} | "
              f"{cost[name][1] * 1e6:.1f} | {cost[name][0] / cost[names[0]][0]:.3f} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--pool-mb", type=float, default=400.0, help="packed MB of distinct matrices per library")
    ap.add_argument("--specs", default="w4g128,w3g128,w2g64")
    ap.add_argument("--shapes", default="gate/up,down,qkv", help=f"of {', '.join(SHAPES)}")
    ap.add_argument("--lib", action="append", default=[], help="NAME=WHAT (repeatable; see above)")
    ap.add_argument("--direct", action="store_true",
                    help="call the library's C entry directly instead of NativeKernel (no Python work per call)")
    ap.add_argument("--one-buffer", action="store_true",
                    help="each pool's matrices as views of one huge-page buffer instead of one buffer each (a "
                         "matrix under 4 MB gets no huge pages of its own)")
    ap.add_argument("--in-cache", type=float, default=0.0, metavar="KB",
                    help="measure compute on cache-resident matrices of ~KB packed kilobytes instead (see above)")
    ap.add_argument("--work", type=Path, default=None, help="where rev: libraries are built (default: bench work dir)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    # one thread: the calling thread's CPU time (a shared machine's preemption does not count);
    # more threads: wall time, for a quiet machine
    clock = time.thread_time if args.threads == 1 else time.perf_counter
    work = args.work or work_dir("gemv_stream")
    work.mkdir(parents=True, exist_ok=True)
    libs = {}
    for item in args.lib or ["new=", "old=rev:main"]:
        name, sep, what = item.partition("=")
        if not sep or not name:
            raise SystemExit(f"--lib {item!r}: expected NAME=WHAT (WHAT empty, rev:REV or compiler flags)")
        libs[name] = library(what, work)
    shapes = [s for s in args.shapes.split(",") if s]
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        raise SystemExit(f"unknown shape(s) {', '.join(unknown)}; known: {', '.join(SHAPES)}")
    kind = "thread CPU time" if args.threads == 1 else "wall time"
    if args.in_cache > 0:
        print(f"{args.threads} thread(s), {kind}, {args.rounds} alternating rounds, in cache: ~{args.in_cache:.0f} KB "
              f"and half its rows, 10th percentiles of {args.rounds * 10} calls each; ratio = per-byte cost / "
              f"{next(iter(libs))}'s\n")
        print("| spec | rows x in | KB | library | ps per byte | compute GB/s | us per call | cost ratio |")
    else:
        print(f"{args.threads} thread(s), {kind}, {args.rounds} alternating rounds, pools of ~{args.pool_mb:.0f} MB per "
              f"library, medians; ratio = median of per-call time / {next(iter(libs))}'s\n")
        print("| spec | shape | matrices | pool MB | library | GB/s | of read | time ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for spec in (QuantSpec.parse(s) for s in args.specs.split(",")):
        for shape in shapes:
            (measure_in_cache if args.in_cache > 0 else measure)(libs, spec, SHAPES[shape], args, clock)


if __name__ == "__main__":
    main()
