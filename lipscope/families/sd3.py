"""Stable Diffusion 3 (``SD3Transformer2DModel``): a flow-matching MMDiT on latents, conditioned on
``encoder_hidden_states`` and ``pooled_projections`` (encode_prompt's ``prompt_embeds`` and
``pooled_prompt_embeds``), fed the timestep σ·1000 (:class:`lipscope.processes.FlowProcess`)."""

from __future__ import annotations

from typing import Any

import torch

from ..conditioning import Conditioning
from ..models import EpsModel, from_module
from .embeds import text_conditioning


def build(transformer: Any, scheduler_config: dict | None, name: str, device, dtype) -> EpsModel:
    def net(x: torch.Tensor, c: torch.Tensor, encoder_hidden_states: torch.Tensor, pooled_projections: torch.Tensor):
        return transformer(
            hidden_states=x,
            timestep=c,
            encoder_hidden_states=encoder_hidden_states,
            pooled_projections=pooled_projections,
        ).sample

    return from_module(transformer, net, scheduler_config, None, name, device, dtype)


def conditioning(
    model: EpsModel, prompt_embeds: str | None = None, guidance_scale: float | None = None, **other: Any
) -> Conditioning:
    def branch(t: dict[str, torch.Tensor], prefix: str) -> dict[str, Any]:
        return {
            "encoder_hidden_states": t[f"{prefix}prompt_embeds"],
            "pooled_projections": t[f"{prefix}pooled_prompt_embeds"],
        }

    dim = int(model.config.get("joint_attention_dim") or 0)
    keys = ("prompt_embeds", "pooled_prompt_embeds")
    return text_conditioning(model, prompt_embeds, guidance_scale, other, keys, dim, branch)
