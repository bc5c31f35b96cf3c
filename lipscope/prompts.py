"""Prompts → the embeddings a text-conditioned model is fed, by the pipeline's own tokenizers, text encoders and
``encode_prompt`` (one call per family, :mod:`lipscope.families`), once per run; the encoders are freed after.

Needs ``transformers`` (``pip install 'lipscope[text]'``); without it, or without text encoders in the pipeline,
precomputed ``prompt_embeds`` do the same. :func:`conditioning_for` is the one entry point of the runs: it picks
the family's default (the empty prompt: unconditional; the null class) when nothing is given.
"""

from __future__ import annotations

import gc
import logging
from pathlib import Path
from typing import Any

import torch

from .conditioning import Conditioning
from .errors import InputError, short_error
from .families import GENERIC, EncodedPrompts, family_of_model, pipeline_denoiser, resolve_conditioning
from .loading import hub_local_only, read_json
from .lora import lora_run_base
from .models import EpsModel, resolve_device

log = logging.getLogger("lipscope")

HEAVY = ("unet", "transformer", "prior", "vae", "vqvae", "safety_checker", "image_encoder", "feature_extractor")


class _ConfigOnly:
    """A denoiser as ``encode_prompt`` sees it (config, dtype), without loading its weights."""

    def __init__(self, config: Any, dtype: torch.dtype) -> None:
        self.config, self.dtype = config, dtype


