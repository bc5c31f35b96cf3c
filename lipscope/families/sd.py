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
from ..errors import InputError
from ..etsdm import unmapped
from ..models import EpsModel, from_module
from .embeds import text_conditioning


def encode(pipe: Any, prompts: list[str], negative: str | None, device) -> dict[str, torch.Tensor]:
    """StableDiffusion(XL)Pipeline.encode_prompt with guidance on, as ``__call__`` calls it (SDXL: the pipeline's own
    zeros for an empty negative prompt when ``force_zeros_for_empty_prompt``)."""
    neg = None if negative is None else [negative] * len(prompts)
    if hasattr(pipe, "text_encoder_2"):
        pe, npe, ppe, nppe = pipe.encode_prompt(
            prompt=prompts,
            device=device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=True,
            negative_prompt=neg,
        )
        return {
            "prompt_embeds": pe,
            "negative_prompt_embeds": npe,
            "pooled_prompt_embeds": ppe,
            "negative_pooled_prompt_embeds": nppe,
        }
    pe, npe = pipe.encode_prompt(prompts, device, 1, True, negative_prompt=neg)
    return {"prompt_embeds": pe, "negative_prompt_embeds": npe}


def build(unet: Any, scheduler_config: dict | None, name: str, device, dtype) -> EpsModel:
    cin, cout = unet.config.get("in_channels"), unet.config.get("out_channels")
    if cin != cout:  # inpainting (9 → 4), depth or instruct UNets take extra image channels
        raise InputError(
            f"`model` {name}: its UNet takes {cin} input channels for {cout} output channels (an inpainting, depth "
            "or image-conditioned UNet); lipscope probes text-to-image UNets"
        )

    def net(x: torch.Tensor, c: torch.Tensor, encoder_hidden_states: torch.Tensor, **added: Any) -> torch.Tensor:
        return unmapped(unet)(x, c, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added or None).sample

    return from_module(unet, net, scheduler_config, None, name, device, dtype)


def conditioning(
    model: EpsModel, prompt_embeds: Any = None, guidance_scale: float | None = None, **other: Any
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
