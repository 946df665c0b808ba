"""Build and load the native CPU kernels (csrc/qmatmul.cpp, csrc/decode.cpp) once per machine.

The source is plain C++ with a C ABI, compiled by the system ``g++`` (or ``$CXX``) with
``-O3 -march=native -fopenmp`` into a shared library cached under ``~/.cache/bitsmith/kernels``
(``$BITSMITH_CACHE`` or ``$XDG_CACHE_HOME`` move it), then loaded with :mod:`ctypes`. No torch headers,
pybind or ninja are involved, so a build takes a few seconds. The cache key covers the sources, the
flags, the compiler and the CPU's feature flags, so a cache shared between machines never runs code
built for another CPU. OpenMP calls resolve to the libgomp torch already loaded, so both share one
thread pool.

When there is no compiler, or the build fails, :func:`native_library` logs one warning and returns
``None``; :func:`bitsmith.kernels.prepare` then uses the torch path.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

CSRC = Path(__file__).with_name("csrc")
SOURCE = CSRC / "qmatmul.cpp"
SOURCES = (SOURCE, CSRC / "decode.cpp", CSRC / "vbmi.cpp")  # compiled together into one library
SOURCES += (CSRC / "dequant.cpp",)  # the prefill's dequantization and bf16 conversions (kernels.cpu)
SOURCES += (CSRC / "smallbatch.cpp",)  # 2..16-row exact packed matmul (kernels.small)
SOURCES += (CSRC / "codebook.cpp",)  # vector-codebook (vq) decode (kernels.codebook)
SOURCES += (CSRC / "gptq.cpp",)  # GPTQ's block walk and the range search (methods.native declares them)
SOURCES += (CSRC / "codebook_int8.cpp",)  # vq decode with int8 codebook and activations (kernels.codebook)
SOURCES += (CSRC / "verify.cpp", CSRC / "verify_rows.cpp")  # speculative verify step (infer.verify)
SOURCES += (CSRC / "hessian.cpp",)  # AMX bf16 Hessian update X^T X (calib.stats via methods.native)
SOURCES += (CSRC / "score.cpp",)  # log-sum-exp and argmax per row of logits (kernels.score, for eval)
SOURCES += (CSRC / "vq_search.cpp",)  # nearest codebook entry per vector (methods.vq via methods.native)
SOURCES += (CSRC / "mixed3.cpp",)  # the 3-bit mixed layout: repack, batched rows, dequant (kernels.cpu)
SOURCES += (CSRC / "avx2_int8.cpp",)  # 2/3-bit int8 decode on AVX2 without AVX-512 (kernels.cpu)
SOURCES += (CSRC / "gemm_int8.cpp",)  # the int8 prefill GEMM on AVX-512 VNNI (kernels.cpu)
SOURCES += (CSRC / "attn_prefill.cpp",)  # causal attention of a prompt slice (kernels.attention)
HEADERS = (CSRC / "gemv.h", CSRC / "attention.h", CSRC / "step.h", CSRC / "unpack.h", CSRC / "strided.h",
           CSRC / "qmatmul.h", CSRC / "qmatmul_float.h", CSRC / "qmatmul_int8.h", CSRC / "gemm_tile.h")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17", "-Wno-psabi")

_I64 = ctypes.c_int64
_PTR = ctypes.c_void_p


class NativeBuildError(RuntimeError):
    """The native kernel library could not be compiled or loaded."""


def cache_dir() -> Path:
    root = os.environ.get("BITSMITH_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "bitsmith"
    )
    return Path(root) / "kernels"


def cpu_flags() -> str:
    """The CPU feature line (/proc/cpuinfo), so -march=native builds are never reused on another CPU
    and run-time choices (bf16 prefill) can ask what this CPU has."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    import platform

    return platform.processor() + platform.machine()


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")


def build(extra_flags: tuple[str, ...] = ()) -> Path:
    """Compile the library (or find it in the cache) and return its path."""
    cxx = _compiler()
    if cxx is None:
        raise NativeBuildError("no C++ compiler found (install g++ or set $CXX)")
    flags = FLAGS + tuple(extra_flags)
    key = hashlib.sha256()
    for part in (*(p.read_bytes() for p in SOURCES + HEADERS), " ".join(flags).encode(), cxx.encode(), cpu_flags().encode()):
        key.update(part)
    target = cache_dir() / f"qmatmul-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build to a private name, then rename: concurrent processes never load a half-written file.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    cmd = [cxx, *flags, *map(str, SOURCES), "-o", tmp]
    log.info("compiling bitsmith CPU kernels: %s", " ".join(cmd))
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as err:
        os.unlink(tmp)
        raise NativeBuildError(f"running {cxx} failed: {err}") from err
    if done.returncode != 0:
        os.unlink(tmp)
        raise NativeBuildError(f"{cxx} could not build {', '.join(p.name for p in SOURCES)}:\n{done.stderr[-2000:]}")
    os.replace(tmp, target)
    return target


