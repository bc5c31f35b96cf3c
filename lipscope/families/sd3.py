"""Stable Diffusion 3 (``SD3Transformer2DModel``): a flow-matching MMDiT on latents, conditioned on
``encoder_hidden_states`` and ``pooled_projections`` (encode_prompt's ``prompt_embeds`` and
``pooled_prompt_embeds``), fed the timestep σ·1000 (:class:`lipscope.processes.FlowProcess`)."""

from __future__ import annotations

from typing import Any

import torch

from ..conditioning import Conditioning
from ..etsdm import unmapped
from ..models import EpsModel, from_module
from .embeds import call_default, negatives, pooled_branch, text_conditioning


def encode(pipe: Any, prompts: list[str], negative: str | None, device) -> dict[str, torch.Tensor]:
    """StableDiffusion3Pipeline.encode_prompt with guidance on (a missing T5 gives the pipeline's zeros)."""
    pe, npe, ppe, nppe = pipe.encode_prompt(
        prompt=prompts,
        prompt_2=None,
        prompt_3=None,
        device=device,
        num_images_per_prompt=1,
        do_classifier_free_guidance=True,
        negative_prompt=None if negative is None else negatives(prompts, negative),
        max_sequence_length=call_default(pipe, "max_sequence_length", 256),
    )
    return {
        "prompt_embeds": pe,
        "negative_prompt_embeds": npe,
        "pooled_prompt_embeds": ppe,
        "negative_pooled_prompt_embeds": nppe,
    }


def build(transformer: Any, scheduler_config: dict | None, name: str, device, dtype) -> EpsModel:
    def net(x: torch.Tensor, c: torch.Tensor, encoder_hidden_states: torch.Tensor, pooled_projections: torch.Tensor):
        return unmapped(transformer)(
            hidden_states=x,
            timestep=c,
            encoder_hidden_states=encoder_hidden_states,
            pooled_projections=pooled_projections,
        ).sample

    return from_module(transformer, net, scheduler_config, None, name, device, dtype)


def conditioning(
    model: EpsModel, prompt_embeds: Any = None, guidance_scale: float | None = None, **other: Any
) -> Conditioning:
    dim = int(model.config.get("joint_attention_dim") or 0)
    keys = ("prompt_embeds", "pooled_prompt_embeds")
    return text_conditioning(model, prompt_embeds, guidance_scale, other, keys, dim, pooled_branch)
