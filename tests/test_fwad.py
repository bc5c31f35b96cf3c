"""lipscope.fwad's linear/convolution/GroupNorm/attention patches: the tangents of torch's own forward-AD formulas (to
rounding), the primal bit-exact, and one matmul or convolution per layer for the tangent instead of two (issue 22)."""

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


def _qkv(shape_q=(2, 3, 5, 4), s_len=7, dv=6):
    g = torch.Generator().manual_seed(1)
    b, h, _, d = shape_q
    q = torch.randn(shape_q, dtype=torch.float64, generator=g)
    k = torch.randn((b, h, s_len, d), dtype=torch.float64, generator=g)
    v = torch.randn((b, h, s_len, dv), dtype=torch.float64, generator=g)
    return q, k, v, [torch.randn_like(a) for a in (q, k, v)]


SDPA_CASES = {
    "plain": {},
    "scale": {"scale": 0.37},
    "float-mask": {"attn_mask": "float"},
    "bool-mask (math fallback)": {"attn_mask": "bool"},
    "causal (math fallback)": {"is_causal": True},
}


def _sdpa_kwargs(case, s_len=7):
    kw = dict(SDPA_CASES[case])
    g = torch.Generator().manual_seed(2)
    if kw.get("attn_mask") == "float":  # an additive bias broadcast over heads, as diffusers' prepare_attention_mask
        kw["attn_mask"] = torch.randn((2, 1, 5, s_len), dtype=torch.float64, generator=g)
    elif kw.get("attn_mask") == "bool":
        kw["attn_mask"] = torch.rand((2, 1, 5, s_len), generator=g) > 0.3
        kw["attn_mask"][..., 0] = True  # no fully masked row
    return kw


@pytest.mark.parametrize("case", list(SDPA_CASES))
@pytest.mark.parametrize("zero", ["none", "q", "k", "v", "qk", "qkv"])
def test_sdpa_tangent_equals_torch_math_formula(case, zero):
    """The written-out attention JVP against torch's own forward AD of the math SDPA path, float64, with absent
    tangents (inputs closed over, as the weights-only parts of a network are). Tolerance: float64 u = 1.1e-16; the two
    formulas sum the same ≤ S·d = 28 products of O(1)-O(10) terms in another order, plus the softmax's exp: ≤ 1e-13."""
    q, k, v, tangents = _qkv()
    kw = _sdpa_kwargs(case)
    moving = [name not in zero for name in "qkv"] if zero != "none" else [True] * 3
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def call(*xs):
        it = iter(xs)
        args = [next(it) if m else a for m, a in zip(moving, (q, k, v), strict=True)]
        query, key, value = args  # by keyword, as diffusers' attention dispatcher calls it
        return nn.functional.scaled_dot_product_attention(query=query, key=key, value=value, **kw)

    primals = tuple(a for m, a in zip(moving, (q, k, v), strict=True) if m) or (q,)
    tans = tuple(t for m, t in zip(moving, tangents, strict=True) if m) or (tangents[0],)
    if not any(moving):  # every tangent absent: differentiate w.r.t. an unused input
        f = call

        def call(x):  # noqa: F811
            return f() + 0 * x.sum()

    with torch.no_grad():
        with sdpa_kernel([SDPBackend.MATH]):
            ref = torch.func.jvp(call, primals, tans)
        with forward_ad_patches(nn.Linear(1, 1)):
            got = torch.func.jvp(call, primals, tans)
    torch.testing.assert_close(got[0], ref[0], rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(got[1], ref[1], rtol=1e-13, atol=1e-13)


def test_sdpa_patch_is_applied_and_undone():
    """Inside the patches diffusers' processors (``F.scaled_dot_product_attention``) get the written-out rule; after
    them, torch's own function again."""
    original = nn.functional.scaled_dot_product_attention
    with forward_ad_patches(nn.Linear(1, 1)):
        assert nn.functional.scaled_dot_product_attention is not original
        q, k, v, _ = _qkv()
        with Count() as c:  # the rule's primal: two matmuls, as the math path
            nn.functional.scaled_dot_product_attention(q, k, v)
        assert c.n == 2
    assert nn.functional.scaled_dot_product_attention is original
