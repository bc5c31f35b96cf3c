"""Forward-mode AD through diffusers networks (DESIGN.md, "Exact derivative"): the patches that give every
layer a forward-AD formula, applied inside a context manager that restores the module exactly, and the one JVP call
every exact estimator (JVP, along the ODE, attribution) goes through, with its one-line refusals."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.autograd.forward_ad as fwad_api
from torch import nn

from .errors import InputError


class _GroupNorm(torch.autograd.Function):
    """GroupNorm by the native kernel, with a forward-AD formula written out in per-channel coefficients:
    y_t = a·x_t + b·x̂ + c with a = γr, b = −γr·mean(x̂·x_t), c = −γr·mean(x_t) per (sample, group) (+ x̂·γ_t + β_t
    where those exist), x̂ = (x − μ)·r from the NCHW kernel without the affine (centred there, so no cancellation
    when |μ| ≫ σ). Two fused passes and two reductions over the activation, in any memory format: torch's own
    formula rejects non-contiguous tangents, and the composite one (reshape, var_mean, …) costs a dozen passes."""

    @staticmethod
    def forward(x: torch.Tensor, weight: Any, bias: Any, groups: int, eps: float) -> torch.Tensor:
        return nn.functional.group_norm(x, groups, weight, bias, eps)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
        ctx.set_materialize_grads(False)
        ctx.x, ctx.weight, _, ctx.groups, ctx.eps = inputs

    @staticmethod
    def jvp(ctx: Any, x_t: Any, w_t: Any, b_t: Any, *_: Any) -> torch.Tensor:
        x, g = ctx.x, ctx.groups
        n, c = x.shape[0], x.shape[1]
        hw = x.numel() // (n * c) if x.numel() else 0
        # x̂ and r by the NCHW kernel (Welford: accurate when |μ| ≫ σ, where the channels-last kernel's one-pass
        # moments lose digits): one copy of a channels-last activation
        xhat, _mean, rstd = torch.native_group_norm(x.contiguous(), None, None, n, c, hw, g, ctx.eps)
        xhat = xhat.view(x.shape)
        dims = tuple(range(2, x.ndim))
        per_channel = (n, c) + (1,) * (x.ndim - 2)  # coefficients broadcast over the spatial dims
        if x_t is not None:
            size = (c // g) * hw  # elements per group

            def group_mean(v: torch.Tensor) -> torch.Tensor:  # (n, c) per-channel sums → per-channel group means
                per_ch = v.sum(dims) if dims else v
                return (per_ch.view(n, g, -1).sum(-1, keepdim=True) / size).expand(n, g, c // g).reshape(n, c)

            a = rstd.view(n, g, 1).expand(n, g, c // g).reshape(n, c)
            if ctx.weight is not None:
                a = a * ctx.weight
            b = -a * group_mean(xhat * x_t)
            out = torch.addcmul((-a * group_mean(x_t)).view(per_channel), x_t, a.view(per_channel))  # x_t's layout
            out = out.addcmul_(xhat, b.view(per_channel))
        else:
            out = torch.zeros_like(x)
        shape = (1, -1) + (1,) * (x.ndim - 2)
        if w_t is not None:
            out = out + xhat * w_t.reshape(shape)
        if b_t is not None:
            out = out + b_t.reshape(shape)
        return out


def _group_norm_forward(mod: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    return _GroupNorm.apply(x, mod.weight, mod.bias, mod.num_groups, mod.eps)


class _WeightOp(torch.autograd.Function):
    """``op(x, weight, bias)`` (a linear map or convolution) whose forward-AD formula computes only the tangents that
    exist: torch's own formula for ``addmm``/``convolution`` also multiplies the primal input by the weight's zero
    tangent (a materialised zero: a second full matmul or convolution per layer in a JVP w.r.t. t). ``weight_cl``:
    the weight's channels-last copy for channels-last inputs of a convolution (:func:`_conv_forward`), or None."""

    @staticmethod
    def forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, op: Any, conv: bool,
                weight_cl: torch.Tensor | None) -> torch.Tensor:  # fmt: skip
        return op(x, _laid_out(x, weight, weight_cl), bias)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
        ctx.set_materialize_grads(False)  # absent tangents arrive as None instead of zeros
        ctx.x, ctx.weight, _, ctx.op, ctx.conv, ctx.weight_cl = inputs
        ctx.shape = output.shape

    @staticmethod
    def jvp(ctx: Any, x_t: Any, w_t: Any, b_t: Any, *_: Any) -> torch.Tensor:
        # linear in (x, weight, bias): the tangent is op(x_t, W) + op(x, W_t) + b_t, each term only where it exists
        x = ctx.x
        if x_t is None:
            out = torch.zeros(ctx.shape, dtype=x.dtype, device=x.device)
        else:
            out = ctx.op(x_t, _laid_out(x_t, ctx.weight, ctx.weight_cl), None)
        if w_t is not None:
            out = out + ctx.op(x, w_t, None)
        if b_t is not None:  # a convolution's bias is per channel (dim 1), a linear map's per feature (last dim)
            out = out + (b_t.reshape(-1, *([1] * (out.ndim - 2))) if ctx.conv else b_t)
        return out


