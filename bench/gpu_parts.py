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


SHAPES_ONLY = "SHAPES_ONLY.txt"  # marks a prepared folder: a model's config and tokenizer, no weights
RANDOM_WEIGHTS = "RANDOM_WEIGHTS.txt"  # marks a folder whose weights gpu_session.py drew at random


def prepare(model: str, folder: Path) -> Path:
    """On a machine with ``model`` installed: its config and tokenizer (~11 MB for Qwen2.5-Coder-1.5B, no
    weights) into ``folder``, to carry to the GPU machine, where a 1 GB model file cannot travel."""
    from bitsmith.models import open_source

    source = open_source(model)
    folder.mkdir(parents=True, exist_ok=True)
    source.config.save_pretrained(folder)
    source.tokenizer().save_pretrained(folder)
    (folder / SHAPES_ONLY).write_text(f"{model}'s config and tokenizer; bench/gpu_session.py draws random weights\n")
    return folder


def with_weights(model: str, work: Path, device: str) -> str:
    """The model to measure: ``model`` itself, unless it is a prepared folder (:func:`prepare`): then a
    folder in ``work`` with random weights of its shapes (HF's initialisation, fp16, drawn on ``device``),
    made once. Decode and GPTQ times depend on the shapes, not the values; KLD of random weights says
    nothing about a real model (the rows say ``weights: random``)."""
    import shutil

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(model)
    if not (folder / SHAPES_ONLY).is_file():
        return model
    out = work / f"random-{folder.name}"
    if (out / RANDOM_WEIGHTS).is_file():
        return str(out)
    config = AutoConfig.from_pretrained(folder)
    with torch.device(device):
        net = AutoModelForCausalLM.from_config(config, dtype=torch.float16)
    net.save_pretrained(out)
    for item in folder.iterdir():
        if item.name not in ("config.json", SHAPES_ONLY):
            shutil.copy(item, out / item.name)
    (out / RANDOM_WEIGHTS).write_text(f"random weights of {folder.name}'s shapes (bench/gpu_parts.py with_weights)\n")
    return str(out)


def weights_kind(model: str) -> str:
    return "random" if (Path(model) / RANDOM_WEIGHTS).is_file() else "real"


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


def decode_rate(loaded, args: argparse.Namespace) -> dict:
    """Median decode tok/s of ``--runs`` greedy generations of ``--new-tokens`` (EOS ignored), after one
    warm-up, on generate's lean runner; where that fails on this device, on the Hugging Face forward
    (``path`` says which, ``lean_error`` why)."""
    from bitsmith.infer.generate import generate

    def once(tokens: int, lean: bool) -> float:
        return generate(loaded.model, loaded.tokenizer, args.prompt, max_new_tokens=tokens, stop_at_eos=False,
                        lean=lean).decode_tok_s

    row: dict = {"path": "lean"}
    try:
        once(8, True)
    except Exception as exc:  # noqa: BLE001 -- a one-shot GPU session reports and goes on
        row = {"path": "hf", "lean_error": f"{type(exc).__name__}: {exc}"[:300]}
        once(8, False)
    rates = [once(args.new_tokens, row["path"] == "lean") for _ in range(args.runs)]
    return {"tok_s": statistics.median(rates), "runs": rates, **row}


def attempt(out: Path, part: str, label: str, fn) -> dict | None:
    """``fn()``, or None after writing a row with its error: one failing row must not end a one-shot session."""
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001
        _row(out, part, {"variant": label, "error": f"{type(exc).__name__}: {exc}"[:500]})
        return None


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
    deadline = time.monotonic() + (args.cap or 1e9) - RESERVE_S
    print(f"## decode: {args.model}, batch 1, {args.new_tokens} new tokens x {args.runs} runs (median), "
          f"{args.dtype} activations on {args.device}; KLD vs the unquantized {args.dtype} model, {args.windows} x 512 tokens",
          flush=True)
    reference = load_on(args.model, args)
    wins = prose_windows(reference.tokenizer, args.windows)
    base = attempt(args.out, "decode", args.dtype, lambda: decode_rate(reference, args))
    if base is not None:
        _row(args.out, "decode", {"variant": args.dtype, "weights": weights_kind(args.model), **base, "x_unquantized": 1.0})
    last = 0.0  # seconds the previous variant took: the next is started only if as much is left
    for spec in [s for s in args.variants.split(",") if s]:
        t0 = time.monotonic()
        if t0 + last > deadline:
            _row(args.out, "decode", {"variant": spec, "skipped": f"{deadline - t0:.0f} s left of the cap"})
            continue
        row = attempt(args.out, "decode", f"rtn {spec}", lambda: decode_variant(args, spec, reference, wins))
        if row is not None:
            row["x_unquantized"] = row["tok_s"] / base["tok_s"] if base else None
            _row(args.out, "decode", row)
        last = time.monotonic() - t0
    return 0