def load(path: Path) -> ctypes.CDLL:
    """Load a built library and declare its functions' C signatures."""
    import torch  # noqa: F401  (loads torch's libgomp first, so the kernels share its thread pool)

    lib = ctypes.CDLL(str(path))
    args = [_PTR, _PTR, _PTR, _I64, _I64, _I64, _I64]
    lib.bs_gemv.argtypes = args + [_PTR, _I64, _PTR, _I64, _I64]
    lib.bs_gemv.restype = None
    lib.bs_dequant.argtypes = args + [_I64, _I64, _PTR, _I64, _I64]
    lib.bs_dequant.restype = None
    lib.bs_dequant_bf16.argtypes = args + [_I64, _I64, _PTR, _I64, _I64]
    lib.bs_dequant_bf16.restype = None
    lib.bs_to_bf16.argtypes = [_PTR, _PTR, _I64, _I64, _I64]
    lib.bs_to_bf16.restype = None
    lib.bs_permute4.argtypes = [_PTR, _PTR, _I64, _I64]
    lib.bs_permute4.restype = None
    lib.bs_decode_scratch.argtypes = [_PTR, _I64, _PTR]
    lib.bs_decode_scratch.restype = _I64
    lib.bs_decode_step.argtypes = [_PTR, _I64, _PTR, _I64, _PTR, _I64, _I64, _PTR]
    lib.bs_decode_step.restype = None
    lib.bs_half_roundtrip.argtypes = [_PTR, _PTR, _I64]
    lib.bs_half_roundtrip.restype = None
    lib.bs_simd_width.argtypes = []
    lib.bs_simd_width.restype = ctypes.c_int
    lib.bs_int8_widths.argtypes = []
    lib.bs_int8_widths.restype = ctypes.c_int
    if hasattr(lib, "bs_mixed3_takes"):  # libraries of older sources (bench/gemv_stream.py rev:) have none
        lib.bs_mixed3_takes.argtypes = [_I64, _I64]
        lib.bs_mixed3_takes.restype = _I64
        lib.bs_mixed3_repack.argtypes = [_PTR, _I64, _I64, _I64, _I64]
        lib.bs_mixed3_repack.restype = _I64
    if hasattr(lib, "bs_gemm_int8"):
        lib.bs_gemm_int8_takes.argtypes = [_I64, _I64, _I64]
        lib.bs_gemm_int8_takes.restype = _I64
        lib.bs_gemm_int8.argtypes = args + [_PTR, _I64, _PTR, _I64]
        lib.bs_gemm_int8.restype = None
    return lib


def int8_widths(lib: ctypes.CDLL) -> frozenset[int]:
    """The bit widths whose decode products this build can run with int8 activations (llama.cpp's
    trade: a few 1e-3 relative error on each product, up to twice the speed) when a call asks for it
    (``RuntimeOptions.int8_decode``): every width 2-8 with AVX-512 VBMI + VNNI (csrc/vbmi.cpp), {4, 8}
    with AVX-512 but no VBMI, {2, 3, 4, 8} on AVX2 builds without AVX-512 (csrc/avx2_int8.cpp for 2 and
    3 bits; 8-bit codes as |code - 128| with the sign moved onto x where there is no VNNI), empty
    without AVX2."""
    mask = lib.bs_int8_widths()
    return frozenset(b for b in range(2, 9) if mask & (1 << b))


@lru_cache(maxsize=None)
def native_library(extra_flags: tuple[str, ...] = ()) -> ctypes.CDLL | None:
    """The loaded kernel library, or None (with one logged warning) when it cannot be built."""
    try:
        return load(build(extra_flags))
    except (NativeBuildError, OSError) as err:
        log.warning("bitsmith native CPU kernels unavailable, using the slower torch path: %s", err)
        return None


def declared_library(signatures: dict[str, tuple[list, Any]]) -> ctypes.CDLL | None:
    """The kernel library with the C signatures ``name -> (argtypes, restype)`` declared (once per
    library), or None when it cannot be built or lacks one of the functions (the torch paths then)."""
    lib = native_library()
    if lib is None or not all(hasattr(lib, name) for name in signatures):
        return None
    for name, (argtypes, restype) in signatures.items():
        fn = getattr(lib, name)
        if fn.argtypes is None:
            fn.argtypes, fn.restype = argtypes, restype
    return lib
