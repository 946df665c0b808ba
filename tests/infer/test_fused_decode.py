"""The fused decode step (infer/fused.py, csrc/decode.cpp) against the torch lean path it replaces, on
tiny random quantized llama, qwen2 and gemma3 models (a sliding window shorter than the sequence):
logits and KV cache over many decode steps after a torch prefill, greedy tokens, several bit widths,
one and two threads, and the fallbacks (torch kernels, RuntimeOptions(fused_decode=False))."""

from __future__ import annotations

import logging
from dataclasses import replace

import pytest
import torch

from tests.infer.test_lean import ARCHS
from tests.tiny import make_tiny_model

from bitsmith.infer.fused import fused_reason
from bitsmith.infer.generate import generate
from bitsmith.infer.lean import LeanRunner, lean_plan
from bitsmith.runtime.options import RuntimeOptions

# Exact float decode throughout: these tests compare implementations at float tolerance; the
# default int8-activation 4-bit decode is held to its own oracle (test_kernels.py, and below).
EXACT = RuntimeOptions(int8_decode=False, kv_cache="fp32", prefill="exact")
ATOL = 1e-4  # float32 both ways; only the order of the sums differs
SPECS = ["w4g32", "w8", "w3g64"]  # the 4-bit fast path, whole bytes, and bit runs with a partial group (96 % 64)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict:
    """(arch, spec) -> a quantized checkpoint folder, made once for the module."""
    from bitsmith.pipeline.plan import QuantizePlan
    from bitsmith.pipeline.quantize import quantize
    from bitsmith.spec import QuantSpec

    root = tmp_path_factory.mktemp("fused")
    out = {}
    for arch in ARCHS:
        src = make_tiny_model(root / arch, arch, seed=7, **ARCHS[arch])
        for spec in SPECS:
            out[arch, spec] = quantize(src, root / f"{arch}-{spec}", QuantizePlan(QuantSpec.parse(spec)))
    return out


def load(folder, options: RuntimeOptions = EXACT):
    from bitsmith.runtime.load import load_model

    loaded = load_model(folder, options=options)
    return loaded.model.eval(), loaded.tokenizer


def runners(model, max_len: int, options: RuntimeOptions = EXACT) -> tuple[LeanRunner, LeanRunner]:
    """(torch lean runner, fused runner) over the same plan, each with its own cache."""
    plan = lean_plan(model)
    torch_runner = LeanRunner(plan, max_len, replace(options, fused_decode=False))
    fused_runner = LeanRunner(plan, max_len, replace(options, fused_decode=True))
    assert torch_runner._fused is None
    assert fused_runner._fused is not None, fused_reason(plan)
    return torch_runner, fused_runner


@pytest.mark.parametrize("kv", ["fp32", "fp16"])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("arch", list(ARCHS))
def test_fused_decode_equals_torch_lean(arch: str, spec: str, threads: int, kv: str, checkpoints, monkeypatch) -> None:
    """Both KV cache types: with fp16 the fused step must round this position's k/v as the cache
    does (the torch path reads them back from it)."""
    if threads == 2 and spec != "w4g32":
        pytest.skip("two threads: one bit width per architecture is enough")
    if kv == "fp16" and (threads == 2 or spec == "w3g64"):
        pytest.skip("fp16 cache: one thread, two widths per architecture are enough")
    options = replace(EXACT, kv_cache=kv)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model, _ = load(checkpoints[arch, spec])
        ref, fused = runners(model, 48, options)
        ids = torch.randint(0, 100, (44,), generator=torch.Generator().manual_seed(11))
        with torch.no_grad():
            torch.testing.assert_close(fused(ids[:17]), ref(ids[:17]), atol=0, rtol=0)  # prefill: the same torch code
            for pos in range(17, 44):  # 27 decode steps, gemma's window of 8 sliding past the prompt
                want = ref(ids[pos : pos + 1])
                got = fused(ids[pos : pos + 1])
                torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
        assert fused.pos == ref.pos == 44
        assert fused.keys[0].dtype == (torch.float16 if kv == "fp16" else torch.float32)
        ulp = 1e-3 if kv == "fp16" else 0  # float noise may land a value on the other side of a half's rounding
        for i in range(len(ref.keys)):  # the fused step wrote the same K/V into the shared cache layout
            torch.testing.assert_close(fused.keys[i][:, :44], ref.keys[i][:, :44], atol=ATOL, rtol=ulp)
            torch.testing.assert_close(fused.values[i][:, :44], ref.values[i][:, :44], atol=ATOL, rtol=ulp)
        # a decode step right after a reset (prefill of one token is a decode step too)
        fused.reset()
        ref.reset()
        with torch.no_grad():
            torch.testing.assert_close(fused(ids[:1]), ref(ids[:1]), atol=ATOL, rtol=0)
            torch.testing.assert_close(fused(ids[1:2], all_logits=True), ref(ids[1:2], all_logits=True),
                                       atol=ATOL, rtol=0)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_greedy_tokens_equal_with_and_without_fused_decode(arch: str, checkpoints, monkeypatch) -> None:
    model, tok = load(checkpoints[arch, "w4g32"])
    prompt = " ".join(["the cat sat on the mat and the dog ran far"] * 2)  # longer than gemma's window
    runs = []
    for flag in (False, True):
        runs.append(generate(model, tok, prompt, max_new_tokens=24, stop_at_eos=False,
                             options=replace(EXACT, fused_decode=flag)).token_ids)
    assert len(runs[0]) == 24 and runs[0] == runs[1]


