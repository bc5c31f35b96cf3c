"""Conditioning of a conditional denoiser (class labels, text embeddings, SDXL's added conditions) and
classifier-free guidance, as per-row tensors aligned with the probe's samples.

Row r of every tensor belongs to sample r: with P prompts or labels, sample i is conditioned on number
i mod P (recorded in run.json), so each (sample, condition) pair keeps its own noise stream and nothing
depends on the batch size. ``cond`` holds the denoiser's keyword arguments for the conditional branch,
``uncond`` those of the unconditional one (the null class, the empty or negative prompt). With
``guidance_scale`` w the field probed is the one samplers integrate, ε_u + w (ε_c − ε_u), both branches
packed in one network call.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import InputError

Kwargs = dict[str, Any]  # tensors (rows first) or nested dicts of them (SDXL's added_cond_kwargs)


def _map(kw: Kwargs, fn) -> Kwargs:
    return {k: (_map(v, fn) if isinstance(v, dict) else fn(v)) for k, v in kw.items()}


def _rows(kw: Kwargs) -> set[int]:
    out: set[int] = set()
    for v in kw.values():
        out |= _rows(v) if isinstance(v, dict) else {int(v.shape[0])}
    return out


def cat_kwargs(a: Kwargs, b: Kwargs) -> Kwargs:
    """Row-wise concatenation of two kwarg sets of the same structure (both CFG branches in one call)."""
    return {k: (cat_kwargs(v, b[k]) if isinstance(v, dict) else torch.cat([v, b[k]])) for k, v in a.items()}


@dataclass(frozen=True)
class Conditioning:
    """What a conditional denoiser is fed besides x and t: P conditions, cycled over the samples."""

    cond: Kwargs
    uncond: Kwargs | None = None
    guidance_scale: float | None = None
    info: dict[str, Any] = field(default_factory=dict)  # what run.json records (prompts, labels, source)

    def __post_init__(self) -> None:
        sizes = _rows(self.cond) | (_rows(self.uncond) if self.uncond is not None else set())
        if len(sizes) != 1:
            raise InputError(f"conditioning tensors disagree on the number of conditions ({sorted(sizes)})")
        if self.guidance_scale is not None and self.uncond is None:
            raise InputError("`guidance_scale` needs the unconditional branch (the null class or empty prompt)")

    @property
    def count(self) -> int:
        """P, the number of distinct conditions."""
        return next(iter(_rows(self.cond)))

    def rows(self, idx: torch.Tensor, device: torch.device, dtype: torch.dtype) -> tuple[Kwargs, Kwargs | None]:
        """(cond, uncond) kwargs for samples ``idx`` (sample i gets condition i mod P), on device; float
        tensors in ``dtype``."""
        sel = (torch.as_tensor(idx).reshape(-1) % self.count).cpu()

        def pick(v: torch.Tensor) -> torch.Tensor:
            v = v[sel].to(device)
            return v.to(dtype) if v.is_floating_point() else v

        return _map(self.cond, pick), (_map(self.uncond, pick) if self.uncond is not None else None)

    def digest(self) -> str:
        """sha256 (16 hex) of every tensor and the guidance scale: part of the sample-cache key."""
        h = hashlib.sha256(repr(self.guidance_scale).encode())
        for branch in (self.cond, self.uncond or {}):
            for k, v in sorted(_flat(branch).items()):
                t = v.detach().cpu().contiguous()
                h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
                h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()[:16]


def _flat(kw: Kwargs, prefix: str = "") -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for k, v in kw.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def guided(eps_c: torch.Tensor, eps_u: torch.Tensor, w: float) -> torch.Tensor:
    """ε_u + w (ε_c − ε_u): the classifier-free guided field (w = 1: the conditional ε)."""
    return eps_u + w * (eps_c - eps_u)
