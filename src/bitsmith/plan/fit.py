"""Memory fit planner: will a model, quantized to b bits, fit in a GPU's memory, and how fast will it run?

Pure arithmetic over an :class:`~bitsmith.plan.catalog.ArchShape`. For each bit width the planner adds

    weights  = block linears x bits_per_weight / 8            (quantized)
             + embedding table (+ untied lm_head) x their bits / 8   (``outputs``: see below)
             + norm weights and biases x 32 / 8
    KV cache = 2 (K and V) x layers x kv_heads x head_dim x ctx x batch x kv_bits_per_value / 8
    overhead = runtime constant (CUDA context, allocator slack) + activations of one prefill chunk

and compares the total with the memory given. When it does not fit, it finds the fewest decoder
layers whose weights must live in CPU RAM and be streamed to the GPU over PCIe for each token
(as accelerate-style offloading does), and estimates decoding speed from memory traffic: decoding is
memory-bound, so a token costs (bytes read from GPU memory) / (GPU bandwidth) plus
(bytes streamed from CPU RAM) / (PCIe bandwidth). A second estimate covers runtimes that instead
*compute* the offloaded layers on the CPU (llama.cpp's partial ``-ngl`` offload): those bytes are
then read from RAM at the CPU's memory bandwidth and never cross PCIe.

Bytes read per decoded token: every quantized linear, the output head and the whole KV cache (an
upper bound: the cache is full only at the end of the context); an untied input embedding is not
read, only one of its rows per token.

The embedding table and the head (``outputs``): ``auto`` counts them as ``bitsmith quantize`` stores
them by default (pipeline.outputs: under bodies of at most 4 bits a w6g128 head and an untied w4g128
table, w8 above; the layout of llama.cpp's Q4_K_M, Q6_K head and Q4_K table); ``16`` keeps both in 16
bit (runtimes that do not quantize them, e.g. a GPTQ/AWQ export served by vLLM); ``level`` counts
them at the level's bits. On Qwen2.5-Coder-1.5B at 4 bits that is 0.31 / 0.93 / 0.25 GB (its w4g128 checkpoint
with the auto outputs stores 1.015 GB; the plan counts 1.003 GB of weights).

Bits per weight include the quantization metadata: a group of ``g`` weights shares one fp16 scale and
one fp16 zero point, so ``bits_per_weight = bits + 32 / g`` (4-bit g128 -> 4.25). A quantized KV
cache is counted like llama.cpp's q8_0 / q4_0 cache types: blocks of 32 values with one fp16 scale,
so 8-bit KV costs 8.5 bits per value and 4-bit KV 4.5.

GB means 10^9 bytes throughout; :func:`parse_size` also accepts GiB (2^30 bytes).
"""
from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from bitsmith.plan.catalog import ArchShape
from bitsmith.spec import BITS_RANGE

__all__ = [
    "DEFAULT_GROUP_SIZE",
    "DEFAULT_LEVELS",
    "FitLevel",
    "FitPlan",
    "PLANNABLE_BITS",
    "Runtime",
    "bits_per_weight",
    "kv_bits_per_value",
    "parse_size",
    "plan",
]

GB = 10**9  # GB means 10^9 bytes (as GPU vendors and disks count), GiB 2^30

DEFAULT_LEVELS: tuple[int, ...] = (16, 8, 6, 5, 4, 3, 2)

# Assumed quantization group size per bit width: 128 weights share one scale and one zero, the usual
# GPTQ/AWQ/HQQ setting; 2 bits needs smaller groups (64) to keep usable quality. 16 bits is plain bf16.
DEFAULT_GROUP_SIZE: dict[int, int] = {8: 128, 6: 128, 5: 128, 4: 128, 3: 128, 2: 64}
SCALE_BITS = 16  # one fp16 scale per group
ZERO_BITS = 16  # one fp16 zero point per group (asymmetric quantization)
UNQUANTIZED_BITS = 16  # weights that are not quantized are stored in bf16/fp16
# The widths bitsmith quantizes to (QuantSpec's 2..8), and 16 for unquantized weights.
PLANNABLE_BITS: tuple[int, ...] = (*BITS_RANGE, UNQUANTIZED_BITS)
EMBEDDING_BITS = 16  # token embedding and lm_head under outputs="16" (and at the 16-bit level)
OUTPUTS = ("auto", "16", "level")  # how the embedding table and the head are counted (module docstring)
NORM_BITS = 32  # norm weights and biases are tiny and kept in fp32
LOGIT_BYTES = 4  # logits of the last position are computed in fp32

