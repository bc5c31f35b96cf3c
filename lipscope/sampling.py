"""Sampling through diffusers schedulers (the model's own noise levels, seeded per sample).

The EpsModel already returns ε and applies the E-TSDM map, so every VP scheduler is built with
``prediction_type="epsilon"`` from the model's own betas; the E-TSDM map is honoured for free. Flow models
sample with their own ``FlowMatchEulerDiscreteScheduler``; VE and EDM models with ``ScoreSdeVeScheduler``'s
predictor-corrector and the EDM Euler / DPM-Solver++ schedulers (:mod:`lipscope.sigma_samplers`).
Each sample has its own generator (initial noise and, for DDPM and PC, the per-step noise), so samples do
not depend on the batch size. Samples are x0 in the model's own space: pixels clamped to its data range (VE:
[0, 1], as ``ScoreSdeVePipeline`` does), latents and unbounded (Gaussian) models unclamped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from pathlib import Path

import numpy as np
import torch

from . import rng, shard
from .errors import InputError, ModelOutputError
from .models import EpsModel
from .processes import EDMProcess, FlowProcess, VEProcess
from .schedules import Schedule
from .sigma_samplers import samplers_for, sigma_sample

log = logging.getLogger("lipscope")

SAMPLERS = ("ddpm", "ddim", "dpmsolver", "dpmsolver++", "pc")


def check_sampleable(model: EpsModel) -> None:
    """Sampling runs for VP schedules (DDPM-family samplers), flow matching (its Euler scheduler), VE and EDM."""
    if not isinstance(model.schedule, Schedule | FlowProcess | VEProcess | EDMProcess):
        raise InputError(
            f"sampling {model.schedule.kind} models is not supported yet (VP, VE, EDM and flow only); to probe one, "
            "give `data` as images or arrays instead of model samples"
        )


def check_sampler(model: EpsModel, name: str) -> None:
    """Refuse, before any work, a sampler ``name`` this model's process has none of."""
    check_sampleable(model)
    p = model.schedule
    allowed = SAMPLERS[:4] if isinstance(p, Schedule) else ("ddim",) if isinstance(p, FlowProcess) else samplers_for(p)
    if name not in allowed:
        raise InputError(f"`scheduler` {name}: this {p.kind} model samples with {', '.join(allowed)}; use one of them")


def data_range_of(model: EpsModel) -> tuple[float, float] | None:
    """The range of the model's pixel data (its own, else its process family's convention); None: unbounded."""
    r = model.data_range
    return model.schedule.default_data_range if isinstance(r, str) else r


def as_images(model: EpsModel, x: torch.Tensor) -> torch.Tensor:
    """Samples as images in [−1, 1] (what grids and sample-quality metrics take): a latent model's decoded by its
    autoencoder, pixels mapped from the model's data range (VE: [0, 1])."""
    if model.latent is not None:
        return model.latent.decode(x)
    r = data_range_of(model)
    if r is None or tuple(r) == (-1.0, 1.0):
        return x
    lo, hi = r
    return (x - lo) * (2.0 / (hi - lo)) - 1.0


def betas_of(model: EpsModel) -> np.ndarray:
    """β_k recovered from the schedule's log ᾱ (exact inverse of the cumulative product); VP schedules only."""
    check_sampleable(model)
    assert isinstance(model.schedule, Schedule)
    lab = model.schedule.log_alpha_bar
    prev = torch.cat([torch.zeros(1, dtype=lab.dtype), lab[:-1]])
    return (-torch.expm1(lab - prev)).numpy()


def make_scheduler(name: str, model: EpsModel, steps: int, clip: bool = True):
    """A diffusers scheduler for ``name`` over the model's own betas, timesteps set for ``steps``; ``clip``:
    x̂0 clipped to [−1, 1] at each step (pixel models, as diffusers' pixel pipelines do; never for latents)."""
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

    if name not in SAMPLERS:
        raise InputError(f"`scheduler` {name!r} not known; use {', '.join(SAMPLERS)}")
    if steps < 1 or steps > model.T:
        raise InputError(f"`steps` {steps}: use 1..{model.T}")
    common = {"num_train_timesteps": model.T, "trained_betas": betas_of(model), "prediction_type": "epsilon"}
    if name == "ddpm":
        sched = DDPMScheduler(**common, variance_type="fixed_small", clip_sample=clip)
    elif name == "ddim":
        sched = DDIMScheduler(**common, clip_sample=clip, set_alpha_to_one=True, timestep_spacing="trailing")
    else:  # "dpmsolver" is DPM-Solver++(2M): plain DPM-Solver is deprecated in diffusers
        sched = DPMSolverMultistepScheduler(
            **common, algorithm_type="dpmsolver++", solver_order=2, timestep_spacing="trailing"
        )
    sched.set_timesteps(steps)
    return sched


