"""The one diffusion loss of every family and process lipscope trains, and what one training step draws.

x_t = α_t x0 + σ_t ε at the true time t; the network is fed f(t) under E-TSDM (paper Sec. 4), else t, in model
steps k = τ·T (VP: the DDPM step; flow matching: σ·1000, after the sampler's timestep shift, since σ is the
physical noise level); its target is the model's own: ε, v = αε − σx0, x0 (VP) or the velocity ε − x0 (flow).

Time sampling follows diffusers' training scripts: VP draws whole steps uniformly (train_text_to_image.py);
flow draws u with ``compute_density_for_timestep_sampling`` (``weighting``: none = uniform, logit_normal, mode,
cosmap) and takes the scheduler's shifted σ at index ⌊u·T⌋ (train_dreambooth_sd3.py / _flux.py), weighting the
squared error with ``compute_loss_weighting_for_sd3``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from . import rng
from .errors import InputError
from .etsdm import Etsdm
from .processes import FlowProcess, process_from_config
from .schedules import NoiseProcess, Schedule
from .targets import mean_half, noisy, prediction_target

WEIGHTINGS = ("none", "logit_normal", "mode", "cosmap", "sigma_sqrt")


def training_process(scheduler_config: dict[str, Any]) -> NoiseProcess:
    """The process a model trains under: VP (DDPM family) or flow matching; others are refused."""
    p = process_from_config(scheduler_config)
    if not isinstance(p, (Schedule, FlowProcess)):
        raise InputError(
            f"training supports VP (DDPM-family) and flow-matching schedules; this model's scheduler is a {p.kind} "
            f"process ({scheduler_config.get('_class_name')})"
        )
    return p


@dataclass(frozen=True)
class StepBatch:
    """What training step s draws (a function of seed, step and process only): data rows, times, noise, and
    which rows drop their caption (classifier-free-guidance dropout)."""

    idx: torch.Tensor  # (B,) data rows
    t: torch.Tensor  # (B,) float64 model steps k
    eps: torch.Tensor  # (B, …) noise
    drop: torch.Tensor  # (B,) bool


def flow_grid(scheduler_config: dict[str, Any]) -> torch.Tensor:
    """The model steps σ·T the flow training scripts index (``FlowMatchEulerDiscreteScheduler.timesteps`` before
    ``set_timesteps``: shifted unless the shift is dynamic), highest noise first."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    cfg = {k: v for k, v in scheduler_config.items() if not k.startswith("_")}
    return FlowMatchEulerDiscreteScheduler.from_config(cfg).timesteps.to(torch.float64)


def draw_step(
    n_data: int,
    shape: tuple[int, ...],
    step: int,
    batch: int,
    process: NoiseProcess,
    seed: int,
    *,
    rank: int = 0,
    weighting: str = "none",
    grid: torch.Tensor | None = None,
    dropout: float = 0.0,
) -> StepBatch:
    """One step's draws from the TRAINING stream of (seed, step, rank); a VP draw is the same as lipscope's
    earlier loop drew (rows, whole steps, noise), so those runs stay reproducible."""
    from diffusers.training_utils import compute_density_for_timestep_sampling

    g = rng.generator(seed, rng.Stream.TRAINING, step, process=rank)
    idx = torch.randint(0, n_data, (batch,), generator=g)
    if isinstance(process, FlowProcess):
        if grid is None:
            raise InputError("flow training needs the scheduler's σ grid (`grid`)")
        u = compute_density_for_timestep_sampling(
            weighting, batch, logit_mean=0.0, logit_std=1.0, mode_scale=1.29, generator=g
        )
        t = grid[(u * len(grid)).long().clamp(max=len(grid) - 1)]
    else:
        t = torch.randint(0, process.T, (batch,), generator=g).to(torch.float64)
    eps = torch.randn((batch, *shape), generator=g)
    drop = torch.rand(batch, generator=g) < dropout if dropout > 0 else torch.zeros(batch, dtype=torch.bool)
    return StepBatch(idx, t, eps, drop)


def diffusion_loss(
    forward: Callable[..., torch.Tensor],
    x0: torch.Tensor,
    t: torch.Tensor,
    eps: torch.Tensor,
    process: NoiseProcess,
    prediction_type: str,
    etsdm: Etsdm | None = None,
    device: torch.device | str | None = None,
    weighting: str = "none",
    **conditioning: Any,
) -> torch.Tensor:
    """The one diffusion loss: noise x0 at the true time t, feed the network f(t), regress its own target.

    x_t = α_t x0 + σ_t ε (float32 coefficients from the float64 process); the network sees the E-TSDM condition
    f(t) when ``etsdm`` is set, else t (paper Sec. 4), through the process's c(·); ``forward(x, c, **conditioning)``
    returns the raw output (a learned-variance output keeps its mean half, as the pipelines do). Flow models weight
    the squared error with diffusers' ``compute_loss_weighting_for_sd3`` (1 for ``none``/logit_normal/mode).
    """
    tt = t.to(torch.float64)
    a, s = process.alpha(tt).float(), process.sigma(tt).float()
    x = noisy(x0, eps, a, s)
    x = x.to(device) if device is not None else x
    cond = etsdm.map(tt) if etsdm is not None else tt
    c = process.condition(cond).float().to(x.device)
    target = prediction_target(prediction_type, x0, eps, a, s).to(x.device)
    out = mean_half(forward(process.scale_input(x, tt.to(x.device)), c, **conditioning), x).float()
    if not isinstance(process, FlowProcess) or weighting in ("none", "logit_normal", "mode"):
        return torch.nn.functional.mse_loss(out, target)
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    w = compute_loss_weighting_for_sd3(weighting, s.to(x.device).reshape(-1, *([1] * (x.ndim - 1))))
    return (w.float() * (out - target) ** 2).reshape(x.shape[0], -1).mean(1).mean()
