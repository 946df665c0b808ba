"""Native paths of the calibrated methods' inner loops (kernels/csrc/gptq.cpp): GPTQ's in-block column
walk and the affine range (clip) search.

Each replaces a chain of small torch operations (one per column, or per clip candidate) by one call
that runs whole chunks of independent output rows per OpenMP thread. The torch versions
(:func:`bitsmith.methods.gptq.gptq_walk`'s loop, :func:`bitsmith.methods.rtn.fit_group_ranges`) stay
the oracles: the tests hold these to them on random inputs. Both functions return None when the
native library is unavailable (no compiler) or the case is not covered (fitted/non-uniform grids,
GPTQ's dynamic groups), and the caller takes the torch path.
"""

from __future__ import annotations

import ctypes

import torch

from bitsmith.spec import QuantSpec

_I64 = ctypes.c_int64
_PTR = ctypes.c_void_p
ROW_CHUNK = 256  # output rows per thread task in the block walk: a 128-column block is 128 KB
MIN_PARALLEL_WEIGHTS = 1 << 16  # smaller calls run on one thread: waking another costs more


def library() -> ctypes.CDLL | None:
    """The kernel library with this module's functions declared, or None (torch paths then)."""
    from bitsmith.kernels.build import declared_library

    return declared_library({
        "bs_gptq_block": ([_PTR, _I64, _I64, _I64, _PTR, _I64, _PTR, _PTR, _PTR, _I64, _PTR, _I64, _PTR, _I64, _I64], None),
        "bs_range_search": ([_PTR, _I64, _I64, _I64, _I64, _PTR, _PTR, _I64, _I64, _I64, _PTR, _PTR, _I64], None),
        "bs_vq_nearest": ([_PTR, _I64, _I64, _PTR, _PTR, _I64, _PTR, _I64], None),
    })


def on_cpu(*tensors: torch.Tensor | None) -> bool:
    """Whether every given tensor is on the CPU: the native functions read raw pointers, so a tensor on
    an accelerator (the calibrated pipeline's ``--device``) takes the torch path instead."""
    return all(t is None or t.device.type == "cpu" for t in tensors)


def _threads(weights: int) -> int:
    return 1 if weights < MIN_PARALLEL_WEIGHTS else max(1, torch.get_num_threads())


def _ptr(t: torch.Tensor) -> int:
    return t.data_ptr()


