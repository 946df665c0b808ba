"""How a loaded model runs: one frozen :class:`RuntimeOptions`, passed down explicitly.

Kernels and inference never read the environment. The ``BITSMITH_*`` variables below are user
overrides read in one place, :meth:`RuntimeOptions.from_env`, which only the entry points call (the
CLI, and :func:`bitsmith.runtime.load.load_model` / :func:`bitsmith.infer.generate.generate` when no
options are given). Everything else takes options as a parameter and defaults to ``RuntimeOptions()``.

=========================  ==========================  ============================================
variable                   field                       values (default first)
=========================  ==========================  ============================================
``BITSMITH_KERNEL``        ``kernel``                  auto, native, torch, reference
``BITSMITH_INT8_DECODE``   ``int8_decode``             on; 0/false/no/off = exact float decode
``BITSMITH_PREFILL``       ``prefill``                 auto, int8, bf16, exact
``BITSMITH_KV_CACHE``      ``kv_cache``                fp16, fp32
``BITSMITH_FUSED_DECODE``  ``fused_decode``            on; 0/false/no/off = torch lean decode
``BITSMITH_COMPILE``       ``compile``                 auto (CUDA only); 1/yes/true/on; 0/no/...
``BITSMITH_THREADS``       ``threads``                 torch's thread count; a positive integer
``BITSMITH_DEVICE_KERNEL`` ``device_kernel``           auto, torch, triton, generic
=========================  ==========================  ============================================

This module imports nothing heavy: ``import bitsmith`` stays torch-free.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["DEVICE_KERNEL_CHOICES", "KERNEL_CHOICES", "KV_CACHE_CHOICES", "PREFILL_CHOICES", "RuntimeOptions", "ENV"]

KERNEL_CHOICES = ("auto", "native", "torch", "reference")
DEVICE_KERNEL_CHOICES = ("auto", "torch", "triton", "generic")
KV_CACHE_CHOICES = ("fp16", "fp32")
PREFILL_CHOICES = ("auto", "int8", "bf16", "exact")
_OFF = ("0", "false", "no", "off")
_ON = ("1", "yes", "true", "on")

# field -> the environment variable that overrides it
ENV = {
    "kernel": "BITSMITH_KERNEL",
    "int8_decode": "BITSMITH_INT8_DECODE",
    "prefill": "BITSMITH_PREFILL",
    "kv_cache": "BITSMITH_KV_CACHE",
    "fused_decode": "BITSMITH_FUSED_DECODE",
    "compile": "BITSMITH_COMPILE",
    "threads": "BITSMITH_THREADS",
    "device_kernel": "BITSMITH_DEVICE_KERNEL",
}


@dataclass(frozen=True)
class RuntimeOptions:
    """Run-time choices that never change a checkpoint, only how it computes.

    - ``kernel``: the CPU matmul for quantized linears (see :mod:`bitsmith.kernels`); ``auto`` takes the
      native kernels when they build, else the torch path.
    - ``int8_decode``: decode products with int8 activations (every width 2-8 on AVX-512 VBMI CPUs:
      kernels/csrc/vbmi.cpp; 2, 3, 4 and 8 bits on AVX2: avx2_int8.cpp, qmatmul.cpp) (llama.cpp's trade, a few 1e-3
      relative error, up to twice the speed); False runs the exact float path.
    - ``prefill``: the native kernel's batched matmul (more than ``GEMV_MAX_ROWS`` rows: prefill,
      evaluation). ``int8`` rounds the activations to int8 per 32-block, as the int8 decode does, and
      multiplies them into the codes with AVX-512 VNNI (kernels/csrc/gemm_int8.cpp): Qwen2.5-Coder-1.5B
      w4g128's 512-token prefill 56.5 -> 290.5 tok/s on a Zen 5 (session 22), at a mean KLD of 8e-4 (prose)
      and 3e-4 (code) against the exact path, SmolLM2-135M 3e-3 (bench/prefill_accuracy.py).
      ``bf16`` dequantizes weight blocks to bfloat16 and multiplies bf16-rounded activations in oneDNN
      (float32 accumulation, bf16 output): 4-9x the float32 path per layer at T=512 on one core of an
      AMX CPU, SmolLM2-135M w4g128 prefill 165 -> 332 tok/s, mean KLD 7.2e-4 against the exact path
      (teacher-forced, 4 x 512 tokens of Austen), top-1 agreement 97.6%. ``exact`` is the float32
      dequantize-then-matmul, bit for bit the old path. ``auto`` is ``bf16`` where the CPU has AMX
      (``kernels.cpu.native_bf16``), else ``int8`` where the build has the int8 GEMM
      (``kernels.cpu.native_int8_gemm``), else ``exact``: with AVX512-BF16 alone the bf16 path measured
      0.82-0.85x of ``exact`` (session 21). Shapes the int8 GEMM does not take (inputs not whole 64-code
      chunks, groups not whole 32-blocks) run ``exact``. Vector-codebook (vq) layers have no bf16 path:
      ``int8`` and ``auto`` take the int8 GEMM's tiles with the decode's int8 codebook (Qwen2.5-Coder-1.5B
      w3g256vq 512-token prefill 36.9 -> 178.6 tok/s, KLD 4.5e-4 prose / 1.9e-4 code against ``exact``,
      session 26), ``bf16`` and ``exact`` the float32 blocks.
    - ``kv_cache``: the lean runner's cache dtype for float32 models (``fp16`` halves the bytes decode
      reads per token; other model dtypes keep theirs).
    - ``fused_decode``: one native call per decoded token when the model allows it (infer/fused.py).
    - ``compile``: torch.compile the device kernel's dequantization; None = on CUDA only.
    - ``threads``: native kernel threads; None = torch's current ``get_num_threads()`` at each call.
    - ``device_kernel``: the kernel a quantized layer gets off the CPU (:mod:`bitsmith.kernels.device_select`):
      ``auto`` tries torch's int4/int8 weight-only kernels, then Triton, then the generic dequantize-per-call
      kernel; ``torch`` and ``triton`` use only that family (generic where it does not take a layer);
      ``generic`` always the generic kernel (the arithmetic the CPU's reference does).
    """

    kernel: str = "auto"
    int8_decode: bool = True
    kv_cache: str = "fp16"
    fused_decode: bool = True
    compile: bool | None = None
    threads: int | None = None
    prefill: str = "auto"  # after the others: callers build RuntimeOptions positionally
    device_kernel: str = "auto"

    def __post_init__(self) -> None:
        if self.kernel not in KERNEL_CHOICES:
            raise ValueError(f"{ENV['kernel']}={self.kernel!r} is not a kernel choice; use one of {', '.join(KERNEL_CHOICES)}")
        if self.device_kernel not in DEVICE_KERNEL_CHOICES:
            raise ValueError(f"{ENV['device_kernel']}={self.device_kernel!r} is not a device kernel choice; use one of "
                             f"{', '.join(DEVICE_KERNEL_CHOICES)}")
        if self.prefill not in PREFILL_CHOICES:
            raise ValueError(f"{ENV['prefill']}={self.prefill!r} is not a prefill choice; use one of {', '.join(PREFILL_CHOICES)}")
        if self.kv_cache not in KV_CACHE_CHOICES:
            raise ValueError(f"{ENV['kv_cache']}={self.kv_cache!r}; use fp16 or fp32")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"{ENV['threads']}={self.threads}; give a positive number of threads")

    @classmethod
    def for_measurement(cls, environ: Mapping[str, str] | None = None) -> RuntimeOptions:
        """:meth:`from_env`, except that the batched matmul defaults to ``exact``: quality numbers
        (eval, compare, the demo's quality columns) measure the checkpoint's own arithmetic, not a
        kernel shortcut. The bf16 prefill adds a mean KLD of ~7e-4 against the exact path, a third
        of w8's whole loss on SmolLM2 (0.0022), the int8 one ~3e-3 there, so they would blur exactly the
        comparisons users make near the top. ``BITSMITH_PREFILL`` set by the user still wins."""
        env = os.environ if environ is None else environ
        return cls.from_env({**env, ENV["prefill"]: env.get(ENV["prefill"], "exact")})

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> RuntimeOptions:
        """The defaults with the user's ``BITSMITH_*`` overrides applied (table in the module docstring)."""
        env = os.environ if environ is None else environ

        def text(field: str, default: str) -> str:
            return env.get(ENV[field], default).strip().lower() or default

        def switch(field: str) -> bool:  # on by default: off for 0, false, no or off
            return env.get(ENV[field], "1").strip().lower() not in _OFF

        compile_choice = text("compile", "auto")
        threads = env.get(ENV["threads"], "").strip()
        if threads and not threads.isdigit():
            raise ValueError(f"{ENV['threads']}={threads!r}; give a positive number of threads")
        return cls(
            kernel=text("kernel", "auto"),
            int8_decode=switch("int8_decode"),
            prefill=text("prefill", "auto"),
            kv_cache=text("kv_cache", "fp16"),
            fused_decode=switch("fused_decode"),
            compile=False if compile_choice in _OFF else True if compile_choice in _ON else None,
            threads=int(threads) if threads else None,
            device_kernel=text("device_kernel", "auto"),
        )
