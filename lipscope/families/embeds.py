"""Text conditioning read from a safetensors file of the tensors a pipeline's ``encode_prompt`` returns
(shared by the text-conditioned families: SD/SDXL, SD3, PixArt)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..conditioning import Conditioning
from ..errors import InputError, short_error
from ..models import EpsModel


def read_embeds(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise InputError(f"`prompt_embeds` {path}: no such file; save encode_prompt's tensors with safetensors")
    try:
        return load_file(path)
    except Exception as e:  # SafetensorError has no stable import path
        raise InputError(f"`prompt_embeds` {path}: not a readable safetensors file ({short_error(e)})") from e


def text_conditioning(
    model: EpsModel,
    prompt_embeds: str | None,
    guidance_scale: float | None,
    other: dict[str, Any],
    keys: tuple[str, ...],
    dim: int,
    branch: Callable[[dict[str, torch.Tensor], str], dict[str, Any]],
) -> Conditioning:
    """Conditioning from ``prompt_embeds``: ``keys`` (e.g. prompt_embeds, pooled_prompt_embeds) are required, their
    ``negative_`` twins too for CFG; ``branch(tensors, prefix)`` builds the denoiser kwargs of one branch."""
    if other.get("class_labels"):
        raise InputError(f"`model` {model.name} is text-conditioned: give `prompt_embeds`, not `class_labels`")
    if prompt_embeds is None:
        raise InputError(
            f"`model` {model.name} is conditioned on text: give `prompt_embeds` FILE.safetensors (keys "
            f"{', '.join(keys)}, negative_…: what the pipeline's encode_prompt returns; the empty prompt's for none)"
        )
    t = read_embeds(prompt_embeds)
    need = list(keys) + ([f"negative_{k}" for k in keys] if guidance_scale is not None else [])
    missing = [k for k in need if k not in t]
    if missing:
        raise InputError(f"`prompt_embeds` {prompt_embeds} lacks {', '.join(missing)}; save encode_prompt's outputs")
    for k in ("prompt_embeds", "negative_prompt_embeds"):
        if k in t and (t[k].ndim != 3 or (dim and t[k].shape[-1] != dim)):
            raise InputError(
                f"`prompt_embeds` {k} has shape {tuple(t[k].shape)}; {model.name} takes (P, tokens, {dim})"
            )
    uncond = branch(t, "negative_") if all(f"negative_{k}" in t for k in keys) else None
    info = {
        "conditioning": "prompt embeddings",
        "file": str(prompt_embeds),
        "prompts": int(t["prompt_embeds"].shape[0]),
    }
    return Conditioning(branch(t, ""), uncond, guidance_scale, info)
