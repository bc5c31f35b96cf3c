"""PixArt-α/Σ (``PixArtTransformer2DModel``): a VP latent DiT with learned variance, conditioned on T5
``encoder_hidden_states`` with their ``encoder_attention_mask`` (encode_prompt's ``prompt_embeds`` and
``prompt_attention_mask``); at 1024 px (``use_additional_conditions``) also on resolution and aspect ratio."""

from __future__ import annotations

from typing import Any

import torch

from ..conditioning import Conditioning
from ..etsdm import unmapped
from ..models import EpsModel, from_module
from .embeds import call_default, text_conditioning


def encode(pipe: Any, prompts: list[str], negative: str | None, device) -> dict[str, torch.Tensor]:
    """PixArt(-Σ)Pipeline.encode_prompt with guidance on, its ``__call__``'s caption cleaning and token length."""
    pe, mask, npe, nmask = pipe.encode_prompt(
        prompts,
        do_classifier_free_guidance=True,
        negative_prompt="" if negative is None else negative,
        num_images_per_prompt=1,
        device=device,
        clean_caption=call_default(pipe, "clean_caption", True),
        max_sequence_length=call_default(pipe, "max_sequence_length", 120),
    )
    return {"prompt_embeds": pe, "prompt_attention_mask": mask, "negative_prompt_embeds": npe,
            "negative_prompt_attention_mask": nmask}  # fmt: skip


def build(transformer: Any, scheduler_config: dict | None, name: str, device, dtype) -> EpsModel:
    def net(
        x: torch.Tensor, c: torch.Tensor, encoder_hidden_states: torch.Tensor, encoder_attention_mask: torch.Tensor,
        **added: Any,
    ) -> torch.Tensor:  # fmt: skip
        return unmapped(transformer)(
            x,
            encoder_hidden_states=encoder_hidden_states,
            encoder_attention_mask=encoder_attention_mask,
            timestep=c,
            added_cond_kwargs=added or {"resolution": None, "aspect_ratio": None},
        ).sample

    return from_module(transformer, net, scheduler_config, None, name, device, dtype)


def conditioning(
    model: EpsModel, prompt_embeds: Any = None, guidance_scale: float | None = None, **other: Any
) -> Conditioning:
    use = model.config.get("use_additional_conditions")  # None: the transformer's own rule, sample_size 128 (1024 px)
    extra = bool(use) if use is not None else model.config.get("sample_size") == 128

    def branch(t: dict[str, torch.Tensor], prefix: str) -> dict[str, Any]:
        e = t[f"{prefix}prompt_embeds"]
        kw: dict[str, Any] = {"encoder_hidden_states": e, "encoder_attention_mask": t[f"{prefix}prompt_attention_mask"]}
        if extra:  # the pipeline's resolution (H, W) and aspect ratio H/W in pixels
            shape = model.latent.pixel_shape if model.latent is not None else model.sample_shape or (0, 1, 1)
            kw["resolution"] = torch.tensor([[float(shape[1]), float(shape[2])]]).expand(len(e), 2).clone()
            kw["aspect_ratio"] = torch.full((len(e), 1), float(shape[1]) / float(shape[2]))
        return kw

    keys = ("prompt_embeds", "prompt_attention_mask")
    dim = int(model.config.get("caption_channels") or 0)
    return text_conditioning(model, prompt_embeds, guidance_scale, other, keys, dim, branch)
