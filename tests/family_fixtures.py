"""Tiny random-weight folders for the DiT, Stable Diffusion and SDXL families, and prompt-embedding files.

Every builder takes the path to create, writes it with diffusers' own ``save_pretrained`` (or
``safetensors.torch.save_file``) and returns it. Weights are drawn under ``torch.manual_seed(0)`` inside
``torch.random.fork_rng`` so the builders are deterministic and leave the caller's global RNG state untouched.

The SD / SDXL folders hold no text encoders or tokenizers (``transformers`` is not needed): their
``model_index.json`` is written by hand with those components set to ``[null, null]``, as ``save_pretrained`` writes
an absent optional component. ``StableDiffusion(XL)Pipeline`` itself cannot be constructed without ``transformers``
(diffusers exports a dummy class then), so the folders are read component-wise (``unet/``, ``vae/``, ``scheduler/``).

Independent of lipscope on purpose (do not import it here): these folders feed ``tests/reference_families.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import diffusers
import torch
from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel, UNet2DConditionModel
from safetensors.torch import save_file

DIT_NUM_CLASSES = 10
DIT_ID2LABEL = dict(enumerate("zero one two three four five six seven eight nine".split()))
LATENT_SHAPE = (4, 4, 4)  # latent shape the denoisers work on (16 / 2**(3 - 1) = 4)
IMAGE_SHAPE = (3, 16, 16)  # pixel shape the autoencoder takes
VAE_SCALING_FACTOR = 0.5  # non-trivial, so forgetting the latent scaling is caught
SDXL_POOLED_DIM = 8  # text_encoder_2 projection_dim stand-in (pooled prompt embedding width)
SDXL_ADDITION_TIME_EMBED_DIM = 4
SD_CROSS_ATTENTION_DIM = 16

# The AutoencoderKL of tests/process_fixtures.py (save_ldm_pipeline, vae="kl"): three encoder blocks, two of which
# downsample, map 3x16x16 images to 4x4x4 latents.
_TINY_VAE = dict(
    in_channels=IMAGE_SHAPE[0],
    out_channels=IMAGE_SHAPE[0],
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(8, 8, 16),
    layers_per_block=1,
    latent_channels=LATENT_SHAPE[0],
    norm_num_groups=4,
    sample_size=IMAGE_SHAPE[1],
    scaling_factor=VAE_SCALING_FACTOR,
)

# UNet2DConditionModel's ``attention_head_dim`` is, for historical reasons, used as the number of heads
# (``num_attention_heads = num_attention_heads or attention_head_dim`` in unet_2d_condition.py): 2 heads here.
TINY_DIT = dict(  # a learned-sigma DiT: out_channels = 2 · in_channels
    num_attention_heads=2,
    attention_head_dim=8,
    in_channels=LATENT_SHAPE[0],
    out_channels=2 * LATENT_SHAPE[0],
    num_layers=2,
    norm_num_groups=4,
    sample_size=LATENT_SHAPE[1],
    patch_size=2,
    num_embeds_ada_norm=DIT_NUM_CLASSES,
    norm_type="ada_norm_zero",
)

_TINY_COND_UNET = dict(
    sample_size=LATENT_SHAPE[1],
    in_channels=LATENT_SHAPE[0],
    out_channels=LATENT_SHAPE[0],
    block_out_channels=(8, 16),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=SD_CROSS_ATTENTION_DIM,
    attention_head_dim=2,
    norm_num_groups=4,
)

# 6 = len(original_size + crops_coords_top_left + target_size), the add_time_ids of
# StableDiffusionXLPipeline._get_add_time_ids; UNet2DConditionModel (addition_embed_type="text_time") embeds each
# id with ``Timesteps(addition_time_embed_dim)`` and concatenates them after ``text_embeds``, so
# ``add_embedding.linear_1.in_features = projection_class_embeddings_input_dim = pooled + 6 * addition_time_embed_dim``
# (the pipeline checks ``addition_time_embed_dim * len(add_time_ids) + text_encoder_projection_dim`` against it).
SDXL_PROJECTION_DIM = SDXL_POOLED_DIM + 6 * SDXL_ADDITION_TIME_EMBED_DIM

_SD_INDEX_KEYS = {
    # StableDiffusionPipeline.__init__ components (+ its registered config flag), as save_pretrained writes them.
    False: {
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "text_encoder": [None, None],
        "tokenizer": [None, None],
    },
    # StableDiffusionXLPipeline.__init__ components (+ force_zeros_for_empty_prompt, registered to its config).
    True: {
        "feature_extractor": [None, None],
        "force_zeros_for_empty_prompt": True,
        "image_encoder": [None, None],
        "text_encoder": [None, None],
        "text_encoder_2": [None, None],
        "tokenizer": [None, None],
        "tokenizer_2": [None, None],
    },
}


def _seeded(build):
    """Run ``build()`` with the global torch RNG seeded to 0, restoring the caller's RNG state afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return build()


