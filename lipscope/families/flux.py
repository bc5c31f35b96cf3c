"""Flux (``FluxTransformer2DModel``, Black Forest Labs 2024): a flow-matching MMDiT on packed latents.

lipscope probes in the unpacked latent space (C, H, W) the autoencoder gives; the adapter packs 2×2 patches
into tokens (FluxPipeline ``_pack_latents``; a permutation, so every norm is unchanged), builds the image
positions ``img_ids`` and zero ``txt_ids`` (what ``encode_prompt`` returns), feeds the timestep σ = k/1000
(the pipeline's ``timestep / 1000``; the transformer multiplies by 1000 again) and unpacks the velocity.
Conditioned on T5 ``prompt_embeds`` and pooled CLIP ``pooled_prompt_embeds``. Guidance: a guidance-distilled
model (``guidance_embeds``, FLUX.1-dev) is fed the guidance value as an input (FluxPipeline's
``guidance_scale``, default 3.5) and has no unconditional branch; without it (FLUX.1-schnell) ``guidance_scale``
is classifier-free guidance against the ``negative_`` embeddings (FluxPipeline's ``true_cfg_scale``).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch

from ..conditioning import Conditioning
from ..errors import InputError
from ..etsdm import unmapped
from ..models import EpsModel, from_module
from .embeds import EncodedPrompts, call_default, negatives, pooled_branch, text_conditioning

log = logging.getLogger("lipscope")

DEFAULT_GUIDANCE = 3.5  # FluxPipeline.__call__'s guidance_scale default
DEFAULT_LATENT_SIZE = 128  # FluxPipeline.default_sample_size: 1024 px through the 8× autoencoder


def pack(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) → (B, H/2·W/2, 4C): 2×2 latent patches as tokens (FluxPipeline._pack_latents)."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The inverse of :func:`pack` (FluxPipeline._unpack_latents)."""
    b, _, d = tokens.shape
    x = tokens.view(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // 4, h, w)


def image_ids(h: int, w: int, device, dtype) -> torch.Tensor:
    """(h/2·w/2, 3) positions (0, row, col) of the packed tokens (FluxPipeline._prepare_latent_image_ids)."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] = torch.arange(h // 2)[:, None]
    ids[..., 2] = torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


def encode(pipe: Any, prompts: list[str], negative: str | None, device) -> dict[str, torch.Tensor]:
    """FluxPipeline.encode_prompt for the prompts and, as ``__call__`` does for true CFG, for the negative prompt
    (none: "")."""
    n = call_default(pipe, "max_sequence_length", 512)
    pe, ppe, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, device=device, max_sequence_length=n)
    npe, nppe, _ = pipe.encode_prompt(
        prompt=negatives(prompts, negative), prompt_2=None, device=device, max_sequence_length=n
    )
    return {"prompt_embeds": pe, "pooled_prompt_embeds": ppe, "negative_prompt_embeds": npe,
            "negative_pooled_prompt_embeds": nppe}  # fmt: skip


def build(transformer: Any, scheduler_config: dict | None, name: str, device, dtype) -> EpsModel:
    def net(
        x: torch.Tensor, c: torch.Tensor, encoder_hidden_states: torch.Tensor, pooled_projections: torch.Tensor,
        guidance: torch.Tensor | None = None,
    ) -> torch.Tensor:  # fmt: skip
        h, w = x.shape[-2:]
        out = unmapped(transformer)(
            hidden_states=pack(x),
            timestep=c / 1000,
            guidance=guidance,
            pooled_projections=pooled_projections,
            encoder_hidden_states=encoder_hidden_states,
            txt_ids=torch.zeros(encoder_hidden_states.shape[1], 3, device=x.device, dtype=x.dtype),
            img_ids=image_ids(h, w, x.device, x.dtype),
            return_dict=False,
        )[0]
        return unpack(out, h, w)

    if dtype in ("bfloat16", "float16", torch.bfloat16, torch.float16):
        log.warning(
            "%s: FluxTransformer2DModel casts the timestep to the model's dtype (%s): FD differences of nearby t "
            "are quantised; use `method` jvp or float32 for FD", name, dtype,
        )  # fmt: skip
    channels = int(transformer.config.in_channels) // 4
    shape = (channels, DEFAULT_LATENT_SIZE, DEFAULT_LATENT_SIZE)  # the autoencoder's size replaces it (loading)
    return from_module(transformer, net, scheduler_config, shape, name, device, dtype)


def conditioning(
    model: EpsModel, prompt_embeds: Any = None, guidance_scale: float | None = None, **other: Any
) -> Conditioning:
    dim = int(model.config.get("joint_attention_dim") or 0)
    keys = ("prompt_embeds", "pooled_prompt_embeds")
    if not model.config.get("guidance_embeds"):  # schnell: guidance_scale is true CFG on the negative prompt
        return text_conditioning(model, prompt_embeds, guidance_scale, other, keys, dim, pooled_branch)
    if isinstance(prompt_embeds, EncodedPrompts) and prompt_embeds.info.get("negative_prompt") is not None:
        raise InputError(
            f"`model` {model.name} is guidance-distilled (guidance_embeds): it has no negative branch; leave out "
            "`negative_prompt` (`guidance_scale` is its guidance input)"
        )
    g = DEFAULT_GUIDANCE if guidance_scale is None else float(guidance_scale)
    c = text_conditioning(model, prompt_embeds, None, other, keys, dim, pooled_branch)
    return dataclasses.replace(
        c,
        cond={**c.cond, "guidance": torch.full((c.count,), g)},
        uncond=None,
        info={**c.info, "embedded_guidance": g, "guidance": "guidance-distilled: fed as an input, no CFG branch"},
    )
