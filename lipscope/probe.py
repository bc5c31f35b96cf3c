"""Lipschitz-in-t estimators over an EpsModel, and the batched runner.

Finite differences (paper, Fig. 1; DESIGN.md):

    K(t) = E_{x0,ε} ‖εθ(x_t, t_b) − εθ(x_t, t_a)‖₂ / ((t_b − t_a)/T)

with x_t = α_t x0 + σ_t ε drawn at t and the SAME x_t fed at both conditions. Schemes:
``forward`` (t_a = t, t_b = t + Δ) and ``central`` (t_a = t − Δ/2, t_b = t + Δ/2). Δ is in model
steps and may be fractional. K is per unit of normalised time τ = t/T.

The runner packs (sample, timestep) pairs of many timesteps into each forward pass: every batch holds
P pairs, i.e. 2P forwards (the P inputs at t_a followed by the same P inputs at t_b).
Sample i always uses the noise ε_i of its own generator (``data.sample_generator``), shared across
timesteps (common random numbers), so results do not depend on the batch size or the grid.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch

from .data import load_data, per_sample_noise
from .errors import InputError, ModelOutputError
from .models import EpsModel
from .schedules import parse_grid

log = logging.getLogger("lipscope")

SCHEMES = ("forward", "central")
CUDA_AUTO_BATCH = 1024
CPU_AUTO_CANDIDATES = (8, 16, 32, 64, 128)


@dataclass
class FDPoints:
    """Where x_t is drawn (t) and the two points it is evaluated at (t_a < t_b), all in model steps.

    ``conditions=True``: t_a, t_b are conditions fed to the network directly (no E-TSDM map),
    as in ``--space condition``; otherwise they are true timesteps (the map applies).
    """

    t: np.ndarray
    t_a: np.ndarray
    t_b: np.ndarray
    conditions: bool = False

    @property
    def dt(self) -> np.ndarray:
        return self.t_b - self.t_a


def fd_points(grid: np.ndarray, dt: float, scheme: str, T: int) -> FDPoints:
    """Evaluation points of the FD scheme; refuses any that fall outside [0, T−1]."""
    if not dt > 0 or not math.isfinite(dt):
        raise InputError(f"--dt must be > 0 (got {dt}); it is the FD step in model steps, fractional allowed")
    if scheme not in SCHEMES:
        raise InputError(f"--scheme {scheme!r} not known; use {' or '.join(SCHEMES)}")
    g = np.asarray(grid, dtype=np.float64)
    ta, tb = (g, g + dt) if scheme == "forward" else (g - dt / 2, g + dt / 2)
    bad = (ta < 0) | (tb > T - 1)
    if bad.any():
        k = float(g[bad][0])
        raise InputError(
            f"timestep {k:g} with --dt {dt:g} ({scheme}) needs the model at [{ta[bad][0]:g}, {tb[bad][0]:g}], "
            f"outside [0, {T - 1}]; drop it from --timesteps or change --dt/--scheme"
        )
    return FDPoints(t=g, t_a=ta, t_b=tb)


def condition_points(grid: np.ndarray, dt: float, T: int, etsdm: dict | None) -> FDPoints:
    """``--space condition``: K between consecutive conditions the network is actually fed.

    Plain model: (t, t + Δt) as in time space. E-TSDM: a grid step t < t̃ becomes its sub-interval
    start c = f(t), paired with the next condition c + t̃/n (x drawn at t = c; duplicates dropped);
    t ≥ t̃ keeps (t, t + Δt).
    """
    g = np.asarray(grid, dtype=np.float64)
    if etsdm is None:
        pts = fd_points(g, dt, "forward", T)
        return FDPoints(pts.t, pts.t_a, pts.t_b, conditions=True)
    tt, w = etsdm["t_tilde"], etsdm["t_tilde"] / etsdm["n"]
    low = np.unique(np.floor(g[g < tt] / w) * w)
    high = fd_points(g[g >= tt], dt, "forward", T) if (g >= tt).any() else FDPoints(g[:0], g[:0], g[:0])
    return FDPoints(
        np.concatenate([low, high.t]),
        np.concatenate([low, high.t_a]),
        np.concatenate([np.minimum(low + w, tt), high.t_b]),
        conditions=True,
    )


def crosses_boundary(t_a: np.ndarray, t_b: np.ndarray, etsdm: dict | None) -> np.ndarray:
    """True where (t_a, t_b] contains an E-TSDM sub-interval boundary (t̃/n, 2t̃/n, …, t̃)."""
    if etsdm is None:
        return np.zeros(len(t_a), dtype=bool)
    from .etsdm import etsdm_boundaries

    b = np.asarray(etsdm_boundaries(etsdm["t_tilde"], etsdm["n"])[1:])
    return ((np.asarray(t_a)[:, None] < b[None]) & (b[None] <= np.asarray(t_b)[:, None])).any(1)


def valid_range(dt: float, scheme: str, T: int) -> tuple[float, float]:
    """The span of t where the scheme's evaluation points stay inside [0, T−1]."""
    if scheme == "central":
        return dt / 2, T - 1 - dt / 2
    return 0.0, T - 1 - dt