def vq_nearest(vectors: torch.Tensor, codebook: torch.Tensor, half_norms: torch.Tensor) -> torch.Tensor | None:
    """Index of the entry maximising ``x . c - half_norms`` for each of vectors [N, d] (the nearest
    codebook row, first on a tie) -> int64 [N]; None without the native library or off the CPU (the torch
    path then)."""
    lib = library() if on_cpu(vectors, codebook, half_norms) else None
    if lib is None:
        return None
    x = vectors.float().contiguous()
    cbt = codebook.float().T.contiguous()
    half = half_norms.float().contiguous()
    out = torch.empty(x.shape[0], dtype=torch.long)
    lib.bs_vq_nearest(_ptr(x), x.shape[0], x.shape[1], _ptr(cbt), _ptr(half), cbt.shape[1], _ptr(out),
                      _threads(x.numel() * cbt.shape[1] // 16))
    return out


def gptq_block(lib: ctypes.CDLL, block: torch.Tensor, u_block: torch.Tensor, scale_g: torch.Tensor,
               zero_g: torch.Tensor, groups: torch.Tensor, qmax: int, codes: torch.Tensor) -> torch.Tensor:
    """One lazy-batch block of GPTQ's walk, in place: ``block`` [B, out] (rows of a contiguous
    [n, out] weight, visit order) is quantized column by column with the in-block error feedback;
    ``u_block`` is the block's [B, B] view of the upper Cholesky factor (row stride may be larger),
    ``scale_g``/``zero_g`` [G, out], ``groups`` [B] int64 each column's group, ``codes`` [B, out]
    uint8 out. Returns errs [B, out], the scaled errors for the caller's lazy update GEMM."""
    b, out = block.shape
    assert block.stride(1) == 1 and u_block.stride(1) == 1 and codes.stride(1) == 1
    assert scale_g.is_contiguous() and zero_g.is_contiguous() and groups.dtype == torch.int64
    errs = torch.empty(b, out, dtype=torch.float32)
    lib.bs_gptq_block(_ptr(block), block.stride(0), b, out, _ptr(u_block), u_block.stride(0), _ptr(scale_g),
                      _ptr(zero_g), _ptr(groups), qmax, _ptr(codes), codes.stride(0), _ptr(errs), ROW_CHUNK,
                      _threads(b * out))
    return errs


def range_search(groups: torch.Tensor, spec: QuantSpec, mask: torch.Tensor | None, weights: torch.Tensor | None,
                 steps: int, in_features: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """:func:`bitsmith.methods.rtn.fit_group_ranges` (affine specs, ``steps`` > 0) for groups
    [out, G, gs] of a weight with ``in_features`` inputs: (scale, zero) [out, G, 1]. None when the
    native path does not apply (no library, a grid spec, no search, tensors off the CPU)."""
    lib = library() if on_cpu(groups, weights, mask) else None
    if lib is None or steps <= 0 or spec.grid != "uniform":
        return None
    from bitsmith.methods.rtn import MIN_SHRINK

    rows, n_groups, gs = groups.shape
    last = in_features - (n_groups - 1) * gs
    g = groups.float().contiguous()
    wt = None
    if weights is not None:
        wt = weights.reshape(n_groups, gs).float()
        if mask is not None:
            wt = wt * mask
        wt = wt.contiguous()
    # the candidates as torch multiplies them: Python-float factors, rounded to float32 by the kernel call
    shrink = torch.tensor([1.0 - (1.0 - MIN_SHRINK) * t / steps for t in range(steps + 1)], dtype=torch.float32)
    scale = torch.empty(rows, n_groups, 1, dtype=torch.float32)
    zero = torch.empty(rows, n_groups, 1, dtype=torch.float32)
    lib.bs_range_search(_ptr(g), rows, n_groups, gs, last, 0 if wt is None else _ptr(wt), _ptr(shrink), steps + 1,
                        spec.qmax, int(spec.symmetric), _ptr(scale), _ptr(zero), _threads(g.numel()))
    return scale, zero


def hessian_library() -> ctypes.CDLL | None:
    """The kernel library when its bf16 Hessian update (kernels/csrc/hessian.cpp: AMX, or AVX512-BF16) runs on
    this CPU, else None."""
    from bitsmith.kernels.build import declared_library

    lib = declared_library({
        "bs_hessian_bf16_available": ([], ctypes.c_int),
        "bs_hessian_bf16": ([_PTR, _I64, _I64, _I64, _PTR, _I64, _I64], ctypes.c_int),
        "bs_hessian_bf16_packed": ([_PTR, _I64, _I64, _I64, _PTR, _I64, _I64, _I64], ctypes.c_int),
    })
    return lib if lib is not None and lib.bs_hessian_bf16_available() else None


def hessian_update(lib: ctypes.CDLL, x: torch.Tensor, hessian: torch.Tensor, scalar_pack: bool = False) -> bool:
    """``hessian`` [n, n] float32 += x^T x for bfloat16 ``x`` [tokens, n], summed in float32 (exact
    products), on the 32 x 32 blocks on and above the diagonal only: every entry with column >= row
    is updated, entries below the diagonal blocks are not touched (the caller mirrors). False when the
    kernel declined (nothing changed). ``scalar_pack`` packs the tiles element by element (the reference
    for the vector packing: the same bytes, so the same result)."""
    assert x.dtype == torch.bfloat16 and x.dim() == 2 and x.stride(1) == 1
    assert hessian.dtype == torch.float32 and hessian.stride(1) == 1 and hessian.shape == (x.shape[1], x.shape[1])
    done = lib.bs_hessian_bf16_packed(_ptr(x), x.shape[0], x.shape[1], x.stride(0), _ptr(hessian), hessian.stride(0),
                                      max(1, torch.get_num_threads()), int(scalar_pack))
    return done == 0
