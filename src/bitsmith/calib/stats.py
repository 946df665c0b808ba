"""Streaming statistics of a linear layer's inputs: the GPTQ Hessian H = sum_t x_t x_t^T and the
per-channel importance mean_t x_t^2 (AWQ / weighted clipping), accumulated batch by batch in float32.

The Hessian is a plain sum over tokens (``LayerStats.hessian``'s contract); importance is its
diagonal over the token count, so it costs nothing extra.

H is symmetric, so wide inputs (``in >= SYMMETRIC_FROM``) accumulate only its upper block triangle:
with the columns cut into c panels, row panel i is multiplied by the columns from panel i on,
(c + 1) / 2c of the full product's multiply-adds (62 % at c = 4), and the lower triangle is
mirrored once when the statistics are read (c = 2 below 1024 inputs: measured here, 4 panels of
144 columns ran slower than 2 of 288 on SmolLM2's 576). The blocks are plain float32 GEMMs, as
accurate as the full product.

``products="bf16"`` (opt-in: ``bitsmith quantize --hessian-dtype bf16``) multiplies bfloat16 inputs in
bfloat16 GEMMs, ~2.2x the float32 rate here (AVX-512 BF16): each batch's partial sum is accumulated
in float32 inside the GEMM and rounded to bfloat16 once (relative error 2^-9 per entry and batch),
then added to the float32 total. On SmolLM2's GPTQ w4g128 it saved 19% of the time and raised the
held-out KLD 2.1% (0.1413 -> 0.1443, bench/results/calibrated-methods/gptq_speed.md), hence not the default.

The default ``products="fp32"`` with **bfloat16 inputs** (bitsmith's bf16 block forwards) is exact and
fast at once: the inputs go to float32 GEMMs run in oneDNN's bf16 "fpmath" mode (AMX or AVX-512 BF16,
float32 accumulation *and* float32 output). Rounding the operands to bf16 changes nothing, since they
are bf16 values already, so the result is a float32 GEMM's up to summation order (held to a float64
oracle in the tests), at ~2x the MKL float32 rate here. What ``products="bf16"`` loses is the
output's rounding to bf16, which this mode does not do. Float32 inputs keep the plain float32 GEMM.

Where the CPU has AMX (``methods.native.hessian_library``), bf16 inputs in the default mode skip both
GEMM paths: ``kernels/csrc/hessian.cpp`` multiplies the bf16 values on AMX tiles with float32
accumulation (the same exact products, float32 sums in another order), on the 32 x 32 blocks on and
above the diagonal only, with no float32 copy of the batch. Measured here on Qwen2.5-1.5B's 8960-wide
down_proj input, 4096 tokens, one thread: ~0.55 CPU s per batch against ~1.8 for the fpmath GEMM panels.
"""

from __future__ import annotations

import torch

from bitsmith.methods import native
from bitsmith.methods.base import LayerStats
from bitsmith.methods.parallel import bf16_fpmath

SYMMETRIC_FROM = 512  # inputs at least this wide use the upper-triangle accumulation
PANELS = 4
MIRROR_ROWS = 512  # rows per slice when the upper triangle is mirrored (no whole-matrix temporary)
SQUARE_SLICE = 256  # tokens per float32 partial sum of the importance (square_sums)