def noisy_inputs(model: EpsModel, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = α_t x0 + σ_t ε per row (t float64 (B,)), in the model's dtype and device."""
    shape = (-1,) + (1,) * (x0.ndim - 1)
    a = model.schedule.alpha(t).reshape(shape)
    s = model.schedule.sigma(t).reshape(shape)
    work = torch.float64 if model.dtype == torch.float64 else torch.float32
    x = a.to(work) * x0.to(work) + s.to(work) * noise.to(work)
    return x.to(model.device, model.dtype)


# ---------------------------------------------------------------------------------------------
# runner
# ---------------------------------------------------------------------------------------------


@dataclass
class RunStats:
    forwards: int = 0
    seconds: float = 0.0
    batch_size: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def forwards_per_s(self) -> float:
        return self.forwards / self.seconds if self.seconds > 0 else float("nan")


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


class AutoBatch:
    """Batch size search for ``auto`` on CPU, where throughput peaks at small batches.

    Tries the candidates in increasing order on real work (nothing is computed twice), one timed
    batch each after one warm-up batch, stops once throughput falls 5% under the best seen, then
    keeps the best. (Measured on 2 cores: the CIFAR-10 DDPM UNet peaks at 16, a tiny UNet at ≥ 128.)
    """

    def __init__(self, candidates: tuple[int, ...], total: int):
        self.cands = [c for c in candidates if c <= 2 * total] or [max(2, 2 * total)]
        self.i, self.warm, self.rates = 0, False, {}
        self.best: int | None = None

    def size(self) -> int:
        return self.best if self.best is not None else self.cands[self.i]

    def record(self, size: int, forwards: int, seconds: float) -> None:
        if self.best is not None:
            return
        if not self.warm:
            self.warm = True
            return
        self.rates[size] = forwards / max(seconds, 1e-9)
        top = max(self.rates, key=self.rates.get)
        self.i += 1
        if self.rates[size] < 0.95 * self.rates[top] or self.i >= len(self.cands):
            self.best = top


def resolve_batch_size(batch_size: int | str, model: EpsModel, total: int) -> int:
    """Forwards per batch (even, so pairs stay together). ``auto``: 1024 on CUDA, backing off on OOM;
    on CPU the first candidate of :class:`AutoBatch`."""
    if batch_size == "auto":
        bs = CUDA_AUTO_BATCH if model.device.type == "cuda" else CPU_AUTO_CANDIDATES[0]
    else:
        try:
            bs = int(batch_size)
        except (TypeError, ValueError) as e:
            raise InputError(f"--batch-size {batch_size!r}: use a positive integer or auto") from e
        if bs < 2:
            raise InputError(f"--batch-size {bs}: must be ≥ 2 (each FD pair takes two forwards)")
    bs = min(bs, 2 * total)
    return max(2, bs - bs % 2)


@contextmanager
def _progress(enabled: bool, total: int, label: str) -> Iterator:
    if not enabled:
        yield lambda k: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), transient=True
    ) as p:
        task = p.add_task(label, total=total)
        yield lambda k: p.advance(task, k)


