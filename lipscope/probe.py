"""Lipschitz-in-t estimators over an EpsModel, and the batched runner.

Finite differences (paper, Fig. 1; DESIGN.md):

    K(t) = E_{x0,ε} ‖εθ(x_t, t_b) − εθ(x_t, t_a)‖₂ / ((t_b − t_a)/T)

with x_t = α_t x0 + σ_t ε drawn at t and the SAME x_t fed at both conditions. Schemes:
``forward`` (t_a = t, t_b = t + Δ) and ``central`` (t_a = t − Δ/2, t_b = t + Δ/2). Δ is in model
steps and may be fractional. K is per unit of normalised time τ = t/T.

The runner packs (sample, timestep) pairs of many timesteps into each forward pass: every batch holds
P pairs, i.e. 2P forwards (the P inputs at t_a followed by the same P inputs at t_b).
Sample i always uses the noise ε_i of its own generator (stream NOISE of :mod:`lipscope.rng`), shared across
timesteps (common random numbers), so results do not depend on the batch size or the grid.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from . import rng
from .batching import RunStats, check_finite, check_memory, is_oom, run_batched
from .data import load_data
from .errors import InputError
from .etsdm import Etsdm
from .models import EpsModel, forward_ad_patches
from .reduction import summarize_samples
from .sampling import model_samples
from .schedules import noisy, parse_grid

log = logging.getLogger("lipscope")

SCHEMES = ("forward", "central")


@dataclass
class FDPoints:
    """Where x_t is drawn (t) and the two points it is evaluated at (t_a < t_b), all in model steps.

    ``conditions=True``: t_a, t_b are conditions fed to the network directly (no E-TSDM map),
    as in ``space="condition"``; otherwise they are true timesteps (the map applies).
    """

    t: np.ndarray
    t_a: np.ndarray
    t_b: np.ndarray
    conditions: bool = False

    @property
    def dt(self) -> np.ndarray:
        return self.t_b - self.t_a


def check_dt(dt: float, T: int) -> None:
    """Δt must be a finite step > 0 that fits in the schedule (both FD points inside [0, T−1])."""
    if not (isinstance(dt, (int, float)) and math.isfinite(dt) and dt > 0):
        raise InputError(f"`dt` must be > 0 (got {dt}); it is the FD step in model steps, fractional allowed")
    if dt > T - 1:
        raise InputError(f"`dt` {dt:g} is longer than the whole schedule (T − 1 = {T - 1} steps); use a step < {T - 1}")


def fd_points(grid: np.ndarray, dt: float, scheme: str, T: int) -> FDPoints:
    """Evaluation points of the FD scheme; refuses any that fall outside [0, T−1]."""
    if not dt > 0 or not math.isfinite(dt):
        raise InputError(f"`dt` must be > 0 (got {dt}); it is the FD step in model steps, fractional allowed")
    if scheme not in SCHEMES:
        raise InputError(f"`scheme` {scheme!r} not known; use {' or '.join(SCHEMES)}")
    g = np.asarray(grid, dtype=np.float64)
    ta, tb = (g, g + dt) if scheme == "forward" else (g - dt / 2, g + dt / 2)
    bad = (ta < 0) | (tb > T - 1)
    if bad.any():
        k = float(g[bad][0])
        raise InputError(
            f"timestep {k:g} with `dt` {dt:g} ({scheme}) needs the model at [{ta[bad][0]:g}, {tb[bad][0]:g}], "
            f"outside [0, {T - 1}]; drop it from `timesteps` or change `dt`/`scheme`"
        )
    return FDPoints(t=g, t_a=ta, t_b=tb)


def condition_points(grid: np.ndarray, dt: float, T: int, etsdm: Etsdm | None) -> FDPoints:
    """``space="condition"``: K between consecutive conditions the network is actually fed.

    Plain model: (t, t + Δt) as in time space. E-TSDM: a grid step t < t̃ becomes its sub-interval
    start c = f(t), paired with the next condition c + t̃/n (x drawn at t = c; duplicates dropped);
    t ≥ t̃ keeps (t, t + Δt).
    """
    g = np.asarray(grid, dtype=np.float64)
    if etsdm is None:
        pts = fd_points(g, dt, "forward", T)
        return FDPoints(pts.t, pts.t_a, pts.t_b, conditions=True)
    tt, w = etsdm.t_tilde, etsdm.width
    low = np.unique(np.floor(g[g < tt] / w) * w)
    high = fd_points(g[g >= tt], dt, "forward", T) if (g >= tt).any() else FDPoints(g[:0], g[:0], g[:0])
    return FDPoints(
        np.concatenate([low, high.t]),
        np.concatenate([low, high.t_a]),
        np.concatenate([np.minimum(low + w, tt), high.t_b]),
        conditions=True,
    )


def crosses_boundary(t_a: np.ndarray, t_b: np.ndarray, etsdm: Etsdm | None) -> np.ndarray:
    """True where (t_a, t_b] contains an E-TSDM sub-interval boundary (t̃/n, 2t̃/n, …, t̃)."""
    if etsdm is None:
        return np.zeros(len(t_a), dtype=bool)
    return etsdm.crosses(t_a, t_b)


def valid_range(dt: float, scheme: str, T: int) -> tuple[float, float]:
    """The span of t where the scheme's evaluation points stay inside [0, T−1]."""
    if scheme == "central":
        return dt / 2, T - 1 - dt / 2
    return 0.0, T - 1 - dt