class StatsAccumulator:
    """Accumulates X^T X over batches of inputs x [..., in] in float32.

    ``hessian_tokens`` (None: all) caps the tokens whose outer products enter the Hessian; the
    importance (mean x^2) still covers every token. For quantizers that need no Hessian the
    pipeline keeps one only for its report's output error, and the full product was the largest
    cost of an AWQ + RTN block on Qwen2.5-1.5B (the 8960 x 8960 down_proj input: 6.6 TFLOP over
    128 x 512 tokens, for a report figure).

    ``device``: where the sums live and the products run (the inputs must be there); off the CPU they
    are plain float32 (or bf16, ``products="bf16"``) torch GEMMs, the CPU-only AMX kernel and oneDNN
    fpmath mode are not used."""

    def __init__(self, in_features: int, products: str = "fp32", hessian_tokens: int | None = None,
                 device: "torch.device | str" = "cpu") -> None:
        if products not in ("fp32", "bf16"):
            raise ValueError(f"products must be 'fp32' or 'bf16', got {products!r}")
        if hessian_tokens is not None and hessian_tokens < 1:
            raise ValueError(f"hessian_tokens must be >= 1 or None, got {hessian_tokens}")
        self.hessian = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)  # [in, in]
        self._cpu = self.hessian.device.type == "cpu"
        self.tokens = 0
        self.products = products
        self.hessian_tokens = hessian_tokens
        self._in_hessian = 0  # tokens summed into the Hessian so far
        self._squares = None if hessian_tokens is None else torch.zeros(in_features, dtype=torch.float64, device=device)
        n = in_features
        panels = PANELS if n >= 2 * SYMMETRIC_FROM else 2  # narrower panels lose more to the GEMM's edges
        self._cuts = ([round(n * i / panels) for i in range(panels + 1)] if n >= SYMMETRIC_FROM else None)
        self._native_upper = False  # some batch went through the AMX kernel: only col >= row is summed

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1])  # [tokens, in]
        self.tokens += x.shape[0]
        if self._squares is not None:  # capped Hessian: the importance from every token on its own
            self._squares += square_sums(x)
            x = x[: max(0, self.hessian_tokens - self._in_hessian)]
            if x.shape[0] == 0:
                return
        self._in_hessian += x.shape[0]
        exact_bf16 = self.products == "fp32" and x.dtype == torch.bfloat16 and self._cpu  # the CPU-only paths
        if exact_bf16 and self._native_add(x):
            return
        x = x.to(torch.bfloat16) if self.products == "bf16" else x.float()
        # upper block triangle: rows a:b, columns a: (one block, the whole matrix, below SYMMETRIC_FROM)
        cuts = self._cuts or [0, x.shape[1]]
        with bf16_fpmath(exact_bf16):
            for a, b in zip(cuts, cuts[1:]):
                out = self.hessian[a:b, a:]
                if self.products == "bf16":
                    out += (x[:, a:b].T @ x[:, a:]).float()
                else:  # addmm into the fp32 sum: no [in, in] temporary per batch
                    out.addmm_(x[:, a:b].T, x[:, a:])

    def _native_add(self, x: torch.Tensor) -> bool:
        """The AMX kernel's update of the upper triangle, if it runs here (bf16 ``x`` [tokens, in])."""
        lib = native.hessian_library()
        if lib is None or not native.hessian_update(lib, x.contiguous(), self.hessian):
            return False
        self._native_upper = True
        return True

    def stats(self) -> LayerStats:
        if self._native_upper:  # entries with column >= row are summed (by either path): mirror those
            mirror_upper(self.hessian)
            self._native_upper, self._cuts = False, None
        if self._cuts is not None:  # mirror the upper block triangle into the lower one
            for a, b in zip(self._cuts, self._cuts[1:]):
                self.hessian[b:, a:b] = self.hessian[a:b, b:].T
            self._cuts = None  # the full matrix from now on
        if self._squares is not None:
            importance = (self._squares / max(self.tokens, 1)).float()  # [in], mean x^2 over every token
        else:
            importance = self.hessian.diagonal() / max(self.tokens, 1)  # [in], mean x^2
        return LayerStats(hessian=self.hessian, importance=importance.clone(), tokens=self.tokens)


def square_sums(x: torch.Tensor) -> torch.Tensor:
    """sum_t x_t^2 per channel of x [tokens, in], float64: float32 sums over slices of ``SQUARE_SLICE``
    tokens, float64 across them. One float32 copy squared in place; ``x.float().pow(2).sum(0,
    dtype=float64)`` cast every element to float64 on the way and took 180 ms per 4096 x 8960 batch
    at 2 threads here (~4 s of every AWQ block of Qwen2.5-1.5B, on the thread the forwards wait on),
    this 53 ms; the sums differ by ~1e-7 relative."""
    tokens, width = x.shape
    full = tokens - tokens % SQUARE_SLICE
    squares = x.square() if x.dtype == torch.float32 else x.float().square_()  # never the caller's tensor
    out = squares[:full].view(-1, SQUARE_SLICE, width).sum(1).sum(0, dtype=torch.float64)
    return out + squares[full:].sum(0, dtype=torch.float64) if full < tokens else out


def mirror_upper(h: torch.Tensor) -> None:
    """Make square ``h`` symmetric from its upper triangle (diagonal included), in place, a slice of
    ``MIRROR_ROWS`` rows at a time (an 8960-wide Hessian is 321 MB: no second copy)."""
    n = h.shape[0]
    for a in range(0, n, MIRROR_ROWS):
        b = min(a + MIRROR_ROWS, n)
        h[b:, a:b] = h[a:b, b:].T
        square = h[a:b, a:b]
        square.copy_(square.triu() + square.triu(1).T)
