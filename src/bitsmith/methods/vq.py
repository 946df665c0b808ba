"""Vector codes (``vq`` specs, issue 19): a per-tensor k-means codebook over runs of ``spec.vq_dim``
consecutive weights of a row, and its encoder with GPTQ's error feedback.

Format (see :mod:`bitsmith.spec`, :class:`bitsmith.tensor.QuantizedTensor`): ``w = scale_g *
codebook[index]`` for each vector of ``d = vq_dim`` weights of group ``g``. ``w2g64vq`` has d = 4 and
256 entries (an 8-bit index per 4 weights = 2 bits/weight), ``w3..vq`` d = 2 and 64 entries. The
codebook is fp16 [entries, d], 2 KB at most, so a decode kernel gathers from L1.

Why vectors: on rotated weights (``--rotate``) the rows are near-Gaussian and a scalar grid wastes
the corners of its hypercube; a 4-dim codebook learned on the tensor's own normalized vectors
places its 256 points where the vectors are (a shaping gain a scalar 4-level grid cannot have).

Encoding (``vq`` method): group scales = the group's RMS (fp16), fitted on the weights before any
update ("static groups"); a codebook fitted by weighted k-means (Lloyd) on ``W / scale``, vectors
weighted by the mean ``diag(H)`` of their input channels; then the columns are walked ``d`` at a
time with the block form of GPTQ's update (QuIP#'s BlockLDLQ): with ``H^-1 = U^T U`` (U upper),
quantize the d columns B jointly to the nearest codebook vector, then every later column k gets
``W[:, k] -= (W_B - Q_B) U_BB^-1 U_Bk``. For d = 1 this is GPTQ's ``err_j = (w_j - q_j) / U_jj``
exactly; updates are lazy per block of columns, as in :mod:`bitsmith.methods.gptq`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bitsmith.methods.base import LayerStats, Needs, register
from bitsmith.primitives import expand_groups
from bitsmith.spec import QuantSpec
from bitsmith.tensor import QuantizedTensor

DEFAULT_DAMP = 0.01  # λ as a fraction of mean(diag(H)), as GPTQ
DEFAULT_BLOCK = 128  # columns per lazy batch update (a multiple of every vq_dim)
KMEANS_ITERS = 16
NEAREST_CHUNK = 1 << 12  # vectors per distance matrix (4k x 256 fp32 = 4 MB, L2-sized: 2x faster than 32 MB, same codes)
KMEANS_SAMPLE = 1 << 15  # vectors the codebook is fitted on (a seeded random subset of larger tensors)


class VQError(ValueError):
    """A vq spec or method cannot be used on this weight or with this method."""


@dataclass(frozen=True)
class VQOptions:
    """Typed form of the ``options`` dict the vq method accepts."""

    damp_percent: float = DEFAULT_DAMP
    block_size: int = DEFAULT_BLOCK
    kmeans_iters: int = KMEANS_ITERS
    feedback: bool = True  # GPTQ error feedback (False: nearest vector only, the oracle of the walk)
    seed: int = 0  # k-means initialisation
    share_codebook: bool = False  # layers reading one input (q/k/v, gate/up): one codebook fit, one walk (vq_many)

    @classmethod
    def from_dict(cls, options: dict | None) -> "VQOptions":
        options = dict(options or {})
        known = set(cls.__dataclass_fields__)
        unknown = set(options) - known
        if unknown:
            raise ValueError(f"vq does not know option(s) {', '.join(sorted(unknown))}; use {', '.join(sorted(known))}")
        opts = cls(**options)
        if opts.block_size < 1 or opts.damp_percent < 0 or opts.kmeans_iters < 0:
            raise ValueError("vq needs block_size >= 1, damp_percent >= 0 and kmeans_iters >= 0")
        return opts


def check_method(quantizer: str, spec: QuantSpec, layer_specs: list[QuantSpec]) -> None:
    """Refuse, before any work, a vq spec with another method, or the vq method with a scalar main
    spec. Scalar per-layer specs under ``--method vq`` (the w8 embedding and head, a mixed budget)
    are fine: the vq method hands them to GPTQ."""
    vq_spec = next((s for s in (spec, *layer_specs) if s.grid == "vq"), None)
    if vq_spec is not None and quantizer != "vq":
        raise VQError(f"{vq_spec} is a vector-codebook spec; quantize it with --method vq (not {quantizer})")
    if quantizer == "vq" and spec.grid != "vq":
        raise VQError(f"--method vq writes vector codes; use a vq spec such as w2g64vq or w3g128vq, not {spec}")


def check_shape(weight: torch.Tensor, spec: QuantSpec) -> None:
    if spec.grid != "vq":
        raise VQError(f"vq needs a vq spec (e.g. w2g64vq), not {spec}")
    if weight.shape[1] % spec.vq_dim:
        raise VQError(f"{spec} codes runs of {spec.vq_dim} weights, but this layer has {weight.shape[1]} inputs; "
                      "use a scalar spec for it")


def group_scales(weight: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Per-group RMS of weight [out, in] -> fp16-representable float32 [out, G] (never 0)."""
    out_features, in_features = weight.shape
    width, groups = spec.group_width(in_features), spec.groups_per_row(in_features)
    squares = torch.nn.functional.pad(weight.float().pow(2), (0, groups * width - in_features))
    counts = torch.full((groups,), float(width))
    counts[-1] = in_features - (groups - 1) * width
    rms = (squares.view(out_features, groups, width).sum(-1) / counts).sqrt()
    return rms.clamp_min(1e-8).half().float().clamp_min(6e-8)  # fp16's smallest subnormal: no zero scale


