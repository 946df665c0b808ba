"""Decode and prefill speed of bitsmith next to llama.cpp, against this machine's memory-bandwidth bound.

One command prints the whole table:

    python bench/speed.py                          # smollm2-135m and qwen2.5-coder-1.5b, 2 threads
    python bench/speed.py --models smollm2-135m    # a subset

For each model: bitsmith fp32, bf16, w8, w4g128 and w4g32 (``generate`` on the lean path: a
``--prompt``-token prompt, then ``--new`` greedy tokens, batch 1), each in its own subprocess so its
peak RSS is its own; then llama.cpp's ``llama-bench`` on the same weights at F16, Q8_0, Q4_0 and
Q4_K_M with the same thread count. The exact llama.cpp commands are printed.

Decode is measured at two depths, both engines alike: after the ``--prompt``-token prompt ("decode": bitsmith's
generate of ``--new`` tokens after the prefill, llama-bench's ``tg`` at ``-d --prompt``) and from an (almost) empty
context ("decode d0": bitsmith from a 1-token prompt, llama-bench's ``tg`` at depth 0). Until session 24 llama.cpp's
decode was taken at depth 0 only and set against bitsmith's after the prompt: on SmolLM2-135M a 512-token cache
slows both engines by ~30%, so that comparison understated bitsmith.

The bound: decode reads every weight of every matmul once per token, so ``bandwidth / weight bytes
per token`` is the fastest possible decode; each decode figure is also given as a fraction of it.
Bandwidth is measured here (best read rate of a 1 GB float32 tensor summed with the same threads)
**right before every single run**, bitsmith's and llama.cpp's alike, and each run's fraction of the
bound uses its own measurement: a shared host's bandwidth drifts by tens of percent between minutes,
so a fraction against one figure taken at the start says more about the drift than the kernel. The
table's "of bound" is the median of a row's per-run fractions, "best of bound" the best one.

After the table, the issue-18 comparisons, each paired within a round (both sides met the same
host) and given as the median and range over rounds: w4g128 against llama.cpp's fastest 4-bit type
of that round (Q4_0 or Q4_K_M, whichever ran faster), w8 against Q8_0, and every narrower variant
(w3*, w2*) against w4g128 as "speed ratio / byte ratio" (1.00 = exactly in proportion to its bytes).

Peak RSS is the process's high-water mark while generating (reset after loading through
/proc/self/clear_refs), shown against the packed size (checkpoint tensor bytes, or the float weights)
plus the KV cache, and also as the growth over the process before the model was loaded (python, torch
and transformers alone take a few hundred MB). The warm-up before it is one generation of the same
shape (the full prompt, 4 new tokens), so the growth is a steady request's, as a server sees after its
first one: the first long prompt of a process also leaves ~17-20 MB of allocator and library state
behind for good (measured on SmolLM2 w4g128), which a warm-up on a short prompt counted as growth.

``--prefill exact,auto`` runs every quantized bitsmith variant under each ``RuntimeOptions.prefill``
mode (``$BITSMITH_PREFILL`` in the child), one after the other within each round, so ``--rounds 5``
gives paired before/after prefill ratios on a shared machine (rows ``w4g128@exact``, ``w4g128@auto``).

Made once and cached under ``--cache`` (default ``speed`` under bench/common.work_dir: ~/.cache/bitsmith/bench): the bitsmith checkpoints (RTN,
no clip search: speed does not depend on the rounding; the layers at the variant's spec, the embedding
and head as ``bitsmith quantize`` sets them without flags: w6g128 under bodies of at most 4 bits, w8 above) and the GGUFs (``llama-quantize --allow-requantize`` of the alias's own GGUF to F16,
then F16 -> Q8_0 / Q4_0 / Q4_K_M, i.e. the same weights as bitsmith's fp32 model; i-quant types, ``IQ3_XXS``
and the like, with an importance matrix from the first 32 x 512 tokens of bitsmith's prose+code calibration mix,
bench/iquant_anchor.py make_imatrix). A checkpoint made elsewhere (a vq or calibrated one, whose making takes
far longer than RTN) joins as one more row with ``--checkpoint MODEL:NAME=PATH``, e.g. the 3-bit vq beside IQ3_XXS:

    python bench/speed.py --models qwen2.5-coder-1.5b --variants w4g128 --gguf-types Q4_0,IQ3_XXS \
        --checkpoint qwen2.5-coder-1.5b:w3g256vq=DIR --prefill exact,auto --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import tools
from common import text_path, work_dir
from iquant_anchor import make_imatrix

LLAMA_BIN = tools.llama_bin_dir()  # `make bench-tools` builds it; without it the llama.cpp rows are skipped
MODELS = ["smollm2-135m", "qwen2.5-coder-1.5b"]
VARIANTS = ["fp32", "bf16", "w8", "w4g128", "w4g32"]
GGUF_TYPES = ["F16", "Q8_0", "Q4_0", "Q4_K_M"]
TEXT = text_path()


# ----------------------------------------------------------------------------- one bitsmith run (child)


def _rss_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _weight_bytes_per_token(model) -> int:
    """Bytes of every matmul weight one decode step reads (the head included, embedding lookups not)."""
    import torch

    from bitsmith.nn.qlinear import QuantLinear

    seen, total, alive = set(), 0, []
    for module in model.modules():
        if isinstance(module, QuantLinear):
            kernel = module._kernel
            # what the decode reads: a fused kernel's views, and a 3-bit kernel's codes as held (to_state would
            # hand back a temporary copy in the file's layout)
            resident = getattr(kernel, "_shared", False) or getattr(kernel, "mixed3", False)
            tensors = ([kernel.qweight, kernel.scale] + ([kernel.zero] if kernel.zero is not None else [])
                       if resident else list(kernel.to_state("x").values()))
            alive += tensors  # a freed temporary's address may come back: keep each alive while addresses are compared
        elif isinstance(module, torch.nn.Linear):
            tensors = [module.weight]
        else:
            continue
        for t in tensors:
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
    return total


def _resident_tensor_bytes(model) -> int:
    """Bytes of every tensor the loaded model keeps (parameters, buffers, packed kernel tensors,
    quantized embedding codes), each storage once: what RSS would be with nothing else around."""
    from bitsmith.nn.qembedding import QuantEmbedding
    from bitsmith.nn.qlinear import QuantLinear

    seen, total = set(), 0

    def add(t) -> None:
        nonlocal total
        if t is not None and t.untyped_storage().data_ptr() not in seen:
            seen.add(t.untyped_storage().data_ptr())
            total += t.untyped_storage().nbytes()

    for mod in model.modules():
        for t in [*mod.parameters(recurse=False), *mod.buffers(recurse=False)]:
            add(t)
        if isinstance(mod, QuantLinear):
            for t in (mod._kernel.qweight, mod._kernel.scale, getattr(mod._kernel, "zero", None)):
                add(t)
        if isinstance(mod, QuantEmbedding):
            for t in mod.held_tensors():
                add(t)
    return total


def child(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    from bitsmith.infer.generate import generate
    from bitsmith.runtime.load import load_model

    base_rss = _rss_mb("VmRSS")
    source = args.child_model
    if args.child_variant in ("fp32", "bf16"):
        loaded = load_model(source, dtype=torch.float32 if args.child_variant == "fp32" else torch.bfloat16)
        packed = sum(p.numel() * p.element_size() for p in loaded.model.parameters())
    else:
        loaded = load_model(args.child_path)
        packed = sum(f.stat().st_size for f in Path(args.child_path).glob("*.safetensors"))
    model, tok = loaded.model, loaded.tokenizer
    ids = tok(TEXT.read_text(encoding="utf-8")[: 8 * args.prompt])["input_ids"][: args.prompt]
    prompt = tok.decode(ids)
    # warm-up, the same shape as the measured request: kernel builds, allocator pools, thread pool
    generate(model, tok, prompt, max_new_tokens=4, stop_at_eos=False, lean=not args.hf)
    import ctypes
    import gc

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed loader buffers back to the OS: RSS shows what is live
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the RSS high-water mark: the peak below is generation's own
    except OSError:
        pass
    before = _rss_mb("VmRSS")
    result = generate(model, tok, prompt, max_new_tokens=args.new, stop_at_eos=False, lean=not args.hf)
    peak = _rss_mb("VmHWM")
    # decode from an (almost) empty context too: llama-bench's tg at depth 0 is that, and its tg at
    # depth --prompt is the run above; a 512-token cache costs SmolLM2's decode ~30% on both engines
    short = tok.decode(ids[:1])
    fresh = generate(model, tok, short, max_new_tokens=args.new, stop_at_eos=False, lean=not args.hf)
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    from bitsmith.infer.lean import kv_cache_dtype
    from bitsmith.runtime.options import RuntimeOptions

    kv_choice = RuntimeOptions.from_env().kv_cache
    kv_dtype_bytes = kv_cache_dtype(torch.bfloat16 if args.child_variant == "bf16" else torch.float32, kv_choice).itemsize
    kv = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * (result.prompt_tokens + args.new) * kv_dtype_bytes
    print("RESULT " + json.dumps({
        "prompt_tokens": result.prompt_tokens, "new_tokens": result.new_tokens,
        "prefill_tok_s": result.prefill_tok_s, "decode_tok_s": result.decode_tok_s,
        "decode_d0_tok_s": fresh.decode_tok_s, "d0_prompt_tokens": fresh.prompt_tokens,
        "weight_bytes": _weight_bytes_per_token(model), "packed_bytes": packed, "kv_bytes": kv,
        "peak_rss_mb": peak, "rss_before_mb": before, "base_rss_mb": base_rss,
        "resident_bytes": _resident_tensor_bytes(model),
    }), flush=True)


# ----------------------------------------------------------------------------- preparation


def _output_specs(model: str, specs: dict) -> tuple[str, str]:
    """The embedding table's and the head's specs in a plan's per-layer ``specs`` (tied: the table's twice)."""
    from bitsmith.models import embedding_and_head_names, open_source
    from bitsmith.models.meta import meta_model

    table, head = (n and n.removesuffix(".weight") for n in embedding_and_head_names(meta_model(open_source(model).config)))
    return str(specs[table]), str(specs[head or table])


def checkpoint(cache: Path, model: str, variant: str) -> Path:
    """A bitsmith checkpoint of ``model`` at ``variant`` (made once): layers at the spec, the embedding
    and the head (tied or not) at the spec ``bitsmith quantize`` gives them without flags
    (pipeline.outputs.default_output_spec: w6g128 under bodies of at most 4 bits, w8 above, as llama.cpp
    keeps its output at Q6_K / Q8_0; an untied table w4g128 under those bodies since session 29). The
    folder name carries the output spec unless it is w8 (the recipe of sessions before 24, whose folders
    stay valid for w8 outputs), and a narrower table's spec after ``-emb``."""
    from bitsmith.pipeline.outputs import AUTO, with_output_spec
    from bitsmith.pipeline.plan import QuantizePlan
    from bitsmith.pipeline.quantize import quantize
    from bitsmith.spec import QuantSpec

    # the embedding quantized even when untied: otherwise the loader keeps a float32 table (RSS, not speed)
    plan = with_output_spec(QuantizePlan(QuantSpec.parse(variant), "rtn", {"clip_search": False}), model, AUTO)
    table, head = _output_specs(model, plan.layer_specs)
    outputs = head if table == head else f"{head}-emb{table}"  # an untied table narrower than its head (session 29)
    path = cache / (f"{model}-{variant}" + ("" if outputs == "w8" else f"-out{outputs}"))
    if (path / "bitsmith.json").exists():
        made = json.loads((path / "bitsmith.json").read_text()).get("options", {})
        if made.get("quantize_embeddings"):  # this recipe (an older one left a float embedding table)
            return path
    print(f"[prepare] quantizing {model} -> {path} (once)", file=sys.stderr, flush=True)
    quantize(model, path, plan, overwrite=True)
    return path


