"""Shared fixtures: tiny diffusers UNets saved in every layout lipscope loads (offline, CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel

TINY = dict(
    sample_size=8,
    in_channels=1,
    out_channels=1,
    layers_per_block=1,
    block_out_channels=(4, 8),
    norm_num_groups=2,
    down_block_types=("DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=4,
)


# the lipschitz.csv contract of DESIGN.md
CONTRACT = [
    "t",
    "t_prime",
    "dt",
    "method",
    "n",
    "K_mean",
    "K_std",
    "K_sem",
    "K_ci_low",
    "K_ci_high",
    "K_mean_per_dim",
    "alpha",
    "sigma",
]


def tiny_unet(seed: int = 0, **overrides) -> UNet2DModel:
    torch.manual_seed(seed)
    return UNet2DModel(**{**TINY, **overrides}).eval()


@pytest.fixture(scope="session")
def unet() -> UNet2DModel:
    return tiny_unet()


@pytest.fixture(scope="session")
def pipeline_dir(tmp_path_factory, unet) -> Path:
    """A DDPMPipeline-style folder: model_index.json, unet/, scheduler/."""
    d = tmp_path_factory.mktemp("pipe")
    unet.save_pretrained(d / "unet")
    DDPMScheduler(num_train_timesteps=1000).save_pretrained(d / "scheduler")
    (d / "model_index.json").write_text(
        json.dumps(
            {
                "_class_name": "DDPMPipeline",
                "unet": ["diffusers", "UNet2DModel"],
                "scheduler": ["diffusers", "DDPMScheduler"],
            }
        )
    )
    return d


@pytest.fixture()
def no_network(monkeypatch):
    """Make any attempt to reach the network fail loudly."""
    import socket

    def guard(*a, **k):
        raise RuntimeError("network access attempted in a test")

    monkeypatch.setattr(socket.socket, "connect", guard)