CUDA_CONTEXT_GB = 0.5  # CUDA context, cuBLAS workspace and allocator slack on a fresh process
PREFILL_CHUNK_TOKENS = 512  # the prompt is processed in chunks of this many tokens per sequence
ACTIVATION_BYTES = 2  # activations in bf16/fp16
MATERIALIZE_SCORES = True  # eager attention keeps a (heads, chunk, ctx) score matrix; flash does not
PCIE_GB_S = 25.0  # effective host-to-device bandwidth of PCIe 4.0 x16 (32 GB/s peak)
RAM_GB_S = 60.0  # CPU memory bandwidth, dual-channel DDR5 (about 90 GB/s peak, ~60 sustained)
GPU_BANDWIDTH_GB_S = 900.0  # GPU memory bandwidth, roughly an RTX 4090 / A6000-class card
STAGING_LAYERS = 1  # offloading needs room on the GPU for one streamed-in layer at a time
RECOMMENDED_BITS = 4  # level explained when nothing fits: the usual quality/size sweet spot
KV_BITS_CHOICES = (16, 8, 4)
KV_GROUP = 32  # a quantized KV cache stores one fp16 scale per 32 values (llama.cpp q8_0 / q4_0)


@dataclass(frozen=True)
class Runtime:
    """Assumptions about the inference runtime and the machine; every default is a named constant."""

    cuda_context_gb: float = CUDA_CONTEXT_GB
    prefill_chunk: int = PREFILL_CHUNK_TOKENS
    activation_bytes: int = ACTIVATION_BYTES
    materialize_scores: bool = MATERIALIZE_SCORES
    pcie_gb_s: float = PCIE_GB_S
    gpu_bandwidth_gb_s: float = GPU_BANDWIDTH_GB_S
    staging_layers: int = STAGING_LAYERS
    ram_gb_s: float = RAM_GB_S

    def __post_init__(self) -> None:
        if self.pcie_gb_s <= 0 or self.gpu_bandwidth_gb_s <= 0 or self.ram_gb_s <= 0:
            raise ValueError("bandwidths must be positive GB/s, e.g. pcie_gb_s=25, gpu_bandwidth_gb_s=900, ram_gb_s=60")
        if self.prefill_chunk <= 0:
            raise ValueError(f"prefill_chunk must be a positive token count, got {self.prefill_chunk}")


@dataclass(frozen=True)
class FitLevel:
    """Memory and speed of one bit width. Sizes in GB (10^9 bytes), speeds in tokens/s."""

    bits: int
    group_size: int | None  # None for unquantized 16-bit weights
    bits_per_weight: float
    linears_gb: float  # quantized linear weights of the decoder blocks
    embeddings_gb: float  # token embedding and lm_head (once if tied)
    embedding_bits: float  # bits per weight of the input embedding table (a tied head's too)
    head_bits: float  # bits per weight of the output head
    norms_gb: float  # norm weights and biases
    weights_gb: float  # linears + embeddings + norms
    kv_gb: float
    activations_gb: float
    overhead_gb: float  # runtime constant + activations
    total_gb: float
    fits: bool
    layer_gb: float  # weights of one decoder block
    offload_layers: int | None  # 0 if it fits; None if even offloading every layer is not enough
    offload_gb: float  # weights living in CPU RAM
    gpu_gb: float  # what the GPU holds (total, or total - offload + staging buffer)
    read_gb: float  # bytes read per decoding step: weights less an untied input embedding, + KV
    tok_s_resident: float  # decoding speed if everything were on the GPU
    tok_s: float | None  # expected decoding speed as planned (None if it cannot run)
    slowdown: float | None  # tok_s_resident / tok_s (1.0 when it fits)
    tok_s_cpu_offload: float | None  # speed if the offloaded layers ran on the CPU from RAM instead

    @property
    def runnable(self) -> bool:
        """Fits outright or with offloading."""
        return self.offload_layers is not None


def bits_per_weight(bits: int, group_size: int | None) -> float:
    """Storage cost of one weight including its share of the group's fp16 scale and zero point."""
    if bits >= UNQUANTIZED_BITS:
        return float(UNQUANTIZED_BITS)
    if group_size is None or group_size <= 0:
        raise ValueError(f"{bits}-bit weights need a positive group size, got {group_size}")
    return bits + (SCALE_BITS + ZERO_BITS) / group_size


