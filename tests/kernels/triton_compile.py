"""Compile the Triton GEMM (kernels/triton_gemm.py) for CUDA targets on a machine without a GPU.

Triton lowers a kernel to PTX and assembles it with the ptxas its wheel ships, without a device, so
CI can check what the CPU interpreter cannot: that the kernel compiles, bf16 tensor-core dots
included. Run in a process where TRITON_INTERPRET is unset (under the interpreter the kernel is not a
compilable JITFunction)::

    python -m tests.kernels.triton_compile w3g64:1:fp16:90 w4g128:512:bf16:80

Each argument is spec:rows:x dtype:compute capability; prints one line per case, exits 1 if any failed.
"""

from __future__ import annotations

import sys

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from bitsmith.kernels.triton_gemm import block_config, gemm_kernel
from bitsmith.spec import QuantSpec

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
IN_FEATURES = 4096  # a grouped width: the K block is the group's or the tile's


def compile_case(spec_text: str, rows: int, dtype: str, capability: int) -> str:
    """Compile one specialisation of the kernel; returns the stages Triton produced."""
    spec = QuantSpec.parse(spec_text)
    block = block_config(rows, spec, IN_FEATURES, DTYPES[dtype])
    warps = block.pop("num_warps")
    constants = dict(CODE_BITS=spec.index_bits, VQ_DIM=spec.vq_dim, HAS_ZERO=spec.has_zero,
                     HAS_GRID=spec.grid != "uniform", MID=float((spec.qmax + 1) / 2), DOT_FP32=False, **block)
    signature = {"x_ptr": f"*{dtype}", "q_ptr": "*u8", "s_ptr": "*fp16", "z_ptr": "*fp16", "g_ptr": "*fp32",
                 "y_ptr": f"*{dtype}", "M": "i32", "N": "i32", "K": "i32", "row_bytes": "i32", "groups": "i32",
                 "group_width": "i32"}
    signature.update({name: "constexpr" for name in constants})
    compiled = triton.compile(ASTSource(fn=gemm_kernel, signature=signature, constexprs=constants),
                              target=GPUTarget("cuda", capability, 32), options={"num_warps": warps})
    return ",".join(sorted(compiled.asm))


def main(cases: list[str]) -> int:
    failed = 0
    for case in cases:
        spec_text, rows, dtype, capability = case.split(":")
        try:
            print(f"ok {case}: {compile_case(spec_text, int(rows), dtype, int(capability))}", flush=True)
        except Exception as exc:  # report every case, then fail
            failed += 1
            print(f"FAILED {case}: {type(exc).__name__}: {str(exc)[:2000]}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
