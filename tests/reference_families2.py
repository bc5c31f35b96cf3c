"""Brute-force per-sample references for ``||eps(x_k, k + dt) - eps(x_k, k)|| / (dt / T)`` for the Stable
Diffusion 3 and PixArt-alpha families, written from the pipelines' own denoising calls.

Written only from diffusers' scheduler / model calls and plain torch (lipscope is deliberately NOT imported: this
module is the independent reference lipscope is tested against), in the style of ``tests/reference_families.py``:

* float64 throughout: inputs are cast with ``.to(torch.float64)`` and every module is evaluated as a ``.double()``
  eval-mode deep copy (the caller's modules and schedulers are never modified);
* one sample (batch of 1) at a time in a plain Python loop, each with its own conditioning row;
* ``x_k`` is drawn ONCE at ``k`` and the SAME ``x_k`` is fed at ``k`` and ``k + dt`` (forward difference, integer
  ``k >= 0``, ``dt >= 1``, ``k + dt <= T - 1``);
* each returns a float64 tensor of shape ``(n,)``.

Pipeline lines mirrored (diffusers 0.42.1):

* StableDiffusion3Pipeline.__call__: ``prompt_embeds = torch.cat([negative_prompt_embeds, prompt_embeds], dim=0)``,
  ``pooled_prompt_embeds = torch.cat([negative_pooled_prompt_embeds, pooled_prompt_embeds], dim=0)`` (unconditional
  FIRST); ``timestep = t.expand(latent_model_input.shape[0])`` (t: a float32 entry of ``scheduler.timesteps`` =
  ``sigma * T``); ``noise_pred = self.transformer(hidden_states=latent_model_input, timestep=timestep,
  encoder_hidden_states=prompt_embeds, pooled_projections=pooled_prompt_embeds,
  joint_attention_kwargs=self.joint_attention_kwargs, return_dict=False)[0]``; ``noise_pred_uncond, noise_pred_text
  = noise_pred.chunk(2)``, ``noise_pred = noise_pred_uncond + self.guidance_scale * (noise_pred_text -
  noise_pred_uncond)`` (no skip-layer guidance). The output is the flow velocity v (trained toward noise - x0), so
  with ``x = (1 - sigma) x0 + sigma eps``: ``eps = x + (1 - sigma) v``, applied to the guided v at the evaluation
  point's own ``sigma = k_eval / T``.
* Flow noising: ``FlowMatchEulerDiscreteScheduler.scale_noise`` (``sigma * noise + (1.0 - sigma) * sample`` with
  ``sigma = self.sigmas[index_for_timestep(t)]``) on a copy holding exactly ``timesteps = [k]``, ``sigmas = [k / T,
  0]``, built with ``shift=1.0`` (``set_timesteps`` would shift the custom sigma too), as
  ``tests/reference_processes.py``'s ``flow_noising_scheduler``. The network is fed timestep ``sigma * T = k``
  whatever the scheduler's ``shift``: the shift only changes which sigmas a sampler visits.
* PixArtAlphaPipeline.__call__: ``prompt_embeds = torch.cat([negative_prompt_embeds, prompt_embeds], dim=0)``,
  ``prompt_attention_mask = torch.cat([negative_prompt_attention_mask, prompt_attention_mask], dim=0)``;
  ``added_cond_kwargs = {"resolution": None, "aspect_ratio": None}`` unless ``transformer.config.sample_size ==
  128``; ``latent_model_input = self.scheduler.scale_model_input(latent_model_input, t)``; ``current_timestep =
  current_timestep[None]...expand(latent_model_input.shape[0])`` (t: an int64 0-d entry of ``scheduler.timesteps``);
  ``noise_pred = self.transformer(latent_model_input, encoder_hidden_states=prompt_embeds,
  encoder_attention_mask=prompt_attention_mask, timestep=current_timestep, added_cond_kwargs=added_cond_kwargs,
  return_dict=False)[0]``; ``noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)``, ``noise_pred =
  noise_pred_uncond + guidance_scale * (noise_pred_text - noise_pred_uncond)`` (on ALL output channels, variance
  included); learned sigma: ``if self.transformer.config.out_channels // 2 == latent_channels: noise_pred =
  noise_pred.chunk(2, dim=1)[0]`` (``latent_channels = self.transformer.config.in_channels``).
* VP noising for PixArt: ``DDPMScheduler.from_config(scheduler.config).add_noise(latents, noise, k)``
  (``sqrt(alphas_cumprod[k]) * x0 + sqrt(1 - alphas_cumprod[k]) * noise``, PixArt's training forward process), NOT
  the pipeline scheduler's own ``add_noise``: PixArt's published scheduler is ``DPMSolverMultistepScheduler``, whose
  ``add_noise`` on a scheduler that has not run ``set_timesteps`` looks ``k`` up in its descending ``__init__``
  timesteps ``[999, ..., 0]`` and indexes the t-ascending ``self.sigmas`` with the position, i.e. noises to level
  ``999 - k``. The DDPM copy's ``alphas_cumprod`` is asserted equal to the pipeline scheduler's.

Both branches of each CFG pair are evaluated as two batch-1 calls (no cross-sample interaction in eval mode),
combined with the identical formula. Guidance: both pipelines only guide when ``guidance_scale > 1``; here the CFG
combination is applied whenever ``guidance_scale`` is given, and ``guidance_scale=None`` means the conditional branch
alone.

Float32 leaks that remain inside diffusers: ``get_timestep_embedding`` computes the sinusoids in float32 (exact for
integer timesteps); ``FlowMatchEulerDiscreteScheduler`` stores sigmas in float32, so the SD3 ``x_k`` uses
``float32(k / T)`` (the eps conversion uses the exact float64 ``k / T``); ``alphas_cumprod`` is a float32 product.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from pathlib import Path

import torch
from diffusers import DDPMScheduler
from reference_families import _cfg, _check_pair, _check_steps, _f64, _f64_copy, _fd  # shared helpers
from reference_processes import flow_noising_scheduler

F64 = torch.float64


# --------------------------------------------------------------------------- helpers


def _check_rows(name: str, x: torch.Tensor | None, n: int, dim: int) -> None:
    if x is None or x.dim() != dim or x.shape[0] != n:
        shape = None if x is None else tuple(x.shape)
        raise ValueError(f"{name} must have {dim} dims and one row per sample (n={n}), got {shape}")


def load_transformer_components(folder_or_components):
    """(transformer, scheduler) from a pipeline folder (``transformer/``, ``scheduler/``; classes named in
    ``model_index.json``), a mapping with ``transformer`` / ``scheduler`` keys, or an object with those attributes."""
    if isinstance(folder_or_components, (str, Path)):
        import diffusers

        root = Path(folder_or_components)
        index = json.loads((root / "model_index.json").read_text())
        scheduler_cls = getattr(diffusers, index["scheduler"][1])
        transformer_cls = getattr(diffusers, index["transformer"][1])
        return transformer_cls.from_pretrained(root / "transformer"), scheduler_cls.from_pretrained(root / "scheduler")
    if isinstance(folder_or_components, Mapping):
        return folder_or_components["transformer"], folder_or_components["scheduler"]
    return folder_or_components.transformer, folder_or_components.scheduler


# --------------------------------------------------------------------------- Stable Diffusion 3 (flow matching)


sd3_noising_scheduler = flow_noising_scheduler  # the same noising copy as the flow-process reference


def sd3_fd_reference(
    folder_or_components,
    latents: torch.Tensor,
    noise: torch.Tensor,
    prompt_embeds: torch.Tensor,
    pooled: torch.Tensor,
    negative_prompt_embeds: torch.Tensor | None,
    negative_pooled: torch.Tensor | None,
    k: int,
    dt: int,
    guidance_scale: float | None = None,
) -> torch.Tensor:
    """StableDiffusion3Pipeline: sigma = k / T, x_k = ``scale_noise(latents, k, noise)`` = (1 - sigma) latents +
    sigma noise; at each evaluation point k_e in (k, k + dt) the transformer is fed ``timestep = k_e`` (float32, as
    the pipeline's ``t``) and returns v, CFG-combined when ``guidance_scale`` is given, then
    ``eps = x_k + (1 - k_e / T) * v``.

    Per-sample conditioning (row i for sample i): ``prompt_embeds`` / ``negative_prompt_embeds`` (n, L, D),
    ``pooled`` / ``negative_pooled`` (n, pooled_dim); the negatives are needed only with ``guidance_scale``.
    """
    transformer, scheduler = load_transformer_components(folder_or_components)
    T = scheduler.config.num_train_timesteps
    _check_steps(k, dt, T - 1)
    _check_pair(latents, noise)
    n = latents.shape[0]
    _check_rows("prompt_embeds", prompt_embeds, n, 3)
    _check_rows("pooled", pooled, n, 2)
    if guidance_scale is not None:
        _check_rows("negative_prompt_embeds", negative_prompt_embeds, n, 3)
        _check_rows("negative_pooled", negative_pooled, n, 2)
        negative_prompt_embeds, negative_pooled = _f64(negative_prompt_embeds), _f64(negative_pooled)
    noiser = sd3_noising_scheduler(scheduler, k)
    model = _f64_copy(transformer)
    latents, noise = _f64(latents), _f64(noise)
    prompt_embeds, pooled = _f64(prompt_embeds), _f64(pooled)

    def v_at(x: torch.Tensor, timestep: torch.Tensor, embeds: torch.Tensor, pooled_row: torch.Tensor) -> torch.Tensor:
        return model(
            hidden_states=x,
            timestep=timestep,
            encoder_hidden_states=embeds,
            pooled_projections=pooled_row,
            joint_attention_kwargs=None,
            return_dict=False,
        )[0]

    def eps_at(x: torch.Tensor, kk: int, i: int) -> torch.Tensor:
        t = torch.tensor(float(kk), dtype=torch.float32)  # sigma * T with sigma = kk / T, as scheduler.timesteps
        timestep = t.expand(x.shape[0])
        noise_pred = v_at(x, timestep, prompt_embeds[i : i + 1], pooled[i : i + 1])
        if guidance_scale is not None:
            noise_pred_text = noise_pred
            noise_pred_uncond = v_at(x, timestep, negative_prompt_embeds[i : i + 1], negative_pooled[i : i + 1])
            noise_pred = _cfg(noise_pred_uncond, noise_pred_text, guidance_scale)
        sigma = kk / T
        return x + (1.0 - sigma) * noise_pred

    out = torch.empty(n, dtype=F64)
    with torch.no_grad():
        for i in range(n):
            x_k = noiser.scale_noise(latents[i : i + 1], torch.tensor([float(k)], dtype=F64), noise[i : i + 1])
            eps = [eps_at(x_k, kk, i) for kk in (k, k + dt)]
            out[i] = _fd(eps[0], eps[1], dt, T)
    return out


# --------------------------------------------------------------------------- PixArt-alpha (VP, learned sigma)


def pixart_noising_scheduler(scheduler) -> DDPMScheduler:
    """``DDPMScheduler.from_config(scheduler.config)``: the training noiser on the pipeline scheduler's betas, whose
    ``add_noise`` indexes ``alphas_cumprod[k]`` directly (see the module docstring for why the pipeline's
    DPMSolverMultistepScheduler.add_noise is not used)."""
    noiser = DDPMScheduler.from_config(scheduler.config)
    torch.testing.assert_close(noiser.alphas_cumprod, scheduler.alphas_cumprod, rtol=0.0, atol=0.0)
    return noiser


def pixart_fd_reference(
    folder_or_components,
    latents: torch.Tensor,
    noise: torch.Tensor,
    prompt_embeds: torch.Tensor,
    prompt_attention_mask: torch.Tensor,
    negative_prompt_embeds: torch.Tensor | None,
    negative_attention_mask: torch.Tensor | None,
    k: int,
    dt: int,
    guidance_scale: float | None = None,
) -> torch.Tensor:
    """PixArtAlphaPipeline: x_k = ``DDPMScheduler.from_config(cfg).add_noise(latents, noise, k)``; at each evaluation
    point the transformer is fed ``scale_model_input(x_k, t)`` and ``timestep = tensor([k_e])`` (int64) with
    ``encoder_attention_mask`` and ``added_cond_kwargs = {"resolution": None, "aspect_ratio": None}``; the output is
    CFG-combined on all channels when ``guidance_scale`` is given, then the first ``in_channels`` are kept (learned
    sigma) as eps (prediction type epsilon only).

    Per-sample conditioning (row i for sample i): ``prompt_embeds`` / ``negative_prompt_embeds`` (n, L, D) and
    ``prompt_attention_mask`` / ``negative_attention_mask`` (n, L), 1 = keep, 0 = padding.
    """
    transformer, scheduler = load_transformer_components(folder_or_components)
    T = scheduler.config.num_train_timesteps
    _check_steps(k, dt, T - 1)
    _check_pair(latents, noise)
    n = latents.shape[0]
    if scheduler.config.prediction_type != "epsilon":
        raise ValueError(f"only epsilon-prediction PixArt models are covered, got {scheduler.config.prediction_type!r}")
    if transformer.config.sample_size == 128:
        raise ValueError("sample_size 128 makes PixArtAlphaPipeline pass resolution / aspect_ratio micro-conditions")
    _check_rows("prompt_embeds", prompt_embeds, n, 3)
    _check_rows("prompt_attention_mask", prompt_attention_mask, n, 2)
    if guidance_scale is not None:
        _check_rows("negative_prompt_embeds", negative_prompt_embeds, n, 3)
        _check_rows("negative_attention_mask", negative_attention_mask, n, 2)
        negative_prompt_embeds = _f64(negative_prompt_embeds)
    latent_channels = transformer.config.in_channels
    learned_sigma = transformer.config.out_channels // 2 == latent_channels
    noiser = pixart_noising_scheduler(scheduler)
    sched = copy.deepcopy(scheduler)  # for scale_model_input; keep the caller's untouched
    model = _f64_copy(transformer)
    latents, noise = _f64(latents), _f64(noise)
    prompt_embeds = _f64(prompt_embeds)
    added_cond_kwargs = {"resolution": None, "aspect_ratio": None}

    def out_at(x: torch.Tensor, timestep: torch.Tensor, embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return model(
            x,
            encoder_hidden_states=embeds,
            encoder_attention_mask=mask,
            timestep=timestep,
            added_cond_kwargs=added_cond_kwargs,
            return_dict=False,
        )[0]

    def eps_at(x: torch.Tensor, kk: int, i: int) -> torch.Tensor:
        t = torch.tensor(kk)  # an int64 0-d entry, as scheduler.timesteps holds
        latent_model_input = sched.scale_model_input(x, t)
        current_timestep = t[None].expand(latent_model_input.shape[0])
        rows = slice(i, i + 1)
        noise_pred = out_at(latent_model_input, current_timestep, prompt_embeds[rows], prompt_attention_mask[rows])
        if guidance_scale is not None:
            noise_pred_text = noise_pred
            negative = (negative_prompt_embeds[rows], negative_attention_mask[rows])
            noise_pred_uncond = out_at(latent_model_input, current_timestep, *negative)
            noise_pred = _cfg(noise_pred_uncond, noise_pred_text, guidance_scale)
        if learned_sigma:
            noise_pred = noise_pred.chunk(2, dim=1)[0]
        return noise_pred

    out = torch.empty(n, dtype=F64)
    with torch.no_grad():
        for i in range(n):
            x_k = noiser.add_noise(latents[i : i + 1], noise[i : i + 1], torch.tensor([k]))
            eps = [eps_at(x_k, kk, i) for kk in (k, k + dt)]
            out[i] = _fd(eps[0], eps[1], dt, T)
    return out


# --------------------------------------------------------------------------- self-test


if __name__ == "__main__":
    import sys
    import tempfile

    from diffusers import DPMSolverMultistepScheduler
    from safetensors.torch import load_file

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from family_fixtures import LATENT_SHAPE  # noqa: E402
    from family_fixtures2 import save_embeds, save_pixart_folder, save_sd3_folder  # noqa: E402

    torch.set_printoptions(precision=6)
    N, K, DT = 2, 10, 1
    g = torch.Generator().manual_seed(0)
    latents = torch.randn((N, *LATENT_SHAPE), generator=g, dtype=F64)
    noise = torch.randn((N, *LATENT_SHAPE), generator=g, dtype=F64)

    def show(name: str, vals: torch.Tensor) -> None:
        finite = bool(torch.isfinite(vals).all())
        assert finite and vals.dtype == F64 and vals.shape == (N,), (name, vals)
        print(f"{name:24s} k={K} dt={DT}: {vals.tolist()}  finite={finite}")

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)

        sd3_dir = save_sd3_folder(root / "sd3", shift=3.0)
        e = load_file(save_embeds(root / "sd3.safetensors", "sd3", prompts=N))
        sd3_args = (e["prompt_embeds"], e["pooled_prompt_embeds"])
        sd3_neg = (e["negative_prompt_embeds"], e["negative_pooled_prompt_embeds"])
        for gs in (None, 3.0):
            vals = sd3_fd_reference(sd3_dir, latents, noise, *sd3_args, *sd3_neg, K, DT, guidance_scale=gs)
            show("sd3" + ("" if gs is None else f" cfg={gs:g}"), vals)
        # the shift is a sampler setting only: an un-shifted folder gives the same numbers
        same = sd3_fd_reference(save_sd3_folder(root / "sd3_s1", shift=1.0), latents, noise, *sd3_args, *sd3_neg, K, DT)
        torch.testing.assert_close(same, sd3_fd_reference(sd3_dir, latents, noise, *sd3_args, *sd3_neg, K, DT))
        print("sd3: shift=1 and shift=3 folders agree (the network is fed sigma * T = k either way)")

        px_dir = save_pixart_folder(root / "pixart")
        e = load_file(save_embeds(root / "pixart.safetensors", "pixart", prompts=N))
        px_args = (e["prompt_embeds"], e["prompt_attention_mask"])
        px_neg = (e["negative_prompt_embeds"], e["negative_prompt_attention_mask"])
        for gs in (None, 3.0):
            vals = pixart_fd_reference(px_dir, latents, noise, *px_args, *px_neg, K, DT, guidance_scale=gs)
            show("pixart" + ("" if gs is None else f" cfg={gs:g}"), vals)
        # padded positions are masked out: changing their embeddings changes nothing
        pad = (e["prompt_attention_mask"] == 0)[..., None]
        npad = (e["negative_prompt_attention_mask"] == 0)[..., None]
        moved_pos = e["prompt_embeds"].masked_fill(pad, 7.0)
        moved = (moved_pos, px_args[1], e["negative_prompt_embeds"].masked_fill(npad, -7.0))
        a = pixart_fd_reference(px_dir, latents, noise, *px_args, *px_neg, K, DT, guidance_scale=3.0)
        b = pixart_fd_reference(px_dir, latents, noise, *moved, px_neg[1], K, DT, guidance_scale=3.0)
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0.0)
        print(f"pixart: padded-token embeddings do not matter (max rel diff {((a - b).abs() / a).max().item():.1e})")
        fresh = DPMSolverMultistepScheduler.from_pretrained(px_dir / "scheduler")
        zero, one = torch.zeros(1, 1, 1, 1, dtype=F64), torch.ones(1, 1, 1, 1, dtype=F64)
        dpm = fresh.add_noise(zero, one, torch.tensor([K])).item()
        ddpm = pixart_noising_scheduler(fresh).add_noise(zero, one, torch.tensor([K])).item()
        print(f"noise level at k={K}: DPMSolverMultistepScheduler.add_noise {dpm:.6f}, DDPM add_noise {ddpm:.6f}")