def nearest_codes(vectors: torch.Tensor, codebook: torch.Tensor, native: bool = True) -> torch.Tensor:
    """Index of the nearest codebook row (Euclidean) for each of vectors [N, d] -> int64 [N]. The native
    search (methods.native.vq_nearest) where the library builds; ``native=False`` is the torch path,
    its oracle."""
    cb = codebook.float()
    half_norms = 0.5 * cb.pow(2).sum(-1)  # argmin |x - c|^2 = argmax x.c - |c|^2 / 2
    if native:
        from bitsmith.methods import native as native_lib

        fast = native_lib.vq_nearest(vectors, cb, half_norms)
        if fast is not None:
            return fast
    out = torch.empty(vectors.shape[0], dtype=torch.long)
    for start in range(0, vectors.shape[0], NEAREST_CHUNK):
        x = vectors[start : start + NEAREST_CHUNK].float()
        out[start : start + x.shape[0]] = (x @ cb.T - half_norms).argmax(-1)
    return out


def seed_centroids(x: torch.Tensor, w: torch.Tensor, entries: int, gen: torch.Generator) -> torch.Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii 2007): each next centroid drawn with probability
    ∝ weight x squared distance to the nearest one chosen so far (Lloyd from random seeds left
    clusters merged or split on separable data)."""
    first = int(torch.multinomial(w, 1, generator=gen))
    centroids = [x[first]]
    nearest = (x - x[first]).pow(2).sum(-1)
    for _ in range(entries - 1):
        p = nearest * w
        if float(p.sum()) > 0:
            pick = int(torch.multinomial(p, 1, generator=gen))
        else:  # every vector already sits on a centroid: any one will do
            pick = int(torch.randint(x.shape[0], (1,), generator=gen))
        centroids.append(x[pick])
        nearest = torch.minimum(nearest, (x - x[pick]).pow(2).sum(-1))
    return torch.stack(centroids)


def fit_codebook(vectors: torch.Tensor, entries: int, weights: torch.Tensor | None = None, iters: int = KMEANS_ITERS,
                 seed: int = 0) -> torch.Tensor:
    """Weighted k-means (Lloyd) of vectors [N, d] into ``entries`` centroids, float32 [entries, d],
    rounded to fp16 (what is stored). Seeded by k-means++; an empty cluster is
    re-seeded at the vector currently worst served. More than ``KMEANS_SAMPLE`` vectors: fitted on a
    seeded random subset of that many (the assignment afterwards uses every vector)."""
    n, d = vectors.shape
    gen = torch.Generator().manual_seed(seed)
    x = vectors.float()
    w = torch.ones(n) if weights is None else weights.float().clamp_min(0) + 1e-12
    if n > KMEANS_SAMPLE:
        keep = torch.randperm(n, generator=gen)[:KMEANS_SAMPLE]
        x, w, n = x[keep], w[keep], KMEANS_SAMPLE
    if n <= entries:  # fewer vectors than entries: every vector is its own entry
        return torch.cat([x, x[:1].expand(entries - n, d)]).half().float() if n else torch.zeros(entries, d)
    centroids = seed_centroids(x, w, entries, gen)
    for _ in range(iters):
        codes = nearest_codes(x, centroids)
        mass = torch.zeros(entries).index_add_(0, codes, w)
        sums = torch.zeros(entries, d).index_add_(0, codes, x * w[:, None])
        empty = mass <= 0
        centroids = torch.where(empty[:, None], centroids, sums / mass.clamp_min(1e-30)[:, None])
        if bool(empty.any()):
            err = (x - centroids[codes]).pow(2).sum(-1) * w
            centroids[empty] = x[err.topk(int(empty.sum())).indices]
    return centroids.half().float()


def vectors_of(weight: torch.Tensor, scale: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """weight [out, in] / its group scales, as [out * in / d, d] vectors (row-major)."""
    normalized = weight.float() / expand_groups(scale, spec, weight.shape[1])
    return normalized.reshape(-1, spec.vq_dim)


def vector_weights(importance: torch.Tensor | None, out_features: int, spec: QuantSpec) -> torch.Tensor | None:
    """k-means weight of each vector: the mean importance (diag H) of its d input channels."""
    if importance is None:
        return None
    per_vector = importance.float().clamp_min(0).view(-1, spec.vq_dim).mean(-1)  # [in / d]
    return per_vector.repeat(out_features)


def upper_inverse_factor(hessian: torch.Tensor, damp_percent: float) -> torch.Tensor:
    """Upper U with (H + λI)^-1 = U^T U (λ = damp_percent x mean diag); dead inputs get H_ii = 1;
    damping grows x10 on a failed factorization. GPTQ's factor (:func:`bitsmith.methods.gptq.inverse_cholesky`:
    one float32 factorization and one triangular inverse). Why not its own: the float64 route here
    (two factorizations and an explicit inverse) was a fifth of a vq quantize on Qwen2.5-1.5B, whose
    8,960-wide down_proj Hessian costs ~1.4 TFLOP that way."""
    from bitsmith.methods.gptq import inverse_cholesky

    try:
        return inverse_cholesky(hessian, damp_percent, method="vq")
    except ValueError as e:
        raise VQError(str(e)) from e  # inverse_cholesky's message, naming vq


def quantize_vectors(cols_t: torch.Tensor, scale_t: torch.Tensor, codebook: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """d columns, transposed [d, out], with their scales [out] -> (codes [out], dequantized [d, out])."""
    codes = nearest_codes((cols_t / scale_t).T, codebook)
    return codes, (codebook[codes] * scale_t[:, None]).T


def vq_walk(weight_t: torch.Tensor, upper: torch.Tensor, scale: torch.Tensor, codebook: torch.Tensor, spec: QuantSpec,
            block_size: int = DEFAULT_BLOCK) -> torch.Tensor:
    """The error-feedback walk on transposed weights weight_t [in, out] (updated in place), U [in, in],
    scale [out, G] -> codes [out, in / d] (uint8). See the module docstring for the update."""
    d = spec.vq_dim
    n, out_features = weight_t.shape
    width = spec.group_width(n)
    block_size = max(d, block_size // d * d)
    codes = torch.empty(out_features, n // d, dtype=torch.uint8)
    for i1 in range(0, n, block_size):
        i2 = min(i1 + block_size, n)
        block, u_block = weight_t[i1:i2], upper[i1:i2, i1:i2]  # block: a view, updated in place
        errs = torch.empty_like(block)  # [B, out]
        for j in range(0, i2 - i1, d):
            if j:  # left-looking form of the in-block updates
                block[j : j + d].sub_(u_block[:j, j : j + d].T @ errs[:j])
            col = i1 + j
            idx, q = quantize_vectors(block[j : j + d], scale[:, col // width], codebook)
            codes[:, col // d] = idx.to(torch.uint8)
            # errs_B = U_BB^-T (W_B - Q_B)^T, so that U_B,rest^T errs_B is the update of the later columns
            errs[j : j + d] = torch.linalg.solve_triangular(u_block[j : j + d, j : j + d].T, block[j : j + d] - q,
                                                            upper=False)
        if i2 < n:
            weight_t[i2:].sub_(upper[i1:i2, i2:].T @ errs)
    return codes


def nearest_tensor(weight: torch.Tensor, spec: QuantSpec, importance: torch.Tensor | None = None,
                   iters: int = KMEANS_ITERS, seed: int = 0) -> QuantizedTensor:
    """vq without feedback: group scales, the fitted codebook, each vector's nearest entry."""
    check_shape(weight, spec)
    scale = group_scales(weight, spec)
    vectors = vectors_of(weight, scale, spec)
    codebook = fit_codebook(vectors, spec.levels, vector_weights(importance, weight.shape[0], spec), iters, seed)
    codes = nearest_codes(vectors, codebook).view(weight.shape[0], -1).to(torch.uint8)
    return QuantizedTensor(codes, scale.half(), None, spec, codebook.half())