# i-quant GGUFs (IQ*) get llama.cpp's importance matrix from bitsmith's own calibration mix, as the vq and AWQ
# checkpoints they are compared with calibrate on (bench/iquant_anchor.py make_imatrix: first N x 512 tokens)
IMATRIX_TEXT, IMATRIX_CHUNKS = "prose+code", 32


def ggufs(cache: Path, model: str, types: list[str]) -> dict[str, Path]:
    """llama.cpp files of the alias's weights: requantized to F16 once, then F16 -> each type (i-quants
    with an importance matrix, ``{model}-{type}-imatrix.gguf``)."""
    from bitsmith.models import open_source

    folder = cache / "gguf"
    folder.mkdir(parents=True, exist_ok=True)
    f16 = folder / f"{model}-F16.gguf"
    quantize = str(LLAMA_BIN / "llama-quantize")
    if not f16.exists():
        src = open_source(model).path
        tmp = f16.with_suffix(".tmp")
        subprocess.run([quantize, "--allow-requantize", str(src), str(tmp), "F16", "2"], check=True, capture_output=True)
        tmp.rename(f16)
    out = {}
    for t in types:
        imatrix = t.upper().startswith("IQ")  # llama.cpp refuses most i-quants without one, and users make one
        path = folder / f"{model}-{t}{'-imatrix' if imatrix else ''}.gguf"
        if not path.exists():
            tmp = path.with_suffix(".tmp")
            work = folder / f"{model}-imatrix"  # make_imatrix names its file by chunks and text: one folder per model
            work.mkdir(exist_ok=True)
            extra = ["--imatrix", str(make_imatrix(LLAMA_BIN / "llama-imatrix", f16, work, IMATRIX_CHUNKS, 2,
                                                   IMATRIX_TEXT))] if imatrix else []
            subprocess.run([quantize, *extra, str(f16), str(tmp), t, "2"], check=True, capture_output=True)
            tmp.rename(path)
        out[t] = path
    return out


