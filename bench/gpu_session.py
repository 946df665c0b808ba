"""One GPU session: what issue 18 asks a lent GPU to measure, in one command, under 8 minutes.

    timeout 480 python bench/gpu_session.py --out $OUT [--model FOLDER]

A model file cannot travel to a lent GPU machine (64 MiB per call), so a session first runs, where the
model is installed, ``python bench/gpu_session.py --prepare .gpu_session/qwen`` (its config and tokenizer,
~11 MB, no weights), carries that folder and passes it as ``--model``: the script then draws random weights
of the model's shapes there, once (decode and GPTQ times depend on shapes; every row says ``weights``).

Parts, in this order, each in its own process under a time cap (GPU memory and peaks start clean for
each). A part that would get less than half its cap from what is left of ``--budget`` is skipped with a
line saying so; one that overruns its cap is stopped and keeps what it printed (rows are printed as they
are measured). The timetable is printed at the end and written to ``$OUT/timetable.md``; each part's
output is ``$OUT/<part>.log``, its figures ``$OUT/<part>.jsonl`` (one JSON object per measured row).

  decode   batch-1 greedy decode of Qwen2.5-Coder-1.5B through the path ``bitsmith generate --device cuda``
           takes (``load_model``, ``model.to(device)``, ``generate`` on the lean runner): the unquantized model,
           then RTN checkpoints w4g128, w8, w3g128 (quantized here, on the CPU, default options: clip search,
           w8 embedding and head). Per row: tok/s (median of ``--runs`` after a warm-up), the ratio to the
           unquantized row, the kernel each layer kind got (``QuantLinear.kernel_name``), and KLD / top-1
           against the unquantized model on ``--windows`` windows of 512 tokens of the prose text. A
           variant that would not finish before the part's cap is skipped with a line.
  gptq     ``bitsmith.quantize(..., method="gptq", device=...)`` w4g128 on the 1.5B (128 x 512 tokens of the
           calibration text, as the CLI's default): wall seconds, peak device memory
           (``torch.cuda.max_memory_allocated``), peak RSS; then the checkpoint's KLD against the unquantized
           model, as in decode.
  kernels  ``bench/gpu_kernels.py``'s table on the 1.5B's shapes.

The reference is the unquantized model in ``--dtype`` (fp16 by default) on the GPU, not PROTOCOL's float32:
the KLD figures say so. Nothing is downloaded: the model is the installed package's, or a prepared folder
given random weights. Without CUDA the script says so and runs nothing. Checkpoints go to ``--work`` (default: bench/common.py's work folder).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent
MIN_SHARE = 0.5  # a part starts only if at least this share of its cap is left of the budget


@dataclass(frozen=True)
class Part:
    name: str
    cap_s: float  # the most seconds it may run
    about: str


PARTS = (
    Part("decode", 230, "batch-1 decode tok/s and KLD: unquantized vs RTN w4g128, w8, w3g128"),
    Part("gptq", 170, "GPTQ w4g128 on the GPU: wall s, peak device memory, KLD"),
    Part("kernels", 50, "bench/gpu_kernels.py's table"),
)


@dataclass
class Row:
    part: str
    cap_s: float
    status: str  # ok, stopped at cap, failed (rc N), skipped
    wall_s: float
    note: str = ""


Runner = Callable[[Part, float], tuple[str, str]]  # (part, cap seconds) -> (status, note)


def run_timetable(parts: list[Part], budget_s: float, runner: Runner, clock: Callable[[], float] = time.monotonic) -> list[Row]:
    """Run ``parts`` in order within ``budget_s`` seconds: each under min(its cap, what is left), or
    skipped when that is less than ``MIN_SHARE`` of its cap."""
    start, rows = clock(), []
    for part in parts:
        left = budget_s - (clock() - start)
        if left < MIN_SHARE * part.cap_s:
            rows.append(Row(part.name, part.cap_s, "skipped", 0.0,
                            f"{max(left, 0):.0f} s left of the {budget_s:.0f} s budget, cap {part.cap_s:.0f} s"))
            continue
        cap = min(part.cap_s, left)
        t0 = clock()
        status, note = runner(part, cap)
        rows.append(Row(part.name, cap, status, clock() - t0, note))
    return rows


def timetable(rows: list[Row], total_s: float) -> str:
    lines = ["| part | cap s | wall s | status | note |", "|---|---|---|---|---|"]
    lines += [f"| {r.part} | {r.cap_s:.0f} | {r.wall_s:.1f} | {r.status} | {r.note} |" for r in rows]
    return "\n".join(lines + [f"\ntotal {total_s:.1f} s"])


def subprocess_runner(args: argparse.Namespace) -> Runner:
    """Each part in its own process (this script with --part, or gpu_kernels.py), output to $OUT/<part>.log."""

    def run(part: Part, cap: float) -> tuple[str, str]:
        if part.name == "kernels":
            command = [sys.executable, str(HERE / "gpu_kernels.py"), "--shapes", args.kernel_shapes]
        else:
            command = [sys.executable, __file__, "--part", part.name, "--cap", f"{cap:.0f}", *forwarded(args)]
        log = args.out / f"{part.name}.log"
        with log.open("w") as handle:
            try:
                rc = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, timeout=cap).returncode
            except subprocess.TimeoutExpired:
                rc = None
        print(log.read_text(), flush=True)
        if rc is None:
            return "stopped at cap", f"its rows so far are in {log.name}"
        return ("ok", "") if rc == 0 else (f"failed (rc {rc})", f"see {log.name}")

    return run


def forwarded(args: argparse.Namespace) -> list[str]:
    """The options a part's process needs, as given to this one."""
    return ["--out", str(args.out), "--work", str(args.work), "--model", args.model, "--device", args.device,
            "--dtype", args.dtype, "--windows", str(args.windows), "--new-tokens", str(args.new_tokens),
            "--runs", str(args.runs), "--prompt", args.prompt, "--variants", args.variants, "--gptq-spec", args.gptq_spec, "--calib-samples", str(args.calib_samples)]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=None, help="folder for the timetable, logs and figures (required but with --prepare)")
    ap.add_argument("--work", type=Path, default=None, help="folder for checkpoints (default: bench work folder gpu-session)")
    ap.add_argument("--budget", type=float, default=455, help="seconds for all parts together (default 455)")
    ap.add_argument("--parts", default=",".join(p.name for p in PARTS), help="which parts, in order (default: all)")
    ap.add_argument("--model", default="qwen2.5-coder-1.5b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", choices=["fp16", "bf16"], default="fp16", help="activations and the unquantized reference")
    ap.add_argument("--variants", default="w4g128,w8,w3g128", help="RTN specs of the decode part, in order")
    ap.add_argument("--windows", type=int, default=4, help="512-token windows of the prose text for KLD")
    ap.add_argument("--new-tokens", type=int, default=64, help="tokens generated per timed run")
    ap.add_argument("--prompt", default="def quicksort(items):\n    ", help="the decode prompt (EOS is ignored: "
                    "every run generates --new-tokens)")
    ap.add_argument("--runs", type=int, default=3, help="timed runs per row (median); one warm-up before")
    ap.add_argument("--gptq-spec", default="w4g128", help="the gptq part's spec (default w4g128)")
    ap.add_argument("--calib-samples", type=int, default=128, help="GPTQ calibration sequences of 512 tokens")
    ap.add_argument("--kernel-shapes", default="8960x1536,1536x8960,151936x1536", help="gpu_kernels.py --shapes")
    ap.add_argument("--prepare", type=Path, default=None, metavar="DIR",
                    help="write --model's config and tokenizer (no weights) to DIR and stop: run here, carry DIR to "
                         "the GPU machine (the model file cannot travel) and pass it there as --model")
    ap.add_argument("--part", default=None, help=argparse.SUPPRESS)  # run one part in this process
    ap.add_argument("--cap", type=float, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.out is None and args.prepare is None:
        ap.error("--out is required: the folder for the timetable, logs and figures (e.g. --out $OUT)")
    known = {p.name for p in PARTS}
    chosen = [p for p in args.parts.split(",") if p]
    if not chosen or any(p not in known for p in chosen):
        ap.error(f"--parts takes a comma-separated list of {', '.join(p.name for p in PARTS)}, got {args.parts!r}")
    if args.windows < 1 or args.runs < 1 or args.new_tokens < 2 or args.calib_samples < 1:
        ap.error("--windows, --runs and --calib-samples must be at least 1 and --new-tokens at least 2")
    return args


def cuda_refusal(device: str) -> str | None:
    """Why this script cannot run here (a line), or None."""
    import torch

    if not device.startswith("cuda"):
        return f"this script measures a CUDA GPU; --device {device} is not one"
    if not torch.cuda.is_available():
        return "no CUDA device: this torch has no CUDA or sees no GPU; nothing was run"
    return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(HERE))  # bench/common.py and bench/gpu_parts.py
    if args.prepare is not None:  # here, where the model is installed: no GPU needed
        from gpu_parts import prepare

        print(f"{prepare(args.model, args.prepare)}: config and tokenizer of {args.model}; carry it to the GPU "
              f"machine and pass it as --model")
        return 0
    if args.part is not None:  # one part, started by the timetable below (which checked the device)
        from gpu_parts import PART_FUNCTIONS

        return PART_FUNCTIONS[args.part](args)
    refusal = cuda_refusal(args.device)
    if refusal:
        print(refusal)
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    if args.work is None:
        from common import work_dir

        args.work = work_dir("gpu-session")
    print(environment(), flush=True)
    parts = [p for name in args.parts.split(",") for p in PARTS if p.name == name]
    start = time.monotonic()
    from gpu_parts import with_weights

    args.model = with_weights(args.model, args.work, args.device)  # a prepared folder: random weights, made once
    print(f"model: {args.model} ({time.monotonic() - start:.1f} s to make ready)", flush=True)
    rows = run_timetable(parts, args.budget - (time.monotonic() - start), subprocess_runner(args))
    table = timetable(rows, time.monotonic() - start)
    (args.out / "timetable.md").write_text(environment() + "\n\n" + table + "\n")
    print(table)
    return 0


def environment() -> str:
    import torch

    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return f"device: {name}; torch {torch.__version__}, CUDA {torch.version.cuda}; python {sys.version.split()[0]}"


if __name__ == "__main__":
    raise SystemExit(main())
