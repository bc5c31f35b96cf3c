"""Stable Diffusion 1.x/2.x and SDXL (``UNet2DConditionModel``): text-conditioned latent UNets.

Conditioned on ``encoder_hidden_states`` (and, for SDXL, ``added_cond_kwargs`` text_embeds/time_ids), read
from a ``prompt_embeds`` safetensors file with the keys the pipelines' ``encode_prompt`` returns:
``prompt_embeds`` (P, L, D), ``negative_prompt_embeds`` (the unconditional branch: needed for CFG), and for
SDXL ``pooled_prompt_embeds``, ``negative_pooled_prompt_embeds`` and optionally ``add_time_ids`` (P, 6) or (6,)
(default: the pipeline's (H, W, 0, 0, H, W) for the autoencoder's pixel size).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..conditioning import Conditioning
from ..errors import InputError, short_error
from ..models import EpsModel, from_module


def build(unet: Any, scheduler_config: dict | None, name: str, device, dtype) -> EpsModel:
    def net(x: torch.Tensor, c: torch.Tensor, encoder_hidden_states: torch.Tensor, **added: Any) -> torch.Tensor:
        return unet(x, c, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added or None).sample

    cfg = dict(unet.config)
    s = cfg["sample_size"]
    hw = (s, s) if isinstance(s, int) else tuple(int(v) for v in s)
    return from_module(unet, net, scheduler_config, (int(cfg["in_channels"]), *hw), name, device, dtype)


def _read(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise InputError(f"`prompt_embeds` {path}: no such file; save encode_prompt's tensors with safetensors")
    try:
        return load_file(path)
    except Exception as e:  # SafetensorError has no stable import path
        raise InputError(f"`prompt_embeds` {path}: not a readable safetensors file ({short_error(e)})") from e


def conditioning(
    model: EpsModel, prompt_embeds: str | None = None, guidance_scale: float | None = None, **other: Any
) -> Conditioning:
    if other.get("class_labels"):
        raise InputError(f"`model` {model.name} is text-conditioned: give `prompt_embeds`, not `class_labels`")
    if prompt_embeds is None:
        raise InputError(
            f"`model` {model.name} is conditioned on text: give `prompt_embeds` FILE.safetensors (keys prompt_embeds, "
            "negative_prompt_embeds, …: what the pipeline's encode_prompt returns; the empty prompt's: unconditional)"
        )
    t = _read(prompt_embeds)
    cfg = model.config
    xl = cfg.get("addition_embed_type") == "text_time"
    need = ["prompt_embeds"] + (["pooled_prompt_embeds"] if xl else [])
    if guidance_scale is not None:
        need += ["negative_prompt_embeds"] + (["negative_pooled_prompt_embeds"] if xl else [])
    missing = [k for k in need if k not in t]
    if missing:
        raise InputError(f"`prompt_embeds` {prompt_embeds} lacks {', '.join(missing)}; save encode_prompt's outputs")
    dim = int(cfg.get("cross_attention_dim") or 0)
    for k in ("prompt_embeds", "negative_prompt_embeds"):
        if k in t and (t[k].ndim != 3 or (dim and t[k].shape[-1] != dim)):
            raise InputError(
                f"`prompt_embeds` {k} has shape {tuple(t[k].shape)}; {model.name} takes (P, tokens, {dim})"
            )

    def branch(prefix: str) -> dict[str, Any]:
        kw: dict[str, Any] = {"encoder_hidden_states": t[f"{prefix}prompt_embeds"]}
        if xl:
            p = kw["encoder_hidden_states"].shape[0]
            ids = t.get("add_time_ids")
            if ids is None:
                h, w = model.latent.pixel_shape[1:] if model.latent is not None else model.sample_shape[1:]  # type: ignore[index]
                ids = torch.tensor([h, w, 0, 0, h, w], dtype=torch.float32)
            kw["text_embeds"] = t[f"{prefix}pooled_prompt_embeds"]
            kw["time_ids"] = ids.reshape(-1, 6).expand(p, 6).clone() if ids.numel() == 6 else ids
        return kw

    uncond = branch("negative_") if "negative_prompt_embeds" in t else None
    info = {
        "conditioning": "prompt embeddings",
        "prompt_embeds": str(prompt_embeds),
        "prompts": int(t["prompt_embeds"].shape[0]),
    }
    return Conditioning(branch(""), uncond, guidance_scale, info)
