"""A tiny random-weight FLUX.1 folder and prompt-embedding files.

The same conventions as ``tests/family_fixtures.py`` / ``tests/family_fixtures2.py``: every builder takes the path to
create, writes it with diffusers' own ``save_pretrained`` (or ``safetensors.torch.save_file``) and returns it;
weights are drawn under ``torch.manual_seed(0)`` inside ``torch.random.fork_rng`` so the builders are deterministic
and leave the caller's global RNG state untouched.

The folder holds no text encoders or tokenizers: its ``model_index.json`` is written by hand with ``text_encoder``,
``text_encoder_2``, ``tokenizer``, ``tokenizer_2`` (and FluxPipeline's optional ``image_encoder`` /
``feature_extractor``) set to ``[null, null]``, as ``save_pretrained`` writes an absent component. The folder is read
component-wise (``transformer/``, ``vae/``, ``scheduler/``). Where ``transformers`` is installed,
``FluxPipeline.from_pretrained(path, text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None)``
loads it too (``from_pretrained`` refuses null NON-optional components unless they are passed explicitly; only
``image_encoder`` / ``feature_extractor`` are in ``_optional_components``), and then runs from precomputed
``prompt_embeds`` / ``pooled_prompt_embeds``.

FluxPipeline packs 2 x 2 latent patches into tokens (``_pack_latents``): the transformer's ``in_channels`` is 4 x the
VAE's ``latent_channels`` and the latent height / width must be even.

Independent of lipscope on purpose (do not import it here): this folder feeds ``tests/reference_flux.py``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
from family_fixtures import _TINY_VAE, IMAGE_SHAPE, LATENT_SHAPE
from family_fixtures2 import _seeded, _write_index
from safetensors.torch import save_file

FLUX_JOINT_ATTENTION_DIM = 16  # prompt_embeds width (T5-XXL hidden size 4096 stand-in)
FLUX_POOLED_DIM = 8  # pooled_prompt_embeds width (CLIP-L pooled output 768 stand-in)
FLUX_LATENT_SHAPE = LATENT_SHAPE  # unpacked (C, H, W) latents of IMAGE_SHAPE images; H, W even for the 2x2 packing
FLUX_IMAGE_SHAPE = IMAGE_SHAPE  # pixel shape the autoencoder takes
# FLUX.1's VAE has both a shift and a scale (0.1159, 0.3611); exact binary fractions here, distinct from
# family_fixtures' VAE_SCALING_FACTOR (0.5) and SD3_VAE_SHIFT_FACTOR (0.1), so forgetting either one is caught.
FLUX_VAE_SHIFT_FACTOR = 0.125
FLUX_VAE_SCALING_FACTOR = 0.375
FLUX_PACKED_CHANNELS = 4 * FLUX_LATENT_SHAPE[0]  # transformer in_channels: one token = a 2 x 2 latent patch

# inner_dim = num_attention_heads * attention_head_dim = 16. ``axes_dims_rope`` splits attention_head_dim between
# the (index, row, column) position ids (FLUX.1: (16, 56, 56) of 128) and must sum to it; (2, 2, 4) gives rows and
# columns different rotary frequencies, so swapping them is caught even on square latents. ``patch_size=1`` as in
# FLUX.1 (the 2 x 2 patching happens in the pipeline's ``_pack_latents``); ``out_channels`` None -> in_channels.
_TINY_FLUX = dict(
    patch_size=1,
    in_channels=FLUX_PACKED_CHANNELS,
    num_layers=1,
    num_single_layers=1,
    attention_head_dim=8,
    num_attention_heads=2,
    joint_attention_dim=FLUX_JOINT_ATTENTION_DIM,
    pooled_projection_dim=FLUX_POOLED_DIM,
    axes_dims_rope=(2, 2, 4),
)

# The AutoencoderKL of family_fixtures.py (3x16x16 images <-> 4x4x4 latents, vae_scale_factor 2**(3 - 1) = 4) with
# FLUX.1's latent normalisation (``(z - shift_factor) * scaling_factor``) and, as FLUX.1's VAE config, no
# quant_conv / post_quant_conv.
_TINY_FLUX_VAE = dict(
    _TINY_VAE,
    scaling_factor=FLUX_VAE_SCALING_FACTOR,
    shift_factor=FLUX_VAE_SHIFT_FACTOR,
    use_quant_conv=False,
    use_post_quant_conv=False,
)

# FLUX.1-dev's published scheduler/scheduler_config.json: resolution-dependent shift mu = calculate_shift(image
# tokens) (use_dynamic_shifting), ``shift`` unused while use_dynamic_shifting is on.
FLUX_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    shift=3.0,
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=1.15,
    base_image_seq_len=256,
    max_image_seq_len=4096,
)

_FLUX_INDEX_KEYS = {
    # FluxPipeline.__init__ components other than transformer / scheduler / vae.
    "feature_extractor": [None, None],
    "image_encoder": [None, None],
    "text_encoder": [None, None],
    "text_encoder_2": [None, None],
    "tokenizer": [None, None],
    "tokenizer_2": [None, None],
}


def save_flux_folder(path: Path, guidance_embeds: bool = True) -> Path:
    """A FluxPipeline folder WITHOUT text encoders / tokenizers: ``transformer/`` (tiny ``FluxTransformer2DModel``,
    ``in_channels = FLUX_PACKED_CHANNELS``; ``guidance_embeds=True`` is a guidance-distilled FLUX.1-dev stand-in that
    embeds the guidance scale, ``False`` a FLUX.1-schnell one), ``vae/`` (the tiny ``AutoencoderKL`` of
    family_fixtures.py with ``shift_factor = FLUX_VAE_SHIFT_FACTOR``, ``scaling_factor = FLUX_VAE_SCALING_FACTOR``
    and no quant convs; FluxPipeline decodes ``latents / scaling_factor + shift_factor``), ``scheduler/``
    (``FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER_CONFIG)``, FLUX.1-dev's) and a hand-written
    ``model_index.json``."""
    path = Path(path)

    def build():
        transformer = FluxTransformer2DModel(**_TINY_FLUX, guidance_embeds=guidance_embeds)
        return transformer, AutoencoderKL(**_TINY_FLUX_VAE)

    transformer, vae = _seeded(build)
    assert vae.config.latent_channels * 4 == transformer.config.in_channels
    assert vae.config.scaling_factor == FLUX_VAE_SCALING_FACTOR and vae.config.shift_factor == FLUX_VAE_SHIFT_FACTOR
    transformer.save_pretrained(path / "transformer")
    vae.save_pretrained(path / "vae")
    FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER_CONFIG).save_pretrained(path / "scheduler")
    _write_index(
        path,
        "FluxPipeline",
        _FLUX_INDEX_KEYS,
        {
            "scheduler": "FlowMatchEulerDiscreteScheduler",
            "transformer": "FluxTransformer2DModel",
            "vae": "AutoencoderKL",
        },
    )
    return path


def save_flux_embeds(path: Path, prompts: int = 2, tokens: int = 5, seed: int = 1) -> Path:
    """A safetensors file with what ``FluxPipeline.encode_prompt`` returns, random normal float32 embeddings:
    ``prompt_embeds`` (P, tokens, FLUX_JOINT_ATTENTION_DIM) (T5 stand-in), ``pooled_prompt_embeds``
    (P, FLUX_POOLED_DIM) (pooled CLIP stand-in), and the true-CFG negative branch ``negative_prompt_embeds`` /
    ``negative_pooled_prompt_embeds`` of the same shapes (FluxPipeline gets them by calling ``encode_prompt`` on
    ``negative_prompt``, and requires ``prompt_embeds.shape == negative_prompt_embeds.shape`` when both are passed).

    ``encode_prompt``'s third output, ``text_ids = torch.zeros(tokens, 3)``, is not stored: it is all zeros and
    determined by ``tokens``.
    """
    path = Path(path)
    g = torch.Generator().manual_seed(seed)
    tensors = {
        "prompt_embeds": torch.randn((prompts, tokens, FLUX_JOINT_ATTENTION_DIM), generator=g),
        "negative_prompt_embeds": torch.randn((prompts, tokens, FLUX_JOINT_ATTENTION_DIM), generator=g),
        "pooled_prompt_embeds": torch.randn((prompts, FLUX_POOLED_DIM), generator=g),
        "negative_pooled_prompt_embeds": torch.randn((prompts, FLUX_POOLED_DIM), generator=g),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path
