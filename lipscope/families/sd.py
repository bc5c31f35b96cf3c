"""Stable Diffusion 1.x/2.x and SDXL (``UNet2DConditionModel``): text-conditioned latent UNets.

Conditioned on ``encoder_hidden_states`` (and, for SDXL, ``added_cond_kwargs`` text_embeds/time_ids), read
from a ``prompt_embeds`` safetensors file with the keys the pipelines' ``encode_prompt`` returns:
``prompt_embeds`` (P, L, D), ``negative_prompt_embeds`` (the unconditional branch: needed for CFG), and for
SDXL ``pooled_prompt_embeds``, ``negative_pooled_prompt_embeds`` and optionally ``add_time_ids`` (P, 6) or (6,)
(default: the pipeline's (H, W, 0, 0, H, W) for the autoencoder's pixel size).
"""

from __future__ import annotations

from typing import Any

import torch

from ..conditioning import Conditioning
from ..models import EpsModel, from_module
from .embeds import text_conditioning


def build(unet: Any, scheduler_config: dict | None, name: str, device, dtype) -> EpsModel:
    def net(x: torch.Tensor, c: torch.Tensor, encoder_hidden_states: torch.Tensor, **added: Any) -> torch.Tensor:
        return unet(x, c, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added or None).sample

    return from_module(unet, net, scheduler_config, None, name, device, dtype)


def conditioning(
    model: EpsModel, prompt_embeds: str | None = None, guidance_scale: float | None = None, **other: Any
) -> Conditioning:
    cfg = model.config
    xl = cfg.get("addition_embed_type") == "text_time"

    def branch(t: dict[str, torch.Tensor], prefix: str) -> dict[str, Any]:
        kw: dict[str, Any] = {"encoder_hidden_states": t[f"{prefix}prompt_embeds"]}
        if xl:
            p = kw["encoder_hidden_states"].shape[0]
            ids = t.get("add_time_ids")
            if ids is None:  # the pipeline's (H, W, 0, 0, H, W) for the autoencoder's pixel size
                shape = model.latent.pixel_shape if model.latent is not None else model.sample_shape or (0, 0, 0)
                ids = torch.tensor([shape[1], shape[2], 0, 0, shape[1], shape[2]], dtype=torch.float32)
            kw["text_embeds"] = t[f"{prefix}pooled_prompt_embeds"]
            kw["time_ids"] = ids.reshape(-1, 6).expand(p, 6).clone() if ids.numel() == 6 else ids
        return kw

    keys = ("prompt_embeds", "pooled_prompt_embeds") if xl else ("prompt_embeds",)
    dim = int(cfg.get("cross_attention_dim") or 0)
    return text_conditioning(model, prompt_embeds, guidance_scale, other, keys, dim, branch)
