"""AWQ transform: scale groups found as data, exact folding, searches that beat plain RTN."""

from __future__ import annotations

import copy
from functools import lru_cache

import pytest
import torch
from torch import nn

from bitsmith.methods.rtn import rtn
from bitsmith.spec import QuantSpec
from bitsmith.transforms.awq import (
    SCALE_PATTERNS,
    ScalePattern,
    find_scale_groups,
    fold_scale,
)
from bitsmith.transforms.awq_search import awq_transform, clip_search
from tests.tiny import tiny_config

ARCHS = ["llama", "qwen2", "gemma3_text"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The searches make many small tensor ops; on a busy 2-core machine a second intra-op thread
    makes each one wait for the other (17 ms instead of 2 us per op), so run these single-threaded."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _block(arch: str, n: int = 4, length: int = 16, pad: bool = False, kv_heads: int = 2):
    """A fresh copy of decoder block 0 of a tiny random model, its inputs [n, length, H] and kwargs."""
    block, hidden, kwargs = _built(arch, n, length, pad, kv_heads)
    return copy.deepcopy(block), hidden.clone(), kwargs


@lru_cache(maxsize=None)
def _built(arch: str, n: int, length: int, pad: bool, kv_heads: int, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, num_key_value_heads=kv_heads)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
            elif "norm" in name:  # non-trivial norm weights, so folding into them is really tested
                p.copy_(0.1 * torch.randn_like(p) + (0.0 if arch == "gemma3_text" else 1.0))
            else:
                p.normal_(0, 0.05)  # biases
    ids = torch.randint(3, model.config.vocab_size, (n, length))
    mask = torch.ones(n, length, dtype=torch.long)
    if pad:
        mask[0, -3:] = 0  # right padding: a per-sequence attention mask kwarg with batch dim n
    block = model.model.layers[0]
    seen = {}

    def grab(_m, args, kwargs):
        seen["hidden"], seen["kwargs"] = args[0].detach().clone(), dict(kwargs)

    handle = block.register_forward_pre_hook(grab, with_kwargs=True)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, use_cache=False)
    handle.remove()
    return block, seen["hidden"], seen["kwargs"]


