"""The one diffusion loss of every family and process lipscope trains, and what one training step draws.

x_t = α_t x0 + σ_t ε at the true time t; the network is fed f(t) under E-TSDM (paper Sec. 4), else t, in model
steps k = τ·T (VP: the DDPM step; flow matching: σ·1000, after the sampler's timestep shift, since σ is the
physical noise level; VE and EDM: the step of σ on the process's own axis), through the process's c(·) (VE: σ;
EDM: c_noise = ¼ ln σ, input c_in·x); its target is the model's own: ε, v = αε − σx0, x0 (VP), the velocity
ε − x0 (flow), the score −ε/σ (VE) or EDM's F.

Time sampling and weighting follow each process's reference training code:

* VP draws whole steps uniformly (diffusers' train_text_to_image.py);
* flow draws u with ``compute_density_for_timestep_sampling`` (``weighting``: none = uniform, logit_normal, mode,
  cosmap) and takes the scheduler's shifted σ at index ⌊u·T⌋ (train_dreambooth_sd3.py / _flux.py), weighting the
  squared error with ``compute_loss_weighting_for_sd3``;
* VE (Song et al. 2021, score_sde's ``get_sde_loss_fn``): the SDE time t ~ U[eps, 1] (σ log-uniform in
  [σ_min (σ_max/σ_min)^eps, σ_max]), denoising score matching weighted by σ²: ‖σ s + ε‖²;
* EDM (Karras et al. 2022, NVlabs/edm ``EDMLoss``): ln σ ~ N(P_mean = −1.2, P_std = 1.2), λ(σ) = (σ² + σ_d²)/(σσ_d)²,
  so λ‖D − x0‖² = ‖F − F*‖² with F* = (x0 − c_skip x)/c_out (:meth:`EDMProcess.training_target`).

Every loss is the mean over elements (NVlabs and score_sde sum over a sample's elements; a constant factor).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from . import rng
from .errors import InputError
from .etsdm import Etsdm
from .processes import EDMProcess, FlowProcess, VEProcess, process_from_config
from .schedules import NoiseProcess, Schedule
from .targets import mean_half, noisy, per_row, prediction_target

WEIGHTINGS = ("none", "logit_normal", "mode", "cosmap", "sigma_sqrt")
EDM_P_MEAN, EDM_P_STD = -1.2, 1.2  # Karras et al. 2022, Table 1 (NVlabs/edm EDMLoss defaults)


def training_process(scheduler_config: dict[str, Any]) -> NoiseProcess:
    """The process a model trains under: VP (DDPM family), flow matching, VE or EDM; others are refused."""
    p = process_from_config(scheduler_config)
    if not isinstance(p, (Schedule, FlowProcess, VEProcess, EDMProcess)):
        raise InputError(
            f"training supports VP (DDPM-family), flow-matching, VE and EDM schedules; this model's scheduler is a "
            f"{p.kind} process ({scheduler_config.get('_class_name')})"
        )
    return p


def loss_description(process: NoiseProcess, weighting: str = "none") -> dict[str, Any]:
    """What train.json records about the loss: the time density, the target and the weighting."""
    if isinstance(process, VEProcess):
        return {"time": f"t ~ U[{process.sampling_eps:g}, 1], sigma = sigma_min (sigma_max/sigma_min)^t",
                "target": "score -eps/sigma", "weighting": "sigma^2 (score_sde denoising score matching)"}  # fmt: skip
    if isinstance(process, EDMProcess):
        return {"time": f"ln sigma ~ N({EDM_P_MEAN}, {EDM_P_STD}^2)", "target": "F* = (x0 - c_skip x)/c_out",
                "weighting": "lambda(sigma) = (sigma^2 + sigma_data^2)/(sigma sigma_data)^2 (EDMLoss)"}  # fmt: skip
    if isinstance(process, FlowProcess):
        return {"time": f"compute_density_for_timestep_sampling({weighting}), shifted sigma grid",
                "target": "velocity eps - x0", "weighting": f"compute_loss_weighting_for_sd3({weighting})"}  # fmt: skip
    return {"time": "whole steps, uniform", "target": process.prediction_type, "weighting": "none"}


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
    elif isinstance(process, VEProcess):  # score_sde: t ~ U[eps, 1], in model steps k = t·T
        eps_t = process.sampling_eps
        t = (eps_t + (1 - eps_t) * torch.rand(batch, generator=g, dtype=torch.float64)) * process.T
    elif isinstance(process, EDMProcess):  # EDMLoss: ln σ ~ N(P_mean, P_std²), at its (fractional) model step
        sigma = torch.exp(EDM_P_MEAN + EDM_P_STD * torch.randn(batch, generator=g, dtype=torch.float64))
        t = process.step_of_sigma(sigma)
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
    f(t) when ``etsdm`` is set, else t (paper Sec. 4), through the process's c(·) and input scaling (EDM's c_in at
    the true σ); ``forward(x, c, **conditioning)`` returns the raw output (a learned-variance output keeps its mean
    half, as the pipelines do). Flow models weight the squared error with diffusers' ``compute_loss_weighting_for_sd3``
    (1 for ``none``/logit_normal/mode); VE and EDM with their own weighting (module docstring).
    """
    tt = t.to(torch.float64)
    a, s = process.alpha(tt).float(), process.sigma(tt).float()
    x = noisy(x0, eps, a, s)
    x = x.to(device) if device is not None else x
    cond = etsdm.map(tt) if etsdm is not None else tt
    c = process.condition(cond).float().to(x.device)
    out = mean_half(forward(process.scale_input(x, tt.to(x.device)), c, **conditioning), x).float()
    if isinstance(process, VEProcess):  # σ²‖s − (−ε/σ)‖² = ‖σ s + ε‖² (score_sde)
        return torch.nn.functional.mse_loss(per_row(s.to(x.device), x.ndim) * out, -eps.to(x.device))
    if isinstance(process, EDMProcess):  # λ(σ)‖D − x0‖² = ‖F − F*‖² (EDMLoss)
        return torch.nn.functional.mse_loss(out, process.training_target(x0, eps, tt, prediction_type).to(x.device))
    target = prediction_target(prediction_type, x0, eps, a, s).to(x.device)
    if not isinstance(process, FlowProcess) or weighting in ("none", "logit_normal", "mode"):
        return torch.nn.functional.mse_loss(out, target)
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    w = compute_loss_weighting_for_sd3(weighting, s.to(x.device).reshape(-1, *([1] * (x.ndim - 1))))
    return (w.float() * (out - target) ** 2).reshape(x.shape[0], -1).mean(1).mean()