def save_dit_pipeline(path: Path) -> Path:
    """A ``DiTPipeline`` folder (``transformer`` / ``vae`` / ``scheduler`` + ``id2label``).

    ``DiTTransformer2DModel`` with learned sigma (``out_channels = 2 * in_channels``, DiTPipeline keeps the first
    ``in_channels``) and ``num_embeds_ada_norm = DIT_NUM_CLASSES`` classes; its ``LabelEmbedding`` is built with
    ``class_dropout_prob=0.1`` (``CombinedTimestepLabelEmbeddings`` default), so the table has
    ``DIT_NUM_CLASSES + 1`` rows and the null (CFG) class is index ``DIT_NUM_CLASSES``.

    Note: ``DiTPipeline.__call__`` hard-codes ``class_null = torch.tensor([1000] * batch_size)``, so the saved
    pipeline samples only with ``guidance_scale <= 1`` (its default 4.0 indexes row 1000 of an 11-row table).
    """
    path = Path(path)

    def build():
        transformer = DiTTransformer2DModel(**TINY_DIT)
        vae = AutoencoderKL(**_TINY_VAE)
        scheduler = DDIMScheduler(num_train_timesteps=1000)
        return DiTPipeline(transformer=transformer, vae=vae, scheduler=scheduler, id2label=DIT_ID2LABEL)

    _seeded(build).save_pretrained(path)
    # DiTPipeline does not register id2label to its config, so save_pretrained drops it; published DiT folders keep
    # it in model_index.json (string keys), from where from_pretrained passes it back to __init__.
    index_file = path / "model_index.json"
    index = json.loads(index_file.read_text())
    index["id2label"] = {str(i): name for i, name in DIT_ID2LABEL.items()}
    index_file.write_text(json.dumps(index, indent=2) + "\n")
    return path


def sd_scheduler(prediction_type: str = "epsilon") -> DDIMScheduler:
    """Stable Diffusion's DDIM config (scaled_linear 0.00085 -> 0.012, T = 1000).

    ``steps_offset=1`` / ``clip_sample=False`` / ``set_alpha_to_one=False`` as SD's published scheduler configs
    (StableDiffusionPipeline rewrites a ``steps_offset != 1`` config with a deprecation warning); none of them changes
    ``alphas_cumprod`` or ``add_noise``.
    """
    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type=prediction_type,
        steps_offset=1,
        clip_sample=False,
        set_alpha_to_one=False,
    )


def save_sd_pipeline(path: Path, xl: bool = False, prediction_type: str = "epsilon") -> Path:
    """A StableDiffusionPipeline (``xl=False``) / StableDiffusionXLPipeline (``xl=True``) folder WITHOUT text
    encoders, tokenizers or safety checker: ``unet/`` (tiny ``UNet2DConditionModel``), ``vae/`` (tiny
    ``AutoencoderKL``), ``scheduler/`` (``sd_scheduler(prediction_type)``) and a hand-written ``model_index.json``.

    For SDXL the UNet adds ``addition_embed_type="text_time"`` with ``addition_time_embed_dim =
    SDXL_ADDITION_TIME_EMBED_DIM`` and ``projection_class_embeddings_input_dim = SDXL_PROJECTION_DIM`` (pooled
    ``SDXL_POOLED_DIM`` + 6 time ids x ``addition_time_embed_dim``).
    """
    path = Path(path)
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', got {prediction_type!r}")
    unet_kwargs = dict(_TINY_COND_UNET)
    if xl:
        unet_kwargs.update(
            addition_embed_type="text_time",
            addition_time_embed_dim=SDXL_ADDITION_TIME_EMBED_DIM,
            projection_class_embeddings_input_dim=SDXL_PROJECTION_DIM,
        )

    def build():
        return UNet2DConditionModel(**unet_kwargs), AutoencoderKL(**_TINY_VAE)

    unet, vae = _seeded(build)
    if xl:
        assert unet.add_embedding.linear_1.in_features == SDXL_PROJECTION_DIM
    unet.save_pretrained(path / "unet")
    vae.save_pretrained(path / "vae")
    sd_scheduler(prediction_type).save_pretrained(path / "scheduler")
    index = {
        "_class_name": "StableDiffusionXLPipeline" if xl else "StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        **_SD_INDEX_KEYS[xl],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (path / "model_index.json").write_text(json.dumps(dict(sorted(index.items())), indent=2) + "\n")
    return path


def save_prompt_embeds(
    path: Path,
    xl: bool = False,
    prompts: int = 2,
    tokens: int = 5,
    dim: int = SD_CROSS_ATTENTION_DIM,
    pooled_dim: int = SDXL_POOLED_DIM,
    seed: int = 1,
) -> Path:
    """A safetensors file with what the pipelines' ``encode_prompt`` returns, as random normal float32 tensors:
    ``prompt_embeds`` / ``negative_prompt_embeds`` (P, tokens, dim) and, for SDXL, ``pooled_prompt_embeds`` /
    ``negative_pooled_prompt_embeds`` (P, pooled_dim)."""
    path = Path(path)
    g = torch.Generator().manual_seed(seed)
    tensors = {
        "prompt_embeds": torch.randn((prompts, tokens, dim), generator=g),
        "negative_prompt_embeds": torch.randn((prompts, tokens, dim), generator=g),
    }
    if xl:
        tensors["pooled_prompt_embeds"] = torch.randn((prompts, pooled_dim), generator=g)
        tensors["negative_pooled_prompt_embeds"] = torch.randn((prompts, pooled_dim), generator=g)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path