def kv_bits_per_value(kv_bits: int) -> float:
    """Stored bits of one cached K or V value: 16, or the code bits plus a fp16 scale per block of 32."""
    return float(kv_bits) if kv_bits >= 16 else kv_bits + SCALE_BITS / KV_GROUP


def _activation_bytes(shape: ArchShape, ctx: int, batch: int, runtime: Runtime) -> float:
    """Peak live activations of one block during a prefill chunk, plus the last-position logits."""
    chunk = min(ctx, runtime.prefill_chunk)
    tokens = batch * chunk
    q_dim, kv_dim = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    # attention phase: residual + normed input, q and attention output, k and v of the chunk
    attention = tokens * (2 * shape.hidden + 2 * q_dim + 2 * kv_dim)
    if runtime.materialize_scores:
        attention += batch * shape.heads * chunk * ctx  # scores of the chunk against the whole context
    # MLP phase: residual + normed input, gate, up and their product
    mlp = tokens * (2 * shape.hidden + 3 * shape.intermediate)
    logits = batch * shape.vocab * LOGIT_BYTES
    return max(attention, mlp) * runtime.activation_bytes + logits


def output_bits(shape: ArchShape, bits: int, bpw: float, outputs: str) -> tuple[float, float]:
    """Bits per weight of the input embedding table and of the output head of ``shape`` at a level of
    ``bits`` (``bpw`` with its scales) under the ``outputs`` policy (module docstring). A tied head is
    the table: both figures are then the head's."""
    if outputs == "16" or bits >= UNQUANTIZED_BITS:
        return float(EMBEDDING_BITS), float(EMBEDDING_BITS)
    if outputs == "level":
        return bpw, bpw
    from bitsmith.pipeline.outputs import default_embedding_spec, default_output_spec
    from bitsmith.spec import QuantSpec

    body = QuantSpec.parse(f"w{bits}")
    head = default_output_spec(body, shape.hidden)
    table = head if shape.tied_embeddings else default_embedding_spec(body, shape.hidden)
    return tuple(s.bits_per_weight(shape.vocab, shape.hidden) for s in (table, head))


def _min_offload(total: float, layer: float, layers: int, memory: float, staging: int) -> int | None:
    """Fewest layers to move to CPU RAM so the GPU part fits; None if moving all is not enough."""
    for k in range(1, layers + 1):
        if total - k * layer + staging * layer <= memory:
            return k
    return None


def _level(shape: ArchShape, bits: int, group_size: int | None, memory_gb: float, batch: int,
           kv_gb: float, act_gb: float, runtime: Runtime, outputs: str) -> FitLevel:
    group = None if bits >= UNQUANTIZED_BITS else group_size or DEFAULT_GROUP_SIZE.get(bits, 128)
    bpw = bits_per_weight(bits, group)
    emb_bits, head_bits = output_bits(shape, bits, bpw, outputs)
    linears = shape.block_linear_params * bpw / 8 / GB
    table = shape.vocab * shape.hidden
    embeddings = table * (emb_bits + (0 if shape.tied_embeddings else head_bits)) / 8 / GB
    norms = shape.norm_params * NORM_BITS / 8 / GB
    weights = linears + embeddings + norms
    overhead = runtime.cuda_context_gb + act_gb
    total = weights + kv_gb + overhead
    layer = (shape.layer_linear_params * bpw + shape.layer_other_params * NORM_BITS) / 8 / GB
    fits = total <= memory_gb
    offload = 0 if fits else _min_offload(total, layer, shape.layers, memory_gb, runtime.staging_layers)
    offload_gb = (offload or 0) * layer
    gpu_gb = total - offload_gb + (runtime.staging_layers * layer if offload else 0.0)
    # decoding is memory-bound: one step (one token for each of `batch` sequences) reads every weight
    # but an untied input embedding (one row per token) and the whole KV cache once; offloaded weights
    # additionally cross PCIe (no overlap assumed), or, run on the CPU, are read from RAM there
    unread = table * emb_bits / 8 / GB if not shape.tied_embeddings else 0.0
    read = weights - unread + kv_gb
    tok_s_resident = batch / (read / runtime.gpu_bandwidth_gb_s)
    tok_s: float | None = None
    tok_s_cpu: float | None = None
    if offload is not None:
        on_gpu_s = (read - offload_gb) / runtime.gpu_bandwidth_gb_s
        tok_s = batch / (on_gpu_s + offload_gb / runtime.pcie_gb_s)
        tok_s_cpu = batch / (on_gpu_s + offload_gb / runtime.ram_gb_s)
    return FitLevel(
        bits=bits, group_size=group, bits_per_weight=bpw, linears_gb=linears, embeddings_gb=embeddings,
        embedding_bits=emb_bits, head_bits=head_bits,
        norms_gb=norms, weights_gb=weights, kv_gb=kv_gb, activations_gb=act_gb, overhead_gb=overhead,
        total_gb=total, fits=fits, layer_gb=layer, offload_layers=offload, offload_gb=offload_gb,
        gpu_gb=gpu_gb, read_gb=read, tok_s_resident=tok_s_resident, tok_s=tok_s,
        slowdown=None if tok_s is None else tok_s_resident / tok_s, tok_s_cpu_offload=tok_s_cpu,
    )


