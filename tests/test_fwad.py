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
    "float-mask-one-row": {"attn_mask": "float-row"},
    "bool-mask (math fallback)": {"attn_mask": "bool"},
    "causal (math fallback)": {"is_causal": True},
}


def _sdpa_kwargs(case, s_len=7):
    kw = dict(SDPA_CASES[case])
    g = torch.Generator().manual_seed(2)
    if kw.get("attn_mask") == "float":  # an additive bias broadcast over heads, as diffusers' prepare_attention_mask
        kw["attn_mask"] = torch.randn((2, 1, 5, s_len), dtype=torch.float64, generator=g)
    elif kw.get("attn_mask") == "float-row":  # a key-padding bias, broadcast over the query rows
        kw["attn_mask"] = torch.randn((2, 1, 1, s_len), dtype=torch.float64, generator=g)
    elif kw.get("attn_mask") == "bool":
        kw["attn_mask"] = torch.rand((2, 1, 5, s_len), generator=g) > 0.3
        kw["attn_mask"][..., 0] = True  # no fully masked row
    return kw


@pytest.mark.parametrize("chunked", [False, True], ids=["whole", "row-chunks"])
@pytest.mark.parametrize("case", list(SDPA_CASES))
@pytest.mark.parametrize("zero", ["none", "q", "k", "v", "qk", "qkv"])
def test_sdpa_tangent_equals_torch_math_formula(case, zero, chunked, monkeypatch):
    """The written-out attention JVP against torch's own forward AD of the math SDPA path, float64, with absent
    tangents (inputs closed over, as the weights-only parts of a network are), over the whole score matrix and in
    chunks of query rows (a budget of 2 rows of 5: chunks 2, 2, 1). Tolerance: float64 u = 1.1e-16; the two formulas
    sum the same ≤ S·d = 28 products of O(1)-O(10) terms in another order, plus the softmax's exp: ≤ 1e-13."""
    import lipscope.fwad

    if chunked:  # batch 2 × heads 3 × keys 7 per query row
        monkeypatch.setitem(lipscope.fwad.CHUNK_ELEMENTS, "cpu", 2 * 3 * 7 * 2)
        assert [r.stop for r in lipscope.fwad._row_chunks(*_qkv()[:2])] == [2, 4, 5]
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


GN_INPUTS = {  # the layouts diffusers feeds GroupNorm: NCHW, channels-last (after an attention block), transposed 3-D
    "nchw": lambda x: x,
    "channels-last": lambda x: x.contiguous(memory_format=torch.channels_last),
    "transposed-3d": lambda x: x.flatten(2).transpose(1, 2).contiguous().transpose(1, 2),
}


@pytest.mark.parametrize("layout", list(GN_INPUTS))
@pytest.mark.parametrize("offset", [0.0, 1e3])
def test_groupnorm_layouts_and_offsets(layout, offset):
    """The per-channel-coefficient formula against torch's own forward AD of the composite GroupNorm, float64, in every
    layout it meets, with the group means 1000× the spread (x̂ comes centred from the kernel, so nothing cancels):
    differences are sums in another order, ≤ 1e-13 relative to the tangent's size."""
    torch.manual_seed(3)
    gn = _affine(nn.GroupNorm(4, 8)).double()
    x = GN_INPUTS[layout](torch.randn(2, 8, 6, 6, dtype=torch.float64) + offset)
    v = GN_INPUTS[layout](torch.randn(2, 8, 6, 6, dtype=torch.float64))

    def composite(xx):
        xg = xx.reshape(2, 4, -1)
        y = (xg - xg.mean(-1, keepdim=True)) / torch.sqrt(xg.var(-1, unbiased=False, keepdim=True) + gn.eps)
        return y.reshape(xx.shape) * gn.weight.reshape(1, -1, *[1] * (xx.ndim - 2)) + gn.bias.reshape(
            1, -1, *[1] * (xx.ndim - 2)
        )

    if layout == "transposed-3d":
        x, v = x.flatten(2), v.flatten(2)
    with torch.no_grad():
        ref = torch.func.jvp(composite, (x,), (v,))[1]
        with forward_ad_patches(gn):
            got = torch.func.jvp(gn, (x,), (v,))
    assert torch.equal(got[0], gn(x))  # the primal is the stock call
    torch.testing.assert_close(got[1], ref, rtol=1e-13, atol=1e-13 * ref.abs().max().item())