def gguf_weight_bytes(path: Path) -> int:
    """Bytes of the matmul weights a decode step reads: every 2-D tensor, but the token embedding
    only when it doubles as the output (no output.weight)."""
    from bitsmith.io.gguf.inspect import inspect_gguf

    tensors = inspect_gguf(path).tensors
    has_output = any(t.name == "output.weight" for t in tensors)
    total = 0.0
    for t in tensors:
        if len(t.shape) != 2 or (t.name == "token_embd.weight" and has_output):
            continue
        total += t.numel * t.bits_per_weight / 8
    return int(total)


# ----------------------------------------------------------------------------- measurements (parent)


def bandwidth_gbs(threads: int) -> float:
    """Best read bandwidth: sum a 1 GB float32 tensor (far larger than any cache)."""
    import torch

    torch.set_num_threads(threads)
    x = torch.ones(256 << 20)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
    del x
    return (1 << 30) / best / 1e9


W4_TARGET = {"smollm2-135m": 1.2}  # issue 18: small models are overhead-bound, so more than parity is asked (else 1.0x)
DEPTHS = {"decode_tok_s": "after the prompt", "decode_d0_tok_s": "from an empty context"}  # key -> how it is shown


def _of_bound(r: dict, key: str = "decode_tok_s") -> float:
    """A run's decode as a fraction of the bound at the bandwidth measured just before it (weights only:
    after the prompt the KV cache is read too, which the bound leaves out)."""
    return r.get(key, 0.0) * r["weight_bytes"] / (r["bandwidth_gbs"] * 1e9)