def test_unsupported_plan_falls_back_with_a_reason(checkpoints, monkeypatch, caplog, exact_decode) -> None:
    """Torch kernels (not native): no fused step, the reason is logged, and the tokens are unchanged
    (exact float decode: the int8-activation path is held to its own oracle in test_kernels.py)."""
    model, tok = load(checkpoints["llama", "w4g32"], replace(exact_decode, kernel="torch"))
    with caplog.at_level(logging.INFO, logger="bitsmith.infer.fused"):
        runner = LeanRunner(lean_plan(model), 8, exact_decode)
    assert runner._fused is None
    assert "q/k/v is not a fused native kernel" in caplog.text
    fallback = generate(model, tok, "the cat sat", max_new_tokens=12, stop_at_eos=False, options=exact_decode).token_ids
    native, _ = load(checkpoints["llama", "w4g32"], replace(exact_decode, kernel="auto"))
    assert LeanRunner(lean_plan(native), 8, exact_decode)._fused is not None
    assert generate(native, tok, "the cat sat", max_new_tokens=12, stop_at_eos=False,
                    options=exact_decode).token_ids == fallback


def test_unquantized_and_bf16_models_keep_the_torch_path(caplog) -> None:
    from tests.infer.test_lean import random_model

    model = random_model("llama")
    with caplog.at_level(logging.INFO, logger="bitsmith.infer.fused"):
        assert LeanRunner(lean_plan(model), 8, EXACT)._fused is None
    assert "quantized linear" in caplog.text
    assert "bfloat16" in fused_reason(lean_plan(model.to(torch.bfloat16)))


@pytest.mark.parametrize("arch,shape", [
    ("llama", dict(hidden_size=128, num_attention_heads=2, num_key_value_heads=1)),  # head_dim 64 (SmolLM2)
    ("llama", dict(hidden_size=72, num_attention_heads=4, num_key_value_heads=2)),  # 18: no vector path
    ("gemma3_text", dict(ARCHS["gemma3_text"], head_dim=256, num_attention_heads=2, num_key_value_heads=1,
                         query_pre_attn_scalar=256)),  # 256 (Gemma 3 270M), window 8
    # several heads per KV group, attended together (attention.h): 3 of 64 (SmolLM2's 9 over 3), 4 of 64,
    # 2 of 128, 6 of 16 (chunks of 4 and 2), 3 of 32, then attend_group_v's: 6 of 128 (Qwen2.5-1.5B: 12
    # over 2), 5 of 128 (at 2 threads a chunk of 3 and one of 2), 3 of 128 in each of 2 groups
    ("llama", dict(hidden_size=192, num_attention_heads=3, num_key_value_heads=1)),
    ("llama", dict(hidden_size=512, num_attention_heads=8, num_key_value_heads=2)),
    ("llama", dict(hidden_size=256, num_attention_heads=2, num_key_value_heads=1)),
    ("llama", dict(hidden_size=96, num_attention_heads=6, num_key_value_heads=1)),
    ("llama", dict(hidden_size=192, num_attention_heads=6, num_key_value_heads=2)),
    ("llama", dict(hidden_size=768, num_attention_heads=6, num_key_value_heads=1)),
    ("llama", dict(hidden_size=640, num_attention_heads=5, num_key_value_heads=1)),
    ("llama", dict(hidden_size=768, num_attention_heads=6, num_key_value_heads=2)),
])
@pytest.mark.parametrize("threads", [1, 2])
def test_other_head_dims(arch: str, shape: dict, threads: int, tmp_path, monkeypatch) -> None:
    """The attention has a register-blocked version for head_dim = 16k and a plain one for the rest,
    and attends a KV group's heads together where that balances the threads."""
    from bitsmith.pipeline.plan import QuantizePlan
    from bitsmith.pipeline.quantize import quantize
    from bitsmith.spec import QuantSpec

    src = make_tiny_model(tmp_path / "m", arch, seed=9, **shape)
    model, _ = load(quantize(src, tmp_path / "q", QuantizePlan(QuantSpec.parse("w4g32"))))
    ref, fused = runners(model, 40)
    ids = torch.randint(0, 100, (40,), generator=torch.Generator().manual_seed(12))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            ref(ids[:9])
            fused(ids[:9])
            for pos in range(9, 40):
                torch.testing.assert_close(fused(ids[pos : pos + 1]), ref(ids[pos : pos + 1]), atol=ATOL, rtol=0)
    finally:
        torch.set_num_threads(before)