def decode_variant(args: argparse.Namespace, spec: str, reference, wins) -> dict:
    """One RTN checkpoint: made on the CPU, loaded onto the device, its decode rate, kernels and KLD."""
    import torch

    path, quantize_s = rtn_checkpoint(args, spec)
    loaded = load_on(path, args)
    row = {"variant": f"rtn {spec}", "weights": weights_kind(args.model), **decode_rate(loaded, args),
           "quantize_cpu_s": quantize_s, "kernels": kernels_by_kind(loaded.model), **kld(loaded, reference, wins)}
    del loaded
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return row


def device_agreement(device: str, out_features: int = 512, in_features: int = 1536, tokens: int = 4096) -> dict:
    """GPTQ w4g128 of one random layer (correlated random inputs) on ``device`` and on the CPU: the share of
    equal codes and each one's relative output error on the inputs (summation order differs, so a few codes
    may differ; the errors should agree to a few percent)."""
    import torch

    from bitsmith.methods import LayerStats
    from bitsmith.methods.gptq import gptq, layer_error
    from bitsmith.spec import QuantSpec

    g = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, in_features, generator=g) @ torch.randn(in_features, in_features, generator=g) / in_features**0.5
    h, w, spec = x.T @ x, torch.randn(out_features, in_features, generator=g) * 0.02, QuantSpec.parse("w4g128")
    stats = LayerStats(hessian=h, importance=h.diagonal() / tokens, tokens=tokens)
    cpu = gptq(w, spec, stats, {})
    dev_stats = LayerStats(hessian=h.to(device), importance=stats.importance.to(device), tokens=tokens)
    on_device = gptq(w.to(device), spec, dev_stats, {}).to("cpu")
    return {"check": f"gptq w4g128 of a random {out_features}x{in_features} layer, {device} vs cpu",
            "codes_equal": float((cpu.codes == on_device.codes).float().mean()),
            "output_error_cpu": layer_error(w, cpu.weight(), h), "output_error_device": layer_error(w, on_device.weight(), h)}


def part_gptq(args: argparse.Namespace) -> int:
    import torch

    from bitsmith.api import quantize
    from bitsmith.calib.data import CalibrationConfig

    device = torch.device(args.device)
    print(f"## gptq: {args.model} {args.gptq_spec} on {args.device}, {args.calib_samples} x 512 calibration tokens", flush=True)
    check = attempt(args.out, "gptq", "device check", lambda: device_agreement(args.device))
    if check is not None:
        _row(args.out, "gptq", check)
    on_cuda = device.type == "cuda"  # the tests run this part on the CPU with a tiny model
    if on_cuda:
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    path = quantize(args.model, args.work / f"gptq-{args.gptq_spec}", args.gptq_spec, "gptq",
                    calibration=CalibrationConfig(samples=args.calib_samples, seq_len=512), device=args.device,
                    overwrite=True)
    wall = time.perf_counter() - t0
    row = {"variant": f"gptq {args.gptq_spec}", "weights": weights_kind(args.model), "wall_s": wall, "peak_device_gb": torch.cuda.max_memory_allocated(device) / 1e9 if on_cuda else None,
           "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9}
    _row(args.out, "gptq", row)
    reference = load_on(args.model, args)
    loaded = load_on(path, args)
    _row(args.out, "gptq", {"variant": f"gptq {args.gptq_spec}", **kld(loaded, reference, prose_windows(reference.tokenizer, args.windows))})
    return 0


PART_FUNCTIONS = {"decode": part_decode, "gptq": part_gptq}
