"""Unconditional pixel- or latent-space ``UNet2DModel`` (DDPM, LDM, score-SDE, E-TSDM): the adapter in
:func:`lipscope.models.from_unet`."""

from __future__ import annotations

from ..models import from_unet as build

__all__ = ["build"]