def paired(a: list[dict], b: list[dict], value) -> list[float]:
    """Sorted per-round ratios ``value(a_i) / value(b_i)`` of two rows' runs (round i of each met the same host)."""
    return sorted(value(x) / value(y) for x, y in zip(a, b) if value(y) > 0)


def describe(ratios: list[float]) -> str:
    """'1.23x (median of 3 paired rounds, range 1.10-1.31)'; one round: '1.23x'."""
    text = f"{statistics.median(ratios):.2f}x"
    return text + (f" (median of {len(ratios)} paired rounds, range {ratios[0]:.2f}-{ratios[-1]:.2f})" if len(ratios) > 1 else "")


def decode_comparisons(runs: dict, model: str, ours: str) -> list[str]:
    """Issue 18's decode must-shows for ``model`` from ``runs`` [(model, engine, label)] -> one result per
    round, at both depths (after the prompt, from an empty context; both engines decode at the same
    depth): w4g128 against llama.cpp's fastest 4-bit type of each round, w8 against Q8_0, the narrower
    variants against w4g128 in proportion to their bytes, and w4g128's fraction of the bound."""
    lines = []
    w4 = runs.get((model, ours, "w4g128"))
    fours = [runs[model, "llama.cpp", t] for t in ("Q4_0", "Q4_K_M") if (model, "llama.cpp", t) in runs]
    w8, q8 = runs.get((model, ours, "w8")), runs.get((model, "llama.cpp", "Q8_0"))
    for key, where in DEPTHS.items():
        decode = lambda r: r.get(key, 0.0)  # noqa: E731
        if w4 and fours:
            best = [max(rounds, key=decode) for rounds in zip(*fours)]  # each round's faster 4-bit type
            names = sorted({r["gguf_type"] for r in best})
            lines.append(f"{model}: decode {where}: w4g128 / llama.cpp's fastest 4-bit ({'/'.join(names)}) = "
                         f"{describe(paired(w4, best, decode))} (target >= {W4_TARGET.get(model, 1.0):.1f}x)")
        if w8 and q8:
            lines.append(f"{model}: decode {where}: w8 / llama.cpp Q8_0 = {describe(paired(w8, q8, decode))} (target >= 1.0x)")
        if w4:
            for (m, engine, label), rs in runs.items():
                if m == model and engine == ours and label[:2] in ("w3", "w2"):
                    speed = paired(rs, w4, decode)
                    share = paired(rs, w4, lambda r: decode(r) * r["weight_bytes"])  # (speed ratio) / (byte ratio)
                    lines.append(f"{model}: decode {where}: {label} / w4g128 = {describe(speed)}; bytes w4g128 / {label} = "
                                 f"{w4[0]['weight_bytes'] / rs[0]['weight_bytes']:.2f}x; speed ratio / byte ratio = "
                                 f"{describe(share)} (1.00 = in proportion)")
            fractions = sorted(_of_bound(r, key) for r in w4)
            lines.append(f"{model}: decode {where}: w4g128 of the weights' bound (each run against the bandwidth "
                         f"measured just before it): median {statistics.median(fractions):.1%}, best {fractions[-1]:.1%} "
                         "(target >= 95%)")
    return lines


