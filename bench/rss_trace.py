"""Where a calibrated quantize run's resident set peaks: runs ``bitsmith ARGS`` in this process,
samples /proc/self/status (VmRSS, VmHWM, RssAnon, RssFile) every 0.2 s into TRACE, marks the entry and
exit of the layer-wise pipeline's phases (open and capture, the tensors outside the blocks, each block's
stages, the head, the write) with the resident set at that moment, and prints phase -> peak at the end.

The sampler is a Python thread, so it pauses while native code holds the GIL; VmHWM, the kernel's own
high-water mark, is recorded at every mark and catches peaks between samples. ``--blocks K`` quantizes
only the first K blocks (then the head and the write as usual): a memory trace of every phase in
minutes instead of a full run; the checkpoint it writes is not a usable model.

    OMP_NUM_THREADS=1 BITSMITH_THREADS=1 python bench/rss_trace.py trace.txt --blocks 1 -- \\
        quantize qwen2.5-coder-1.5b --spec w4g128 --method gptq --out DIR

Measures and prints; asserts nothing.
"""

from __future__ import annotations

import argparse
import functools
import logging
import sys
import threading
import time

from bitsmith.cli import ARENA_SHARING_COMMANDS
from bitsmith.kernels.alloc import share_arenas

FIELDS = ("VmRSS", "VmHWM", "RssAnon", "RssFile")
PHASES = ["_open_run", "_write_other_tensors", "_walk_blocks", "_load_block", "_process_block", "stage_stats",
          "quantize_stage", "_quantize_head", "_head_stats", "quantize_linear", "finish_folder", "_emit_block",
          "_trim_heap"]
# (mark, phase name) of the summary's top-level phases, in run order
TOP = [("> _open_run", "open source, build, capture block 0 inputs"),
       ("> _write_other_tensors", "tensors outside the blocks (embedding, norm)"),
       ("> _walk_blocks", "block 1"),
       ("< _walk_blocks", "head (embedding reload, statistics, quantization, write)"),
       ("> finish_folder", "finish")]


class Tracer:
    def __init__(self, path: str) -> None:
        self.t0, self.stack = time.time(), ["startup"]
        self.out = open(path, "w", buffering=1)
        self.phase, self.peak, self.rows = "startup", 0, []

    def status(self) -> dict[str, int]:
        values = {}
        with open("/proc/self/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in FIELDS:
                    values[key] = int(value.split()[0]) // 1024  # MiB
        return values

    def sample_forever(self) -> None:
        while True:
            s = self.status()
            self.peak = max(self.peak, s.get("VmRSS", 0))
            fields = " ".join(f"{k}={s.get(k, 0)}" for k in FIELDS)
            self.out.write(f"S {time.time() - self.t0:.1f} {fields} phase={'/'.join(self.stack[-3:])}\n")
            time.sleep(0.2)

    def mark(self, message: str) -> None:
        s = self.status()
        self.peak = max(self.peak, s["VmRSS"])
        top = [name for m, name in TOP if m == message]
        block = message.startswith("LOG block ")
        if top or block:
            self.rows.append((self.phase, self.peak, s["VmHWM"]))
            done, total = map(int, message.split()[2].split("/")) if block else (0, 0)
            self.phase = top[0] if top else (f"block {done + 1}" if done < total else "after the last block")
            self.peak = s["VmRSS"]
        fields = " ".join(f"{k}={s.get(k, 0)}" for k in FIELDS)
        self.out.write(f"E {time.time() - self.t0:.1f} {fields} {message}\n")

    def wrap(self, owner, name: str) -> None:
        fn = getattr(owner, name)

        @functools.wraps(fn)
        def traced(*args, **kwargs):
            self.stack.append(name)
            self.mark("> " + name)
            try:
                return fn(*args, **kwargs)
            finally:
                self.mark("< " + name)
                self.stack.pop()

        setattr(owner, name, traced)

    def summary(self) -> None:
        self.rows.append((self.phase, self.peak, self.status()["VmHWM"]))
        print("| phase | peak VmRSS sampled (MiB) | VmHWM at its end (MiB) |")
        print("|---|---|---|")
        for phase, peak, hwm in self.rows:
            print(f"| {phase} | {peak} | {hwm} |")


def stage_peaks(lines: list[str]) -> list[tuple[int, str, int]]:
    """(block, phase, peak VmRSS MiB) per block from a trace's lines: each stage's statistics pass
    ("pass k") and solve ("solve k", from the solve's start to the next pass), then the final pass."""
    peaks: dict[tuple[int, str], int] = {}
    block, stage, phase = 0, 0, None
    for line in lines:
        fields = line.split()
        if len(fields) < 6 or fields[0] not in ("S", "E"):
            continue
        message = " ".join(fields[6:]) if fields[0] == "E" else ""
        if message == "> _process_block":
            block, stage = block + 1, 0
        elif message == "> stage_stats":
            stage += 1
            phase = f"pass {stage}"
        elif message == "> quantize_stage":
            phase = f"solve {stage}"
        elif message == "> _emit_block" or message == "< _process_block":
            phase = None
        if block and phase:
            rss = int(fields[2].split("=")[1])
            peaks[(block, phase)] = max(peaks.get((block, phase), 0), rss)
        if message == "< quantize_stage" and phase == f"solve {stage}":
            phase = f"after solve {stage}"  # the dequantized weights swapped in, the next pass or the final pass
    return [(b, name, peak) for (b, name), peak in peaks.items()]


def first_blocks(walk, count: int):
    """``_walk_blocks`` over the first ``count`` blocks only."""
    def walk_first(run, writer, progress):
        blocks = run.blocks
        run.blocks = blocks[:count]
        try:
            return walk(run, writer, progress)
        finally:
            run.blocks = blocks
    return walk_first


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("trace", help="file for the samples and marks")
    parser.add_argument("--blocks", type=int, default=0, help="quantize only the first K blocks (0: all)")
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)
    opts, args = parser.parse_args(argv[:cut]), argv[cut + 1:]  # after --: the bitsmith command line
    if not args:
        parser.error("give the bitsmith command line after --, e.g. -- quantize MODEL --method gptq --out DIR")
    if args[0] in ARENA_SHARING_COMMANDS:  # as the bitsmith CLI does, before the sampler thread allocates
        share_arenas()
    tracer = Tracer(opts.trace)
    threading.Thread(target=tracer.sample_forever, daemon=True).start()

    import bitsmith.pipeline.layerwise as layerwise
    import bitsmith.pipeline.stages as stages
    from bitsmith.cli import main as cli_main
    from bitsmith.io.checkpoint import CheckpointWriter

    for name in PHASES:
        tracer.wrap(layerwise, name)
    tracer.wrap(stages, "_linear_report")
    tracer.wrap(CheckpointWriter, "add_quantized")
    if opts.blocks:
        layerwise._walk_blocks = first_blocks(layerwise._walk_blocks, opts.blocks)

    class Marks(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            tracer.mark("LOG " + record.getMessage())

    logging.getLogger("bitsmith").addHandler(Marks())
    logging.getLogger("bitsmith").setLevel(logging.INFO)
    rc = cli_main(args)
    tracer.mark(f"END rc={rc}")
    tracer.summary()
    tracer.out.flush()
    with open(opts.trace) as f:
        rows = stage_peaks(f.read().splitlines())
    if rows:
        print("\n| block | phase (stages in run order) | peak VmRSS sampled (MiB) |\n|---|---|---|")
        for block, name, peak in rows:
            print(f"| {block} | {name} | {peak} |")
    return rc


if __name__ == "__main__":
    sys.exit(main())