# calibrated on prose and code by default (calib.data's built-in "prose+code"): on Qwen2.5-Coder-1.5B
# w2g64vq + rotate the prose-only text left held-out code KLD at 0.892, prose+code at 0.369 (prose 0.830 ->
# 0.759 as well; bench/results/low-bit, session 15)
@register("vq", needs=Needs.HESSIAN, options=VQOptions, calib_text="prose+code")
def vq(weight: torch.Tensor, spec: QuantSpec, stats: LayerStats | None = None, options: dict | None = None) -> QuantizedTensor:
    """Vector codes with GPTQ's error feedback (module docstring); a scalar spec goes to GPTQ. Needs
    ``stats.hessian`` [in, in] unless ``feedback`` is off. options: ``damp_percent`` (0.01), ``block_size`` (128),
    ``kmeans_iters`` (16), ``feedback`` (True), ``seed`` (0)."""
    opts = VQOptions.from_dict(options)
    if spec.grid != "vq":  # a scalar layer of a vq run (mixed precision): GPTQ with the same Hessian
        from bitsmith.methods.gptq import gptq

        return gptq(weight, spec, stats, {"damp_percent": opts.damp_percent, "block_size": opts.block_size})
    weight = weight.float()
    check_shape(weight, spec)
    hessian = None if stats is None else stats.hessian
    if hessian is None and opts.feedback:
        raise VQError("vq needs calibration data for its error feedback; pass --calib")
    in_features = weight.shape[1]
    if hessian is not None and tuple(hessian.shape) != (in_features, in_features):
        raise VQError(f"vq: Hessian shape {tuple(hessian.shape)} does not match the layer's {in_features} inputs")
    importance = None if hessian is None else hessian.diagonal().float()
    start = nearest_tensor(weight, spec, importance, opts.kmeans_iters, opts.seed)
    if not opts.feedback:
        return start
    upper = upper_inverse_factor(hessian, opts.damp_percent)
    codes = vq_walk(weight.T.contiguous(), upper, start.scale.float(), start.grid.float(), spec, opts.block_size)
    return QuantizedTensor(codes, start.scale, None, spec, start.grid)


