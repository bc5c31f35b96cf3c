"""Brute-force sampling loops for VE and EDM models, written from diffusers' own pipeline and scheduler calls, one
sample at a time (lipscope is deliberately NOT imported: these are what lipscope's samplers are tested against).

* :func:`ve_pc_reference` is the body of ``ScoreSdeVePipeline.__call__`` (diffusers 0.42, pipelines/deprecated/
  score_sde_ve) for ``batch_size=1``, with the initial unit noise handed in instead of drawn, so a caller can feed it
  lipscope's seeds; ``pipeline_call_equals_reference`` checks it against the real ``__call__``.
* :func:`edm_pipeline_reference` is the denoising loop every diffusers pipeline runs with an EDM scheduler
  (``StableDiffusionXLPipeline``, as Playground v2.5 uses ``EDMDPMSolverMultistepScheduler``): latents ·
  ``init_noise_sigma``, then per timestep ``scale_model_input`` → ``unet(input, t)`` → ``scheduler.step``.
* :func:`ve_ode_reference`: no diffusers pipeline pairs a VE score network with an ODE scheduler, so it is that same
  EDM loop with the network's x̂0 written from the papers: the fourier UNet is fed σ (as ``ScoreSdeVePipeline``
  feeds ``sigmas[i]``) and returns the score s, Tweedie's x̂0 = x + σ²s (α = 1), handed to ``EDMEulerScheduler.step``
  as ``pred_original_sample``, or to the DPM solver as F = (x̂0 − c_skip x)/c_out with Karras et al.'s Table 1
  c_skip = σ_d²/(σ²+σ_d²), c_out = σσ_d/√(σ²+σ_d²).
"""

from __future__ import annotations

import copy

import numpy as np
import torch


def ve_pc_reference(unet, scheduler, x_unit: torch.Tensor, generator: torch.Generator, steps: int) -> torch.Tensor:
    """``ScoreSdeVePipeline.__call__`` for one sample from unit noise ``x_unit`` (1, C, H, W): the last predictor's
    mean, unclamped (the pipeline then clamps it to [0, 1])."""
    sched = copy.deepcopy(scheduler)
    sample = x_unit * sched.init_noise_sigma
    sched.set_timesteps(steps)
    sched.set_sigmas(steps)
    sample_mean = sample
    with torch.no_grad():
        for i, t in enumerate(sched.timesteps):
            sigma_t = sched.sigmas[i] * torch.ones(1)
            for _ in range(sched.config.correct_steps):
                model_output = unet(sample, sigma_t).sample
                sample = sched.step_correct(model_output, sample, generator=generator).prev_sample
            model_output = unet(sample, sigma_t).sample
            output = sched.step_pred(model_output, t, sample, generator=generator)
            sample, sample_mean = output.prev_sample, output.prev_sample_mean
    return sample_mean


def pipeline_call_equals_reference(pipe, seed: int, steps: int) -> float:
    """max |ScoreSdeVePipeline(batch_size=1)(...) − the reference on the same generator| (expected 0): the reference
    is handed the unit noise the pipeline draws first (``randn_tensor(shape, generator)``), then continues the
    same generator."""
    from diffusers.utils.torch_utils import randn_tensor

    img = pipe(batch_size=1, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed),
               output_type="np", return_dict=False)[0]  # fmt: skip
    g = torch.Generator().manual_seed(seed)
    size = pipe.unet.config.sample_size
    x_unit = randn_tensor((1, 3, size, size), generator=g)
    ref = ve_pc_reference(pipe.unet, pipe.scheduler, x_unit, g, steps).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    return float(np.abs(img - ref).max())


def edm_pipeline_reference(unet, scheduler, x_unit: torch.Tensor, steps: int) -> torch.Tensor:
    """A diffusers pipeline's loop with an EDM scheduler (``EDMEulerScheduler`` or ``EDMDPMSolverMultistepScheduler``)
    on an EDM ``UNet2DModel`` (fed ``scale_model_input``'s c_in·x and the timestep c_noise = ¼ ln σ, returns F)."""
    sched = copy.deepcopy(scheduler)
    sched.set_timesteps(steps)
    latents = x_unit * sched.init_noise_sigma
    with torch.no_grad():
        for t in sched.timesteps:
            latent_model_input = sched.scale_model_input(latents, t)
            noise_pred = unet(latent_model_input, t).sample
            latents = sched.step(noise_pred, t, latents).prev_sample
    return latents


def ve_ode_reference(unet, scheduler, x_unit: torch.Tensor, steps: int) -> torch.Tensor:
    """The EDM loop (``scheduler``: an EDM Euler or DPM scheduler over the VE's σ range) on a VE score UNet fed σ,
    x̂0 = x + σ²·score (see the module docstring)."""
    sched = copy.deepcopy(scheduler)
    sched.set_timesteps(steps)
    latents = x_unit * sched.init_noise_sigma
    sd = sched.config.sigma_data
    euler = type(sched).__name__ == "EDMEulerScheduler"
    with torch.no_grad():
        for i, t in enumerate(sched.timesteps):
            sigma = sched.sigmas[i]
            sched.scale_model_input(latents, t)  # the pipeline's call; a VE network takes x unscaled
            score = unet(latents, sigma * torch.ones(latents.shape[0])).sample
            x0 = latents + sigma**2 * score
            if euler:
                latents = sched.step(x0, t, latents, pred_original_sample=x0).prev_sample
            else:
                c_skip = sd**2 / (sigma**2 + sd**2)
                c_out = sigma * sd / (sigma**2 + sd**2) ** 0.5
                latents = sched.step((x0 - c_skip * latents) / c_out, t, latents).prev_sample
    return latents