def _out(block: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    with torch.no_grad():
        out = block(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


class _Exact:
    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight

    def dequantize(self) -> torch.Tensor:
        return self.weight


def identity_method(weight, spec, stats, options):
    return _Exact(weight.float().clone())


def _rtn_linears(block: nn.Module, spec: QuantSpec) -> None:
    with torch.no_grad():
        for m in block.modules():
            if isinstance(m, nn.Linear):
                m.weight.copy_(rtn(m.weight, spec, None, {}).dequantize())


@pytest.mark.parametrize("arch", ARCHS)
def test_scale_groups_found(arch):
    block, _, _ = _block(arch)
    groups = find_scale_groups(block)
    mlp_norm = "pre_feedforward_layernorm" if arch == "gemma3_text" else "post_attention_layernorm"
    assert [(g.prev, g.linears, g.measure) for g in groups] == [
        ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn"),
        ("self_attn.v_proj", ("self_attn.o_proj",), "self_attn.o_proj"),
        (mlp_norm, ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
        ("mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj"),
    ]
    offset = 1.0 if arch == "gemma3_text" else 0.0  # Gemma's norm multiplies by (1 + weight)
    assert [g.norm_offset for g in groups] == [offset, None, offset, None]
    assert groups[1].kv_repeat == 2  # tiny configs use 4 query heads over 2 kv heads


@pytest.mark.parametrize("arch,kv_heads", [("llama", 2), ("llama", 4), ("qwen2", 2), ("gemma3_text", 2)])
def test_fold_keeps_float_block_output(arch, kv_heads):
    block, hidden, kwargs = _block(arch, kv_heads=kv_heads)
    reference = _out(block, hidden, kwargs)
    g = torch.Generator().manual_seed(1)
    for group in find_scale_groups(block):
        in_features = block.get_submodule(group.linears[0]).in_features
        fold_scale(block, group, torch.exp(0.7 * torch.randn(in_features, generator=g)))
    assert torch.allclose(_out(block, hidden, kwargs), reference, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_transform_with_exact_method_keeps_output(arch):
    block, hidden, kwargs = _block(arch, n=4, pad=True)
    reference = _out(block, hidden, kwargs)
    for clip in (False, True):  # an exact quantizer makes every clip ratio below 1 worse than none
        report = awq_transform(block, hidden, kwargs, QuantSpec.parse("w4g32"), identity_method,
                               {"awq_clip": clip, "awq_grid": 4}, batch_size=2)
        assert torch.allclose(_out(block, hidden, kwargs), reference, rtol=1e-4, atol=1e-5)
        assert len(report.scales) == 4 and not report.skipped
    assert {c.linear for c in report.clips} == {"self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                                                "mlp.up_proj", "mlp.down_proj"}  # q, k are not clipped
    assert all(c.min_ratio == 1.0 for c in report.clips)


def test_norm_offset_is_probed_not_named():
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from bitsmith.transforms.awq import norm_offset as _norm_offset

    class Squared(nn.Module):  # not affine in its weight: no fold possible
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.ones(8))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * self.weight**2

    layer_norm = nn.LayerNorm(8)
    with torch.no_grad():
        layer_norm.bias.fill_(0.3)
    before = layer_norm.bias.clone()
    assert _norm_offset(layer_norm) == 0.0 and torch.equal(layer_norm.bias, before)  # restored
    assert _norm_offset(LlamaRMSNorm(8)) == 0.0
    assert _norm_offset(Gemma3RMSNorm(8)) == 1.0
    assert _norm_offset(Squared()) is None


def test_wrong_pattern_is_caught_on_data_not_applied():
    """Gemma3's post_attention_layernorm does not feed the MLP; a table saying so must be rejected by
    the check on the calibration data, and the block must stay the same function."""
    block, hidden, kwargs = _block("gemma3_text")
    wrong = ScalePattern(prev=("post_attention_layernorm",), linears=("gate_proj", "up_proj"))
    assert find_scale_groups(block, (wrong,))[0].prev == "post_attention_layernorm"  # names alone match
    reference = _out(block, hidden, kwargs)
    report = awq_transform(block, hidden, kwargs, QuantSpec.parse("w4g32"), identity_method,
                           {"awq_clip": False, "awq_grid": 2}, patterns=(*SCALE_PATTERNS[:2], wrong))
    assert len(report.scales) == 2 and "post_attention_layernorm" in report.skipped[0]
    assert torch.allclose(_out(block, hidden, kwargs), reference, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("duo", [False, True])
def test_awq_beats_rtn_with_outlier_channels(duo):
    spec = QuantSpec.parse("w3g32")
    block, hidden, kwargs = _block("llama", n=8, length=32)
    hidden[..., :4] *= 20.0  # a few outlier activation channels, as in real LLMs
    with torch.no_grad():  # and salient channels after the norms
        block.post_attention_layernorm.weight[4:8] *= 8.0
    reference = _out(block, hidden, kwargs)
    plain = copy.deepcopy(block)
    _rtn_linears(plain, spec)
    report = awq_transform(block, hidden, kwargs, spec, rtn, {"awq_grid": 10, "awq_duo": duo}, batch_size=4)
    _rtn_linears(block, spec)
    err_rtn = (_out(plain, hidden, kwargs) - reference).pow(2).mean()
    err_awq = (_out(block, hidden, kwargs) - reference).pow(2).mean()
    assert err_awq < 0.8 * err_rtn, (err_awq, err_rtn)
    assert all(0.0 <= r.alpha < 1.0 and r.loss_after <= r.loss_before for r in report.scales)
    assert any(r.alpha > 0 for r in report.scales)
    assert report.to_dict()["tokens"] == 8 * 32


def test_clip_search_lowers_output_error():
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(16, 64, generator=g)
    weight[:, 3] *= 6.0  # outlier weights that stretch their groups' ranges
    inputs = torch.randn(128, 64, generator=g)
    spec = QuantSpec.parse("w3g32")
    options = {"clip_search": False}
    clipped, ratio, before, after = clip_search(weight, inputs, spec, rtn, options)
    assert ratio.shape == (16, 2) and (ratio <= 1).all() and (ratio >= 0.5).all()
    assert after < before
    assert clipped.abs().amax() <= weight.abs().amax()


def test_threaded_search_equals_sequential(monkeypatch):
    """The oracle: the same transform with the search batches and the simulated RTN's row chunks
    run one after another on this thread (plain loops instead of methods.parallel.map_chunks)."""
    from bitsmith.transforms import awq_search

    spec = QuantSpec.parse("w4g32")
    block, hidden, kwargs = _block("qwen2", n=8, length=24)
    hidden[..., :3] *= 10.0
    sequential = copy.deepcopy(block)
    monkeypatch.setattr(awq_search, "QDQ_CHUNK_WEIGHTS", 1024)  # several row chunks per linear
    torch.set_num_threads(2)  # two workers (this module otherwise runs on one thread)
    try:
        fast = awq_transform(block, hidden, kwargs, spec, rtn, {"awq_grid": 8}, batch_size=8)
    finally:
        torch.set_num_threads(1)
    monkeypatch.setattr(awq_search, "map_chunks", lambda fn, items, workers=None: [fn(i) for i in items])
    slow = awq_transform(sequential, hidden, kwargs, spec, rtn, {"awq_grid": 8}, batch_size=8)
    assert [r.alpha for r in fast.scales] == [r.alpha for r in slow.scales] and fast.scales
    for (name, a), b in zip(block.state_dict().items(), sequential.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_bf16_inputs_give_the_transform_of_their_float32_copy():
    """The pipeline hands AWQ its bf16 activation store as it is (a float32 copy of all 128 x 512 inputs was
    0.4 GB of Qwen2.5-1.5B's peak); the transform widens only the rows it runs, with the same result as on
    the float32 copy, bit for bit."""
    spec = QuantSpec.parse("w4g32")
    block, hidden, kwargs = _block("llama", n=6, length=16)
    hidden[..., :2] *= 8.0
    half = hidden.bfloat16()
    other = copy.deepcopy(block)
    a = awq_transform(block, half, kwargs, spec, rtn, {"awq_grid": 6, "awq_tokens": 48})
    b = awq_transform(other, half.float(), kwargs, spec, rtn, {"awq_grid": 6, "awq_tokens": 48})
    assert [r.alpha for r in a.scales] == [r.alpha for r in b.scales] and a.scales
    for (name, x), y in zip(block.state_dict().items(), other.state_dict().values()):
        assert torch.equal(x, y), name
