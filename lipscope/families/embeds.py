"""Text conditioning from the tensors a pipeline's ``encode_prompt`` returns, read from a safetensors file or
encoded from prompts (:mod:`lipscope.prompts`); shared by the text-conditioned families (SD/SDXL, SD3, PixArt,
Flux)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..conditioning import Conditioning
from ..errors import InputError, short_error
from ..models import EpsModel


@dataclass(frozen=True)
class EncodedPrompts:
    """Prompts encoded by a pipeline's own tokenizers and text encoders: ``tensors`` under encode_prompt's names
    (one row per prompt), ``info`` what run.json records (prompts, negative prompt, encoders)."""

    tensors: dict[str, torch.Tensor]
    info: dict[str, Any] = field(default_factory=dict)


def call_default(pipe: Any, name: str, fallback: Any) -> Any:
    """The default of a pipeline's ``__call__`` argument ``name`` (e.g. max_sequence_length): encode as it does."""
    import inspect

    p = inspect.signature(pipe.__call__).parameters.get(name)
    return fallback if p is None or p.default is inspect.Parameter.empty else p.default


def negatives(prompts: list[str], negative: str | None) -> list[str]:
    """The negative prompt once per prompt (encode_prompt wants a list as long as ``prompt``); none: ""."""
    return [negative if negative is not None else ""] * len(prompts)


def pooled_branch(t: dict[str, torch.Tensor], prefix: str) -> dict[str, Any]:
    """One branch of an MMDiT's conditioning (SD3, Flux): token embeddings and pooled projections."""
    return {
        "encoder_hidden_states": t[f"{prefix}prompt_embeds"],
        "pooled_projections": t[f"{prefix}pooled_prompt_embeds"],
    }


def read_embeds(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise InputError(f"`prompt_embeds` {path}: no such file; save encode_prompt's tensors with safetensors")
    try:
        return load_file(path)
    except Exception as e:  # SafetensorError has no stable import path
        raise InputError(f"`prompt_embeds` {path}: not a readable safetensors file ({short_error(e)})") from e


def check_embeds(t: dict[str, torch.Tensor], used: list[str], what: str, guidance_scale: float | None) -> None:
    """The embeddings a run feeds: floating point, at least one row, finite, one row count (one row per prompt in
    each), and with CFG one token count in both branches (they go in one batch); each refusal names the tensor.
    Attention masks (PixArt's) are integer or boolean by design: only their rows are checked."""
    for k in (k for k in used if not k.endswith("attention_mask")):
        v = t[k]
        if not v.is_floating_point():
            raise InputError(f"{what}: {k} is {str(v.dtype).removeprefix('torch.')}; save the float embeddings "
                             "encode_prompt returns")  # fmt: skip
        if v.ndim == 0 or v.shape[0] == 0:
            raise InputError(f"{what}: {k} has no rows; save the embeddings of at least one prompt")
        if not bool(torch.isfinite(v).all()):
            bad = int((~torch.isfinite(v)).sum())
            raise InputError(
                f"{what}: {k} holds NaN/inf ({bad} of {v.numel()} values): the embeddings themselves are broken, not "
                "the model; encode the prompts again (a float16 text encoder overflows: encode in float32)"
            )
    rows = {k: int(t[k].shape[0]) for k in used}
    if len(set(rows.values())) > 1:
        (a, na), (b, nb) = next(iter(rows.items())), next((k, n) for k, n in rows.items() if n != rows[used[0]])
        raise InputError(f"{what}: {a} has {na} rows and {b} {nb}; save one row per prompt in each (as encode_prompt "
                         "returns them)")  # fmt: skip
    pos, neg = t.get("prompt_embeds"), t.get("negative_prompt_embeds")
    if guidance_scale is not None and "negative_prompt_embeds" in used and pos is not None and neg is not None:
        if pos.shape[1] != neg.shape[1]:
            raise InputError(
                f"{what}: prompt_embeds has {pos.shape[1]} tokens and negative_prompt_embeds {neg.shape[1]}; both CFG "
                "branches go in one batch: encode them to one length (as the pipelines pad them)"
            )


def text_conditioning(
    model: EpsModel,
    prompt_embeds: str | EncodedPrompts | None,
    guidance_scale: float | None,
    other: dict[str, Any],
    keys: tuple[str, ...],
    dim: int,
    branch: Callable[[dict[str, torch.Tensor], str], dict[str, Any]],
) -> Conditioning:
    """Conditioning from ``prompt_embeds`` (a file or encoded prompts): ``keys`` (e.g. prompt_embeds,
    pooled_prompt_embeds) are required, their ``negative_`` twins too for CFG; ``branch(tensors, prefix)`` builds the
    denoiser kwargs of one branch."""
    if other.get("class_labels"):
        raise InputError(
            f"`model` {model.name} is text-conditioned: give `prompt` or `prompt_embeds`, not `class_labels`"
        )
    if prompt_embeds is None:
        raise InputError(
            f"`model` {model.name} is conditioned on text: give `prompt` or `prompt_embeds` FILE.safetensors (keys "
            f"{', '.join(keys)}, negative_…: what the pipeline's encode_prompt returns; the empty prompt's for none)"
        )
    if isinstance(prompt_embeds, EncodedPrompts):
        t, what, info = prompt_embeds.tensors, "the encoded prompts", dict(prompt_embeds.info)
    else:
        t, what = read_embeds(prompt_embeds), f"`prompt_embeds` {prompt_embeds}"
        info = {"conditioning": "prompt embeddings", "file": str(prompt_embeds)}
    need = list(keys) + ([f"negative_{k}" for k in keys] if guidance_scale is not None else [])
    missing = [k for k in need if k not in t]
    if missing:
        raise InputError(f"{what}: lacks {', '.join(missing)}; save encode_prompt's outputs")
    for k in ("prompt_embeds", "negative_prompt_embeds"):
        if k in t and (t[k].ndim != 3 or (dim and t[k].shape[-1] != dim)):
            raise InputError(f"{what}: {k} has shape {tuple(t[k].shape)}; {model.name} takes (P, tokens, {dim})")
    negative = all(f"negative_{k}" in t for k in keys)
    check_embeds(t, list(keys) + ([f"negative_{k}" for k in keys] if negative else []), what, guidance_scale)
    uncond = branch(t, "negative_") if negative else None
    info.setdefault("prompts", int(t["prompt_embeds"].shape[0]))
    return Conditioning(branch(t, ""), uncond, guidance_scale, info)