def _check_finite(outs: list[torch.Tensor], t_lo: torch.Tensor, t_hi: torch.Tensor, what: str) -> None:
    """Refuse NaN/inf instead of averaging them in; each tensor in ``outs`` has one row per item."""
    bad = torch.zeros(len(t_lo), dtype=torch.bool)
    for o in outs:
        bad |= ~torch.isfinite(o).reshape(o.shape[0], -1).all(1).cpu()
    if bad.any():
        k = int(bad.nonzero()[0, 0])
        raise ModelOutputError(
            f"model {what} has NaN/inf at t={float(t_lo[k]):g}..{float(t_hi[k]):g} ({int(bad.sum())} of "
            f"{len(bad)} items in this batch); not averaged in. Check the weights, try --dtype float32, "
            "or leave these timesteps out of --timesteps"
        )


def run_batched(
    model: EpsModel,
    total: int,
    inputs_per_item: int,
    compute: Callable[[torch.Tensor], torch.Tensor],
    batch_size: int | str = "auto",
    progress: bool = False,
    stats: RunStats | None = None,
    label: str = "probe",
) -> torch.Tensor:
    """Run ``compute(idx) -> float64 (m,)`` over items 0..total−1, packed into batches of network inputs.

    ``inputs_per_item`` network inputs per item (2 for an FD pair, 1 for a JVP). Backs off on
    out-of-memory (retrying the same items) and, for ``auto`` on CPU, searches the fastest batch.
    """
    out = torch.empty(total, dtype=torch.float64)
    bs = resolve_batch_size(batch_size, model, total)
    auto = AutoBatch(CPU_AUTO_CANDIDATES, total) if batch_size == "auto" and model.device.type == "cpu" else None
    stats = stats if stats is not None else RunStats()
    start = 0
    t0 = time.perf_counter()
    with _progress(progress, total, f"{label} {model.name}") as advance:
        while start < total:
            if auto is not None:
                bs = auto.size()
            per = max(1, bs // inputs_per_item)
            tb = time.perf_counter()
            idx = torch.arange(start, min(start + per, total))
            try:
                vals = compute(idx)
            except (RuntimeError, torch.OutOfMemoryError) as e:
                if _is_oom(e) and bs > 2:
                    bs = max(2, (bs // 2) - (bs // 2) % 2)
                    log.warning("out of memory: backing off to batch size %d", bs)
                    if model.device.type == "cuda":
                        torch.cuda.empty_cache()
                    continue
                raise
            m = idx.numel()
            out[start : start + m] = vals.cpu()
            start += m
            if auto is not None:
                auto.record(bs, inputs_per_item * m, time.perf_counter() - tb)
            stats.forwards += inputs_per_item * m
            advance(m)
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    stats.seconds += time.perf_counter() - t0
    stats.batch_size = bs
    return out


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
        _check_finite([eps[:m], eps[m:]], t_a[j], t_b[j], "output")
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
    from .models import forward_ad_patches

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
            out, tangent = torch.func.jvp(lambda s: model(x, s), (tt,), (torch.ones_like(tt),))
        _check_finite([out, tangent], t_x[j], t_x[j], "output or its t-derivative")
        if not checked[0]:
            checked[0] = True
            _check_tangent_reaches(model, x, tt, tangent)
        return torch.linalg.vector_norm(tangent.reshape(idx.numel(), -1).double(), dim=1) * T

    try:
        with forward_ad_patches(model.module):
            out = run_batched(model, n * G, 1, compute, batch_size, progress, stats, "probe jvp")
    except (NotImplementedError, RuntimeError) as e:
        if _is_oom(e):
            raise
        raise InputError(
            f"{model.name} cannot be differentiated in t with forward-mode AD ({str(e).splitlines()[0][:160]}); "
            "use --method fd"
        ) from e
    return out.reshape(G, n).T.contiguous()


def _refuse_learned_embedding(model: EpsModel) -> None:
    if model.config.get("time_embedding_type") == "learned":
        raise InputError(
            f"{model.name} looks timesteps up in a learned embedding table: ε is not differentiable in t; "
            "use --method fd"
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
            "between steps: an integer cast or embedding table); use --method fd"
        )


# ---------------------------------------------------------------------------------------------
# reduction
# ---------------------------------------------------------------------------------------------


def summarize_samples(values: np.ndarray, confidence: float = 0.95) -> dict[str, np.ndarray]:
    """Mean, std (ddof=1), s.e.m. and Student-t CI over axis 0 of an (n, G) array."""
    from scipy import stats as st

    v = np.asarray(values, dtype=np.float64)
    n = v.shape[0]
    mean = v.mean(axis=0)
    std = v.std(axis=0, ddof=1) if n > 1 else np.full_like(mean, np.nan)
    sem = std / np.sqrt(n)
    q = st.t.ppf(0.5 + confidence / 2, df=n - 1) if n > 1 else np.nan
    return {"mean": mean, "std": std, "sem": sem, "ci_low": mean - q * sem, "ci_high": mean + q * sem}


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
        raise InputError(f"--method {method!r} not known; use fd, jvp or fd,jvp")
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
    if space not in ("time", "condition"):
        raise InputError(f"--space {space!r}: use time or condition")
    if space == "condition" and (methods != ["fd"] or scheme != "forward"):
        raise InputError("--space condition measures forward differences between conditions: use --method fd")
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
    x0 = data if isinstance(data, torch.Tensor) and data.shape[0] == samples else None
    if x0 is None:
        x0 = load_data(data, samples, seed, model.sample_shape, model=model, cache_dir=cache_dir)
    if model.sample_shape is not None and tuple(x0.shape[1:]) != tuple(model.sample_shape):
        raise InputError(
            f"data samples have shape {tuple(x0.shape[1:])} but the model takes {tuple(model.sample_shape)}"
        )
    noise = per_sample_noise(seed, x0.shape[0], tuple(x0.shape[1:]), dtype=x0.dtype)
    D = math.prod(x0.shape[1:])
    stats = RunStats()
    tables, Ks = [], []
    if use_fd:
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


def summary(df: pd.DataFrame, T: int, t_split: float | None = None, method: str | None = None) -> dict[str, Any]:
    """Peak K and its t, median K over t ≥ t_split, and the singularity ratio.

    ``t_split`` defaults to T/10 (= 100 for T = 1000, the paper's t̃). Ratio = mean K over t < t_split
    divided by median K over t ≥ t_split.
    """
    t_split = T / 10 if t_split is None else t_split
    method = df["method"].iloc[0] if method is None else method
    df = df[df["method"] == method]
    k = df["K_mean"].to_numpy()
    t = df["t"].to_numpy()
    i = int(np.nanargmax(k))
    low, high = k[t < t_split], k[t >= t_split]
    med_hi = float(np.median(high)) if high.size else float("nan")
    mean_lo = float(np.mean(low)) if low.size else float("nan")
    return {
        "method": method,
        "peak_K": float(k[i]),
        "peak_t": float(t[i]),
        "t_split": float(t_split),
        "median_K_above": med_hi,
        "mean_K_below": mean_lo,
        "singularity_ratio": mean_lo / med_hi if med_hi and math.isfinite(med_hi) and med_hi > 0 else float("nan"),
    }
