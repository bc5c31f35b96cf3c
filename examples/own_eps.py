"""Probing a network that is not a diffusers model.

    lipscope probe --model py:examples.own_eps:make --data digits --out runs/own

``make()`` returns any callable ``eps(x, t)``: x is (B, C, H, W), t a float tensor (B,) in model
steps (fractional values allowed, never rounded). Optional attributes: ``sample_shape`` (C, H, W)
so lipscope can size the data, and ``schedule`` (any lipscope ``NoiseProcess``: ``Schedule``, ``FlowProcess``, …,
or a diffusers scheduler); without one the DDPM linear schedule is used with a warning (or pass
--scheduler-config). What it returns is what its process predicts (docs/probe.md, "Your own network").
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lipscope.schedules import default_schedule


class SmallEps(nn.Module):
    """A toy conv noise predictor with a sinusoidal time embedding (random weights)."""

    sample_shape = (1, 8, 8)

    def __init__(self, width: int = 16):
        super().__init__()
        torch.manual_seed(0)
        self.schedule = default_schedule()
        self.freqs = torch.exp(-math.log(10_000) * torch.arange(8) / 8)
        self.emb = nn.Linear(16, width)
        self.inp = nn.Conv2d(1, width, 3, padding=1)
        self.out = nn.Conv2d(width, 1, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        ang = t.float()[:, None] * self.freqs[None]
        e = self.emb(torch.cat([ang.sin(), ang.cos()], dim=1))[:, :, None, None]
        return self.out(torch.nn.functional.silu(self.inp(x) + e))


def make() -> SmallEps:
    return SmallEps()
