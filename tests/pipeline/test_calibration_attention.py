"""The calibration forwards' attention (pipeline/attention.py) against transformers' own sdpa function."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from tests.tiny import make_tiny_model, sample_text, tiny_tokenizer
from transformers.integrations.sdpa_attention import sdpa_attention_forward

import bitsmith.pipeline.attention as calib_attention
from bitsmith.calib import calibration_batches
from bitsmith.kernels.attention import causal_prefill
from bitsmith.pipeline.attention import attention_forward, calibration_attention

needs_kernel = pytest.mark.skipif(causal_prefill(torch.zeros(1, 2, 16), torch.zeros(1, 2, 16), torch.zeros(1, 2, 16), 0, 1.0)
                                  is None, reason="no native causal attention kernel on this build")


class _Attention(torch.nn.Module):
    is_causal = True

    def __init__(self, groups: int) -> None:
        super().__init__()
        self.num_key_value_groups = groups


def _qkv(batch: int, heads: int, kv: int, tokens: int, dim: int, dtype: torch.dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    shape = lambda h: (batch, h, tokens, dim)  # noqa: E731
    return [torch.randn(*shape(h), generator=g).to(dtype) for h in (heads, kv, kv)]


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-6), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("batch, heads, kv, tokens, dim", [(2, 9, 3, 77, 64), (1, 4, 4, 33, 16), (3, 6, 2, 128, 32)])
def test_equals_sdpa(dtype, tol, batch, heads, kv, tokens, dim) -> None:
    """Causal, no mask, grouped heads, windows that are not whole blocks of 32 query rows; bf16 within
    one bf16 rounding of the output (both round a float32 result), float32 to summation order."""
    module = _Attention(heads // kv)
    q, k, v = _qkv(batch, heads, kv, tokens, dim, dtype, seed=tokens + dim)
    got, weights = attention_forward(module, q, k, v, None, scaling=dim ** -0.5)
    want, _ = sdpa_attention_forward(module, q, k, v, None, scaling=dim ** -0.5)
    assert weights is None and got.dtype == want.dtype and got.shape == want.shape == (batch, tokens, heads, dim)
    assert torch.allclose(got.float(), want.float(), atol=tol, rtol=tol)


def test_other_calls_go_to_sdpa_unchanged() -> None:
    """A mask, one query row (decode), a sliding window shorter than the window, logit soft-capping:
    transformers' function computes them, bit for bit."""
    module = _Attention(2)
    q, k, v = _qkv(1, 4, 2, 40, 16, torch.float32, seed=1)
    mask = torch.ones(40, 40, dtype=torch.bool).tril()[None, None]
    for got, want in [
        (attention_forward(module, q, k, v, mask), sdpa_attention_forward(module, q, k, v, mask)),
        (attention_forward(module, q[:, :, -1:], k, v, None), sdpa_attention_forward(module, q[:, :, -1:], k, v, None)),
        (attention_forward(module, q, k, v, None, sliding_window=8),
         sdpa_attention_forward(module, q, k, v, None, sliding_window=8)),
    ]:
        assert torch.equal(got[0], want[0])
    calls = []
    original = calib_attention._sdpa
    try:
        calib_attention._sdpa = lambda: (lambda *a, **kw: calls.append(kw) or (None, None))  # noqa: E731
        attention_forward(module, q, k, v, None, softcap=30.0)
    finally:
        calib_attention._sdpa = original
    assert calls and calls[0]["softcap"] == 30.0  # sdpa's own error for soft-capping is kept


def test_the_context_sets_and_restores_the_implementation() -> None:
    config = SimpleNamespace(_attn_implementation="sdpa")
    with calibration_attention(config):
        assert config._attn_implementation == calib_attention.NAME
    assert config._attn_implementation == "sdpa"
    eager = SimpleNamespace(_attn_implementation="eager")
    with calibration_attention(eager):
        assert eager._attn_implementation == "eager"  # not ours to replace
    with calibration_attention(config, enabled=False):
        assert config._attn_implementation == "sdpa"
    with pytest.raises(RuntimeError), calibration_attention(config):
        raise RuntimeError("a failed block")
    assert config._attn_implementation == "sdpa"


def test_a_config_that_refuses_the_name_keeps_sdpa() -> None:
    class Strict:
        def __init__(self) -> None:
            self._impl = "sdpa"

        @property
        def _attn_implementation(self) -> str:
            return self._impl

        @_attn_implementation.setter
        def _attn_implementation(self, value: str) -> None:
            if value not in ("sdpa", "eager"):
                raise ValueError(f"unknown attention {value}")
            self._impl = value

    config = Strict()
    with calibration_attention(config):
        assert config._attn_implementation == "sdpa"
    assert config._attn_implementation == "sdpa"


@needs_kernel
def test_the_pipeline_runs_its_blocks_on_the_kernel(tmp_path, monkeypatch) -> None:
    """GPTQ on a tiny llama: every block forward's attention takes the kernel (none falls back), and the
    checkpoint is the one sdpa gives up to float summation order (float32 forwards here)."""
    from tests.pipeline.test_layerwise import tensors

    from bitsmith.pipeline.layerwise import quantize_blocks
    from bitsmith.pipeline.plan import QuantizePlan
    from bitsmith.spec import QuantSpec

    folder = make_tiny_model(tmp_path / "m")
    calib = calibration_batches(tiny_tokenizer(), sample_text(800), seq_len=64, samples=4)
    plan = QuantizePlan(QuantSpec.parse("w4g32"), "gptq", batch_size=2)
    taken = []
    plain = calib_attention._plain_causal
    monkeypatch.setattr(calib_attention, "_plain_causal", lambda *a: taken.append(plain(*a)) or taken[-1])
    native = tensors(quantize_blocks(folder, tmp_path / "native", plan, calib))
    assert taken and all(taken)
    monkeypatch.setattr(calib_attention, "_plain_causal", lambda *a: False)  # every call on sdpa
    reference = tensors(quantize_blocks(folder, tmp_path / "sdpa", plan, calib))
    assert native.keys() == reference.keys()
    codes = [n for n in native if n.endswith(".qweight")]
    assert codes
    for name in native:
        if name.endswith(".qweight"):  # GPTQ may round a code the other way where a value sat on a tie
            assert (native[name] == reference[name]).float().mean() > 0.98, name
        else:
            assert torch.allclose(native[name].float(), reference[name].float(), rtol=1e-2, atol=1e-5), name