@dataclass(frozen=True)
class FitPlan:
    """The planner's answer: one :class:`FitLevel` per bit width, with the inputs that produced it."""

    shape: ArchShape
    memory_gb: float
    ctx: int
    batch: int
    kv_bits: int
    outputs: str
    runtime: Runtime
    levels: tuple[FitLevel, ...] = field(default_factory=tuple)

    def level(self, bits: int) -> FitLevel:
        """The level for ``bits``; KeyError naming the planned widths if it was not planned."""
        for lvl in self.levels:
            if lvl.bits == bits:
                return lvl
        raise KeyError(f"{bits}-bit was not planned; planned widths: {[lv.bits for lv in self.levels]}")

    def best(self) -> FitLevel | None:
        """Highest bit width (best quality) that fits without offloading, or None."""
        fitting = [lvl for lvl in self.levels if lvl.fits]
        return max(fitting, key=lambda lvl: lvl.bits) if fitting else None

    def recommended(self) -> FitLevel:
        """The best fitting level; when none fits, the 4-bit level (or the narrowest planned)."""
        best = self.best()
        if best is not None:
            return best
        bits = {lvl.bits for lvl in self.levels}
        return self.level(RECOMMENDED_BITS if RECOMMENDED_BITS in bits else min(bits))

    def explain(self, bits: int | None = None) -> list[str]:
        """The arithmetic behind one level (default: :meth:`recommended`), one line per step."""
        return _explain(self, self.level(bits) if bits is not None else self.recommended())

    def to_dict(self) -> dict[str, object]:
        """JSON-ready: ``{"model": ..., "memory_gb": ..., "levels": [{"bits": 4, ...}, ...]}``."""
        return {
            "model": self.shape.name,
            "n_params": self.shape.n_params,
            "memory_gb": self.memory_gb,
            "ctx": self.ctx,
            "batch": self.batch,
            "kv_bits": self.kv_bits,
            "outputs": self.outputs,
            "runtime": asdict(self.runtime),
            "levels": [asdict(lvl) for lvl in self.levels],
        }


def plan(shape: ArchShape, memory_bytes: int, ctx: int = 8192, batch: int = 1, kv_bits: int = 16,
         levels: Sequence[int] = DEFAULT_LEVELS, *, group_size: int | None = None,
         outputs: str = "auto", runtime: Runtime = Runtime()) -> FitPlan:
    """Plan memory use of ``shape`` at each bit width in ``levels`` on a device of ``memory_bytes``.

    Args:
        shape: the model architecture.
        memory_bytes: GPU memory in bytes (see :func:`parse_size`).
        ctx: context length (prompt + generated tokens) the KV cache must hold per sequence.
        batch: sequences decoded together.
        kv_bits: KV cache precision, 16, 8 or 4 (8 and 4 include a fp16 scale per 32 values).
        levels: weight bit widths to plan (2..16).
        group_size: override :data:`DEFAULT_GROUP_SIZE` for every quantized level.
        outputs: the embedding table and head as ``bitsmith quantize`` stores them (``auto``), in
            16 bit (``16``) or at the level's bits (``level``); see the module docstring.
        runtime: runtime and machine assumptions (CUDA context, chunk size, bandwidths).
    """
    if memory_bytes <= 0:
        raise ValueError(f"memory must be positive, got {memory_bytes} bytes; pass e.g. '24GB'")
    if ctx <= 0 or batch <= 0:
        raise ValueError(f"ctx and batch must be positive, got ctx={ctx}, batch={batch}")
    if kv_bits not in KV_BITS_CHOICES:
        raise ValueError(f"kv_bits must be one of {KV_BITS_CHOICES}, got {kv_bits}")
    bad = [b for b in levels if b not in PLANNABLE_BITS]
    if outputs not in OUTPUTS:
        raise ValueError(f"outputs must be one of {', '.join(OUTPUTS)}, got {outputs!r}")
    if bad or not levels:
        raise ValueError(f"levels must be bit widths from 2 to 8, or 16 (unquantized), got {list(levels)}")
    if group_size is not None and group_size < 1:  # 0 used to fall back to the default silently
        raise ValueError(f"group size must be a positive number of weights (e.g. 32, 64, 128), got {group_size}")
    memory_gb = memory_bytes / GB
    kv_values = 2 * shape.layers * shape.kv_heads * shape.head_dim * ctx * batch  # K and V, GQA heads only
    kv_gb = kv_values * kv_bits_per_value(kv_bits) / 8 / GB
    act_gb = _activation_bytes(shape, ctx, batch, runtime) / GB
    planned = tuple(
        _level(shape, b, group_size, memory_gb, batch, kv_gb, act_gb, runtime, outputs)
        for b in sorted(set(levels), reverse=True)
    )
    return FitPlan(shape, memory_gb, ctx, batch, kv_bits, outputs, runtime, planned)


