"""The step budget of a sampler: how much of ∫K dτ each of its steps crosses (docs/probe.md, "Step budget").

A sampler's step from t_a to t_b moves ε_θ by at most ∫_{t_b}^{t_a} K dτ (K per unit τ = t/T, as the probe
measures it), so the share of that integral a step carries says where its local error can concentrate. The
steps are those of diffusers' own scheduler classes, built from the model's scheduler config as diffusers'
pipelines build them (``Cls.from_config(pipe.scheduler.config)``, then ``set_timesteps(N)``): the model-time
boundaries are the timesteps the network is fed, ending at the state the last step returns (clean data: t = −1
on a discrete VP schedule, whose ᾱ reaches 1 one step below t = 0; t = 0 for flow; the t of σ_min where
``final_sigmas_type="sigma_min"``).

The integral is exact for a power law between grid points: K is interpolated linearly in (log τ, log K) between
positive grid points (and as the power law of the first positive segment down to t = 0 where that segment is
singular and integrable, −1 < p < 0); ``budget_err`` is the stated error: the difference to the trapezoid rule on
the same points plus the larger difference to the same rule on every other grid point (even ones, odd ones; the
rule converges quadratically in the spacing, so that difference is about 3× its own error; large where the grid is
coarser than the step), plus the extrapolation from t = 0 (:func:`_first_err`) and, outside the probed grid, the
whole extrapolated piece (K held at the nearest grid value, flagged ``covered = False``).
"""

from __future__ import annotations

import copy
import math
from typing import Any

import numpy as np
import pandas as pd

from .errors import InputError

# name → (diffusers class, extra config); built from the model's scheduler config with from_config
SAMPLERS: dict[str, tuple[str, dict[str, Any]]] = {
    "default": ("", {}),
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "dpmsolver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "dpmsolver": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver"}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "flow-euler": ("FlowMatchEulerDiscreteScheduler", {}),
}
FLOW_SAMPLERS = ("default", "euler", "flow-euler")  # a flow model's samplers (its Euler step)


def parse_samplers(spec: str) -> list[tuple[str, int]]:
    """``NAME:STEPS[,NAME:STEPS…]`` → [(name, steps)]; unknown names and steps ≤ 0 are refused."""
    out = []
    for part in (p.strip() for p in spec.split(",")):
        name, sep, n = part.rpartition(":")
        if not sep or not name:
            raise InputError(f"`sampler` {part!r}: use NAME:STEPS, e.g. ddim:10 (names: {', '.join(SAMPLERS)})")
        if name not in SAMPLERS:
            raise InputError(f"`sampler` {name!r} not known; use one of {', '.join(SAMPLERS)}")
        try:
            steps = int(n)
        except ValueError:
            raise InputError(f"`sampler` {part!r}: STEPS must be a whole number, e.g. {name}:10") from None
        if steps <= 0:
            raise InputError(f"`sampler` {part!r}: STEPS must be ≥ 1")
        out.append((name, steps))
    return out


def is_flow_config(config: dict[str, Any]) -> bool:
    return str(config.get("_class_name", "")).startswith("FlowMatch")


def build_scheduler(name: str, config: dict[str, Any], steps: int, mu: float | None = None):
    """The diffusers scheduler a pipeline would use for ``name`` (``default``: the config's own class), built from
    the model's scheduler ``config`` (shift, spacing, ``final_sigmas_type`` as configured), timesteps set for
    ``steps`` (``mu``: the resolution-dependent shift of a dynamic-shifting flow config)."""
    import diffusers

    cls_name, extra = SAMPLERS[name]
    flow = is_flow_config(config)
    if flow and name not in FLOW_SAMPLERS:
        raise InputError(f"`sampler` {name}: a flow model's samplers are {', '.join(FLOW_SAMPLERS)}")
    if not flow and name == "flow-euler":
        raise InputError("`sampler` flow-euler needs a flow-matching model; use ddim, euler, dpmsolver++, …")
    if flow and name == "euler":
        cls_name = "FlowMatchEulerDiscreteScheduler"
    cls = getattr(diffusers, cls_name or str(config.get("_class_name", "DDPMScheduler")), None)
    if cls is None:
        raise InputError(f"`sampler` default: diffusers has no scheduler class {config.get('_class_name')!r}")
    sched = cls.from_config({**config, **extra})
    if flow and sched.config.get("use_dynamic_shifting"):
        if mu is None:
            raise InputError(f"`sampler` {name}: the config shifts by resolution; give the shift `mu`")
        sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps).tolist(), mu=mu)  # as FluxPipeline
    else:
        sched.set_timesteps(steps)
    return sched