def extra_checkpoints(specs: list[str], models: list[str]) -> dict[tuple[str, str], Path]:
    """``--checkpoint MODEL:NAME=PATH`` values as {(model, name): path}; a malformed one, a model not in
    ``--models`` or a folder without bitsmith.json ends the run with a message."""
    out = {}
    for spec in specs:
        head, eq, path = spec.partition("=")
        model, colon, name = head.partition(":")
        if not (eq and colon and model and name and path):
            raise SystemExit(f"--checkpoint {spec!r}: expected MODEL:NAME=PATH, e.g. qwen2.5-coder-1.5b:w3g256vq=DIR")
        if model not in models:
            raise SystemExit(f"--checkpoint {spec!r}: {model} is not in --models ({', '.join(models)})")
        if not (Path(path) / "bitsmith.json").exists():
            raise SystemExit(f"--checkpoint {spec!r}: {path} is not a bitsmith checkpoint (no bitsmith.json)")
        out[model, name] = Path(path)
    return out


def run_bitsmith(args: argparse.Namespace, model: str, variant: str, path: Path | None, prefill: str = "") -> dict | None:
    cmd = [sys.executable, __file__, "--child-model", model, "--child-variant", variant, "--threads", str(args.threads),
           "--prompt", str(args.prompt), "--new", str(args.new)]
    if path is not None:
        cmd += ["--child-path", str(path)]
    if args.hf:
        cmd += ["--hf"]
    env = dict(os.environ, BITSMITH_PREFILL=prefill) if prefill else None
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    print(f"[bitsmith {model} {variant}] failed:\n{done.stderr[-1500:]}", file=sys.stderr)
    return None