def _linear_forward(mod: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return _WeightOp.apply(x, mod.weight, mod.bias, nn.functional.linear, False, None)


def _channels_last(x: torch.Tensor) -> bool:
    """Whether a convolution lays ``x`` out channels-last (``suggest_memory_format``), as it does after an attention
    block in diffusers' UNets (the processor's transpose-reshape): it then copies its weight to channels-last."""
    return x.ndim == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def _laid_out(x: torch.Tensor, weight: torch.Tensor, weight_cl: torch.Tensor | None) -> torch.Tensor:
    return weight_cl if weight_cl is not None and _channels_last(x) else weight


def _conv_forward(mod: nn.Conv2d, cache: dict[nn.Module, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """A convolution whose weight, for a channels-last input, is the channels-last copy the kernel would make itself
    on every call, made once per patch context (``cache``) and shared by the primal and the tangent: the same values
    in the same kernel, without two weight copies per layer and evaluation (8 % of a CIFAR-10 UNet JVP on CPU, by
    profile). Only the module's own parameter is cached (a weight substituted by ``functional_call`` is used as
    given)."""

    def conv(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        return nn.functional.conv2d(x, w, b, mod.stride, mod.padding, mod.dilation, mod.groups)

    w, weight_cl = mod.weight, None
    if isinstance(w, nn.Parameter) and w.is_contiguous() and _channels_last(x):
        if mod not in cache:
            cache[mod] = w.detach().contiguous(memory_format=torch.channels_last)
        weight_cl = cache[mod]
    return _WeightOp.apply(x, w, mod.bias, conv, True, weight_cl)


CHUNK_ELEMENTS = {"cpu": 2**20, "cuda": 2**27}  # score-matrix elements per chunk of query rows (others: unchunked)


def _row_chunks(q: torch.Tensor, k: torch.Tensor) -> list[slice]:
    """Query-row slices whose score blocks hold at most ``CHUNK_ELEMENTS[device]`` elements: on CPU 4 MB, so the
    softmax and the tangent's elementwise passes run in cache (a 1024-token attention's JVP 12.9 → 6.8 fused forwards);
    on CUDA 512 MB, bounding the tangent's temporaries without many small launches. One slice where it all fits."""
    rows_total = q.shape[-2]
    per_row = max(1, k.shape[-2] * (q.numel() // max(1, q.shape[-1] * rows_total)))  # S × batch·heads
    rows = max(1, CHUNK_ELEMENTS.get(q.device.type, 2**62) // per_row)
    return [slice(r, min(rows_total, r + rows)) for r in range(0, rows_total, rows)]


def _rows(mask: Any, r: slice) -> Any:
    """The rows ``r`` of an additive mask broadcast over the query axis or not."""
    return None if mask is None else (mask if mask.shape[-2] == 1 else mask[..., r, :])


class _Attention(torch.autograd.Function):
    """softmax(S)·V with S = Q Kᵀ·scale (+ an additive mask), whose forward-AD formula reuses the primal's P:
    dO = P dV + (P ⊙ dS) V − rowsum(P ⊙ dS) ⊙ O with dS = [dQ, Q]·scale [K, dK]ᵀ (+ dM) (one matmul of twice the
    head dim), each term only where its tangent exists, in chunks of query rows (:func:`_row_chunks`; P kept per
    chunk). The math SDPA path's own formula cost 6–7 fused forwards per attention on CPU (12 at 1024 tokens of head
    dim 16); this one 2.5–3.4 (5)."""

    @staticmethod
    def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Any, scale: float) -> tuple:
        chunks = _row_chunks(q, k)
        qs, kt = q * scale, k.transpose(-2, -1).contiguous()
        if len(chunks) == 1:
            s = torch.matmul(qs, kt)
            p = torch.softmax(s if mask is None else s.add_(mask), dim=-1)
            return torch.matmul(p, v), p
        ps, os, v = [], [], v.contiguous()  # one copy, not one per chunk
        for r in chunks:
            sc = torch.matmul(qs[..., r, :], kt)
            ps.append(torch.softmax(sc if mask is None else sc.add_(_rows(mask, r)), dim=-1))
            os.append(torch.matmul(ps[-1], v))
        return torch.cat(os, dim=-2), *ps

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        ctx.set_materialize_grads(False)
        ctx.q, ctx.k, ctx.v, _, ctx.scale = inputs
        ctx.o, ctx.ps = output[0], output[1:]
        ctx.mark_non_differentiable(*ctx.ps)

    @staticmethod
    def jvp(ctx: Any, q_t: Any, k_t: Any, v_t: Any, m_t: Any, *_: Any) -> tuple:
        q, k, v, o, ps = ctx.q, ctx.k, ctx.v, ctx.o, ctx.ps
        chunks = _row_chunks(q, k)
        nones = (None,) * len(ps)
        # dS = [dQ, Q]·scale @ [K, dK]ᵀ, or the one term that exists
        lhs = [a for a, b in ((q_t, k), (q, k_t)) if a is not None and b is not None]
        rhs = [b for a, b in ((q_t, k), (q, k_t)) if a is not None and b is not None]
        qq = None if not lhs else (torch.cat(lhs, -1) if len(lhs) > 1 else lhs[0]) * ctx.scale
        kk = None if not rhs else (torch.cat(rhs, -1) if len(rhs) > 1 else rhs[0]).transpose(-2, -1).contiguous()
        outs, v = [], v.contiguous() if len(ps) > 1 else v
        v_t = v_t.contiguous() if v_t is not None and len(ps) > 1 else v_t
        for r, p in zip(chunks, ps, strict=True):
            ds = None if qq is None or kk is None else torch.matmul(qq[..., r, :], kk)
            mt = _rows(m_t, r)
            if mt is not None:
                ds = mt.expand(p.shape).clone() if ds is None else ds.add_(mt)
            out = torch.zeros_like(o[..., r, :]) if v_t is None else torch.matmul(p, v_t)
            if ds is not None:
                pds = ds.mul_(p)
                out = out.add_(torch.matmul(pds, v)).sub_(o[..., r, :] * pds.sum(-1, keepdim=True))
            outs.append(out)
        return (outs[0] if len(outs) == 1 else torch.cat(outs, dim=-2)), *nones


def _sdpa(original: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """``scaled_dot_product_attention`` through ``_Attention`` where its formula applies (no dropout, no causal or
    boolean mask, no grouped heads, equal head dims); anything else goes to ``original`` on the math backend."""

    @functools.wraps(original)
    def sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: Any = None,
             dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None, enable_gqa: bool = False,
             ) -> torch.Tensor:  # fmt: skip
        q, k, v = query, key, value  # torch's own parameter names: diffusers' dispatcher passes them by keyword
        plain = dropout_p == 0.0 and not is_causal and not enable_gqa and q.shape[:-2] == k.shape[:-2] == v.shape[:-2]
        if plain and (attn_mask is None or attn_mask.is_floating_point()):
            s = q.shape[-1] ** -0.5 if scale is None else scale
            return _Attention.apply(q, k, v, attn_mask, s)[0]
        return original(q, k, v, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)

    return sdpa


def _moe_forward(mod: Any, x: torch.Tensor) -> torch.Tensor:
    """HiDream's mixture-of-experts in eval mode, its dispatch written with boolean masks (what its training branch
    does) instead of expert counts read through numpy, which torch.func's wrapped tensors cannot give."""
    topk_idx, topk_weight, _ = mod.gate(x)
    flat = x.view(-1, x.shape[-1]).repeat_interleave(mod.num_activated_experts, dim=0)
    idx = topk_idx.view(-1)
    y = torch.zeros_like(flat)
    for i, expert in enumerate(mod.experts):
        mask = idx == i
        y = y.index_put((mask,), expert(flat[mask]).to(flat.dtype))
    y = (y.view(*topk_weight.shape, -1) * topk_weight.unsqueeze(-1)).sum(dim=1)
    return y.view(*x.shape) + mod.shared_experts(x)


@contextmanager
def forward_ad_patches(module: nn.Module | None) -> Iterator[None]:
    """Make a diffusers network differentiable with forward-mode AD, and restore it exactly afterwards.

    Two known blockers: the fused SDPA kernels have no forward-AD formula, so ``F.scaled_dot_product_attention``
    is swapped, for the duration, for ``_Attention`` (its JVP written out; every attention processor — cross,
    joint (SD3), Flux, PixArt — keeps its own maths, only the kernel changes), the math backend taking the cases it
    does not cover; and the native GroupNorm's forward AD fails on
    non-contiguous tangents (each GroupNorm instance gets a functional forward). HiDream's mixture of experts
    reads expert counts through numpy in eval mode; it gets the same dispatch written with masks.
    """
    if module is None:
        yield
        return
    refuse_compiled(module)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    patched_gn: list[nn.Module] = []
    cl_weights: dict[nn.Module, torch.Tensor] = {}  # channels-last conv weights, for this context only
    try:
        for mod in module.modules():
            if "forward" in mod.__dict__:
                continue
            if type(mod).forward is nn.Linear.forward and isinstance(mod, nn.Linear):
                mod.forward = functools.partial(_linear_forward, mod)  # type: ignore[method-assign]
                patched_gn.append(mod)
            elif (
                type(mod).forward is nn.Conv2d.forward
                and isinstance(mod, nn.Conv2d)
                and mod.padding_mode == "zeros"
                and not isinstance(mod.padding, str)
            ):
                mod.forward = functools.partial(_conv_forward, mod, cl_weights)  # type: ignore[method-assign]
                patched_gn.append(mod)
            elif isinstance(mod, nn.GroupNorm):
                # instance-level patch, undone by `del mod.forward` below; mypy forbids assigning to a method
                mod.forward = functools.partial(_group_norm_forward, mod)  # type: ignore[method-assign]
                patched_gn.append(mod)
            elif hasattr(mod, "moe_infer") and hasattr(mod, "experts") and "forward" not in mod.__dict__:
                mod.forward = functools.partial(_moe_forward, mod)
                patched_gn.append(mod)
        original = nn.functional.scaled_dot_product_attention
        nn.functional.scaled_dot_product_attention = _sdpa(original)  # diffusers' processors call it as F.…
        try:  # no autograd graph: the rules keep their outputs on ctx, a cycle through C++ that would never be freed
            with sdpa_kernel([SDPBackend.MATH]), torch.no_grad():
                yield
        finally:
            nn.functional.scaled_dot_product_attention = original
    finally:
        for mod in patched_gn:
            del mod.forward
        cl_weights.clear()


def refuse_compiled(module: nn.Module) -> None:
    """A ``torch.compile``-d network (or one holding a compiled part) returns a zero tangent to dual-tensor forward AD
    (measured: benchmarks/bench_compile_jvp.py, torch 2.13): one line instead of a silent K of 0."""
    from torch._dynamo.eval_frame import OptimizedModule

    if any(isinstance(m, OptimizedModule) for m in module.modules()):
        raise InputError(
            "the network is compiled (torch.compile): forward-mode AD through a compiled graph returns a zero "
            "derivative; pass the uncompiled network for `method` jvp (or use `method` fd)"
        )


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def jvp(name: str, fn: Callable[..., torch.Tensor], primals: tuple, tangents: tuple) -> tuple[torch.Tensor, ...]:
    """(fn(*primals), its JVP along ``tangents``) by forward-mode AD with dual tensors, without autograd; a network
    that forward AD cannot go through is one line naming ``name`` (an out-of-memory error goes to the batched
    runner's back-off). Dual tensors rather than ``torch.func.jvp``: the same formulas, but each custom forward-AD
    rule (:class:`_WeightOp`, …) is called without functorch's per-call wrapping (13 % of a CIFAR-10 UNet JVP)."""
    try:
        with torch.no_grad(), fwad_api.dual_level():
            out = fn(*(fwad_api.make_dual(p, t) for p, t in zip(primals, tangents, strict=True)))
            primal, tangent = fwad_api.unpack_dual(out)
    except (NotImplementedError, RuntimeError) as e:  # only the JVP itself: not the runner, not the gather
        if _is_oom(e):
            raise
        raise InputError(
            f"{name} cannot be differentiated in t with forward-mode AD ({str(e).splitlines()[0][:160]}); "
            "use `method` fd"
        ) from e
    return primal, torch.zeros_like(primal) if tangent is None else tangent


def refuse_learned_embedding(name: str, config: dict) -> None:
    """A learned embedding table looks t up: ε is not differentiable in t."""
    if config.get("time_embedding_type") == "learned":
        raise InputError(
            f"{name} looks timesteps up in a learned embedding table: ε is not differentiable in t; use `method` fd"
        )


def check_tangent_reaches(model: Callable, name: str, x: torch.Tensor, tt: torch.Tensor, tangent: torch.Tensor,
                          rows: torch.Tensor) -> None:  # fmt: skip
    """A zero tangent where a one-step difference of ``model(x, t, rows)`` moves means t reaches the network through
    an integer cast or a table: forward AD would silently report 0."""
    if tangent.abs().max() > 0:
        return
    with torch.inference_mode():
        lo = torch.clamp(tt - 1, min=0)
        d = model(x, lo + 1, rows) - model(x, lo, rows)
    if (etsdm := getattr(model, "etsdm", None)) is not None:  # E-TSDM's f jumps at a boundary, f' = 0: no cast
        a = lo.double().cpu().numpy()
        d = d[torch.as_tensor(~etsdm.crosses(a, a + 1), device=d.device)]
    if d.numel() and d.abs().max() > 0:
        raise InputError(
            f"{name}: the timestep does not reach the network differentiably (d/dt is 0 but ε changes "
            "between steps: an integer cast or embedding table); use `method` fd"
        )