def _count(n: float) -> str:
    if n >= 1e9:
        return f"{n / 1e9:.2f}e9"
    if n >= 1e6:
        return f"{n / 1e6:.2f}e6"
    return f"{n:,.0f}"


def _gb(x: float) -> str:
    return f"{x:.2f} GB" if x >= 0.1 or x == 0 else f"{x:.4f} GB"


def _embedding_line(p: FitPlan, lvl: FitLevel) -> str:
    table, bits = p.shape.vocab * p.shape.hidden, f"{lvl.embedding_bits:.3g}"
    what = "embeddings (tied, counted once)" if p.shape.tied_embeddings else "embedding table + lm_head"
    if not p.shape.tied_embeddings:
        bits = f"({bits} + {lvl.head_bits:.3g})"
    return f"{what}: {_count(table)} params x {bits} bits / 8 = {_gb(lvl.embeddings_gb)}  (outputs {p.outputs})"


def _explain(p: FitPlan, lvl: FitLevel) -> list[str]:
    s, rt = p.shape, p.runtime
    group = f"group {lvl.group_size}, fp16 scale + zero" if lvl.group_size else "unquantized"
    kv_bpv = kv_bits_per_value(p.kv_bits)
    kv_what = f"{p.kv_bits} bits" if p.kv_bits >= 16 else f"{kv_bpv:g} bits ({p.kv_bits}-bit + fp16 scale/{KV_GROUP})"
    unread = lvl.weights_gb + lvl.kv_gb - lvl.read_gb
    read_what = (f"{lvl.weights_gb:.2f} weights - {unread:.2f} input embedding (one row/token) + {lvl.kv_gb:.2f} KV"
                 if unread > 0 else f"{lvl.weights_gb:.2f} weights + {lvl.kv_gb:.2f} KV")
    lines = [
        f"model: {s.name}, {_count(s.n_params)} params ({s.layers} layers, hidden {s.hidden}, "
        f"{s.heads} heads / {s.kv_heads} KV heads x {s.head_dim}, vocab {s.vocab}, MLP {s.intermediate})",
        f"block linears: {_count(s.block_linear_params)} params x {lvl.bits_per_weight:g} bits / 8 "
        f"= {_gb(lvl.linears_gb)}  ({lvl.bits}-bit, {group})",
        _embedding_line(p, lvl),
        f"norms (+ biases): {_count(s.norm_params)} params x {NORM_BITS} bits / 8 = {_gb(lvl.norms_gb)}",
        f"weights: {_gb(lvl.linears_gb)} + {_gb(lvl.embeddings_gb)} + {_gb(lvl.norms_gb)} "
        f"= {_gb(lvl.weights_gb)}",
        f"KV cache: 2 x {s.layers} layers x {s.kv_heads} KV heads x {s.head_dim} head_dim x {p.ctx} ctx "
        f"x {p.batch} batch x {kv_what} / 8 = {_gb(lvl.kv_gb)}",
        f"overhead: {_gb(rt.cuda_context_gb)} runtime + {_gb(lvl.activations_gb)} activations "
        f"({min(p.ctx, rt.prefill_chunk)}-token prefill chunk) = {_gb(lvl.overhead_gb)}",
        f"total: {lvl.weights_gb:.2f} + {lvl.kv_gb:.2f} + {lvl.overhead_gb:.2f} = {_gb(lvl.total_gb)} "
        + (f"<= {_gb(p.memory_gb)} -> fits" if lvl.fits else f"> {_gb(p.memory_gb)} -> does not fit"),
        f"speed if resident: ({read_what}) = {lvl.read_gb:.2f} GB read per step / "
        f"{rt.gpu_bandwidth_gb_s:g} GB/s = {1e3 * lvl.read_gb / rt.gpu_bandwidth_gb_s:.1f} ms "
        f"-> {lvl.tok_s_resident:.1f} tok/s",
    ]
    if lvl.fits:
        return lines
    if lvl.offload_layers is None:
        rest = lvl.total_gb - s.layers * lvl.layer_gb
        lines.append(
            f"offload: even with all {s.layers} layers in CPU RAM the GPU needs {_gb(rest)} for "
            f"embeddings, KV cache and overhead; use fewer bits, --kv-bits 8/4, a shorter --ctx "
            "or a bigger GPU"
        )
        return lines
    k, staging = lvl.offload_layers, rt.staging_layers * lvl.layer_gb
    on_gpu_gb = lvl.read_gb - lvl.offload_gb
    on_gpu_s = on_gpu_gb / rt.gpu_bandwidth_gb_s
    pcie_s, ram_s = lvl.offload_gb / rt.pcie_gb_s, lvl.offload_gb / rt.ram_gb_s
    assert lvl.tok_s is not None and lvl.slowdown is not None and lvl.tok_s_cpu_offload is not None
    lines += [
        f"offload: one decoder layer = {_gb(lvl.layer_gb)}; {k} of {s.layers} layers x "
        f"{lvl.layer_gb:.3f} = {_gb(lvl.offload_gb)} live in CPU RAM",
        f"GPU keeps: {lvl.total_gb:.3f} - {lvl.offload_gb:.3f} + {staging:.3f} (staging buffer) "
        f"= {lvl.gpu_gb:.3f} GB <= {p.memory_gb:.3f} GB; {k - 1} layers would need "
        f"{lvl.gpu_gb + lvl.layer_gb:.3f} GB",
        f"speed offloaded (layers streamed to the GPU): {on_gpu_gb:.2f} GB / {rt.gpu_bandwidth_gb_s:g} GB/s + "
        f"{lvl.offload_gb:.2f} GB / {rt.pcie_gb_s:g} GB/s (PCIe) = {1e3 * on_gpu_s:.0f} + "
        f"{1e3 * pcie_s:.0f} ms -> {lvl.tok_s:.2f} tok/s ({lvl.slowdown:.1f}x slower than resident)",
        f"speed offloaded (layers run on the CPU, llama.cpp -ngl): {1e3 * on_gpu_s:.0f} + "
        f"{lvl.offload_gb:.2f} GB / {rt.ram_gb_s:g} GB/s (RAM) = {1e3 * (on_gpu_s + ram_s):.0f} ms "
        f"-> {lvl.tok_s_cpu_offload:.2f} tok/s ({lvl.tok_s_resident / lvl.tok_s_cpu_offload:.1f}x slower)",
    ]
    return lines


_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]?)(i?)(b?)\s*$", re.IGNORECASE)
_POWERS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}


def parse_size(text: str) -> int:
    """Bytes in a size such as ``24GB`` (10^9), ``24GiB`` (2^30), ``24000MB``, ``1.5TB`` or ``512B``.

    A bare ``G``/``M`` suffix is read as decimal (``24G`` = ``24GB``); a bare number is refused
    because it is ambiguous.
    """
    match = _SIZE_RE.match(text)
    if match is None or not (match.group(2) or match.group(4)) or (match.group(3) and not match.group(2)):
        raise ValueError(
            f"cannot read size '{text}'; write a number with a unit, e.g. 24GB, 24GiB or 24000MB"
        )
    number, prefix, binary = float(match.group(1)), match.group(2).lower(), bool(match.group(3))
    size = number * (1024 if binary else 1000) ** _POWERS[prefix]
    if not math.isfinite(size):  # hundreds of digits overflow the float; round() would raise OverflowError
        raise ValueError(f"cannot read size '{text}': the number is too large; write e.g. 24GB, 24GiB or 24000MB")
    return round(size)
