"""Tiny random-weight folders for the Stable Diffusion 3 and PixArt-alpha families, and prompt-embedding files.

The same conventions as ``tests/family_fixtures.py``: every builder takes the path to create, writes it with
diffusers' own ``save_pretrained`` (or ``safetensors.torch.save_file``) and returns it; weights are drawn under
``torch.manual_seed(0)`` inside ``torch.random.fork_rng`` so the builders are deterministic and leave the caller's
global RNG state untouched.

The folders hold no text encoders or tokenizers (``transformers`` is not needed): their ``model_index.json`` is
written by hand with those components set to ``[null, null]``, as ``save_pretrained`` writes an absent component.
``StableDiffusion3Pipeline`` / ``PixArtAlphaPipeline`` themselves cannot be constructed without ``transformers``
(diffusers exports dummy classes then), so the folders are read component-wise (``transformer/``, ``vae/``,
``scheduler/``).

Independent of lipscope on purpose (do not import it here): these folders feed ``tests/reference_families2.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import diffusers
import torch
from diffusers import (
    AutoencoderKL,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    PixArtTransformer2DModel,
    SD3Transformer2DModel,
)
from family_fixtures import _TINY_VAE, LATENT_SHAPE, VAE_SCALING_FACTOR
from safetensors.torch import save_file

SD3_JOINT_ATTENTION_DIM = 16  # prompt_embeds width (T5 / CLIP hidden size stand-in)
SD3_POOLED_DIM = 8  # pooled_prompt_embeds width (pooled CLIP projections stand-in)
SD3_VAE_SHIFT_FACTOR = 0.1  # non-None, so forgetting SD3's latent shift is caught
PIXART_CAPTION_CHANNELS = 16  # prompt_embeds width (T5 hidden size stand-in)

# inner_dim = num_attention_heads * attention_head_dim = 16. SD3: ``caption_projection_dim`` must equal inner_dim
# (the context stream runs through JointTransformerBlock(dim=inner_dim) after ``context_embedder =
# nn.Linear(joint_attention_dim, caption_projection_dim)``); ``PatchEmbed`` crops its ``pos_embed_max_size**2`` table
# to the (sample_size / patch_size)**2 = 2 x 2 patch grid (``cropped_pos_embed``: needs 2 <= pos_embed_max_size).
_TINY_SD3 = dict(
    sample_size=LATENT_SHAPE[1],
    patch_size=2,
    in_channels=LATENT_SHAPE[0],
    out_channels=LATENT_SHAPE[0],
    num_layers=2,
    attention_head_dim=8,
    num_attention_heads=2,
    joint_attention_dim=SD3_JOINT_ATTENTION_DIM,
    caption_projection_dim=16,
    pooled_projection_dim=SD3_POOLED_DIM,
    pos_embed_max_size=8,
)

# PixArt: ``caption_projection = PixArtAlphaTextProjection(caption_channels, inner_dim)`` maps prompt_embeds to
# inner_dim = 16 before the cross-attention, so ``cross_attention_dim`` must equal inner_dim. ``out_channels = 2 *
# in_channels`` is learned sigma (PixArtAlphaPipeline keeps ``noise_pred.chunk(2, dim=1)[0]``).
# ``use_additional_conditions=False`` is what ``None`` resolves to for ``sample_size != 128`` anyway; the pipeline
# keys its micro-conditions on ``transformer.config.sample_size == 128`` too, so it passes
# ``{"resolution": None, "aspect_ratio": None}``.
_TINY_PIXART = dict(
    sample_size=LATENT_SHAPE[1],
    in_channels=LATENT_SHAPE[0],
    out_channels=2 * LATENT_SHAPE[0],
    patch_size=2,
    num_layers=2,
    attention_head_dim=8,
    num_attention_heads=2,
    cross_attention_dim=16,
    caption_channels=PIXART_CAPTION_CHANNELS,
    norm_type="ada_norm_single",
    use_additional_conditions=False,
)

_SD3_INDEX_KEYS = {
    # StableDiffusion3Pipeline.__init__ components other than transformer / scheduler / vae.
    "feature_extractor": [None, None],
    "image_encoder": [None, None],
    "text_encoder": [None, None],
    "text_encoder_2": [None, None],
    "text_encoder_3": [None, None],
    "tokenizer": [None, None],
    "tokenizer_2": [None, None],
    "tokenizer_3": [None, None],
}

_PIXART_INDEX_KEYS = {
    # PixArtAlphaPipeline.__init__ components other than transformer / scheduler / vae.
    "text_encoder": [None, None],
    "tokenizer": [None, None],
}


def _seeded(build):
    """Run ``build()`` with the global torch RNG seeded to 0, restoring the caller's RNG state afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return build()


