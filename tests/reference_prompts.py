"""Reference prompt encodings: what a text-conditioned diffusers pipeline's OWN ``encode_prompt`` returns when its
``__call__`` runs with default arguments (classifier-free guidance on, one image per prompt).

Written only from diffusers calls and plain torch (lipscope is deliberately NOT imported: this module is the
independent reference lipscope is tested against). Folders come from ``tests/text_fixtures.py``.

Pipeline lines mirrored (diffusers 0.42.1), all under ``__call__``'s ``@torch.no_grad()``, ``device =
self._execution_device``, ``num_images_per_prompt=1``, every ``*_embeds`` / ``prompt_2`` / ``prompt_3`` argument None,
``lora_scale`` None (no ``cross_attention_kwargs`` / ``joint_attention_kwargs``), ``clip_skip`` None:

* StableDiffusionPipeline.__call__ (pipeline_stable_diffusion.py:962-972): ``prompt_embeds, negative_prompt_embeds =
  self.encode_prompt(prompt, device, num_images_per_prompt, self.do_classifier_free_guidance, negative_prompt,
  ...)``; ``do_classifier_free_guidance = guidance_scale (7.5) > 1 and unet.config.time_cond_proj_dim is None``.
  A ``str`` negative prompt is passed as ``[negative_prompt] * len(prompts)``: with a list ``prompt`` SD's
  encode_prompt raises TypeError on a ``str`` one (``type(prompt) is not type(negative_prompt)``,
  pipeline_stable_diffusion.py:458-462), and ``[s] * n`` is what SDXL / SD3 / PixArt turn a ``str`` into themselves.
  ``negative_prompt=None`` -> ``uncond_tokens = [""] * batch_size``.
* StableDiffusionXLPipeline.__call__ (pipeline_stable_diffusion_xl.py:1083-1097): ``self.encode_prompt(prompt=prompt,
  prompt_2=prompt_2, device=device, num_images_per_prompt=..., do_classifier_free_guidance=..., negative_prompt=
  negative_prompt, negative_prompt_2=negative_prompt_2, ...)``, guidance_scale 5.0. ``negative_prompt=None`` with
  ``force_zeros_for_empty_prompt`` (the fixture's config) -> ``torch.zeros_like`` negatives (lines 424-427).
* StableDiffusion3Pipeline.__call__ (pipeline_stable_diffusion_3.py:975-992): ``self.encode_prompt(prompt=prompt,
  prompt_2=prompt_2, prompt_3=prompt_3, negative_prompt=..., negative_prompt_2=..., negative_prompt_3=...,
  do_classifier_free_guidance=..., device=device, clip_skip=..., num_images_per_prompt=..., max_sequence_length=256,
  lora_scale=...)``, guidance_scale 7.0; ``negative_prompt=None`` -> ``""`` (line 467).
* PixArtAlphaPipeline.__call__ (pipeline_pixart_alpha.py:847-859): ``self.encode_prompt(prompt,
  do_classifier_free_guidance, negative_prompt=negative_prompt, num_images_per_prompt=..., device=device, ...,
  clean_caption=clean_caption, max_sequence_length=120)`` with ``__call__``'s defaults ``negative_prompt=""``,
  ``guidance_scale=4.5``, ``clean_caption=True``. ``clean_caption=True`` needs bs4 + ftfy: without them
  ``_text_preprocessing`` logs two warnings and falls back to ``text.lower().strip()`` (lines 524-545), as here.

Returned: float32 CPU embeddings, one row per prompt in prompt order, under encode_prompt's own names
(``prompt_embeds``, ``negative_prompt_embeds``; SDXL / SD3 ``pooled_prompt_embeds``,
``negative_pooled_prompt_embeds``; PixArt ``prompt_attention_mask``, ``negative_prompt_attention_mask``, kept as the
tokenizer's int64 masks). The folder's ``[null, null]`` components (e.g. SD3 without T5) are passed to
``from_pretrained`` as None, as diffusers requires for a dropped non-optional component.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import DiffusionPipeline


def encode_reference(folder, prompts: list[str], negative_prompt: str | None = None) -> dict[str, torch.Tensor]:
    """Load ``folder`` with ``DiffusionPipeline.from_pretrained`` and return its own ``encode_prompt`` outputs for
    ``prompts`` as its ``__call__`` computes them by default (see the module docstring)."""
    folder = Path(folder)
    index = json.loads((folder / "model_index.json").read_text())
    dropped = {name: None for name, value in index.items() if value == [None, None]}
    pipe = DiffusionPipeline.from_pretrained(folder, **dropped)
    kind = type(pipe).__name__
    device = pipe._execution_device
    prompt = list(prompts)
    with torch.no_grad():
        if kind == "StableDiffusionPipeline":
            do_cfg = 7.5 > 1 and pipe.unet.config.time_cond_proj_dim is None
            negative = None if negative_prompt is None else [negative_prompt] * len(prompt)
            embeds = pipe.encode_prompt(
                prompt,
                device,
                1,
                do_cfg,
                negative,
                prompt_embeds=None,
                negative_prompt_embeds=None,
                lora_scale=None,
                clip_skip=None,
            )
            names = ("prompt_embeds", "negative_prompt_embeds")
        elif kind == "StableDiffusionXLPipeline":
            do_cfg = 5.0 > 1 and pipe.unet.config.time_cond_proj_dim is None
            embeds = pipe.encode_prompt(
                prompt=prompt,
                prompt_2=None,
                device=device,
                num_images_per_prompt=1,
                do_classifier_free_guidance=do_cfg,
                negative_prompt=negative_prompt,
                negative_prompt_2=None,
                prompt_embeds=None,
                negative_prompt_embeds=None,
                pooled_prompt_embeds=None,
                negative_pooled_prompt_embeds=None,
                lora_scale=None,
                clip_skip=None,
            )
            names = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")
        elif kind == "StableDiffusion3Pipeline":
            embeds = pipe.encode_prompt(
                prompt=prompt,
                prompt_2=None,
                prompt_3=None,
                negative_prompt=negative_prompt,
                negative_prompt_2=None,
                negative_prompt_3=None,
                do_classifier_free_guidance=7.0 > 1,
                prompt_embeds=None,
                negative_prompt_embeds=None,
                pooled_prompt_embeds=None,
                negative_pooled_prompt_embeds=None,
                device=device,
                clip_skip=None,
                num_images_per_prompt=1,
                max_sequence_length=256,
                lora_scale=None,
            )
            names = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")
        elif kind == "PixArtAlphaPipeline":
            embeds = pipe.encode_prompt(
                prompt,
                4.5 > 1.0,
                negative_prompt="" if negative_prompt is None else negative_prompt,
                num_images_per_prompt=1,
                device=device,
                prompt_embeds=None,
                negative_prompt_embeds=None,
                prompt_attention_mask=None,
                negative_prompt_attention_mask=None,
                clean_caption=True,
                max_sequence_length=120,
            )
            names = (
                "prompt_embeds",
                "prompt_attention_mask",
                "negative_prompt_embeds",
                "negative_prompt_attention_mask",
            )
        elif kind == "FluxPipeline":
            # FluxPipeline.__call__ (pipeline_flux.py): ``(prompt_embeds, pooled_prompt_embeds, text_ids) =
            # self.encode_prompt(prompt=prompt, prompt_2=prompt_2, ..., device=device, num_images_per_prompt=...,
            # max_sequence_length=512, lora_scale=...)``, and for true CFG the same call on ``negative_prompt``;
            # a negative prompt of None is encoded here as "" (the pipeline then skips true CFG)
            negs = ["" if negative_prompt is None else negative_prompt] * len(prompt)
            pos = pipe.encode_prompt(prompt=prompt, prompt_2=None, device=device, max_sequence_length=512)
            neg = pipe.encode_prompt(prompt=negs, prompt_2=None, device=device, max_sequence_length=512)
            embeds = (pos[0], pos[1], neg[0], neg[1])
            names = ("prompt_embeds", "pooled_prompt_embeds", "negative_prompt_embeds", "negative_pooled_prompt_embeds")
        else:
            raise ValueError(f"no reference for {kind}")
    out = {}
    for name, value in zip(names, embeds, strict=True):
        value = value.detach().cpu()
        out[name] = value if name.endswith("attention_mask") else value.to(torch.float32)
        assert out[name].shape[0] == len(prompt), (name, tuple(value.shape))
    return out
