"""Forward-mode AD through diffusers networks (DESIGN.md, "Exact derivative"): the patches that give every
layer a forward-AD formula, applied inside a context manager that restores the module exactly, and the one JVP call
every exact estimator (JVP, along the ODE, attribution) goes through, with its one-line refusals."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from .errors import InputError


class _GroupNorm(torch.autograd.Function):
    """GroupNorm by the native kernel, with a forward-AD formula written out: x̂ = (x − μ)·r per group, and
    x̂_t = r·(c − x̂·mean(x̂·c)) with c = x_t − mean(x_t); y_t = x̂_t·γ (+ x̂·γ_t + β_t where those exist). The native
    formula rejects non-contiguous tangents, and the composite one (reshape, mean, var) costs a dozen passes."""

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
        xg = x.reshape(x.shape[0], g, -1)
        var, mean = torch.var_mean(xg, dim=-1, unbiased=False, keepdim=True)
        r = torch.rsqrt(var + ctx.eps)
        xhat = (xg - mean) * r
        shape = (1, -1) + (1,) * (x.ndim - 2)
        out = torch.zeros_like(x)
        if x_t is not None:
            c = x_t.reshape(xg.shape)
            c = c - c.mean(-1, keepdim=True)
            dxhat = (c - xhat * (xhat * c).mean(-1, keepdim=True)) * r
            out = dxhat.reshape(x.shape) * (1.0 if ctx.weight is None else ctx.weight.reshape(shape))
        if w_t is not None:
            out = out + xhat.reshape(x.shape) * w_t.reshape(shape)
        if b_t is not None:
            out = out + b_t.reshape(shape)
        return out


def _group_norm_forward(mod: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    return _GroupNorm.apply(x, mod.weight, mod.bias, mod.num_groups, mod.eps)


class _WeightOp(torch.autograd.Function):
    """``op(x, weight, bias)`` (a linear map or convolution) whose forward-AD formula computes only the tangents that
    exist: torch's own formula for ``addmm``/``convolution`` also multiplies the primal input by the weight's zero
    tangent (a materialised zero: a second full matmul or convolution per layer in a JVP w.r.t. t)."""

    @staticmethod
    def forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, op: Any, conv: bool) -> torch.Tensor:
        return op(x, weight, bias)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
        ctx.set_materialize_grads(False)  # absent tangents arrive as None instead of zeros
        ctx.x, ctx.weight, _, ctx.op, ctx.conv = inputs
        ctx.shape = output.shape

    @staticmethod
    def jvp(ctx: Any, x_t: Any, w_t: Any, b_t: Any, *_: Any) -> torch.Tensor:
        # linear in (x, weight, bias): the tangent is op(x_t, W) + op(x, W_t) + b_t, each term only where it exists
        x = ctx.x
        out = torch.zeros(ctx.shape, dtype=x.dtype, device=x.device) if x_t is None else ctx.op(x_t, ctx.weight, None)
        if w_t is not None:
            out = out + ctx.op(x, w_t, None)
        if b_t is not None:  # a convolution's bias is per channel (dim 1), a linear map's per feature (last dim)
            out = out + (b_t.reshape(-1, *([1] * (out.ndim - 2))) if ctx.conv else b_t)
        return out


def _linear_forward(mod: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return _WeightOp.apply(x, mod.weight, mod.bias, nn.functional.linear, False)


def _conv_forward(mod: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    def conv(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        return nn.functional.conv2d(x, w, b, mod.stride, mod.padding, mod.dilation, mod.groups)

    return _WeightOp.apply(x, mod.weight, mod.bias, conv, True)


class _Attention(torch.autograd.Function):
    """softmax(S)·V with S = Q Kᵀ·scale (+ an additive mask), whose forward-AD formula reuses the primal's P:
    dO = P dV + (P ⊙ dS) V − rowsum(P ⊙ dS) ⊙ O with dS = (dQ Kᵀ + Q dKᵀ)·scale (+ dM), each term only where its
    tangent exists. The math SDPA path's own formula cost 6–7 fused forwards per attention on CPU; this one 2.5."""

    @staticmethod
    def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Any, scale: float) -> tuple:
        s = torch.matmul(q, k.transpose(-2, -1)).mul_(scale)
        if mask is not None:
            s = s + mask
        p = torch.softmax(s, dim=-1)
        return torch.matmul(p, v), p

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        ctx.set_materialize_grads(False)
        ctx.q, ctx.k, ctx.v, _, ctx.scale = inputs
        ctx.o, ctx.p = output
        ctx.mark_non_differentiable(ctx.p)

    @staticmethod
    def jvp(ctx: Any, q_t: Any, k_t: Any, v_t: Any, m_t: Any, _: Any) -> tuple:
        q, k, p, o = ctx.q, ctx.k, ctx.p, ctx.o
        ds = None if q_t is None else torch.matmul(q_t, k.transpose(-2, -1))
        if k_t is not None:
            qk_t = torch.matmul(q, k_t.transpose(-2, -1))
            ds = qk_t if ds is None else ds.add_(qk_t)
        ds = None if ds is None else ds.mul_(ctx.scale)
        if m_t is not None:
            ds = m_t.expand(p.shape).clone() if ds is None else ds.add_(m_t)
        out = torch.zeros_like(o) if v_t is None else torch.matmul(p, v_t)
        if ds is not None:
            pds = ds.mul_(p)
            out = out.add_(torch.matmul(pds, ctx.v)).sub_(o * pds.sum(-1, keepdim=True))
        return out, None


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
    from torch.nn.attention import SDPBackend, sdpa_kernel

    patched_gn: list[nn.Module] = []
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
                mod.forward = functools.partial(_conv_forward, mod)  # type: ignore[method-assign]
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
        try:
            with sdpa_kernel([SDPBackend.MATH]):
                yield
        finally:
            nn.functional.scaled_dot_product_attention = original
    finally:
        for mod in patched_gn:
            del mod.forward


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def jvp(name: str, fn: Callable[..., torch.Tensor], primals: tuple, tangents: tuple) -> tuple[torch.Tensor, ...]:
    """(fn(*primals), its JVP along ``tangents``) by ``torch.func.jvp``, without autograd; a network that forward AD
    cannot go through is one line naming ``name`` (an out-of-memory error goes to the batched runner's back-off)."""
    try:
        with torch.no_grad():
            # torch types jvp's result as a 2- or 3-tuple (no overload on has_aux); without has_aux it is 2
            out, tangent = torch.func.jvp(fn, primals, tangents)  # type: ignore[misc]
    except (NotImplementedError, RuntimeError) as e:  # only the JVP itself: not the runner, not the gather
        if _is_oom(e):
            raise
        raise InputError(
            f"{name} cannot be differentiated in t with forward-mode AD ({str(e).splitlines()[0][:160]}); "
            "use `method` fd"
        ) from e
    return out, tangent


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
