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


def class_conditioning(
    name: str,
    class_labels: list[int] | None,
    guidance_scale: float | None,
    num_classes: int | None,
    null_class: int | None,
    required: bool = True,
) -> Conditioning | None:
    """Class labels cycled over the samples (DiT, a ``py:`` network taking ``class_labels``). No label: the null
    class (unconditional), else the network's own default (None: nothing fed; refused where it has none). CFG
    guides against the null class. ``num_classes`` None: any label ≥ 0."""
    if not class_labels:
        if guidance_scale is not None:
            raise InputError("`guidance_scale` needs `class_labels` to guide towards; give one or more labels")
        if null_class is not None:
            none = {"conditioning": f"unconditional (null class {null_class})"}
            return Conditioning({"class_labels": torch.tensor([null_class])}, info=none)
        if required:
            raise InputError(
                f"`model` {name} takes `class_labels` and has no default or null class: give `class_labels`"
            )
        return None
    top = f"{num_classes} classes (0..{num_classes - 1})" if num_classes is not None else "labels ≥ 0"
    bad = [
        c for c in class_labels if not (isinstance(c, int) and 0 <= c < (2**62 if num_classes is None else num_classes))
    ]
    if bad:
        raise InputError(f"`class_labels` {bad[0]} is out of range: {name} has {top}")
    if guidance_scale is not None and null_class is None:
        raise InputError(
            "`guidance_scale` needs an unconditional branch: give the network a null_class_label attribute (the label "
            "it was trained on for no class), or leave out `guidance_scale`"
        )
    labels = torch.tensor(class_labels)
    uncond = None if null_class is None else {"class_labels": torch.full_like(labels, null_class)}
    info: dict[str, Any] = {
        "conditioning": "class labels",
        "class_labels": list(class_labels),
        "null_class": null_class,
    }
    return Conditioning({"class_labels": labels}, uncond, guidance_scale, info)
