"""TunableLinear's product (recover/tunable.py RebuiltLinear) against plain autograd: the same output
and the same gradients for x, scales, zeros and vq codebooks, on fresh random layers of every grid
kind; and what it keeps for the backward pass is the input, not a float32 copy of the weight."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bitsmith.hadamard import Rotation
from bitsmith.recover.tunable import TunableLinear
from bitsmith.spec import QuantSpec
from bitsmith.tensor import QuantizedTensor
from bitsmith.transforms.rotate import rotation_for

OUT, IN = 24, 64


def layer(kind: str, seed: int, bias: bool, rotate: bool) -> TunableLinear:
    """A random quantized layer of one grid kind: affine with zeros, symmetric, nf4's fixed grid, vq."""
    g = torch.Generator().manual_seed(seed)
    spec = QuantSpec.parse({"affine": "w4g32", "symmetric": "w3g32s", "nf4": "w4g32nf", "vq": "w2g32vq"}[kind])
    groups = IN // spec.group_width(IN)
    scale = (torch.rand(OUT, groups, generator=g) * 0.1 + 0.01).half()
    rotation: Rotation | None = rotation_for(IN, seed) if rotate else None
    if kind == "vq":
        codes = torch.randint(0, spec.levels, (OUT, IN // spec.vq_dim), generator=g, dtype=torch.uint8)
        qt = QuantizedTensor(codes, scale, None, spec, torch.randn(spec.levels, spec.vq_dim, generator=g).half(), rotation)
    else:
        codes = torch.randint(0, spec.qmax + 1, (OUT, IN), generator=g, dtype=torch.uint8)
        zero = (torch.rand(OUT, groups, generator=g) * spec.qmax).half() if kind == "affine" else None
        grid = torch.sort(torch.randn(spec.qmax + 1, generator=g)).values.half() if kind == "nf4" else None
        qt = QuantizedTensor(codes, scale, zero, spec, grid, rotation)
    b = torch.randn(OUT, generator=g) if bias else None
    return TunableLinear(qt, b)


def plain(lin: TunableLinear, x: torch.Tensor) -> torch.Tensor:
    """The oracle: the product under plain autograd (W kept by F.linear)."""
    if lin.rotation is not None:
        x = lin.rotation.apply(x)
    return F.linear(x.float(), lin.weight(), lin.bias)


def grads(lin: TunableLinear, x: torch.Tensor, forward, upstream: torch.Tensor) -> tuple[torch.Tensor, dict]:
    for p in lin.parameters():
        p.grad = None
    x = x.clone().requires_grad_(True)
    y = forward(lin, x)
    (y * upstream).sum().backward()
    return y.detach(), {"x": x.grad, **{n: p.grad.clone() for n, p in lin.named_parameters()}}


@pytest.mark.parametrize("kind", ["affine", "symmetric", "nf4", "vq"])
@pytest.mark.parametrize("bias,rotate", [(False, False), (True, False), (False, True)])
@pytest.mark.parametrize("seed", [0, 1])
def test_rebuilt_product_equals_plain_autograd(kind: str, bias: bool, rotate: bool, seed: int) -> None:
    lin = layer(kind, seed, bias, rotate)
    g = torch.Generator().manual_seed(100 + seed)
    x, upstream = torch.randn(2, 5, IN, generator=g), torch.randn(2, 5, OUT, generator=g)
    y_fast, fast = grads(lin, x, lambda m, v: m(v), upstream)
    y_slow, slow = grads(lin, x, plain, upstream)
    torch.testing.assert_close(y_fast, y_slow, rtol=1e-5, atol=1e-5)
    assert set(fast) == set(slow) and {"x", "scale"} <= set(fast)
    assert ("grid" in fast) == (kind == "vq") and ("zero" in fast) == (kind == "affine")
    for name in slow:
        torch.testing.assert_close(fast[name], slow[name], rtol=1e-4, atol=1e-5, msg=f"{kind}: grad of {name}")
        assert slow[name].abs().sum() > 0, f"{name}'s gradient is zero: the comparison would prove nothing"


def saved_bytes(forward, lin: TunableLinear, x: torch.Tensor) -> int:
    """Bytes of the tensors autograd keeps for the backward pass of one forward (storage counted once)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward(lin, x)
    return sum(seen.values())


@pytest.mark.parametrize("kind", ["affine", "vq"])
def test_backward_keeps_the_input_not_the_weight(kind: str) -> None:
    lin = layer(kind, 3, bias=False, rotate=False)
    x = torch.randn(1, 4, IN, requires_grad=True)
    weight = OUT * IN * 4
    fast, slow = saved_bytes(lambda m, v: m(v), lin, x), saved_bytes(plain, lin, x)
    assert slow >= 2 * weight  # the oracle keeps W and what built it
    assert fast < weight, f"the rebuilt product keeps {fast} bytes, a float32 W is {weight}"
