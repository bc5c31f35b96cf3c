"""DiT (``DiTTransformer2DModel``, Peebles & Xie 2023): class-conditional latent transformer with learned
variance. Conditioned on ``class_labels``; the null class (index ``num_embeds_ada_norm``, what DiTPipeline
feeds the unconditional branch) is the default and the CFG branch."""

from __future__ import annotations

from typing import Any

import torch

from ..conditioning import Conditioning, class_conditioning
from ..errors import InputError
from ..etsdm import unmapped
from ..models import EpsModel, from_module


def build(transformer: Any, scheduler_config: dict | None, name: str, device, dtype) -> EpsModel:
    def net(x: torch.Tensor, c: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        return unmapped(transformer)(x, timestep=c, class_labels=class_labels).sample

    return from_module(transformer, net, scheduler_config, None, name, device, dtype)


def conditioning(
    model: EpsModel, class_labels: list[int] | None = None, guidance_scale: float | None = None, **other: Any
) -> Conditioning:
    """Labels cycled over the samples (none: the null class, unconditional); CFG against the null class."""
    if any(v for v in other.values()):
        raise InputError(f"`model` {model.name} is class-conditional (DiT): give `class_labels`, not text conditioning")
    n_cls = int(model.config.get("num_embeds_ada_norm") or 1000)
    return class_conditioning(model.name, class_labels, guidance_scale, n_cls, n_cls)  # type: ignore[return-value]