def vq_many(weights: list[torch.Tensor], spec: QuantSpec, stats: LayerStats | None = None,
            options: dict | None = None) -> list[QuantizedTensor]:
    """vq for layers that read the same input (q/k/v, gate/up; the pipeline's stage). With the
    ``share_codebook`` option: one codebook fitted on all their vectors, one Cholesky factor and one
    walk over their stacked rows, then each layer stores its copy of that codebook (same format, same
    bits). Group scales, nearest entries and the walk are row by row (each row's update uses only U
    and its own errors), so each layer's codes are those of walking it alone with the shared
    codebook. Why: the per-layer k-means (seeding 256 entries, 16 Lloyd passes) is most of a vq
    quantize; a stage of 3 layers fits once. Without the option (the default) each layer is ``vq``
    alone, as before."""
    opts = VQOptions.from_dict(options)
    if not opts.share_codebook or len(weights) < 2 or spec.grid != "vq" or len({w.shape[1] for w in weights}) != 1:
        return [vq(w, spec, stats, options) for w in weights]
    stacked = vq(torch.cat([w.float() for w in weights]), spec, stats, options)
    out, start = [], 0
    for w in weights:
        rows = slice(start, start + w.shape[0])
        out.append(QuantizedTensor(stacked.codes[rows].contiguous(), stacked.scale[rows].contiguous(), None, spec,
                                   stacked.grid))
        start = rows.stop
    return out


vq.many = vq_many  # the pipeline quantizes a stage's layers in one call when a method offers this
