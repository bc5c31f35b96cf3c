"""Sampling through diffusers schedulers (the model's own noise levels, seeded per sample)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from .data import per_sample_noise
from .models import EpsModel

log = logging.getLogger("lipscope")


def betas_of(model: EpsModel) -> np.ndarray:
    """β_k recovered from the schedule's log ᾱ (exact inverse of the cumulative product)."""
    lab = model.schedule.log_alpha_bar
    prev = torch.cat([torch.zeros(1, dtype=lab.dtype), lab[:-1]])
    return (-torch.expm1(lab - prev)).numpy()


def ddim_sample(model: EpsModel, n: int, seed: int, steps: int = 50, batch_size: int = 64) -> torch.Tensor:
    """Deterministic DDIM (η = 0) from per-sample initial noise; returns float32 (n, C, H, W)."""
    from diffusers import DDIMScheduler

    if model.sample_shape is None:
        raise ValueError("sampling needs a model with a known sample_shape")
    sched = DDIMScheduler(num_train_timesteps=model.T, trained_betas=betas_of(model), prediction_type="epsilon")
    sched.set_timesteps(steps)
    x = per_sample_noise(seed, n, tuple(model.sample_shape), offset=1 << 20)
    out = []
    with torch.inference_mode():
        for s in range(0, n, batch_size):
            xb = x[s : s + batch_size].to(model.device, model.dtype)
            for t in sched.timesteps:
                tt = torch.full((xb.shape[0],), float(t), device=model.device)
                eps = model(xb, tt)
                xb = sched.step(eps, t, xb).prev_sample
            out.append(xb.float().cpu())
    return torch.cat(out)


def model_samples(
    model: EpsModel, n: int, seed: int, cache_dir: str | Path | None = None, steps: int = 50
) -> torch.Tensor:
    """x0 drawn from the model itself (DDIM, ``steps`` steps), cached as an npz in ``cache_dir``."""
    from .io import atomic_write_bytes, npz_bytes

    path = None
    if cache_dir is not None:
        path = Path(cache_dir) / f"x0_model_{model.config_hash}_n{n}_s{seed}_ddim{steps}.npz"
        if path.exists():
            with np.load(path) as z:
                return torch.from_numpy(z["x0"])
    log.warning(
        "drawing %d x0 samples from the model itself (DDIM, %d steps); pass --data to probe on real data", n, steps
    )
    x0 = ddim_sample(model, n, seed, steps).clamp(-1, 1)
    if path is not None:
        atomic_write_bytes(path, npz_bytes(x0=x0.numpy()))
    return x0
