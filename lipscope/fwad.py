"""Forward-mode AD through diffusers networks (DESIGN.md, "Exact derivative"): the patches that give every
layer a forward-AD formula, applied inside a context manager that restores the module exactly."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager

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


@contextmanager
def forward_ad_patches(module: nn.Module | None) -> Iterator[None]:
    """Make a diffusers network differentiable with forward-mode AD, and restore it exactly afterwards.

    Two known blockers: the fused SDPA kernels have no forward-AD formula, so attention runs on PyTorch's
    math SDPA backend (``sdpa_kernel(MATH)``: every attention processor — cross, joint (SD3), Flux,
    PixArt — keeps its own maths, only the kernel changes); and the native GroupNorm's forward AD fails on
    non-contiguous tangents (each GroupNorm instance gets a functional forward).
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
        with sdpa_kernel([SDPBackend.MATH]):
            yield
    finally:
        for mod in patched_gn:
            del mod.forward