def run_llamacpp(args: argparse.Namespace, path: Path) -> tuple[dict | None, str]:
    """llama-bench's prefill of --prompt tokens (from an empty context), and its decode of --new tokens at
    depth --prompt (after a --prompt-token context, as bitsmith's generate decodes) and at depth 0."""
    base = [str(LLAMA_BIN / "llama-bench"), "-m", str(path), "-t", str(args.threads), "-r", str(args.reps), "-o", "json",
            *args.llama_args.split()]
    cmds = [base + ["-p", str(args.prompt), "-n", "0"], base + ["-p", "0", "-n", str(args.new), "-d", f"0,{args.prompt}"]]
    shown = "\n  ".join(" ".join(c) for c in cmds)
    out: dict = {}
    for cmd in cmds:
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            print(f"[llama-bench] failed: {done.stderr[-800:]}", file=sys.stderr)
            return None, shown
        for row in json.loads(done.stdout):  # several configurations (--llama-args "--repack 0,1"): the best of each
            if row.get("n_gen", 0) == 0:
                key = "prefill_tok_s"
            else:
                key = "decode_d0_tok_s" if row.get("n_depth", 0) == 0 else "decode_tok_s"
            out[key] = max(out.get(key, 0.0), row["avg_ts"])
    return out, shown


def _memory(r: dict) -> list[str] | None:
    """packed+KV, resident tensors, RSS growth while generating, their ratio, whole-process peak (MB)."""
    if "packed_bytes" not in r:
        return None
    need = (r["packed_bytes"] + r["kv_bytes"]) / 1e6
    tensors = r["resident_bytes"] / 1e6
    growth = max(r["peak_rss_mb"] - r["rss_before_mb"], 0.0) * 1.048576
    return [f"{need:.0f}", f"{tensors:.0f}", f"{growth:.0f}", f"{(tensors + growth) / need:.2f}", f"{r['peak_rss_mb'] * 1.048576:.0f}"]