def _final_t(sched, T: int, flow: bool) -> float:
    """The model time of the state a scheduler's last step returns."""
    clean = 0.0 if flow else -1.0
    if flow:
        return float(sched.sigmas[-1]) * T
    sig = getattr(sched, "sigmas", None)
    if sig is not None and len(sig):
        last = float(sig[-1])
        if last <= 0:
            return clean
        ab = sched.alphas_cumprod.double().numpy()  # σ_min: the t of that σ on the training σ's, in log σ
        train = np.log(np.sqrt((1 - ab) / ab))
        return float(np.interp(math.log(last), train, np.arange(len(ab))))
    final = getattr(sched, "final_alpha_cumprod", None)
    if final is not None and float(final) < 1:
        ab = sched.alphas_cumprod.double().numpy()
        return float(np.interp(-float(final), -ab, np.arange(len(ab))))
    return clean


def step_boundaries(sched, T: int | None = None) -> np.ndarray:
    """(steps + 1,) model times a scheduler steps through: its timesteps (a second-order scheduler's repeated
    ones once), then the time of the state its last step returns."""
    T = int(T if T is not None else sched.config.num_train_timesteps)
    flow = type(sched).__name__.startswith("FlowMatch")
    ts = np.asarray([float(t) for t in sched.timesteps], dtype=np.float64)
    keep = np.r_[True, np.diff(ts) != 0]  # Heun/KDPM2 visit each timestep twice
    return np.r_[ts[keep], _final_t(sched, T, flow)]