def test_groupnorm_float32_offset_within_float32_rounding():
    """float32 with means 100× the spread: the patched tangent is as close to the float64 truth as torch's own
    formula is (both within a small multiple of float32's u = 6e-8 relative to the tangent)."""
    torch.manual_seed(4)
    gn = _affine(nn.GroupNorm(4, 8)).double()
    x, v = torch.randn(2, 8, 6, 6, dtype=torch.float64) + 100.0, torch.randn(2, 8, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        truth = torch.func.jvp(gn, (x,), (v,))[1]
        gn32, x32, v32 = gn.float(), x.float(), v.float()
        torch_own = torch.func.jvp(gn32, (x32,), (v32,))[1].double()
        with forward_ad_patches(gn32):
            got = torch.func.jvp(gn32, (x32,), (v32,))[1].double()
    scale = truth.abs().max().item()
    err_own, err = (torch_own - truth).abs().max().item() / scale, (got - truth).abs().max().item() / scale
    assert err <= max(4 * err_own, 100 * 6e-8), (err, err_own)


def test_channels_last_conv_weight_copied_once_per_context():
    """A convolution fed a channels-last input copies its weight to channels-last on every call (torch's kernel);
    patched, the copy is made once per context and shared by the primal and the tangent, with the primal bit-equal to
    the stock call and the tangent equal to torch's formula."""
    torch.manual_seed(5)
    conv = nn.Conv2d(16, 16, 3, padding=1).double()
    x = torch.randn(2, 16, 5, 5, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    v = torch.randn_like(x)

    def weight_copies(fn) -> int:  # the kernel's own copy happens below the dispatcher: count it in the profiler
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            fn()
        return sum(
            e.count
            for e in prof.key_averages(group_by_input_shape=True)
            if e.key == "aten::copy_" and e.input_shapes and e.input_shapes[0] == list(conv.weight.shape)
        )

    with torch.no_grad():
        ref = torch.func.jvp(conv, (x,), (v,))
        stock_n = weight_copies(lambda: [torch.func.jvp(conv, (x,), (v,)) for _ in range(3)])
        got = []
        with forward_ad_patches(conv):
            patched_n = weight_copies(lambda: got.extend(torch.func.jvp(conv, (x,), (v,)) for _ in range(3)))
    assert stock_n >= 6 and patched_n == 1, (stock_n, patched_n)  # stock: primal and tangent, every call
    for g in got:
        assert torch.equal(g[0], ref[0])
        torch.testing.assert_close(g[1], ref[1], rtol=1e-13, atol=1e-13)


def test_dual_tensor_jvp_equals_torch_func_jvp():
    """lipscope.fwad.jvp (dual tensors) against torch.func.jvp of the same patched network, float64: a small UNet with
    an attention block (so channels-last convolutions, the attention rule and GroupNorm all run). Same formulas, same
    order: equal to rounding of a float64 sum (1e-12 of the tangent's size); a function that ignores its input gets a
    zero tangent, as torch.func.jvp gives."""
    import diffusers

    from lipscope.fwad import jvp

    torch.manual_seed(6)
    unet = diffusers.UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, block_out_channels=(16, 32), layers_per_block=1,
        norm_num_groups=8, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    ).double().eval()  # fmt: skip
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    t = torch.tensor([3.0, 500.0], dtype=torch.float64)

    def f(s):
        return unet(x, s).sample

    with torch.no_grad(), forward_ad_patches(unet):
        ref = torch.func.jvp(f, (t,), (torch.ones_like(t),))
        got = jvp("unet", f, (t,), (torch.ones_like(t),))
        const = jvp("const", lambda s: x * 2, (t,), (torch.ones_like(t),))
    assert torch.equal(got[0], ref[0])
    torch.testing.assert_close(got[1], ref[1], rtol=1e-12, atol=1e-12 * ref[1].abs().max().item())
    assert ref[1].abs().max() > 0 and torch.equal(const[1], torch.zeros_like(x))


def test_compiled_network_is_refused():
    """torch.compile drops dual-tensor tangents (bench_compile_jvp: a zero derivative): the patches refuse a compiled
    network, or one holding a compiled part, in one line, before anything runs."""
    from lipscope.errors import InputError

    for net in (torch.compile(nn.Linear(2, 2)), nn.Sequential(nn.Linear(2, 2), torch.compile(nn.Linear(2, 2)))):
        with pytest.raises(InputError, match="compiled"), forward_ad_patches(net):
            pass


def test_patches_run_without_an_autograd_graph():
    """The rules keep their outputs on ctx; with a graph that is a reference cycle through C++ that Python never frees
    (measured: +1.1 GB per PixArt-S JVP under torch.func.jvp with grad enabled). Inside the patches grad is off."""
    assert torch.is_grad_enabled()
    with forward_ad_patches(nn.Linear(1, 1)):
        assert not torch.is_grad_enabled()
    assert torch.is_grad_enabled()
