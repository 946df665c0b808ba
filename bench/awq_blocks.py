"""Per-block output error of AWQ variants against plain min/max RTN, on calibration and held-out text.

    python bench/awq_blocks.py --model qwen2.5-coder-1.5b --blocks 1,3 --specs w4g128 \
        --variant new={} --variant old='{"awq_check": false, "awq_clip_damp": 0}' --variant mixed='{"calib": "mixed"}'

The float model runs block by block (one block's weights in memory at a time) over five token sets:
8 x 512 tokens of the State of the Union calibration text from its start (``calib``: what AWQ searched
on until session 13, as the pipeline's search sequences), 8 x 512 of the built-in prose + code text
(``mixed``: AWQ's default since session 13), 4 further sequences of the State of the Union text from
token 10,240 on (held out), and the first 4 windows of the evaluation texts (prose, code). At each
chosen block, every variant transforms a copy of the float block on its search set (the variant's
``"calib"`` key: ``calib``, the default, or ``mixed``), then every linear is quantized with min/max RTN,
and the block's output on each set is compared with the float block's on the same (float) inputs.
Printed per set, as ratios to plain RTN's: the mean squared error and the mean per-token relative
error ``||dy_t||^2 / ||y_t||^2``. Each block sees float inputs (not the quantized earlier blocks' outputs, as the pipeline's blocks do).
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch
from torch import nn


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="qwen2.5-coder-1.5b")
    ap.add_argument("--blocks", default="1", help="comma-separated block indices")
    ap.add_argument("--specs", default="w4g128")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=JSON",
                    help="AWQ options of one variant, e.g. old='{\"awq_check\": false}' (repeatable; default: new={})")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    variants = dict(v.split("=", 1) for v in args.variant) or {"new": "{}"}
    run(args.model, [int(b) for b in args.blocks.split(",")], args.specs.split(","),
        {name: json.loads(text) for name, text in variants.items()})


def token_sets(source, length: int = 512) -> dict[str, torch.Tensor]:
    from bitsmith.calib.data import PROSE_CODE, read_calibration_text
    from bitsmith.eval.domains import builtin_domain
    from bitsmith.eval.perplexity import tokenize_text

    tokenizer = source.tokenizer()

    def ids(text: str, n: int, skip: int = 0) -> torch.Tensor:
        t = torch.tensor(tokenize_text(tokenizer, text), dtype=torch.long)
        return t[skip * length:(skip + n) * length].reshape(n, length)

    calib, mixed = read_calibration_text(), read_calibration_text(PROSE_CODE)
    return {"calib": ids(calib, 8), "mixed": ids(mixed, 8), "heldout": ids(calib, 4, skip=20),
            "prose": ids(builtin_domain("prose").text, 4), "code": ids(builtin_domain("code").text, 4)}


def block_inputs(net: nn.Module, blocks: nn.ModuleList, sets: dict) -> tuple[dict, dict]:
    """Block 0's hidden states and call kwargs per token set (pipeline.capture's recorders)."""
    from bitsmith.pipeline.capture import Recorder

    recorders = [Recorder(b) for b in blocks]
    for i, r in enumerate(recorders):
        blocks[i] = r
    hidden, kwargs = {}, {}
    for name, ids in sets.items():
        for r in recorders:
            r.calls.clear()
        try:
            with torch.no_grad():
                net(input_ids=ids, use_cache=False)
        except Exception:  # the head is on the meta device: only the recorded calls matter
            pass
        hidden[name] = recorders[0].calls[0][0].detach().float().clone()
        kw = dict(recorders[0].calls[0][2])
        kwargs[name] = {k: (None if k in ("past_key_values", "past_key_value", "cache") else v) for k, v in kw.items()}
        kwargs[name]["use_cache"] = False
    for i, r in enumerate(recorders):
        blocks[i] = r.block
    return hidden, kwargs


def errors(block: nn.Module, hidden: dict, kwargs: dict, reference: dict) -> dict[str, tuple[float, float]]:
    out = {}
    for name in reference:
        with torch.no_grad():
            y = block(hidden[name], **kwargs[name])
        y = y[0] if isinstance(y, tuple) else y
        d = (y - reference[name]).pow(2)
        out[name] = (float(d.mean()), float((d.sum(-1) / reference[name].pow(2).sum(-1)).mean()))
    return out


def quantize_linears(block: nn.Module, spec) -> nn.Module:
    from bitsmith.transforms.awq_fast import minmax_qdq

    with torch.no_grad():
        for m in block.modules():
            if isinstance(m, nn.Linear):
                m.weight.copy_(minmax_qdq(m.weight, spec))
    return block


def run(model: str, wanted: list[int], specs: list[str], variants: dict[str, dict]) -> None:
    from bitsmith.methods.rtn import rtn
    from bitsmith.models import build_model, find_blocks, open_source
    from bitsmith.models.arch import load_checked, set_tensor
    from bitsmith.models.meta import meta_model
    from bitsmith.spec import QuantSpec
    from bitsmith.transforms.awq_search import awq_transform

    source = open_source(model)
    prefix, _ = find_blocks(meta_model(source.config))
    net = build_model(source, torch.float32, skip=lambda n: n.startswith(prefix + "."))
    _, blocks = find_blocks(net)
    sets = token_sets(source)
    hidden, kwargs = block_inputs(net, blocks, sets)
    net.get_input_embeddings().to("meta")
    for i in range(max(wanted) + 1):
        block = blocks[i]
        for rel, tensor in block.state_dict(keep_vars=True).items():
            name = f"{prefix}.{i}.{rel}"
            set_tensor(net, name, load_checked(source, name, tensor.shape, torch.float32))
        with torch.no_grad():
            reference = {n: (lambda y: y[0] if isinstance(y, tuple) else y)(block(hidden[n], **kwargs[n])) for n in sets}
        for spec in map(QuantSpec.parse, specs) if i in wanted else []:
            plain = errors(quantize_linears(copy.deepcopy(block), spec), hidden, kwargs, reference)
            print(f"block {i} {spec} rtn: " + " ".join(f"{n} mse={e[0]:.3g} rel={e[1]:.3g}" for n, e in plain.items()))
            for vname, options in variants.items():
                b, t0 = copy.deepcopy(block), time.perf_counter()
                search = options.get("calib", "calib")  # the token set AWQ searches on: calib (prose) or mixed
                report = awq_transform(b, hidden[search], kwargs[search], spec, rtn, {"clip_search": False, **options})
                seconds = time.perf_counter() - t0
                got = errors(quantize_linears(b, spec), hidden, kwargs, reference)
                ratios = " ".join(f"{n} {got[n][0] / plain[n][0]:.3f}/{got[n][1] / plain[n][1]:.3f}" for n in got)
                kept = {"/".join(s.linears).replace("self_attn.", "").replace("mlp.", ""): s.alpha for s in report.scales}
                print(f"block {i} {spec} {vname}: (mse/rel vs rtn) {ratios}  transform {seconds:.0f} s  alphas {kept}  "
                      f"left out: {[s.split(':')[0] for s in report.skipped]}", flush=True)
        hidden = reference
        block.to("meta")


if __name__ == "__main__":
    main()
