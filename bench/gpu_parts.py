"""The parts of bench/gpu_session.py that run on the GPU, one per process (``gpu_session.py --part NAME``).

Each prints a markdown row per measurement as soon as it has it and appends the same figures to
``$OUT/<part>.jsonl``, so a part stopped at its cap keeps what it measured. See gpu_session.py.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time
from pathlib import Path

from common import PROSE, text_path

RESERVE_S = 10  # seconds of a part's cap kept for writing its last row


def _dtype(name: str):
    import torch

    return {"fp16": torch.float16, "bf16": torch.bfloat16}[name]


def jsonl(path: Path, row: dict) -> None:
    with path.open("a") as handle:
        handle.write(json.dumps(row) + "\n")


def load_on(model: str | Path, args: argparse.Namespace):
    """``bitsmith generate --device``'s path: load_model, then ``model.to(device)`` (activations in --dtype)."""
    import torch

    from bitsmith.runtime.load import load_model

    loaded = load_model(model, dtype=_dtype(args.dtype))
    loaded.model.to(torch.device(args.device))
    return loaded


def kernels_by_kind(model) -> dict[str, list[str]]:
    """The kernel names each kind of quantized layer got (q_proj, down_proj, lm_head, ...)."""
    kinds: dict[str, set[str]] = {}
    for name, module in model.named_modules():
        kernel = getattr(module, "kernel_name", None)
        if isinstance(kernel, str):
            kinds.setdefault(name.rsplit(".", 1)[-1], set()).add(kernel)
    return {kind: sorted(names) for kind, names in sorted(kinds.items())}


def decode_rate(loaded, args: argparse.Namespace) -> tuple[float, list[float]]:
    """Median decode tok/s of ``--runs`` greedy generations of ``--new-tokens`` (EOS ignored), after one warm-up."""
    from bitsmith.infer.generate import generate

    def once(tokens: int) -> float:
        result = generate(loaded.model, loaded.tokenizer, args.prompt, max_new_tokens=tokens, stop_at_eos=False)
        return result.decode_tok_s

    once(8)
    rates = [once(args.new_tokens) for _ in range(args.runs)]
    return statistics.median(rates), rates


def prose_windows(tokenizer, count: int):
    from bitsmith.eval.perplexity import convention_adds_bos, tokenize_text, windows

    ids = tokenize_text(tokenizer, text_path(PROSE).read_text(), convention_adds_bos(tokenizer))
    return windows(ids, 512)[:count]


def kld(loaded, reference, wins) -> dict:
    from bitsmith.eval.perplexity import evaluate

    result = evaluate(loaded.model, wins, reference=reference.model).as_dict()
    return {k: result.get(k) for k in ("kld_mean", "kld_p99", "top1", "ppl", "ref_ppl")}


def _row(out: Path, part: str, row: dict) -> None:
    jsonl(out / f"{part}.jsonl", row)
    figures = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items() if v is not None)
    print(f"- {figures}", flush=True)


def rtn_checkpoint(args: argparse.Namespace, spec: str) -> tuple[Path, float]:
    """An RTN checkpoint of the model at ``spec`` (default options), made on the CPU; (path, seconds)."""
    from bitsmith.api import quantize

    t0 = time.perf_counter()
    path = quantize(args.model, args.work / f"rtn-{spec}", spec, "rtn", overwrite=True)
    return path, time.perf_counter() - t0


def part_decode(args: argparse.Namespace) -> int:
    import torch

    deadline = time.monotonic() + (args.cap or 1e9) - RESERVE_S
    print(f"## decode: {args.model}, batch 1, {args.new_tokens} new tokens x {args.runs} runs (median), "
          f"{args.dtype} activations on {args.device}; KLD vs the unquantized {args.dtype} model, {args.windows} x 512 tokens",
          flush=True)
    reference = load_on(args.model, args)
    wins = prose_windows(reference.tokenizer, args.windows)
    base, rates = decode_rate(reference, args)
    _row(args.out, "decode", {"variant": args.dtype, "tok_s": base, "runs": rates, "x_unquantized": 1.0})
    last = 0.0  # seconds the previous variant took: the next is started only if as much is left
    for spec in [s for s in args.variants.split(",") if s]:
        t0 = time.monotonic()
        if t0 + last > deadline:
            _row(args.out, "decode", {"variant": spec, "skipped": f"{deadline - time.monotonic():.0f} s left of the cap"})
            continue
        path, quantize_s = rtn_checkpoint(args, spec)
        loaded = load_on(path, args)
        rate, rates = decode_rate(loaded, args)
        row = {"variant": f"rtn {spec}", "tok_s": rate, "runs": rates, "x_unquantized": rate / base,
               "quantize_cpu_s": quantize_s, "kernels": kernels_by_kind(loaded.model)}
        row.update(kld(loaded, reference, wins))
        _row(args.out, "decode", row)
        del loaded
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        last = time.monotonic() - t0
    return 0


def part_gptq(args: argparse.Namespace) -> int:
    import torch

    from bitsmith.api import quantize
    from bitsmith.calib.data import CalibrationConfig

    device = torch.device(args.device)
    print(f"## gptq: {args.model} {args.gptq_spec} on {args.device}, {args.calib_samples} x 512 calibration tokens", flush=True)
    on_cuda = device.type == "cuda"  # the tests run this part on the CPU with a tiny model
    if on_cuda:
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    path = quantize(args.model, args.work / f"gptq-{args.gptq_spec}", args.gptq_spec, "gptq",
                    calibration=CalibrationConfig(samples=args.calib_samples, seq_len=512), device=args.device,
                    overwrite=True)
    wall = time.perf_counter() - t0
    row = {"variant": f"gptq {args.gptq_spec}", "wall_s": wall, "peak_device_gb": torch.cuda.max_memory_allocated(device) / 1e9 if on_cuda else None,
           "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9}
    _row(args.out, "gptq", row)
    reference = load_on(args.model, args)
    loaded = load_on(path, args)
    _row(args.out, "gptq", {"variant": f"gptq {args.gptq_spec}", **kld(loaded, reference, prose_windows(reference.tokenizer, args.windows))})
    return 0


PART_FUNCTIONS = {"decode": part_decode, "gptq": part_gptq}