def _teacher_forced_error(ref, fused, seed: int) -> float:
    """Relative error of ``fused``'s logits against ``ref``'s over 20 teacher-forced steps of random ids
    after a 16-token prompt (a random model amplifies every rounding)."""
    ids = torch.randint(0, 100, (36,), generator=torch.Generator().manual_seed(seed))
    got, want = [], []
    with torch.no_grad():
        ref(ids[:16])
        fused(ids[:16])
        for pos in range(16, 36):
            want.append(ref(ids[pos : pos + 1]))
            got.append(fused(ids[pos : pos + 1]))
    got, want = torch.stack(got), torch.stack(want)
    return float((got - want).norm() / want.norm())


def test_int8_decode_stays_close_to_exact(checkpoints, monkeypatch) -> None:
    """The default 4-bit decode (int8 activations, fused step) against the exact float torch path:
    logits within a few percent over 20 steps of a random model (which amplifies every rounding), and
    not identical (the path really ran)."""
    exact, _ = load(checkpoints["llama", "w4g32"])
    fast, _ = load(checkpoints["llama", "w4g32"], replace(EXACT, int8_decode=True))  # the default decode kernels
    ref, fused = runners(exact, 40)[0], runners(fast, 40)[1]
    err = _teacher_forced_error(ref, fused, seed=13)
    assert 0 < err < 0.05, err


@pytest.fixture(scope="module")
def head_checkpoints(tmp_path_factory) -> dict:
    """arch -> a w4g32 checkpoint whose head (and embedding) are quantized at w8, so the fused step
    runs the final norm and head too."""
    from bitsmith.pipeline.plan import QuantizePlan
    from bitsmith.pipeline.quantize import quantize
    from bitsmith.spec import QuantSpec

    root = tmp_path_factory.mktemp("fused-head")
    out = {}
    for arch in ARCHS:
        src = make_tiny_model(root / arch, arch, seed=5, **ARCHS[arch])
        plan = QuantizePlan(QuantSpec.parse("w4g32"), quantize_head=True, quantize_embeddings=True,
                            layer_specs={"lm_head": QuantSpec.parse("w8"), "model.embed_tokens": QuantSpec.parse("w8")})
        out[arch] = quantize(src, root / f"{arch}-head", plan)
    return out


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_fused_head_equals_torch_head(arch: str, threads: int, head_checkpoints) -> None:
    """A quantized head runs inside the fused step (final norm, head, then Gemma's softcap in torch):
    the same logits as the torch lean path, step after step, and the returned logits are each step's
    own tensor (a caller keeping them must not see them overwritten)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model, _ = load(head_checkpoints[arch])
        ref, fused = runners(model, 40)
        assert fused._fused.head is not None, "the head did not fuse"
        ids = torch.randint(0, 100, (36,), generator=torch.Generator().manual_seed(17))
        got, want = [], []
        with torch.no_grad():
            ref(ids[:8])
            fused(ids[:8])
            for pos in range(8, 36):
                want.append(ref(ids[pos : pos + 1]))
                got.append(fused(ids[pos : pos + 1]))
        torch.testing.assert_close(torch.stack(got), torch.stack(want), atol=ATOL, rtol=0)
        assert not torch.equal(got[0], got[-1])
    finally:
        torch.set_num_threads(before)


def test_float_head_stays_in_torch(checkpoints) -> None:
    """A float head (the pipeline's default plan keeps it) is left to torch after the step; the
    layers still fuse."""
    model, _ = load(checkpoints["llama", "w4g32"])
    _, fused = runners(model, 16)
    from bitsmith.nn.qlinear import QuantLinear

    assert not isinstance(lean_plan(model).head, QuantLinear)
    assert fused._fused.head is None


def test_int8_decode_of_mixed_3bit_layers_stays_close_to_exact(tmp_path) -> None:
    """Layers 256 and 320 wide hold their 3-bit codes in the mixed layout (kernels/cpu.py, csrc/strided.h)
    for the int8 decode; the fused step reads them through the layout flag of its matrices. Against the
    exact float torch path on the natural bytes: within a few percent over 20 steps, as the 4-bit test
    above (a step that read the mixed bytes as natural ones would be far off)."""
    from bitsmith.pipeline.plan import QuantizePlan
    from bitsmith.pipeline.quantize import quantize
    from bitsmith.spec import QuantSpec

    src = make_tiny_model(tmp_path / "wide", "llama", seed=3, hidden_size=256, intermediate_size=320)
    folder = quantize(src, tmp_path / "w3", QuantizePlan(QuantSpec.parse("w3g64")))
    exact, _ = load(folder)
    fast, _ = load(folder, replace(EXACT, int8_decode=True))
    mixed = [m._kernel for m in fast.modules() if hasattr(m, "_kernel") and getattr(m._kernel, "mixed3", False)]
    if not mixed:
        pytest.skip("this build holds no 3-bit layer in the mixed layout (no AVX-512 VBMI + VNNI + GFNI)")
    ref, fused = runners(exact, 40)[0], runners(fast, 40)[1]
    err = _teacher_forced_error(ref, fused, seed=17)
    assert 0 < err < 0.05, err
