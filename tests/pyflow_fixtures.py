"""A third-party flow-matching network for ``py:`` specs: ``py:pyflow_fixtures:make`` (tests/ on the path).

A continuous-time velocity predictor u(x, σ) ≈ ε − x0 on 1×8×8 inputs, with Gaussian Fourier time features
(NCSN++'s ``GaussianFourierProjection``: sin/cos(2π W s), W ~ N(0, scale²)) of s = ln σ / 8, σ = t/T: its
steep time dependence near σ = 0 is what makes a forward difference of one step truncate (issue 23). The network
is fed lipscope's model steps t ∈ [0, T−1] and maps them to σ = t/T itself (docs/probe.md, "Your own network").

Nothing here imports lipscope except the factories that attach a lipscope process on purpose.
"""

from __future__ import annotations

import math

import torch
from torch import nn

T = 1000

FLOW_SCHEDULER_CONFIG = {  # what diffusers' FlowMatchEulerDiscreteScheduler() saves (shift 1)
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "num_train_timesteps": T,
    "shift": 1.0,
    "use_dynamic_shifting": False,
}


class FourierFlow(nn.Module):
    """u(x, t) = fc2(tanh(fc1([x, sin(2π W s), cos(2π W s)]))), s = ln(t/T)/8; random weights from ``seed``."""

    sample_shape = (1, 8, 8)

    def __init__(self, seed: int = 1, scale: float = 16.0, features: int = 128, width: int = 64) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("W", torch.randn(features, generator=g) * scale)
        self.fc1 = nn.Linear(64 + 2 * features, width)
        self.fc2 = nn.Linear(width, 64)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        s = torch.log((t.to(x.dtype) / T).clamp_min(1e-6)) / 8
        ang = 2 * math.pi * s[:, None] * self.W[None].to(x.dtype)
        h = torch.cat([x.flatten(1), ang.sin(), ang.cos()], 1)
        return self.fc2(torch.tanh(self.fc1(h))).reshape(x.shape)


def make(seed: int = 1) -> FourierFlow:
    """The bare network: its process must come from ``--scheduler-config``."""
    return FourierFlow(seed)


def make_with_process(seed: int = 1) -> FourierFlow:
    """The network carrying its own process (``.schedule = FlowProcess()``), as docs/probe.md describes."""
    from lipscope.processes import FlowProcess

    net = FourierFlow(seed)
    net.schedule = FlowProcess(steps=T)
    return net


class Labelled(FourierFlow):
    """A class-conditional variant: ``class_labels`` (B,) shifts the features; ``num_classes`` 4, null class 4."""

    num_classes = 4
    null_class_label = 4

    def __init__(self, seed: int = 1) -> None:
        super().__init__(seed)
        g = torch.Generator().manual_seed(seed + 100)
        self.register_buffer("E", torch.randn(5, 64, generator=g))

    def forward(self, x: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        return super().forward(x + self.E[class_labels].to(x.dtype).reshape(x.shape), t)


def make_labelled(seed: int = 1) -> Labelled:
    from lipscope.processes import FlowProcess

    net = Labelled(seed)
    net.schedule = FlowProcess(steps=T)
    return net
