"""lipscope.fwad's linear/convolution/GroupNorm patches: the tangents of torch's own forward-AD formulas (to rounding),
the primal bit-exact, and one matmul or convolution per layer for the tangent instead of two (issue 22 item 1)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from lipscope.fwad import forward_ad_patches

LAYERS = {
    "linear": (lambda: nn.Linear(6, 5), (3, 4, 6)),
    "linear-no-bias": (lambda: nn.Linear(6, 5, bias=False), (7, 6)),
    "conv": (lambda: nn.Conv2d(4, 6, 3, padding=1), (2, 4, 5, 5)),
    "conv-strided-grouped": (lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2), (2, 4, 6, 6)),
    "groupnorm": (lambda: _affine(nn.GroupNorm(2, 4)), (3, 4, 5, 5)),
    "groupnorm-no-affine": (lambda: nn.GroupNorm(2, 4, affine=False), (3, 4, 5)),
}
HEAVY = [k for k in LAYERS if not k.startswith("groupnorm")]


def _affine(gn: nn.GroupNorm) -> nn.GroupNorm:
    nn.init.normal_(gn.weight)
    nn.init.normal_(gn.bias)
    return gn


class Count(TorchDispatchMode):
    """Counts the heavy aten ops dispatched (matmuls and convolutions), tangents included."""

    HEAVY = ("mm", "addmm", "bmm", "convolution")

    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += func.overloadpacket.__name__ in self.HEAVY
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", list(LAYERS))
def test_patched_tangent_equals_torch_formula(name):
    make, shape = LAYERS[name]
    torch.manual_seed(0)
    layer = make().double()
    x, v = torch.randn(shape, dtype=torch.float64), torch.randn(shape, dtype=torch.float64)
    with torch.no_grad():
        ref = torch.func.jvp(layer, (x,), (v,))
        with forward_ad_patches(layer):
            got = torch.func.jvp(layer, (x,), (v,))
    assert torch.equal(got[0], ref[0])  # the primal is the same call
    torch.testing.assert_close(got[1], ref[1], rtol=1e-13, atol=1e-13)  # float64: a sum in another order at most


@pytest.mark.parametrize("name", list(LAYERS))
def test_weight_and_bias_tangents_are_kept(name):
    """A caller that does differentiate in the weights gets op(x, W_t) + b_t too (the patch is not t-specific)."""
    make, shape = LAYERS[name]
    torch.manual_seed(1)
    layer = make().double()
    x = torch.randn(shape, dtype=torch.float64)
    params = dict(layer.named_parameters())
    tangents = {k: torch.randn_like(p) for k, p in params.items()}
    vx = torch.randn_like(x)

    def f(xx, pp):
        return torch.func.functional_call(layer, pp, (xx,))

    with torch.no_grad():
        ref = torch.func.jvp(f, (x, params), (vx, tangents))[1]
        with forward_ad_patches(layer):
            got = torch.func.jvp(f, (x, params), (vx, tangents))[1]
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", HEAVY)
def test_one_heavy_op_for_the_tangent(name):
    """Unpatched, torch's formula also multiplies x by the weight's materialised zero tangent: 3 heavy ops per JVP of
    one layer; patched: the primal and the tangent, 2."""
    make, shape = LAYERS[name]
    layer = make()
    x, v = torch.randn(shape), torch.randn(shape)
    with torch.no_grad(), forward_ad_patches(layer), Count() as c:
        torch.func.jvp(layer, (x,), (v,))
    assert c.n == 2


def test_groupnorm_takes_non_contiguous_tangents():
    """The native GroupNorm's forward AD rejects them; the patch matches the composite formula (float64)."""
    torch.manual_seed(2)
    gn = _affine(nn.GroupNorm(2, 4)).double()
    x = torch.randn(3, 4, 5, 5, dtype=torch.float64)
    v = torch.randn(3, 4, 5, 5, dtype=torch.float64).transpose(2, 3)

    def composite(xx):
        xg = xx.reshape(3, 2, -1)
        y = (xg - xg.mean(-1, keepdim=True)) / torch.sqrt(xg.var(-1, unbiased=False, keepdim=True) + gn.eps)
        return y.reshape(xx.shape) * gn.weight.reshape(1, -1, 1, 1) + gn.bias.reshape(1, -1, 1, 1)

    with torch.no_grad():
        ref = torch.func.jvp(composite, (x,), (v,))
        with forward_ad_patches(gn):
            got = torch.func.jvp(gn, (x,), (v,))
    torch.testing.assert_close(got, ref, rtol=1e-13, atol=1e-13)