def flow_scheduler(name: str, model: EpsModel, steps: int):
    """Flow models sample with diffusers' ``FlowMatchEulerDiscreteScheduler`` from their own config (so a timestep
    shift applies); ``ddim`` names it, since DDIM's update x' = α'x̂0 + σ'ε̂ is exactly the Euler flow step."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    if name != "ddim":
        raise InputError(f"`scheduler` {name}: a flow model samples with the Euler flow step; use ddim")
    if steps < 1 or steps > model.T:
        raise InputError(f"`steps` {steps}: use 1..{model.T}")
    cfg = model.scheduler_config
    sched = FlowMatchEulerDiscreteScheduler.from_config(cfg)
    if cfg.get("use_dynamic_shifting"):  # FluxPipeline: σ from 1 to 1/steps, shifted by mu for the token count
        sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps).tolist(), mu=dynamic_shift_mu(model))
    else:
        sched.set_timesteps(steps)
    return sched


def dynamic_shift_mu(model: EpsModel) -> float:
    """mu of a resolution-dependent shift (FluxPipeline's ``calculate_shift``): linear in the number of 2×2 latent
    tokens between (base_image_seq_len, base_shift) and (max_image_seq_len, max_shift)."""
    cfg, shape = model.scheduler_config, model.sample_shape or (0, 0, 0)
    n = (int(shape[1]) // 2) * (int(shape[2]) // 2)
    lo, hi = cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096)
    b0, b1 = cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15)
    m = (b1 - b0) / (hi - lo)
    return float(n * m + (b0 - m * lo))


def sample(
    model: EpsModel,
    n: int,
    *,
    scheduler: str = "ddim",
    steps: int = 50,
    seed: int = 0,
    batch_size: int = 256,
    progress: bool = False,
) -> torch.Tensor:
    """Draw n samples (float32 (n, C, H, W)); NaN/inf samples are refused. Pixel samples are clamped to the
    model's data range ([−1, 1]; VE [0, 1]); a latent model's samples stay latents, unclamped."""
    check_sampler(model, scheduler)
    span = data_range_of(model) if model.latent is None else None
    clip = span is not None
    flow, sigma = isinstance(model.schedule, FlowProcess), isinstance(model.schedule, VEProcess | EDMProcess)
    # samplers integrate ε (VP) or the velocity (flow), whatever a probe measured (VE/EDM: their own, below)
    if not sigma and model.target != ("velocity" if flow else "eps"):
        model = dataclasses.replace(model, target="velocity" if flow else "eps")
    if model.sample_shape is None:
        raise InputError(
            f"sampling {model.name} needs its sample shape: give the factory's network a sample_shape attribute "
            "(e.g. (3, 32, 32)), or give `data` instead of model samples"
        )
    if n < 1 or batch_size < 1:
        raise InputError(f"`num` and `batch_size` must be ≥ 1 (got {n} and {batch_size})")
    out = []
    x_all = rng.normal(seed, rng.Stream.SAMPLER_INIT, n, tuple(model.sample_shape))
    with torch.inference_mode():
        for s in shard.split(torch.arange(0, n, batch_size), 1).tolist():  # several processes: whole batches each
            xb = x_all[s : s + batch_size].to(model.device, model.dtype)
            rows = torch.arange(s, s + xb.shape[0])  # sample s + r gets the conditioning of row s + r
            dev = "cpu" if sigma else model.device  # ScoreSdeVeScheduler.step_correct draws on the CPU
            gens = [rng.generator(seed, rng.Stream.SAMPLER_STEP, s + i, device=dev) for i in range(xb.shape[0])]
            if sigma:
                xb = sigma_sample(model, scheduler, steps, xb, rows, gens)
            else:  # multistep solvers keep per-run state: one scheduler per batch
                sched = (
                    flow_scheduler(scheduler, model, steps) if flow else make_scheduler(scheduler, model, steps, clip)
                )
                for t in sched.timesteps:
                    tt = torch.full((xb.shape[0],), float(t), device=model.device)
                    # ε, or the velocity u = ε − x0 at σ = t/T for flow
                    xb = sched.step(model(xb, tt, rows), t, xb, generator=gens).prev_sample
            bad = ~torch.isfinite(xb).reshape(xb.shape[0], -1).all(1)
            if bad.any():
                raise ModelOutputError(
                    f"sampling {model.name} ({scheduler}, {steps} steps) gave NaN/inf in {int(bad.sum())} of "
                    f"{xb.shape[0]} samples (batch at {s}); check the weights, or sample in float32"
                )
            out.append((s, (xb.float().clamp(*span) if span is not None else xb.float()).cpu()))
    return torch.cat([x for _, x in sorted(p for part in shard.gather(out) for p in part)])


def ddim_sample(model: EpsModel, n: int, seed: int, steps: int = 50, batch_size: int = 64) -> torch.Tensor:
    """Deterministic DDIM (η = 0)."""
    return sample(model, n, scheduler="ddim", steps=steps, seed=seed, batch_size=batch_size)


def weights_digest(module: torch.nn.Module) -> str:
    """sha256 (first 16 hex) of a network's weights: names, dtypes, shapes and bytes of its state dict."""
    h = hashlib.sha256()
    for name, v in sorted(module.state_dict().items()):
        t = v.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def model_samples(
    model: EpsModel, n: int, seed: int, cache_dir: str | Path | None = None, steps: int = 50
) -> torch.Tensor:
    """x0 drawn from the model itself (DDIM, ``steps`` steps), cached as an npz in ``cache_dir``.

    The cache key is the content of the weights (:func:`weights_digest`), the configs, the E-TSDM
    settings, the dtype and every sampling option, so two models that share a config never share
    samples. A model without weights to hash (a plain callable) is not cached.
    """
    from .io import atomic_write_bytes, npz_bytes

    path = None
    if cache_dir is not None and model.module is not None:
        key = hashlib.sha256(
            "|".join(
                [
                    weights_digest(model.module),
                    model.config_hash,
                    str(model.etsdm),
                    str(model.dtype),
                    str(n),
                    str(seed),
                    model.conditioning.digest() if model.conditioning is not None else "",
                ]
            ).encode()
        ).hexdigest()[:20]
        path = Path(cache_dir) / f"x0_model_{key}_n{n}_s{seed}_ddim{steps}.npz"
        shard.barrier()  # several processes: all see the cache as it was, then sample together (or none does)
        if path.is_file():
            try:
                with np.load(path, allow_pickle=False) as z:
                    x0 = torch.from_numpy(z["x0"])
                if x0.shape == (n, *(model.sample_shape or ())) and torch.isfinite(x0).all():
                    return x0
            except (OSError, ValueError, KeyError):
                pass
            log.warning("ignoring the unreadable sample cache %s; drawing the samples again", path)
    check_sampleable(model)  # refuse before announcing the work
    log.warning(
        "drawing %d x0 samples from the model itself (ddim: %s, %d steps); "
        "pass real data (digits, a folder or an array file) to probe on it",
        n,
        "Euler in sigma" if isinstance(model.schedule, VEProcess | EDMProcess) else "DDIM",
        steps,
    )
    x0 = ddim_sample(model, n, seed, steps)
    if path is not None and shard.is_main():
        try:
            atomic_write_bytes(path, npz_bytes(x0=x0.numpy()))
        except InputError as e:  # a cache that cannot be written is not worth failing the probe
            log.warning("could not cache the samples (%s)", e)
    return x0


def image_grid(x: torch.Tensor, nrow: int | None = None) -> np.ndarray:
    """(n, C, H, W) in [−1, 1] → uint8 grid image (H', W', C) with 1-pixel gaps."""
    n, c, h, w = x.shape
    nrow = nrow or int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / nrow))
    grid = np.full((rows * (h + 1) + 1, nrow * (w + 1) + 1, c), 255, dtype=np.uint8)
    imgs = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for i in range(n):
        r, col = divmod(i, nrow)
        grid[1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + col * (w + 1) : 1 + col * (w + 1) + w] = imgs[i]
    return grid


def png_bytes(grid: np.ndarray, scale: int = 4) -> bytes:
    import io

    from PIL import Image

    img = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
    img = img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()