def read_prompt_file(path: str) -> list[str]:
    """One prompt per line (surrounding whitespace stripped, blank lines skipped), UTF-8."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"`prompt_file` {path}: no such file; give a text file with one prompt per line")
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"`prompt_file` {path}: not a readable UTF-8 text file ({short_error(e)})") from e
    prompts = [s.strip() for s in lines if s.strip()]
    if not prompts:
        raise InputError(f"`prompt_file` {path} holds no prompts; write one prompt per line")
    return prompts


def pipeline_source(
    spec: str, revision: str | None = None, offline: bool | None = None
) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """(root, model_index.json, hub kwargs) of the pipeline a model spec names (a run folder: its ``pipeline/``; a
    LoRA run: its base model's)."""
    if spec.startswith(("py:", "builtin:")) or Path(spec).expanduser().is_file():
        raise InputError(f"`prompt`: `model` {spec} is not a pipeline with text encoders; give `prompt_embeds`")
    path = Path(spec).expanduser()
    if (base := lora_run_base(path)) is not None:  # a `finetune --lora` run: its base pipeline's text encoders
        return pipeline_source(base[0], base[1], offline)
    if path.is_dir():
        if not (path / "model_index.json").is_file() and (path / "pipeline" / "model_index.json").is_file():
            path = path / "pipeline"
        if not (path / "model_index.json").is_file():
            raise InputError(f"`prompt`: {spec} has no model_index.json (not a pipeline folder); give `prompt_embeds`")
        return str(path), read_json(path / "model_index.json", "model_index.json"), {}
    from huggingface_hub import hf_hub_download

    local = hub_local_only(spec, offline)[0]
    try:
        index = read_json(
            Path(hf_hub_download(spec, "model_index.json", revision=revision, local_files_only=local)), ""
        )
    except Exception as e:  # not cached, no network, no such repo
        raise InputError(f"`prompt`: could not read {spec}'s model_index.json ({short_error(e)})") from e
    return spec, index, {"revision": revision, "local_files_only": local}


def encode_prompts(
    spec: str,
    prompts: list[str],
    negative_prompt: str | None = None,
    *,
    revision: str | None = None,
    offline: bool | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> EncodedPrompts:
    """Encode ``prompts`` (and the negative prompt, for CFG) with the pipeline ``spec``'s own text encoders."""
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise InputError("`prompt` must be one or more strings")
    root, index, hub = pipeline_source(spec, revision, offline)
    fam, comp = pipeline_denoiser(index, spec)
    if fam.encode is None:
        raise InputError(f"`prompt`: {spec} is not text-conditioned ({fam.name}); leave out `prompt`")
    texts = {k: v[1] for k, v in index.items() if k.startswith(("text_encoder", "tokenizer")) and isinstance(v, list)}
    if not any(v for k, v in texts.items() if k.startswith("text_encoder")):
        raise InputError(f"`prompt`: {spec} has no text encoder (null in model_index.json); give `prompt_embeds`")
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise InputError(
            "`prompt` needs transformers to run the pipeline's text encoders: pip install 'lipscope[text]' "
            "(or give `prompt_embeds`)"
        ) from None
    import diffusers
    from diffusers.configuration_utils import FrozenDict

    # the denoiser, autoencoder and image models are not loaded; null components are passed as None, as
    # from_pretrained wants them spelled out
    skip = {
        k: None
        for k, v in index.items()
        if isinstance(v, list) and len(v) == 2 and (k in HEAVY or v[1] is None) and not k.startswith("_")
    }
    dev = resolve_device(device)
    try:
        pipe = diffusers.DiffusionPipeline.from_pretrained(root, torch_dtype=dtype, **skip, **hub).to(dev)
    except (OSError, ValueError, RuntimeError, TypeError, AttributeError) as e:
        raise InputError(f"`prompt`: could not load {spec}'s text encoders ({short_error(e)})") from e
    try:
        # encode_prompt may read the denoiser's config (SD3 without T5: joint_attention_dim) or dtype: its config only
        cfg = getattr(diffusers, fam.classes[0]).load_config(root, subfolder=comp, **hub)
        object.__setattr__(pipe, comp, _ConfigOnly(FrozenDict(cfg), dtype))
        with torch.inference_mode():
            out = fam.encode(pipe, list(prompts), negative_prompt, dev)
    finally:
        del pipe
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    tensors = {k: v.detach().float().cpu() if v.is_floating_point() else v.detach().cpu() for k, v in out.items()}
    info = {
        "conditioning": "prompts",
        "prompts": list(prompts),
        "negative_prompt": negative_prompt,
        "encoded_by": f"{index.get('_class_name')}.encode_prompt",
        "text_components": texts,
        "text_encoder_dtype": str(dtype).removeprefix("torch."),
    }
    log.info("encoded %d prompt(s) with %s (%s)", len(prompts), info["encoded_by"], ", ".join(map(str, texts.values())))
    return EncodedPrompts(tensors, info)


def conditioning_for(
    model: EpsModel,
    spec: str,
    *,
    class_labels: list[int] | tuple[int, ...] | None = None,
    prompts: list[str] | tuple[str, ...] | None = None,
    negative_prompt: str | None = None,
    prompt_embeds: str | EncodedPrompts | None = None,
    guidance_scale: float | None = None,
    revision: str | None = None,
    offline: bool | None = None,
) -> Conditioning | None:
    """The conditioning a model is probed / sampled with; a text model given neither prompts nor embeddings gets
    the empty prompt, encoded by its pipeline (SD's unconditional branch; SDXL's is zeros)."""
    fam = family_of_model(model)
    text = fam is not None and fam.conditioned_on == "text"
    if prompts and prompt_embeds:
        raise InputError("give `prompt` or `prompt_embeds`, not both")
    if fam is GENERIC:  # the pipeline's own call encodes the prompts: its conditioning is that call, recorded
        return GENERIC.conditioning(  # type: ignore[misc]
            model, class_labels=list(class_labels or []), prompt_embeds=prompt_embeds, guidance_scale=guidance_scale,
            prompts=list(prompts) if prompts else None, negative_prompt=negative_prompt,
        )  # fmt: skip
    if (prompts or negative_prompt is not None) and not text:
        kind = "class-conditional: give `class_labels`" if fam and fam.conditioned_on else "unconditional"
        raise InputError(f"`model` {model.name} is {kind}; leave out `prompt` / `negative_prompt`")
    if negative_prompt is not None and prompt_embeds:
        raise InputError("`negative_prompt` is encoded with `prompt`; with `prompt_embeds`, save its negative_ keys")
    source: Any = prompt_embeds
    if text and not prompt_embeds and not class_labels:
        default = not prompts
        # text encoders in float32, as the pipelines' defaults (bfloat16 for a bfloat16 probe; T5 overflows in
        # float16): the conditioning is an input held fixed, its rounding does not enter the t-derivative
        work = torch.bfloat16 if model.dtype == torch.bfloat16 else torch.float32
        try:
            source = encode_prompts(
                spec, list(prompts or [""]), negative_prompt, revision=revision, offline=offline,
                device=model.device, dtype=work,
            )  # fmt: skip
        except InputError as e:
            if not default:
                raise
            raise InputError(
                f"`model` {model.name} is conditioned on text and the empty prompt (the unconditional default) could "
                f"not be encoded: {str(e).removeprefix('`prompt`: ')}"
            ) from e
        if default:
            source.info["conditioning"] = "the empty prompt (no text; the pipelines' unconditional branch may differ)"
    return resolve_conditioning(model, class_labels, source, guidance_scale)
