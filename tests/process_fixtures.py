"""Tiny random-weight diffusers folders for the VE, flow-matching, EDM and latent-diffusion processes.

Every builder takes the folder to create, writes it with diffusers' own ``save_pretrained`` and returns it. The
weights are drawn under ``torch.manual_seed(0)`` inside ``torch.random.fork_rng`` so the builders are deterministic
and leave the caller's global RNG state untouched.

Independent of lipscope on purpose (do not import it here): these folders feed ``tests/reference_processes.py``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import diffusers
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    EDMEulerScheduler,
    FlowMatchEulerDiscreteScheduler,
    LDMPipeline,
    ScoreSdeVePipeline,
    ScoreSdeVeScheduler,
    UNet2DModel,
    VQModel,
)

# A 1-channel 8x8 UNet with a positional (sinusoidal) time embedding, as DDPM-style models use.
_TINY_UNET = dict(
    sample_size=8,
    in_channels=1,
    out_channels=1,
    layers_per_block=1,
    block_out_channels=(8, 16),
    norm_num_groups=4,
    down_block_types=("DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=8,
)


def _seeded(build):
    """Run ``build()`` with the global torch RNG seeded to 0, restoring the caller's RNG state afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return build()


def _write_model_index(path: Path, scheduler_class: str) -> None:
    index = {
        "_class_name": "DDPMPipeline",
        "_diffusers_version": diffusers.__version__,
        "unet": ["diffusers", "UNet2DModel"],
        "scheduler": ["diffusers", scheduler_class],
    }
    (path / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


def save_ve_pipeline(path: Path, channels: int = 1) -> Path:
    """A ``ScoreSdeVePipeline`` folder: NCSN++-style fourier-embedded ``UNet2DModel`` + ``ScoreSdeVeScheduler``.

    The time embedding follows diffusers' NCSN++ test config (``time_embedding_type="fourier"``, ``norm_eps=1e-6``,
    ``mid_block_scale_factor=sqrt(2)``). NCSN++'s ``Skip*Block2D`` blocks hard-code 3 image channels
    (``nn.Conv2d(3, ...)`` in unet_2d_blocks.py), so plain Down/Up blocks are used to allow 1 channel.
    ``flip_sin_to_cos=True`` is recorded in the config, but UNet2DModel builds ``GaussianFourierProjection`` without
    passing it, so for the fourier embedding it has no effect (the embedding is always ``[sin, cos]`` of
    ``2*pi*W*log(sigma)``). With ``time_embedding_type="fourier"`` UNet2DModel also divides its output by the
    timestep it was fed (``sample = sample / timesteps``), i.e. by sigma, as NCSN++ does for the score.

    Note: ``ScoreSdeVePipeline.__call__`` hard-codes ``shape = (batch_size, 3, img_size, img_size)``, so the saved
    pipeline can only be *sampled* with ``channels=3``; the 1-channel default loads fine and serves the references.
    """
    path = Path(path)

    def build():
        unet = UNet2DModel(
            sample_size=8,
            in_channels=channels,
            out_channels=channels,
            time_embedding_type="fourier",
            flip_sin_to_cos=True,
            layers_per_block=1,
            block_out_channels=(8, 16),
            norm_num_groups=4,
            norm_eps=1e-6,
            mid_block_scale_factor=math.sqrt(2.0),
            down_block_types=("DownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=8,
        )
        scheduler = ScoreSdeVeScheduler(num_train_timesteps=2000, sigma_min=0.01, sigma_max=50.0)
        return ScoreSdeVePipeline(unet=unet, scheduler=scheduler)

    _seeded(build).save_pretrained(path)
    return path


def save_flow_folder(path: Path, shift: float = 3.0) -> Path:
    """``unet/`` (tiny positional UNet2DModel) + ``scheduler/`` (FlowMatchEulerDiscreteScheduler) + model_index.json."""
    path = Path(path)
    unet = _seeded(lambda: UNet2DModel(**_TINY_UNET))
    unet.save_pretrained(path / "unet")
    FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift).save_pretrained(path / "scheduler")
    _write_model_index(path, "FlowMatchEulerDiscreteScheduler")
    return path


def save_edm_folder(path: Path) -> Path:
    """``unet/`` (tiny positional UNet2DModel) + ``scheduler/`` (EDMEulerScheduler, Karras, eps) + model_index.json."""
    path = Path(path)
    unet = _seeded(lambda: UNet2DModel(**_TINY_UNET))
    unet.save_pretrained(path / "unet")
    scheduler = EDMEulerScheduler(
        sigma_min=0.002,
        sigma_max=80.0,
        sigma_data=0.5,
        sigma_schedule="karras",
        num_train_timesteps=1000,
        prediction_type="epsilon",
    )
    scheduler.save_pretrained(path / "scheduler")
    _write_model_index(path, "EDMEulerScheduler")
    return path


LDM_IMAGE_SHAPE = (3, 16, 16)  # pixel shape the autoencoders take
LDM_LATENT_SHAPE = (4, 4, 4)  # latent shape the UNet denoises (16 / 2**(3 - 1) = 4)
LDM_SCALING_FACTORS = {"kl": 0.5, "vq": 0.75}  # non-trivial, so forgetting the latent scaling is caught


def save_ldm_pipeline(path: Path, vae: str = "kl") -> Path:
    """An ``LDMPipeline`` folder (components ``vqvae`` / ``unet`` / ``scheduler``).

    ``vqvae`` is an ``AutoencoderKL`` (``vae="kl"``) or a ``VQModel`` (``vae="vq"``) mapping 3x16x16 images to
    4x4x4 latents: the diffusers Encoder downsamples in every block but the last, so three blocks give 16 -> 4.
    ``scaling_factor`` is set to a non-trivial value (``LDM_SCALING_FACTORS``); ``shift_factor`` stays ``None``
    because ``LDMPipeline`` only divides by ``scaling_factor`` before decoding and never adds a shift back.
    """
    path = Path(path)
    if vae not in LDM_SCALING_FACTORS:
        raise ValueError(f"vae must be 'kl' or 'vq', got {vae!r}")
    latent_channels = LDM_LATENT_SHAPE[0]
    ae_kwargs = dict(
        in_channels=LDM_IMAGE_SHAPE[0],
        out_channels=LDM_IMAGE_SHAPE[0],
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(8, 8, 16),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=4,
        sample_size=LDM_IMAGE_SHAPE[1],
        scaling_factor=LDM_SCALING_FACTORS[vae],
    )

    def build():
        if vae == "kl":
            autoencoder = AutoencoderKL(**ae_kwargs)
        else:
            autoencoder = VQModel(**ae_kwargs, num_vq_embeddings=16)
        unet = UNet2DModel(
            **{
                **_TINY_UNET,
                "sample_size": LDM_LATENT_SHAPE[1],
                "in_channels": latent_channels,
                "out_channels": latent_channels,
            }
        )
        scheduler = DDIMScheduler(
            num_train_timesteps=1000,
            beta_start=1e-4,
            beta_end=0.02,
            beta_schedule="linear",
            prediction_type="epsilon",
        )
        return LDMPipeline(vqvae=autoencoder, unet=unet, scheduler=scheduler)

    _seeded(build).save_pretrained(path)
    return path
