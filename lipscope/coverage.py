"""Training coverage: how much of a training recipe's timestep distribution falls where K is singular
(docs/probe.md, "Training coverage").

The distributions are those of diffusers' training scripts, as exact probability masses over the model steps a
script can draw: a VP script draws t uniformly from 0..T−1 (``uniform``; ``logit-normal:M,S`` and ``mode:S``
draw u with diffusers' ``compute_density_for_timestep_sampling`` and take t = ⌊u·T⌋); a flow-matching script
(train_dreambooth_sd3.py / _flux.py) draws u the same way and takes the scheduler's (shifted) σ·T at index
⌊u·T⌋, highest noise first (``shift:S`` replaces the config's shift); ``FILE.npy`` is a sample of drawn model
steps (e.g. a fine-tune run's ``timesteps.npy``), its empirical distribution. The mass of u in each index bin
comes from u's CDF: exact for uniform and logit-normal, a midpoint quadrature of 2²⁰ points for ``mode``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats as st

from .errors import InputError

MODE_QUADRATURE = 2**20


def parse_train_timesteps(spec: str) -> dict[str, Any]:
    """``uniform | logit-normal:M,S | mode:S | shift:S | FILE.npy`` → {"kind", parameters}."""
    s = spec.strip()
    head, _, arg = s.partition(":")
    try:
        if s == "uniform":
            return {"kind": "uniform"}
        if head == "logit-normal":
            m, sd = (float(v) for v in arg.split(","))
            if not (math.isfinite(m) and math.isfinite(sd) and sd > 0):
                raise ValueError
            return {"kind": "logit-normal", "mean": m, "std": sd}
        if head in ("mode", "shift"):
            v = float(arg)
            if not math.isfinite(v) or (head == "shift" and v <= 0):
                raise ValueError
            return {"kind": head, "scale" if head == "mode" else "shift": v}
    except ValueError:
        raise InputError(
            f"`train_timesteps` {s!r}: give numbers, e.g. logit-normal:0,1 (std > 0), mode:1.29 or shift:3"
        ) from None
    if s.endswith(".npy"):
        if not Path(s).is_file():
            raise InputError(f"`train_timesteps` {s}: no such file; give a .npy of drawn model steps")
        return {"kind": "file", "path": s}
    raise InputError(f"`train_timesteps` {s!r} not known; use uniform, logit-normal:M,S, mode:S, shift:S or FILE.npy")


def _u_bin_mass(dist: dict[str, Any], T: int) -> np.ndarray:
    """P(⌊u·T⌋ = i), i = 0..T−1, for u drawn as compute_density_for_timestep_sampling draws it."""
    edges = np.linspace(0.0, 1.0, T + 1)
    if dist["kind"] in ("uniform", "shift"):
        return np.diff(edges)
    if dist["kind"] == "logit-normal":  # u = sigmoid(N(m, s²)): F(x) = Φ((logit x − m)/s)
        with np.errstate(divide="ignore"):
            z = (np.log(edges) - np.log1p(-edges) - dist["mean"]) / dist["std"]
        return np.diff(st.norm.cdf(z))
    u0 = (np.arange(MODE_QUADRATURE) + 0.5) / MODE_QUADRATURE  # mode: u = 1 − u0 − s(cos²(πu0/2) − 1 + u0)
    u = 1 - u0 - dist["scale"] * (np.cos(math.pi / 2 * u0) ** 2 - 1 + u0)
    idx = np.clip((u * T).astype(np.int64), 0, T - 1)
    return np.bincount(idx, minlength=T) / MODE_QUADRATURE


def flow_steps(scheduler_config: dict[str, Any], shift: float | None = None) -> np.ndarray:
    """The σ·T a flow training script indexes (FlowMatchEulerDiscreteScheduler.timesteps), highest noise first."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    cfg = {k: v for k, v in scheduler_config.items() if not k.startswith("_")}
    if shift is not None:
        cfg |= {"shift": shift, "use_dynamic_shifting": False}
    return FlowMatchEulerDiscreteScheduler.from_config(cfg).timesteps.double().numpy()


def train_distribution(dist: dict[str, Any], T: int, flow: bool, scheduler_config: dict[str, Any]) -> pd.Series:
    """The probability mass of each model step a training script draws (index: t, values sum to 1)."""
    if dist["kind"] == "file":
        try:
            t = np.load(dist["path"], allow_pickle=False).astype(np.float64).ravel()
        except (OSError, ValueError) as e:
            raise InputError(f"`train_timesteps` {dist['path']}: not a numeric .npy ({e})") from None
        if not t.size or not np.isfinite(t).all():
            raise InputError(f"`train_timesteps` {dist['path']}: needs finite drawn model steps")
        v, c = np.unique(t, return_counts=True)
        return pd.Series(c / t.size, index=v)
    if dist["kind"] == "shift" and not flow:
        raise InputError("`train_timesteps` shift:S is for flow-matching models; a VP model trains uniform")
    mass = _u_bin_mass(dist, T)
    steps = flow_steps(scheduler_config, dist.get("shift")) if flow else np.arange(T, dtype=np.float64)
    s = pd.Series(mass, index=steps[: len(mass)])
    return s.groupby(level=0).sum().sort_index()


def coverage(dist: pd.Series, onset: float | None, steps: pd.DataFrame | None = None) -> dict[str, Any]:
    """Mass at t ≤ onset (the singular range) and, per sampler step, in (t_to, t_from] (the last step: from its
    clean end); None where there is no onset."""
    t, p = dist.index.to_numpy(np.float64), dist.to_numpy(np.float64)
    out: dict[str, Any] = {"onset": onset}
    out["mass_below_onset"] = float(p[t <= onset].sum()) if onset is not None else None
    if steps is not None and len(steps):
        lo, hi = steps["t_to"].to_numpy(), steps["t_from"].to_numpy()
        out["step_mass"] = [float(p[(t > a) & (t <= b)].sum()) for a, b in zip(lo, hi, strict=True)]
    return out


def coverage_sentence(spec: str, cov: dict[str, Any]) -> str:
    """The line the probe prints: the training mass in the singular range."""
    if cov["mass_below_onset"] is None:
        return f"training coverage ({spec}): n/a, because the probe found no onset (K never rises 3× above its median)"
    return (
        f"training coverage ({spec}): {100 * cov['mass_below_onset']:.2f} % of training timesteps at t ≤ "
        f"{cov['onset']:g} (the onset)"
    )
