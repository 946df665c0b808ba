"""Write a Llama-style checkpoint larger than this machine's memory, with random weights, to show that
quantization streams (issue 22): no such model is available offline, so one is generated on disk.

The default shape is Llama-2-13B's (hidden 5120, 40 layers, intermediate 13824, 40 heads, vocab
32000), bf16: about 26 GB in shards of ~4 GB plus ``model.safetensors.index.json``. Weights are
N(0, 0.02) (quantised to 65,536 levels) from a generator seeded per tensor (``--seed`` + the tensor's
index), so the bytes do not depend on how tensors fall into shards; norms are ones. The tokenizer is SmolLM2's, saved from the
installed ``smollm2-135m`` package, so the folder runs end to end: SmolLM2's ids above the 32,000 of
this vocabulary never occur in the short English prompts used here (random weights: the output only
shows that it runs).

Weights are drawn from a table of N(0, 0.02) quantiles by uniform 16-bit random numbers and written
piece by piece straight into the shard file, so peak memory is one 8 MB piece, not a 4 GB shard, and
the CPU cost is ~1/5 of ``randn`` (the rest is disk). Run under ``nice``::

    python bench/make_big_model.py --out ~/.cache/bitsmith/bench/big13b
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import work_dir  # noqa: E402

SHAPES = {
    "13b": dict(hidden_size=5120, num_hidden_layers=40, intermediate_size=13824, num_attention_heads=40,
                num_key_value_heads=40, vocab_size=32000),
    # the 13B's tensors (same widths, vocabulary, shard layout) with 2 of its 40 blocks: what each
    # quantized tensor costs in memory and time, end to end (inspect, generate) in minutes
    "13b-2layer": dict(hidden_size=5120, num_hidden_layers=2, intermediate_size=13824, num_attention_heads=40,
                       num_key_value_heads=40, vocab_size=32000),
    # a small shape with the same layout, to try the script in seconds
    "tiny": dict(hidden_size=256, num_hidden_layers=2, intermediate_size=512, num_attention_heads=4,
                 num_key_value_heads=4, vocab_size=32000),
}


def tensor_shapes(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor of a Llama checkpoint, in the order Hugging Face writes them."""
    h, inter, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    kv = h // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    out = [("model.embed_tokens.weight", (vocab, h))]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}"
        out += [(f"{p}.input_layernorm.weight", (h,)), (f"{p}.self_attn.q_proj.weight", (h, h)),
                (f"{p}.self_attn.k_proj.weight", (kv, h)), (f"{p}.self_attn.v_proj.weight", (kv, h)),
                (f"{p}.self_attn.o_proj.weight", (h, h)), (f"{p}.post_attention_layernorm.weight", (h,)),
                (f"{p}.mlp.gate_proj.weight", (inter, h)), (f"{p}.mlp.up_proj.weight", (inter, h)),
                (f"{p}.mlp.down_proj.weight", (h, inter))]
    return out + [("model.norm.weight", (h,)), ("lm_head.weight", (vocab, h))]


PIECE = 1 << 22  # values per generated piece (8 MB of bf16): bounds memory whatever the tensor


def normal_table(std: float = 0.02) -> torch.Tensor:
    """65,536 bf16 values at the quantiles (i + 0.5) / 65536 of N(0, std): indexing it with uniform
    random 16-bit numbers draws (quantised) normal weights at a fraction of ``randn``'s cost
    (measured on one 13824 x 5120 tensor, 1 thread: randn + scale + bf16 4.7 s)."""
    p = (torch.arange(65536, dtype=torch.float64) + 0.5) / 65536
    return (torch.special.ndtri(p) * std).to(torch.bfloat16)


def tensor_pieces(shape: tuple[int, ...], seed: int, table: torch.Tensor):
    """The tensor's bf16 values as flat pieces: ones for a norm (1-D), else draws from ``table`` with a
    generator seeded per tensor, so the bytes do not depend on how tensors fall into shards."""
    n = torch.Size(shape).numel()
    if len(shape) == 1:
        yield torch.ones(n, dtype=torch.bfloat16)
        return
    gen = torch.Generator().manual_seed(seed)
    for start in range(0, n, PIECE):
        idx = torch.randint(0, 65536, (min(PIECE, n - start),), generator=gen)
        yield table[idx]


def config_json(cfg: dict) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
            "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False,
            "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2, "attention_bias": False,
            "mlp_bias": False, "initializer_range": 0.02, **cfg}


def write(out: Path, cfg: dict, shard_bytes: int, seed: int) -> int:
    from bitsmith.io.checkpoint import write_safetensors_stream
    from bitsmith.models import open_source

    out.mkdir(parents=True, exist_ok=True)
    shapes = tensor_shapes(cfg)
    groups: list[list[int]] = [[]]
    size = 0
    for i, (_, shape) in enumerate(shapes):  # plan the shards first, so the file names know the count
        nbytes = 2 * torch.Size(shape).numel()
        if groups[-1] and size + nbytes > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(i)
        size += nbytes
    weight_map, total, table = {}, 0, normal_table()
    for k, group in enumerate(groups):
        name = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        t0 = time.perf_counter()
        layout = {shapes[i][0]: (torch.bfloat16, shapes[i][1]) for i in group}
        seeds = {shapes[i][0]: seed + i for i in group}
        tmp = out / f".{name}.partial"
        write_safetensors_stream(tmp, layout, lambda n: tensor_pieces(layout[n][1], seeds[n], table), {"format": "pt"})
        tmp.replace(out / name)
        total += (out / name).stat().st_size
        weight_map.update({n: name for n in layout})
        print(f"{name}: {len(layout)} tensors, {(out / name).stat().st_size / 1e9:.2f} GB in "
              f"{time.perf_counter() - t0:.1f} s", flush=True)
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    (out / "config.json").write_text(json.dumps(config_json(cfg), indent=1))
    open_source("smollm2-135m").tokenizer().save_pretrained(str(out))
    return total


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=None, help="folder to write (default: bench work dir 'big13b')")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="13b")
    ap.add_argument("--shard-gb", type=float, default=4.0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    out = args.out or work_dir("big13b")
    if (out / "config.json").exists():
        print(f"{out} already holds a model; delete it first", file=sys.stderr)
        return 1
    cfg = SHAPES[args.shape]
    params = sum(torch.Size(s).numel() for _, s in tensor_shapes(cfg))
    print(f"writing {params / 1e9:.2f} B parameters (bf16) to {out}", flush=True)
    t0 = time.perf_counter()
    total = write(out, cfg, int(args.shard_gb * 1e9), args.seed)
    print(f"done: {total / 1e9:.2f} GB on disk in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