def noisy_inputs(model: EpsModel, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = α_t x0 + σ_t ε per row (t float64 (B,)), in the model's dtype and device."""
    work = torch.float64 if model.dtype == torch.float64 else torch.float32
    a, s = model.schedule.alpha(t).to(work), model.schedule.sigma(t).to(work)
    return noisy(x0.to(work), noise.to(work), a, s).to(model.device, model.dtype)


# ---------------------------------------------------------------------------------------------
# runner
# ---------------------------------------------------------------------------------------------


def fd_norms(
    model: EpsModel,
    x0: torch.Tensor,
    noise: torch.Tensor,
    pts: FDPoints,
    batch_size: int | str = "auto",
    progress: bool = False,
    stats: RunStats | None = None,
) -> torch.Tensor:
    """‖ε(x_t, t_b) − ε(x_t, t_a)‖₂ for every (sample i, grid point j): float64 (n, G).

    Items are ordered grid-major (j, i) and packed P pairs per batch, whatever j they belong to:
    the P inputs at t_a, then the same P inputs at t_b, in one call.
    """
    n, G = x0.shape[0], len(pts.t)
    t_x = torch.as_tensor(pts.t, dtype=torch.float64)
    t_a = torch.as_tensor(pts.t_a, dtype=torch.float64)
    t_b = torch.as_tensor(pts.t_b, dtype=torch.float64)

    def compute(idx: torch.Tensor) -> torch.Tensor:
        j, i = idx // n, idx % n
        m = idx.numel()
        x = noisy_inputs(model, x0[i], noise[i], t_x[j])
        with torch.inference_mode():
            if pts.conditions:  # feed the conditions themselves; convert with α, σ at the true t
                tx = torch.cat([t_x[j], t_x[j]]).to(model.device)
                eps = model.at_condition(torch.cat([x, x]), torch.cat([t_a[j], t_b[j]]), tx)
            else:
                eps = model(torch.cat([x, x]), torch.cat([t_a[j], t_b[j]]))
        d = (eps[m:] - eps[:m]).reshape(m, -1).double()
        check_finite([eps[:m], eps[m:]], t_a[j], t_b[j], "output")
        return torch.linalg.vector_norm(d, dim=1)

    out = run_batched(model, n * G, 2, compute, batch_size, progress, stats, "probe fd")
    return out.reshape(G, n).T.contiguous()


def jvp_norms(
    model: EpsModel,
    x0: torch.Tensor,
    noise: torch.Tensor,
    t: np.ndarray,
    batch_size: int | str = "auto",
    progress: bool = False,
    stats: RunStats | None = None,
) -> torch.Tensor:
    """‖∂εθ(x_t, t)/∂τ‖₂ by forward-mode AD (``torch.func.jvp``) w.r.t. the timestep input: (n, G).

    x_t is held fixed (drawn at t); the tangent is 1 step, times T for per-unit-τ. Runs inside
    :func:`lipscope.models.forward_ad_patches`, which restores the model afterwards.
    """
    n, G = x0.shape[0], len(t)
    t_x = torch.as_tensor(np.asarray(t, dtype=np.float64))
    T = model.T
    _refuse_learned_embedding(model)
    checked = [False]

    def compute(idx: torch.Tensor) -> torch.Tensor:
        j, i = idx // n, idx % n
        x = noisy_inputs(model, x0[i], noise[i], t_x[j])
        tt = t_x[j].to(model.device, torch.float64 if model.dtype == torch.float64 else torch.float32)
        with torch.no_grad():
            # torch types jvp's result as a 2- or 3-tuple (no overload on has_aux); without has_aux it is 2
            out, tangent = torch.func.jvp(lambda s: model(x, s), (tt,), (torch.ones_like(tt),))  # type: ignore[misc]
        check_finite([out, tangent], t_x[j], t_x[j], "output or its t-derivative")
        if not checked[0]:
            checked[0] = True
            _check_tangent_reaches(model, x, tt, tangent)
        return torch.linalg.vector_norm(tangent.reshape(idx.numel(), -1).double(), dim=1) * T

    try:
        with forward_ad_patches(model.module):
            out = run_batched(model, n * G, 1, compute, batch_size, progress, stats, "probe jvp")
    except (NotImplementedError, RuntimeError) as e:
        if is_oom(e):
            raise
        raise InputError(
            f"{model.name} cannot be differentiated in t with forward-mode AD ({str(e).splitlines()[0][:160]}); "
            "use `method` fd"
        ) from e
    return out.reshape(G, n).T.contiguous()


def _refuse_learned_embedding(model: EpsModel) -> None:
    if model.config.get("time_embedding_type") == "learned":
        raise InputError(
            f"{model.name} looks timesteps up in a learned embedding table: ε is not differentiable in t; "
            "use `method` fd"
        )


def _check_tangent_reaches(model: EpsModel, x: torch.Tensor, tt: torch.Tensor, tangent: torch.Tensor) -> None:
    """A zero tangent where a finite difference moves means t reaches the network through an integer
    cast or a table: forward AD would silently report 0."""
    if tangent.abs().max() > 0:
        return
    with torch.inference_mode():
        lo = torch.clamp(tt - 1, min=0)
        d = model(x, lo + 1) - model(x, lo)
    if d.abs().max() > 0:
        raise InputError(
            f"{model.name}: the timestep does not reach the network differentiably (d/dt is 0 but ε changes "
            "between steps: an integer cast or embedding table); use `method` fd"
        )


# ---------------------------------------------------------------------------------------------
# reduction
# ---------------------------------------------------------------------------------------------


def k_table(model: EpsModel, pts: FDPoints, K: np.ndarray, method: str, D: int) -> pd.DataFrame:
    """Long-format table from per-sample K (n, G), one row per grid point (DESIGN.md contract columns)."""
    T = model.T
    s = summarize_samples(K)
    t64 = torch.as_tensor(pts.t, dtype=torch.float64)
    if pts.conditions:
        c_a, c_b = pts.t_a, pts.t_b
    else:
        c_a = model.network_timesteps(torch.as_tensor(pts.t_a, dtype=torch.float64)).numpy()
        c_b = model.network_timesteps(torch.as_tensor(pts.t_b, dtype=torch.float64)).numpy()
    df = pd.DataFrame(
        {
            "t": pts.t,
            "t_prime": pts.t_b,
            "t_a": pts.t_a,
            "t_b": pts.t_b,
            "dt": pts.dt,
            "tau": pts.t / T,
            "method": method,
            "n": K.shape[0],
            "K_mean": s["mean"],
            "K_std": s["std"],
            "K_sem": s["sem"],
            "K_ci_low": s["ci_low"],
            "K_ci_high": s["ci_high"],
            "K_median": np.median(K, axis=0),
            "K_max": K.max(axis=0),
            "K_mean_per_dim": s["mean"] / math.sqrt(D),
            "alpha": model.schedule.alpha(t64).numpy(),
            "sigma": model.schedule.sigma(t64).numpy(),
            "c_a": c_a,
            "c_b": c_b,
            # time space only: condition-space pairs span a sub-interval by construction
            "crosses_boundary": crosses_boundary(pts.t_a, pts.t_b, None if pts.conditions else model.etsdm),
        }
    )
    return df


# ---------------------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------------------


METHODS = ("fd", "jvp")


def parse_methods(method: str) -> list[str]:
    """``fd``, ``jvp`` or both (``fd,jvp``)."""
    ms = [m.strip() for m in method.split(",") if m.strip()]
    if not ms or any(m not in METHODS for m in ms):
        raise InputError(f"`method` {method!r} not known; use fd, jvp or fd,jvp")
    return list(dict.fromkeys(ms))


def probe(
    model: EpsModel,
    data: str | np.ndarray | torch.Tensor = "digits",
    *,
    timesteps: str | np.ndarray | list[float] | None = None,
    dt: float = 1.0,
    scheme: str = "forward",
    method: str = "fd",
    space: str = "time",
    samples: int = 64,
    seed: int = 0,
    batch_size: int | str = "auto",
    progress: bool = False,
    cache_dir: str | None = None,
) -> pd.DataFrame:
    """Measure K(t) of ``model``: finite differences (``fd``, paper Fig. 1) and/or the exact
    ‖∂εθ/∂τ‖ by forward-mode AD (``jvp``). Returns the long-format table.

    ``df.attrs`` holds run statistics (forwards, seconds, forwards_per_s, batch_size) and the
    per-sample K matrix ``K_samples`` (n × rows, columns aligned with the rows of ``df``).
    """
    methods = parse_methods(method)
    if samples < 1:
        raise InputError(f"`samples` must be ≥ 1 (got {samples})")
    if int(seed) != seed or seed < 0:
        raise InputError(f"`seed` must be an integer ≥ 0 (got {seed})")
    if "fd" in methods:
        check_dt(dt, model.T)
    check_memory(samples, model.sample_shape)
    if space not in ("time", "condition"):
        raise InputError(f"`space` {space!r}: use time or condition")
    if space == "condition" and (methods != ["fd"] or scheme != "forward"):
        raise InputError(
            "`space` condition measures forward differences between conditions: use `method` fd and `scheme` forward"
        )
    T = model.T
    use_fd = "fd" in methods
    lo, hi = valid_range(dt, scheme, T) if use_fd and dt > 0 else (0.0, T - 1.0)
    if timesteps is None or isinstance(timesteps, str):
        grid = parse_grid(timesteps, T, t_max=hi)
        if timesteps is None or not _is_explicit(timesteps):
            grid = grid[grid >= lo]
    else:
        grid = parse_grid(",".join(repr(float(v)) for v in np.asarray(timesteps).ravel()), T)
    if not use_fd:
        pts = None
    elif space == "condition":
        pts = condition_points(grid, dt, T, model.etsdm)
    else:
        pts = fd_points(grid, dt, scheme, T)
    if isinstance(data, torch.Tensor) and data.shape[0] == samples:
        x0 = data
    elif isinstance(data, str) and data == "model":  # x0 drawn from the model itself, cached
        x0 = model_samples(model, samples, seed, cache_dir=cache_dir)
    else:
        x0 = load_data(data, samples, seed, model.sample_shape)
    if model.sample_shape is not None and tuple(x0.shape[1:]) != tuple(model.sample_shape):
        raise InputError(
            f"data samples have shape {tuple(x0.shape[1:])} but the model takes {tuple(model.sample_shape)}"
        )
    noise = rng.noise(seed, x0.shape[0], tuple(x0.shape[1:]), dtype=x0.dtype)
    D = math.prod(x0.shape[1:])
    stats = RunStats()
    tables, Ks = [], []
    if use_fd:
        assert pts is not None  # set above whenever use_fd
        norms = fd_norms(model, x0, noise, pts, batch_size=batch_size, progress=progress, stats=stats)
        Ks.append(norms.numpy() / (pts.dt / T)[None, :])
        tables.append(k_table(model, pts, Ks[-1], "fd-condition" if space == "condition" else f"fd-{scheme}", D))
    if "jvp" in methods:
        jst = RunStats()
        Ks.append(jvp_norms(model, x0, noise, grid, batch_size=batch_size, progress=progress, stats=jst).numpy())
        tables.append(k_table(model, FDPoints(grid, grid, grid), Ks[-1], "jvp", D))
        stats.extra.update(jvp_items=jst.forwards, jvp_seconds=jst.seconds, jvp_items_per_s=jst.forwards_per_s)
        if not use_fd:
            stats = RunStats(jst.forwards, jst.seconds, jst.batch_size, stats.extra)
    df = pd.concat(tables, ignore_index=True)
    df.attrs.update(
        {
            "forwards": stats.forwards,
            "seconds": stats.seconds,
            "forwards_per_s": stats.forwards_per_s,
            "batch_size": stats.batch_size,
            "T": T,
            "K_samples": np.concatenate(Ks, axis=1),
            **stats.extra,
        }
    )
    return df


def _is_explicit(spec: str) -> bool:
    s = spec.strip()
    return s.startswith("range:") or not any(
        s == p or s.startswith(p + ":") for p in ("default", "all", "linear", "log")
    )