def _write_index(path: Path, class_name: str, keys: dict, components: dict[str, str]) -> None:
    index = {
        "_class_name": class_name,
        "_diffusers_version": diffusers.__version__,
        **keys,
        **{name: ["diffusers", cls] for name, cls in components.items()},
    }
    (path / "model_index.json").write_text(json.dumps(dict(sorted(index.items())), indent=2) + "\n")


def save_sd3_folder(path: Path, shift: float = 3.0) -> Path:
    """A StableDiffusion3Pipeline folder WITHOUT text encoders / tokenizers: ``transformer/`` (tiny
    ``SD3Transformer2DModel``), ``vae/`` (the tiny ``AutoencoderKL`` of family_fixtures.py with ``scaling_factor =
    VAE_SCALING_FACTOR`` and ``shift_factor = SD3_VAE_SHIFT_FACTOR``; SD3 decodes ``latents / scaling_factor +
    shift_factor``), ``scheduler/`` (``FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)``, as
    SD3's published scheduler with shift 3.0) and a hand-written ``model_index.json``."""
    path = Path(path)

    def build():
        return SD3Transformer2DModel(**_TINY_SD3), AutoencoderKL(**dict(_TINY_VAE, shift_factor=SD3_VAE_SHIFT_FACTOR))

    transformer, vae = _seeded(build)
    assert vae.config.scaling_factor == VAE_SCALING_FACTOR and vae.config.shift_factor == SD3_VAE_SHIFT_FACTOR
    transformer.save_pretrained(path / "transformer")
    vae.save_pretrained(path / "vae")
    FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift).save_pretrained(path / "scheduler")
    _write_index(
        path,
        "StableDiffusion3Pipeline",
        _SD3_INDEX_KEYS,
        {
            "scheduler": "FlowMatchEulerDiscreteScheduler",
            "transformer": "SD3Transformer2DModel",
            "vae": "AutoencoderKL",
        },
    )
    return path


def pixart_scheduler() -> DPMSolverMultistepScheduler:
    """PixArt-alpha's published scheduler: ``DPMSolverMultistepScheduler`` (dpmsolver++, order 2, epsilon) on the
    linear 1e-4 -> 0.02 beta schedule, T = 1000 (all DPMSolverMultistepScheduler defaults; spelled out here).

    Caveat for references: on a scheduler that has not run ``set_timesteps``, ``DPMSolverMultistepScheduler.add_noise``
    looks its sigma up by ``index_for_timestep(k)`` in the DESCENDING ``__init__`` timesteps ``[999, ..., 0]`` while
    ``self.sigmas`` is ascending in t, so it noises to level ``999 - k``, not ``k``."""
    return DPMSolverMultistepScheduler(
        num_train_timesteps=1000,
        beta_start=0.0001,
        beta_end=0.02,
        beta_schedule="linear",
        solver_order=2,
        prediction_type="epsilon",
        algorithm_type="dpmsolver++",
        solver_type="midpoint",
    )