def _segments(t: np.ndarray, k: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Per grid segment: the power-law exponent (NaN where it does not apply) and both segment integrals (in t)."""
    t0, t1, k0, k1 = t[:-1], t[1:], k[:-1], k[1:]
    lin = 0.5 * (k0 + k1) * (t1 - t0)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = np.where((t0 > 0) & (k0 > 0) & (k1 > 0), np.log(k1 / k0) / np.log(t1 / t0), np.nan)
        # the first segment from t = 0: the next segment's power law, where singular and integrable
        if len(p) > 1 and t0[0] == 0 and math.isfinite(p[1]) and -1 < p[1] < 0:
            p[0] = p[1]
        pw = _pow_int(t0, t1, t0, t1, k0, k1, p)
    val = np.where(np.isfinite(pw), pw, lin)
    return p, val, lin, _first_err(t, k, val, lin)


def _first_err(t: np.ndarray, k: np.ndarray, val: np.ndarray, lin: np.ndarray) -> float:
    """The stated error of the segment from t = 0, where the integrand is extrapolated: besides power law vs
    trapezoid, the distance to t₁·max(K(0), K(t₁)) (a decreasing K integrates to at least that; a forward FD row at
    t = 0 with Δt = t₁ is the chord over the segment, which the integral bounds from above)."""
    if t[0] != 0:
        return 0.0
    return float(abs(val[0] - t[1] * max(k[0], k[1])))


def _pow_int(a, b, t0, t1, k0, k1, p):
    """∫_a^b of the power law through (t1, k1) with exponent p (a ≥ 0)."""
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        q = p + 1
        scale = k1 / np.power(t1, p)
        near = np.abs(q) < 1e-9
        val = np.where(near, scale * (np.log(b) - np.log(a)), scale * (np.power(b, q) - np.power(a, q)) / q)
    return np.where(np.isfinite(p), val, np.nan)


def _cumulative(t: np.ndarray, k: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """∫_{t[0]}^{x} K dt inside the grid, by the power law and by the trapezoid (x clipped to the grid)."""
    p, pw, lin, first = _segments(t, k)
    cpw, clin = np.r_[0, np.cumsum(pw)], np.r_[0, np.cumsum(lin)]
    x = np.clip(x, t[0], t[-1])
    j = np.clip(np.searchsorted(t, x, side="right") - 1, 0, len(t) - 2)
    t0, t1, k0, k1 = t[j], t[j + 1], k[j], k[j + 1]
    kx = k0 + (k1 - k0) * (x - t0) / (t1 - t0)
    part_lin = 0.5 * (k0 + kx) * (x - t0)
    part_pw = _pow_int(t0, x, t0, t1, k0, k1, p[j])
    part_pw = np.where(np.isfinite(part_pw), part_pw, part_lin)
    # the first segment's extrapolation error, in proportion to how much of it lies below x
    return cpw[j] + part_pw, clin[j] + part_lin, first * np.clip((x - t[0]) / (t[1] - t[0]), 0, 1)


def integrate(t: np.ndarray, k: np.ndarray, a: np.ndarray, b: np.ndarray) -> dict[str, np.ndarray]:
    """∫_b^a K dt for each interval (a > b) on the grid (t, k): ``value``, ``err`` (power law vs trapezoid, plus
    any extrapolated piece outside the grid) and ``covered`` (the interval lies inside the grid)."""
    o = np.argsort(t)
    t, k = np.asarray(t, np.float64)[o], np.asarray(k, np.float64)[o]
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if len(t) < 2:
        raise InputError("`df` needs at least two grid points for a step budget")
    pa, la, fa = _cumulative(t, k, a)
    pb, lb, fb = _cumulative(t, k, b)
    conv = np.zeros_like(a)  # the rule on every other grid point (even, then odd ones): its own convergence
    for start in (0, 1) if len(t) > 3 else ():
        h = np.unique(np.r_[0, np.arange(start, len(t), 2), len(t) - 1])
        conv = np.maximum(conv, np.abs((pa - pb) - (_cumulative(t[h], k[h], a)[0] - _cumulative(t[h], k[h], b)[0])))
    below = np.clip(t[0] - b, 0, None) * k[0] - np.clip(t[0] - a, 0, None) * k[0]
    above = np.clip(a - t[-1], 0, None) * k[-1] - np.clip(b - t[-1], 0, None) * k[-1]
    outside = below + above
    return {
        "value": pa - pb + outside,
        "err": np.abs((pa - pb) - (la - lb)) + conv + (fa - fb) + outside,
        "covered": (b >= t[0]) & (a <= t[-1]),
    }


def _k_max(t: np.ndarray, k: np.ndarray, a: float, b: float) -> float:
    inside = k[(t >= b) & (t <= a)]
    ends = np.interp([a, b], t, k)  # (clamped outside the grid)
    return float(np.max(np.r_[inside, ends]))


def budget_table(df: pd.DataFrame, bounds: np.ndarray, sampler: str, T: int, method: str | None = None) -> pd.DataFrame:
    """steps.csv's rows for one sampler: per step its model-time interval, ∫K dτ over it (``budget``, with the
    interpolation error ``budget_err`` and the band from the CI columns), its share of the sampler's total, K_max,
    whether the grid covers it and whether it is the largest."""
    method = _network_method(df) if method is None else method
    d = df[df["method"] == method].sort_values("t")
    t = d["t"].to_numpy(np.float64)
    a, b = bounds[:-1], bounds[1:]
    r = integrate(t, d["K_mean"].to_numpy(np.float64), a, b)
    out = pd.DataFrame(
        {
            "sampler": sampler,
            "step": np.arange(1, len(a) + 1),
            "t_from": a,
            "t_to": b,
            "budget": r["value"] / T,  # K is per unit τ = t/T
            "budget_err": r["err"] / T,
        }
    )
    for c in ("K_ci_low", "K_ci_high"):
        if c in d.columns:
            out[f"budget_{c.removeprefix('K_')}"] = integrate(t, d[c].to_numpy(np.float64), a, b)["value"] / T
    total = float(out["budget"].sum())
    out["share"] = out["budget"] / total if total > 0 else math.nan
    out["K_max"] = [_k_max(t, d["K_mean"].to_numpy(np.float64), x, y) for x, y in zip(a, b, strict=True)]
    out["covered"] = r["covered"]
    out["largest"] = out["budget"] == out["budget"].max()
    out["method"] = method
    return out


def _network_method(df: pd.DataFrame) -> str:
    methods = [m for m in pd.unique(df["method"]) if not str(m).startswith("ref-")]
    if not methods:
        raise InputError("`df` has no network rows (only ref-* rows) for a step budget")
    return str(methods[0])


def step_budget(df: pd.DataFrame, scheduler, steps: int, *, T: int | None = None, name: str | None = None):
    """The step budget of ``scheduler`` (a diffusers scheduler instance, copied) at ``steps`` steps on a probe table
    ``df`` (``lipscope.probe``'s DataFrame or lipschitz.csv): one row per step (see :func:`budget_table`)."""
    if int(steps) <= 0:
        raise InputError(f"`steps` {steps}: must be ≥ 1")
    sched = copy.deepcopy(scheduler)
    sched.set_timesteps(int(steps))
    T = int(T if T is not None else sched.config.num_train_timesteps)
    return budget_table(df, step_boundaries(sched, T), name or f"{type(sched).__name__}:{steps}", T)


def uncovered(table: pd.DataFrame) -> list[str]:
    """``sampler step k (t a → b)`` for every step the probed grid does not cover."""
    bad = table[~table["covered"].astype(bool)]
    return [f"{r.sampler} step {r.step} (t {r.t_from:g} → {r.t_to:g})" for r in bad.itertuples()]


def budget_sentences(table: pd.DataFrame) -> list[str]:
    """One line per sampler: which step carries the largest share of the budget, with its numbers."""
    lines = []
    for name, d in table.groupby("sampler", sort=False):
        r = d.loc[d["budget"].idxmax()]
        which = "last step" if int(r["step"]) == len(d) else f"step {int(r['step'])} of {len(d)}"
        err = f" (± {r['budget_err']:.2g} interpolation)" if r["budget_err"] > 0.05 * r["budget"] else ""
        note = "; not covered by the probed grid, extrapolated" if not bool(r["covered"]) else ""
        lines.append(
            f"step budget: {name} — {which} (t {r['t_from']:g} → {r['t_to']:g}) carries {100 * r['share']:.0f} % of "
            "the budget "
            f"(∫K dτ = {r['budget']:.4g}{err} of {d['budget'].sum():.4g}){note}"
        )
    return lines
