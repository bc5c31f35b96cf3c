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


@contextmanager
def forward_ad_patches(module: nn.Module | None) -> Iterator[None]:
    """Make a diffusers UNet differentiable with forward-mode AD, and restore it exactly afterwards.

    Two known blockers: SDPA attention kernels have no forward-AD formula (swap each diffusers
    ``Attention``'s processor for the plain ``AttnProcessor``), and the native GroupNorm's forward
    AD fails on non-contiguous tangents (give each GroupNorm instance a functional forward).
    """
    if module is None:
        yield
        return
    from diffusers.models.attention_processor import Attention, AttnProcessor

    saved_proc: list[tuple[nn.Module, Any]] = []
    patched_gn: list[nn.Module] = []
    try:
        for mod in module.modules():
            if isinstance(mod, Attention):
                saved_proc.append((mod, mod.processor))
                mod.processor = AttnProcessor()
            elif isinstance(mod, nn.GroupNorm) and "forward" not in mod.__dict__:
                # instance-level patch, undone by `del mod.forward` below; mypy forbids assigning to a method
                mod.forward = functools.partial(_group_norm_forward, mod)  # type: ignore[method-assign]
                patched_gn.append(mod)
        yield
    finally:
        for mod, proc in saved_proc:
            mod.processor = proc
        for mod in patched_gn:
            del mod.forward
