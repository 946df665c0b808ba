"""compressed-tensors export and lm-evaluation-harness on a real model (issue 21, part D).

For each spec: quantize (RTN) -> export --to compressed-tensors -> check, and print
- file sizes (checkpoint, export),
- the compressed-tensors package's own decompression against bitsmith's dequantized weights (max |diff|),
- transformers' from_pretrained (compressed-tensors support, CPU, float32) logits against bitsmith's
  exact float path on the evaluation prose: max |logit diff| and top-1 agreement,
- the import back (bitsmith load of the exported folder): max |logit diff| against the checkpoint.
Then (--lm-eval) the harness's table for the unquantized model and each --lm-eval-specs checkpoint on
bitsmith's two local tasks.

    python bench/export_ct.py --model smollm2-135m --specs w4g128,w8 --lm-eval-specs w4g128,w3g128
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import text_path, work_dir  # noqa: E402


def size_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6


def checkpoint(model: str, spec: str, work: Path) -> Path:
    from bitsmith.pipeline.plan import QuantizePlan
    from bitsmith.pipeline.quantize import quantize
    from bitsmith.spec import QuantSpec

    out = work / f"ck-{spec}"
    if not out.exists():
        quantize(model, out, QuantizePlan(QuantSpec.parse(spec)))
    return out


def decompression_diff(ck: Path, folder: Path) -> tuple[float, float, int]:
    """compressed-tensors' PackedQuantizationCompressor.decompress of every layer vs bitsmith's dequantize()
    (a quantized embedding, which compressed-tensors has no scheme for, is compared as written: dequantized).
    Returns (max |diff| over the packed layers, max |diff| over the layers written dequantized, their count)."""
    import json

    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from safetensors.torch import load_file

    from bitsmith.io.checkpoint import read_info
    from bitsmith.io.import_ct import scheme_of
    from bitsmith.io.packed import quantized_tensors

    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    groups = [(g["targets"], g["weights"]) for g in qc["config_groups"].values()]
    state = load_file(str(folder / "model.safetensors"))
    worst, written, n_written = 0.0, 0.0, 0
    for name, qt in quantized_tensors(ck, read_info(ck)).items():
        parts = {k.rpartition(".")[2]: v for k, v in state.items() if k.rpartition(".")[0] == name}
        args = scheme_of(name, groups)
        if args is None or "weight_packed" not in parts:  # a quantized embedding: written dequantized (no CT scheme)
            written = max(written, float((parts["weight"].float() - qt.dequantize()).abs().max()))
            n_written += 1
            continue
        scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**args))
        w = PackedQuantizationCompressor.decompress(parts, scheme)["weight"]
        worst = max(worst, float((w.float() - qt.dequantize()).abs().max()))
    return worst, written, n_written


def logits_on_prose(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits.float()[0]


def check(model: str, spec: str, work: Path, ids: torch.Tensor, given: Path | None = None) -> None:
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    from bitsmith.io.export_ct import export_ct
    from bitsmith.runtime.load import load_model
    from bitsmith.runtime.options import RuntimeOptions

    exact = RuntimeOptions(int8_decode=False, prefill="exact")
    ck = given or checkpoint(model, spec, work)
    folder = work / f"ct-{spec}"
    t = time.perf_counter()
    export_ct(ck, folder, overwrite=True)
    export_s = time.perf_counter() - t
    ours = logits_on_prose(load_model(ck, options=exact).model, ids)
    back = logits_on_prose(load_model(folder, options=exact).model, ids)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                              quantization_config=CompressedTensorsConfig(dequantize=True))
    theirs = logits_on_prose(hf, ids)
    top1 = float((ours.argmax(-1) == theirs.argmax(-1)).float().mean())
    print(f"{spec}: checkpoint {size_mb(ck):.1f} MB, compressed-tensors {size_mb(folder):.1f} MB (export {export_s:.1f} s)")
    packed, written, n_written = decompression_diff(ck, folder)
    print(f"{spec}: compressed-tensors decompress vs bitsmith dequantize: max |diff| {packed}")
    if n_written:
        print(f"{spec}: {n_written} quantized embedding(s) written dequantized (compressed-tensors has no embedding "
              f"scheme), stored dtype vs bitsmith dequantize: max |diff| {written}")
    print(f"{spec}: transformers from_pretrained vs bitsmith logits ({ids.shape[1]} tokens): max |diff| "
          f"{float((ours - theirs).abs().max()):.3g}, top-1 agreement {top1:.4f}")
    print(f"{spec}: bitsmith import of the folder vs the checkpoint: max |logit diff| {float((ours - back).abs().max())}", flush=True)


def lm_eval_tables(model: str, specs: list[str], work: Path, limit: int | None, given: dict[str, str]) -> None:
    """The harness's table for the unquantized model and each spec (its checkpoint from ``given``
    when named there, else quantized with RTN into ``work``)."""
    from bitsmith.eval.harness import LOCAL_TASKS, harness_table, parse_tasks, run_harness
    from bitsmith.runtime.load import load_model

    tasks, manager = parse_tasks(",".join(LOCAL_TASKS))
    for name, path in [("fp32", model)] + [(s, given.get(s) or checkpoint(model, s, work)) for s in specs]:
        t = time.perf_counter()
        results = run_harness(load_model(path), tasks, manager, limit=limit)
        print(f"\n### {name}: {path}, {time.perf_counter() - t:.0f} s\n", flush=True)
        print(harness_table(results), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--specs", default="w4g128,w8")
    p.add_argument("--lm-eval-specs", default="w4g128,w3g128")
    p.add_argument("--tokens", type=int, default=512, help="prose tokens for the logit comparison")
    p.add_argument("--limit", type=int, default=None, help="harness documents per task (default all)")
    p.add_argument("--lm-eval-checkpoints", default="", help="SPEC=DIR[,SPEC=DIR]: existing checkpoints for --lm-eval-specs")
    p.add_argument("--checkpoints", default="", help="SPEC=DIR[,SPEC=DIR]: existing checkpoints for --specs "
                   "(e.g. made with `bitsmith quantize`), instead of quantizing with RTN here")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--skip-export", action="store_true")
    p.add_argument("--skip-lm-eval", action="store_true")
    args = p.parse_args()
    from bitsmith.models import open_source

    if args.threads:
        torch.set_num_threads(args.threads)
    work = work_dir(f"export-ct-{args.model}")
    tok = open_source(args.model).tokenizer()
    ids = torch.tensor([tok.encode(text_path().read_text(encoding="utf-8")[:20000])[: args.tokens]])
    if not args.skip_export:
        for spec in args.specs.split(","):
            made = dict(item.split("=", 1) for item in args.checkpoints.split(",") if item)
            check(args.model, spec, work, ids, Path(made[spec]).expanduser() if spec in made else None)
    if not args.skip_lm_eval:
        given = dict(item.split("=", 1) for item in args.lm_eval_checkpoints.split(",") if item)
        lm_eval_tables(args.model, args.lm_eval_specs.split(","), work, args.limit, given)


if __name__ == "__main__":
    main()