def _median_run(results: list[dict]) -> dict:
    """One result per row: the round with the median decode speed (its memory figures too), with the
    median prefill speed of all rounds."""
    ordered = sorted(results, key=lambda r: r.get("decode_tok_s", 0.0))
    chosen = dict(ordered[(len(ordered) - 1) // 2])
    prefill = [r["prefill_tok_s"] for r in results if r.get("prefill_tok_s") is not None]
    if prefill:
        chosen["prefill_tok_s"] = statistics.median(prefill)
    return chosen


def _spread(results: list[dict], key: str) -> str:
    values = [r[key] for r in results if r.get(key) is not None]
    return f"{min(values):.1f}-{max(values):.1f}" if values else ""


SAME_WIDTH = {"w8": "Q8_0", "w4": "Q4_0"}  # variant prefix -> the llama.cpp type its prefill is paired with


def _prefill_summary(runs: dict, models: list[str], variants: list[str], modes: list[str], ours: str) -> None:
    """Paired prefill ratios: each --prefill mode against the first, and against llama.cpp at the same bit
    width (w8 against Q8_0, w4* against Q4_0) when that type ran."""
    prefill = lambda r: r["prefill_tok_s"]  # noqa: E731

    for m in models:
        for v in variants:
            labels = [f"{v}@{mode}" if mode else v for mode in modes]
            if any((m, ours, label) not in runs for label in labels):
                continue
            for label in labels:
                rs = runs[m, ours, label]
                line = f"{m}: {label} prefill median {statistics.median(r['prefill_tok_s'] for r in rs):.1f} tok/s"
                if label != labels[0]:
                    line += f"; / {labels[0]} = {describe(paired(rs, runs[m, ours, labels[0]], prefill))}"
                same = SAME_WIDTH.get(v[:2])  # llama.cpp's type at the same bit width (issue 18: prefill >= 1.5x)
                if same and (m, "llama.cpp", same) in runs:
                    line += f"; / llama.cpp {same} = {describe(paired(rs, runs[m, 'llama.cpp', same], prefill))}"
                print(line)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--gguf-types", default=",".join(GGUF_TYPES))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--reps", type=int, default=2, help="llama-bench repetitions")
    p.add_argument("--llama-args", default="", help="extra llama-bench arguments, e.g. '--repack 0,1' (with lists, "
                                                    "each figure is the best configuration's)")
    p.add_argument("--rounds", type=int, default=1,
                   help="measure everything this many times, interleaved; the table shows medians and ranges and "
                        "the ratios are paired within a round (a shared host's bandwidth drifts by tens of percent)")
    p.add_argument("--cache", type=Path, default=None, help="checkpoint cache (default: work_dir('speed'))")
    p.add_argument("--no-llamacpp", action="store_true")
    p.add_argument("--prepare-only", action="store_true", help="make the checkpoints and GGUFs, measure nothing")
    p.add_argument("--hf", action="store_true", help="bitsmith on the Hugging Face forward instead of the lean path")
    p.add_argument("--prefill", default="", help="RuntimeOptions.prefill modes (exact, int8, bf16, auto), comma-separated: "
                                                 "each quantized variant runs under each, alternating within a round")
    p.add_argument("--checkpoint", action="append", default=[], metavar="MODEL:NAME=PATH",
                   help="a bitsmith checkpoint made elsewhere (a vq or calibrated one) as one more row of MODEL, named "
                        "NAME, e.g. qwen2.5-coder-1.5b:w3g256vq=DIR; repeatable")
    p.add_argument("--child-model", help=argparse.SUPPRESS)
    p.add_argument("--child-variant", help=argparse.SUPPRESS)
    p.add_argument("--child-path", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child_model:
        child(args)
        return 0

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    types = [t.strip() for t in args.gguf_types.split(",") if t.strip()]
    modes = [t.strip() for t in args.prefill.split(",") if t.strip()] or [""]
    llamacpp = not args.no_llamacpp and (LLAMA_BIN / "llama-bench").exists()
    if not args.no_llamacpp and not llamacpp:
        print(f"llama-bench not found in {LLAMA_BIN}; llama.cpp rows skipped (`make bench-tools` builds it)", file=sys.stderr)
    args.cache = args.cache or work_dir("speed")
    args.cache.mkdir(parents=True, exist_ok=True)
    extra = extra_checkpoints(args.checkpoint, models)  # before any quantizing: a wrong argument fails at once
    paths = {(m, v): checkpoint(args.cache, m, v) for m in models for v in variants if v not in ("fp32", "bf16")}
    paths.update(extra)
    files = {m: ggufs(args.cache, m, types) for m in models} if llamacpp else {}
    if args.prepare_only:
        return 0

    start = time.time()
    load_start = os.getloadavg()
    bandwidths: list[float] = []  # one measurement right before every run
    ours = "bitsmith" + (" (HF fwd)" if args.hf else "")
    runs: dict[tuple[str, str, str], list[dict]] = {}  # (model, engine, variant) -> one result per round
    commands: list[str] = []
    for round_ in range(args.rounds):
        for m in models:
            for v in variants + [name for (mm, name) in extra if mm == m]:
                for mode in (modes if (m, v) in paths else [""]):
                    label = f"{v}@{mode}" if mode else v
                    bw_now = bandwidth_gbs(args.threads)
                    r = run_bitsmith(args, m, v, paths.get((m, v)), mode)
                    if r is not None:
                        r["bandwidth_gbs"] = bw_now
                        bandwidths.append(bw_now)
                        runs.setdefault((m, ours, label), []).append(r)
                    print(f"[done {round_ + 1}/{args.rounds}] {m} bitsmith {label}", file=sys.stderr, flush=True)
            for t, path in files.get(m, {}).items():
                bw_now = bandwidth_gbs(args.threads)
                r, cmd = run_llamacpp(args, path)
                if round_ == 0:
                    commands.append(cmd)
                if r is not None:
                    r.update(weight_bytes=gguf_weight_bytes(path), bandwidth_gbs=bw_now, gguf_type=t)
                    bandwidths.append(bw_now)
                    runs.setdefault((m, "llama.cpp", t), []).append(r)
                print(f"[done {round_ + 1}/{args.rounds}] {m} llama.cpp {t}", file=sys.stderr, flush=True)
    rows = [(m, e, v, _median_run(rs)) for (m, e, v), rs in runs.items()]
    if not bandwidths:
        print("no run succeeded", file=sys.stderr)
        return 1
    bw = statistics.median(bandwidths)

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"batch 1, {args.prompt}-token prompt then {args.new} new tokens (decode), and {args.new} new tokens "
                        f"from a 1-token prompt (decode d0; llama-bench: tg at depth 0), {args.threads} threads; "
                        f"read bandwidth median {bw:.1f} GB/s ({min(bandwidths):.1f}-{max(bandwidths):.1f} over "
                        f"{len(bandwidths)} runs, measured before each)")
    for col in ("model", "engine", "weights", "MB/token", "prefill tok/s", "decode tok/s", "decode d0 tok/s", "bound tok/s",
                "of bound", "d0 of bound", "packed+KV MB", "tensors MB", "gen. growth MB", "mem/(packed+KV)", "peak RSS MB",
                *(["decode min-max"] if args.rounds > 1 else [])):
        table.add_column(col, justify="left" if col in ("model", "engine", "weights") else "right")
    for m, engine, v, r in rows:
        rs = runs[m, engine, v]
        bound = statistics.median(x["bandwidth_gbs"] for x in rs) * 1e9 / r["weight_bytes"]
        fractions = [_of_bound(x) for x in rs]
        mem = _memory(r)
        rate = lambda x: f"{x:.1f}" if x >= 10 else f"{x:.2f}"  # noqa: E731
        table.add_row(m, engine, v, f"{r['weight_bytes'] / 1e6:.0f}", rate(r.get("prefill_tok_s", float("nan"))),
                      rate(r.get("decode_tok_s", float("nan"))), rate(r.get("decode_d0_tok_s", float("nan"))), rate(bound),
                      f"{statistics.median(fractions):.1%}", f"{statistics.median(_of_bound(x, 'decode_d0_tok_s') for x in rs):.1%}",
                      *(mem if mem else [""] * 5),
                      *([_spread(runs[m, engine, v], "decode_tok_s")] if args.rounds > 1 else []))
    Console(width=220).print(table)

    def find(m: str, engine: str, v: str) -> dict | None:
        return next((r for mm, e, vv, r in rows if mm == m and e.startswith(engine) and vv == v), None)

    for m in models:
        w4, fp32 = find(m, "bitsmith", "w4g128"), find(m, "bitsmith", "fp32")
        if w4 and fp32:
            print(f"{m}: w4g128 decode / fp32 decode = {w4['decode_tok_s'] / fp32['decode_tok_s']:.2f}x (target >= 3x)")
        for line in decode_comparisons(runs, m, ours):
            print(line)
        if w4:
            need, tensors, growth, ratio, peak = _memory(w4)
            print(f"{m}: w4g128 resident tensors {tensors} MB + growth while generating {growth} MB = {ratio}x packed+KV "
                  f"({need} MB; target <= 1.3x); whole-process peak RSS {peak} MB, {w4['base_rss_mb']:.0f} MB of it "
                  "python/torch before loading")
    _prefill_summary(runs, models, variants, modes, ours)
    if commands:
        print("llama.cpp commands:")
        for c in commands:
            print("  " + c)
    print(f"load average at start {load_start[0]:.2f}, at end {os.getloadavg()[0]:.2f}; {time.time() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
