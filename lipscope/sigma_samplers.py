"""Samplers of the α = 1 processes (score-SDE VE, EDM) through diffusers' own schedulers, each step loop as the
pipeline that uses the scheduler runs it.

* ``pc`` (VE only): ``ScoreSdeVeScheduler``'s predictor-corrector, the loop of ``ScoreSdeVePipeline.__call__``
  (``correct_steps`` Langevin corrections ``step_correct``, then the reverse-diffusion predictor ``step_pred``; the
  result is the last predictor's mean). One deviation, so that a sample never depends on the batch it is drawn
  in: the corrector's step size (snr·‖z‖/‖score‖)²·2 uses norms averaged over the batch in diffusers and in
  score_sde, so ``step_correct`` is called on each sample alone (a batch of one, as the pipeline with
  ``batch_size=1``); the network calls stay batched. Per-sample norms fluctuate by ~1/√(2D): fine for images,
  not for data of few dimensions (measured in docs/probe.md, ``scripts/pc_corrector_batch.py``).
* ``ddim``: the first-order probability-flow step, ``EDMEulerScheduler`` (for α = 1 it is DDIM's update
  x' = x̂0 + σ'ε̂, i.e. Euler in σ: Karras et al. 2022, Sec. 3).
* ``dpmsolver`` / ``dpmsolver++``: ``EDMDPMSolverMultistepScheduler``, DPM-Solver++(2M), as Playground v2.5 runs
  it in ``StableDiffusionXLPipeline``.

An EDM model's ODE schedulers are built from its own config (σ range, σ_data, ramp, ρ, prediction type, final σ,
…; ``dpmsolver`` is always second-order DPM-Solver++); a VE model's from its σ range with the ``exponential`` ramp,
the geometric σ spacing its own SDE time visits. The schedulers take x̂0 from the :class:`~lipscope.models.EpsModel`
(E-TSDM map, conditioning and guidance included): ``EDMEulerScheduler.step`` directly (``pred_original_sample``),
the DPM solver as the F that its own ``precondition_outputs`` turns back into x̂0. Each σ a scheduler visits is fed
at its (fractional) model step k(σ).
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

import torch

from .errors import InputError
from .models import EpsModel
from .processes import EDMProcess, VEProcess

VE_SAMPLERS = ("pc", "ddim", "dpmsolver", "dpmsolver++")
EDM_SAMPLERS = ("ddim", "dpmsolver", "dpmsolver++")


def samplers_for(process: Any) -> tuple[str, ...]:
    """The sampler names a VE or EDM process takes."""
    return VE_SAMPLERS if isinstance(process, VEProcess) else EDM_SAMPLERS


def ode_config(model: EpsModel, cls: Any) -> dict[str, Any]:
    """The config of EDM scheduler class ``cls`` an α = 1 model's ODE sampler uses: an EDM model's own scheduler
    config (every key ``cls`` takes: σ range, σ_data, ramp, ρ, prediction type, final σ, thresholding, …); a VE
    model's σ range on the exponential (geometric) ramp (its σ_data is then immaterial: x̂0 goes through
    ``precondition_outputs`` and back)."""
    p = model.schedule
    if isinstance(p, VEProcess):
        return {"sigma_min": p.sigma_min, "sigma_max": p.sigma_max, "sigma_schedule": "exponential",
                "num_train_timesteps": p.T, "prediction_type": "epsilon"}  # fmt: skip
    assert isinstance(p, EDMProcess)
    return {**_own(model, cls), "sigma_min": p.sigma_min, "sigma_max": p.sigma_max, "sigma_data": p.sigma_data,
            "rho": p.rho, "sigma_schedule": p.ramp, "num_train_timesteps": p.T,
            "prediction_type": p.prediction_type}  # fmt: skip


def _own(model: EpsModel, cls: Any) -> dict[str, Any]:
    """The keys of the model's scheduler config that scheduler class ``cls`` takes (none for a process built in
    Python, whose config is only its description)."""
    takes = set(inspect.signature(cls.__init__).parameters) - {"self"}
    return {k: v for k, v in model.scheduler_config.items() if k in takes}


def make_sigma_scheduler(name: str, model: EpsModel, steps: int) -> Any:
    """The diffusers scheduler of sampler ``name`` for a VE or EDM model, its timesteps set for ``steps``."""
    from diffusers import EDMDPMSolverMultistepScheduler, EDMEulerScheduler, ScoreSdeVeScheduler

    allowed = samplers_for(model.schedule)
    if name not in allowed:
        raise InputError(
            f"`scheduler` {name}: this {model.schedule.kind} model samples with {', '.join(allowed)} "
            "(pc: score-SDE predictor-corrector; ddim: Euler in σ; dpmsolver: DPM-Solver++ 2M); use one of them"
        )
    if steps < 1 or steps > model.T:
        raise InputError(f"`steps` {steps}: use 1..{model.T}")
    if name == "pc":  # ScoreSdeVePipeline: set_timesteps, then set_sigmas; snr, correct_steps from the model's config
        p = model.schedule
        assert isinstance(p, VEProcess)
        process = {"num_train_timesteps": p.T, "sigma_min": p.sigma_min, "sigma_max": p.sigma_max,
                   "sampling_eps": p.sampling_eps}  # fmt: skip
        sched = ScoreSdeVeScheduler(**(_own(model, ScoreSdeVeScheduler) | process))
        sched.set_timesteps(steps)
        sched.set_sigmas(steps)
        return sched
    if name == "ddim":
        sched = EDMEulerScheduler(**ode_config(model, EDMEulerScheduler))
    else:  # "dpmsolver" is DPM-Solver++(2M), as for VP models
        cfg = ode_config(model, EDMDPMSolverMultistepScheduler) | {"algorithm_type": "dpmsolver++", "solver_order": 2}
        sched = EDMDPMSolverMultistepScheduler(**cfg)
    sched.set_timesteps(steps)
    return sched


def sigma_sample(
    model: EpsModel, name: str, steps: int, x: torch.Tensor, rows: torch.Tensor, gens: list[torch.Generator]
) -> torch.Tensor:
    """Samples from unit noise ``x`` (B, …) of samples ``rows``, scaled to the scheduler's ``init_noise_sigma``;
    ``gens``: one CPU generator per sample (the PC sampler's noise; ``step_correct`` draws on the CPU)."""
    sched = make_sigma_scheduler(name, model, steps)
    x = x * float(sched.init_noise_sigma)
    p = model.schedule
    assert isinstance(p, (VEProcess, EDMProcess))
    if name == "pc":
        return _pc(dataclasses.replace(model, target="score"), sched, x, rows, gens)
    x0_model = dataclasses.replace(model, target="x0")
    euler = type(sched).__name__ == "EDMEulerScheduler"
    for i, t in enumerate(sched.timesteps):
        sigma = sched.sigmas[i]
        k = p.step_of_sigma(sigma).expand(x.shape[0])
        sched.scale_model_input(x, t)  # what the pipelines call first (sets the step index); the EpsModel scales x
        x0 = x0_model(x, k, rows)
        if euler:
            x = sched.step(x0, t, x, pred_original_sample=x0).prev_sample
        else:  # the F whose precondition_outputs is x0: c_out·F = x0 − c_skip·x
            c_skip_x = sched.precondition_outputs(x, torch.zeros_like(x), sigma)
            c_out = sched.precondition_outputs(torch.zeros(()), torch.ones(()), sigma)
            x = sched.step((x0 - c_skip_x) / c_out, t, x).prev_sample
    return x


def _pc(model: EpsModel, sched: Any, x: torch.Tensor, rows: torch.Tensor, gens: list[torch.Generator]) -> torch.Tensor:
    """``ScoreSdeVePipeline.__call__``'s loop, with the corrector on each sample alone (see the module docstring)."""
    p = model.schedule
    assert isinstance(p, VEProcess)
    mean = x
    for i, t in enumerate(sched.timesteps):
        k = p.step_of_sigma(sched.sigmas[i]).expand(x.shape[0])
        for _ in range(sched.config.correct_steps):
            score = model(x, k, rows)
            x = torch.cat([sched.step_correct(score[j : j + 1], x[j : j + 1], generator=gens[j]).prev_sample
                           for j in range(x.shape[0])])  # fmt: skip
        out = sched.step_pred(model(x, k, rows), t, x, generator=gens)
        x, mean = out.prev_sample, out.prev_sample_mean
    return mean
