"""Forward-mode AD through diffusers networks (DESIGN.md, "Exact derivative"): the patches that give every
layer a forward-AD formula, applied inside a context manager that restores the module exactly."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


def _group_norm_forward(mod: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    """GroupNorm from reshape/mean/var: same maths as the fused kernel, with a forward-AD formula
    that accepts the non-contiguous tangents the native one rejects."""
    b = x.shape[0]
    xg = x.reshape(b, mod.num_groups, -1)
    mean = xg.mean(-1, keepdim=True)
    var = xg.var(-1, unbiased=False, keepdim=True)
    y = ((xg - mean) * torch.rsqrt(var + mod.eps)).reshape(x.shape)
    if mod.affine:
        shape = (1, -1) + (1,) * (x.ndim - 2)
        y = y * mod.weight.reshape(shape) + mod.bias.reshape(shape)
    return y


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

    Two known blockers: the fused SDPA kernels have no forward-AD formula, so attention runs on PyTorch's
    math SDPA backend (``sdpa_kernel(MATH)``: every attention processor — cross, joint (SD3), Flux,
    PixArt — keeps its own maths, only the kernel changes); and the native GroupNorm's forward AD fails on
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
            if isinstance(mod, nn.GroupNorm) and "forward" not in mod.__dict__:
                # instance-level patch, undone by `del mod.forward` below; mypy forbids assigning to a method
                mod.forward = functools.partial(_group_norm_forward, mod)  # type: ignore[method-assign]
                patched_gn.append(mod)
            elif hasattr(mod, "moe_infer") and hasattr(mod, "experts") and "forward" not in mod.__dict__:
                mod.forward = functools.partial(_moe_forward, mod)
                patched_gn.append(mod)
        with sdpa_kernel([SDPBackend.MATH]):
            yield
    finally:
        for mod in patched_gn:
            del mod.forward
