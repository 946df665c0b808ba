"""The fused verify step (infer/verify.py, csrc/verify.cpp) against T successive one-token fused steps
(csrc/decode.cpp), bit for bit, with the default int8-activation decode: logits and KV cache rows, tiny
llama / qwen2 (biases) / gemma3 (sliding window shorter than the sequence, softcap) models whose widths
take the int8 kernels (hidden 128), 4-bit superblock, 8-bit and 3-bit (one-row fallback) layouts, fp16
and fp32 caches, one and two threads; then greedy speculative decoding through it equals plain decoding."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from tests.infer.test_lean import ARCHS
from tests.tiny import make_tiny_model

from bitsmith.infer.generate import generate
from bitsmith.infer.lean import LeanRunner, lean_plan
from bitsmith.infer.speculative import speculative_generate
from bitsmith.infer.verify import FusedVerifier, fused_verifier
from bitsmith.runtime.options import RuntimeOptions

FAST = RuntimeOptions(int8_decode=True, kv_cache="fp16")  # plain decoding's default arithmetic
WIDE = dict(hidden_size=128, intermediate_size=256, head_dim=32)  # multiples of 64: the int8 (VBMI) kernels take them
SPECS = ["w4g128", "w4g64", "w8", "w3g64"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict:
    from bitsmith.pipeline.outputs import DEFAULT_OUTPUT_SPEC, parse_output_spec, with_output_spec
    from bitsmith.pipeline.plan import QuantizePlan
    from bitsmith.pipeline.quantize import quantize
    from bitsmith.spec import QuantSpec

    root = tmp_path_factory.mktemp("verify")
    out = {}
    for arch in ARCHS:
        src = make_tiny_model(root / arch, arch, seed=5, **{**ARCHS[arch], **WIDE})
        for spec in SPECS if arch == "llama" else SPECS[:1]:
            # the CLI's default w8 head: the fused step (and so the verify) runs the head natively
            plan = with_output_spec(QuantizePlan(QuantSpec.parse(spec)), src, parse_output_spec(DEFAULT_OUTPUT_SPEC))
            out[arch, spec] = quantize(src, root / f"{arch}-{spec}", plan)
    return out


def load(folder, options: RuntimeOptions = FAST):
    from bitsmith.runtime.load import load_model

    loaded = load_model(folder, options=options)
    return loaded.model.eval(), loaded.tokenizer


def two_runners(model, options: RuntimeOptions, max_len: int = 64) -> tuple[LeanRunner, LeanRunner, FusedVerifier]:
    plan = lean_plan(model)
    plain, checked = LeanRunner(plan, max_len, options), LeanRunner(plan, max_len, options)
    verifier = fused_verifier(checked)
    assert verifier is not None, "the fused verify was not taken"
    return plain, checked, verifier


CASES = [(arch, "w4g128", kv, 1) for arch in ARCHS for kv in ("fp16", "fp32")] + \
        [("llama", spec, "fp16", 1) for spec in SPECS[1:]] + [("llama", "w4g128", "fp16", 2), ("gemma3_text", "w4g128", "fp16", 2)]


@pytest.mark.parametrize("arch,spec,kv,threads", CASES)
def test_verify_rows_are_the_one_token_steps(arch: str, spec: str, kv: str, threads: int, checkpoints) -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        options = replace(FAST, kv_cache=kv)
        model, _ = load(checkpoints[arch, spec], options)
        plain, checked, verify = two_runners(model, options)
        g = torch.Generator().manual_seed(hash((arch, spec, kv)) % 1000)
        prompt = torch.randint(3, 100, (14,), generator=g)
        with torch.no_grad():
            plain(prompt)
            checked(prompt)
            for rows, back in ((2, 0), (5, 3), (8, 0), (1, 0), (4, 2), (7, 0)):  # back: a rejection's rollback
                ids = torch.randint(3, 100, (rows,), generator=g).tolist()
                want = torch.stack([plain([i]) for i in ids])
                got = verify(checked, ids)
                assert torch.equal(got, want), (rows, (got - want).abs().max())
                assert checked.pos == plain.pos
                plain.pos -= back
                checked.pos -= back
            for i in range(len(plain.keys)):  # every cache row both runners hold
                assert torch.equal(plain.keys[i][:, : plain.pos], checked.keys[i][:, : plain.pos])
                assert torch.equal(plain.values[i][:, : plain.pos], checked.values[i][:, : plain.pos])
    finally:
        torch.set_num_threads(before)


def test_the_comparison_can_fail(checkpoints) -> None:
    """A verify at the wrong position gives other logits (the equality above is not vacuous)."""
    model, _ = load(checkpoints["llama", "w4g128"])
    plain, checked, verify = two_runners(model, FAST)
    with torch.no_grad():
        plain([5, 6, 7])
        checked([5, 6, 7])
        checked.pos -= 1
        want = torch.stack([plain([i]) for i in (8, 9)])
        assert not torch.equal(verify(checked, [8, 9]), want)


def test_exact_float_decode_and_torch_decode_keep_the_batched_forward(checkpoints) -> None:
    exact = replace(FAST, int8_decode=False)
    model, _ = load(checkpoints["llama", "w4g128"], exact)
    assert fused_verifier(LeanRunner(lean_plan(model), 16, exact)) is None
    model, _ = load(checkpoints["llama", "w4g128"])
    assert fused_verifier(LeanRunner(lean_plan(model), 16, replace(FAST, fused_decode=False))) is None


@pytest.mark.parametrize("k", [1, 3, 7])
def test_greedy_speculation_at_int8_is_plain_decoding(k: int, checkpoints) -> None:
    target, tok = load(checkpoints["llama", "w4g128"])
    draft, _ = load(checkpoints["llama", "w3g64"])
    for prompt in ("the cat sat on", "def add(a, b):", "one two three"):
        plain = generate(target, tok, prompt, max_new_tokens=24, stop_at_eos=False, options=FAST)
        spec = speculative_generate(target, draft, tok, prompt, k=k, max_new_tokens=24, stop_at_eos=False,
                                    options=FAST)
        assert spec.generation.token_ids == plain.token_ids, prompt
        assert spec.stats.rounds > 0