def save_pixart_folder(path: Path) -> Path:
    """A PixArtAlphaPipeline folder WITHOUT text encoder / tokenizer: ``transformer/`` (tiny
    ``PixArtTransformer2DModel``, learned sigma), ``vae/`` (the tiny ``AutoencoderKL`` of family_fixtures.py,
    ``shift_factor`` None: PixArtAlphaPipeline decodes ``latents / scaling_factor``), ``scheduler/``
    (``pixart_scheduler()``) and a hand-written ``model_index.json``.

    Note: ``PixArtAlphaPipeline.__call__`` defaults to ``use_resolution_binning=True``, which raises "Invalid sample
    size" unless ``transformer.config.sample_size`` is 128 / 64 / 32; this tiny model (sample_size 4) samples only with
    ``use_resolution_binning=False``.
    """
    path = Path(path)

    def build():
        return PixArtTransformer2DModel(**_TINY_PIXART), AutoencoderKL(**_TINY_VAE)

    transformer, vae = _seeded(build)
    assert transformer.use_additional_conditions is False
    transformer.save_pretrained(path / "transformer")
    vae.save_pretrained(path / "vae")
    pixart_scheduler().save_pretrained(path / "scheduler")
    _write_index(
        path,
        "PixArtAlphaPipeline",
        _PIXART_INDEX_KEYS,
        {
            "scheduler": "DPMSolverMultistepScheduler",
            "transformer": "PixArtTransformer2DModel",
            "vae": "AutoencoderKL",
        },
    )
    return path


def _prefix_mask(lengths: list[int], tokens: int) -> torch.Tensor:
    """(P, tokens) int64 tokenizer-style attention mask: ``lengths[i]`` leading ones, then zeros (padding)."""
    return (torch.arange(tokens)[None, :] < torch.tensor(lengths)[:, None]).to(torch.int64)


def save_embeds(path: Path, kind: str, prompts: int = 2, tokens: int = 5, seed: int = 1) -> Path:
    """A safetensors file with what ``encode_prompt`` returns, random normal float32 embeddings:

    * ``kind="sd3"`` (StableDiffusion3Pipeline.encode_prompt): ``prompt_embeds`` / ``negative_prompt_embeds``
      (P, tokens, SD3_JOINT_ATTENTION_DIM), ``pooled_prompt_embeds`` / ``negative_pooled_prompt_embeds``
      (P, SD3_POOLED_DIM);
    * ``kind="pixart"`` (PixArtAlphaPipeline.encode_prompt): ``prompt_embeds`` / ``negative_prompt_embeds``
      (P, tokens, PIXART_CAPTION_CHANNELS) and int64 (P, tokens) ``prompt_attention_mask`` /
      ``negative_prompt_attention_mask``. Positive rows at odd indices are padded (their last 2 tokens masked,
      at least one token kept); every negative row keeps only its first token, as T5 encodes PixArt's default
      negative prompt ``""`` to the single ``</s>`` token. Padded positions still hold random (non-zero) embeddings,
      as a T5 encoder's output does, so only the mask removes them.
    """
    path = Path(path)
    g = torch.Generator().manual_seed(seed)
    if kind == "sd3":
        tensors = {
            "prompt_embeds": torch.randn((prompts, tokens, SD3_JOINT_ATTENTION_DIM), generator=g),
            "negative_prompt_embeds": torch.randn((prompts, tokens, SD3_JOINT_ATTENTION_DIM), generator=g),
            "pooled_prompt_embeds": torch.randn((prompts, SD3_POOLED_DIM), generator=g),
            "negative_pooled_prompt_embeds": torch.randn((prompts, SD3_POOLED_DIM), generator=g),
        }
    elif kind == "pixart":
        if tokens < 3:
            raise ValueError(f"pixart embeddings need tokens >= 3 (one padded row), got {tokens}")
        tensors = {
            "prompt_embeds": torch.randn((prompts, tokens, PIXART_CAPTION_CHANNELS), generator=g),
            "negative_prompt_embeds": torch.randn((prompts, tokens, PIXART_CAPTION_CHANNELS), generator=g),
            "prompt_attention_mask": _prefix_mask([tokens - 2 * (i % 2) for i in range(prompts)], tokens),
            "negative_prompt_attention_mask": _prefix_mask([1] * prompts, tokens),
        }
    else:
        raise ValueError(f"kind must be 'sd3' or 'pixart', got {kind!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path
