"""The singularity's exponent and onset from per-sample K (docs/probe.md, "Diagnosis"). Pure numpy.

Exponent: the least-squares slope p of log K̄(τ) against log τ (K̄ the mean over samples, τ = t/T) over the first
decade of positive grid points, [t₁, 10·t₁] with t₁ the smallest grid t > 0, so K ∝ τ^p there (docs/theory.md
derives p for each process and data rank). Its interval is a percentile bootstrap over samples: B resamples of the
n per-sample K rows (the same rows at every t, as the probe's common random numbers), drawn from stream BOOTSTRAP
of :mod:`lipscope.rng`.

Onset: the largest grid t such that K̄ > 3 × median(K̄ over t ≥ t̃) at every grid point up to it (t̃ = T/10 unless
given): where the singular range ends, as a grid point.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from . import rng

MIN_POINTS = 4  # a slope from fewer points is not reported
DECADE = 10.0  # the fit range: [t₁, DECADE·t₁]
ONSET_FACTOR = 3.0
BOOTSTRAP = 2000
CONFIDENCE = 0.95


@dataclass(frozen=True)
class Exponent:
    """p (K ∝ τ^p) over [t_lo, t_hi] from ``points`` grid points, its bootstrap interval, or the reason it is n/a."""

    p: float = math.nan
    ci_low: float = math.nan
    ci_high: float = math.nan
    intercept: float = math.nan  # log K̄ at τ = 1 of the fitted line (for drawing it)
    t_lo: float = math.nan
    t_hi: float = math.nan
    points: int = 0
    reason: str | None = None  # why p is n/a (None: measured)
    ci_reason: str | None = None  # why the interval is n/a where p is measured

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def fit_range(t: np.ndarray, decade: float = DECADE) -> np.ndarray:
    """Mask of the first decade of positive grid points, [t₁, decade·t₁]."""
    t = np.asarray(t, dtype=np.float64)
    pos = t[t > 0]
    if not pos.size:
        return np.zeros(t.shape, dtype=bool)
    t1 = pos.min()
    return (t >= t1) & (t <= decade * t1 * (1 + 1e-12))


def log_slopes(log_tau: np.ndarray, log_k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares slope and intercept of each row of ``log_k`` (…, G) against ``log_tau`` (G,)."""
    x = log_tau - log_tau.mean()
    slope = (log_k * x).sum(-1) / (x * x).sum()
    return slope, log_k.mean(-1) - slope * log_tau.mean()


def fit_exponent(
    t: np.ndarray,
    K: np.ndarray,
    T: int,
    seed: int = 0,
    boot: int = BOOTSTRAP,
    confidence: float = CONFIDENCE,
    decade: float = DECADE,
) -> Exponent:
    """The exponent of per-sample K (n, G) at grid t (G,) over the first decade of positive t, with its bootstrap
    interval over the n samples (seeded by ``seed``); n/a (with the reason) where it cannot be measured."""
    t, K = np.asarray(t, dtype=np.float64), np.asarray(K, dtype=np.float64)
    order = np.argsort(t, kind="stable")
    t, K = t[order], K[:, order]
    mask = fit_range(t, decade)
    pts = int(mask.sum())
    if pts < MIN_POINTS:
        pos = t[t > 0]
        where = f"[{pos.min():g}, {decade * pos.min():g}]" if pos.size else "(no grid point t > 0)"
        return Exponent(
            points=pts,
            reason=f"{pts} grid points in the first decade {where}; the exponent needs ≥ {MIN_POINTS} (use a grid "
            "with more small t, e.g. `timesteps` default)",
        )
    tt, kk = t[mask], K[:, mask]
    lo, hi = float(tt.min()), float(tt.max())
    mean = kk.mean(0)
    if not np.all(np.isfinite(mean)) or np.any(mean <= 0):
        zero = tt[~(mean > 0)]
        what = "0" if np.all(mean[np.isfinite(mean)] >= 0) else "not positive"
        return Exponent(
            t_lo=lo,
            t_hi=hi,
            points=pts,
            reason=f"K is {what} at {zero.size} of {pts} points in [{lo:g}, {hi:g}] (t = {zero[0]:g}…): no power law "
            "(an E-TSDM network is constant in t inside its sub-intervals)",
        )
    ltau = np.log(tt / T)
    p, b = log_slopes(ltau, np.log(mean))
    n = K.shape[0]
    if n < 2:
        why = "one sample: there is nothing to resample for a bootstrap interval"
        return Exponent(float(p), math.nan, math.nan, float(b), lo, hi, pts, None, why)
    (means,) = resampled_sums(seed, kk / n, boot=boot)  # (boot, pts)
    ok = np.all(means > 0, axis=1)
    ps = log_slopes(ltau, np.log(np.where(means[ok] > 0, means[ok], 1.0)))[0]
    low, high = percentile_interval(ps, confidence)
    ci_why = None if ps.size else "K is 0 somewhere in the range in every resample"
    return Exponent(float(p), float(low), float(high), float(b), lo, hi, pts, None, ci_why)


def resampled_sums(seed: int, *x: np.ndarray, boot: int = BOOTSTRAP) -> list[np.ndarray]:
    """Σᵢ cᵢ xᵢ for each per-sample array x (n, …), with the same B multinomial resamples c (B, n) of the n rows
    for all of them (stream BOOTSTRAP): (B, …) each, the bootstrap of any statistic of sums over samples."""
    n = x[0].shape[0]
    counts = rng.bootstrap_rng(seed).multinomial(n, np.full(n, 1.0 / n), size=boot).astype(np.float64)
    return [(counts @ a.reshape(n, -1).astype(np.float64)).reshape(boot, *a.shape[1:]) for a in x]


def percentile_interval(v: np.ndarray, confidence: float = CONFIDENCE) -> tuple[np.ndarray, np.ndarray]:
    """The percentile interval over the first axis (the resamples), ignoring NaN (a resample whose ratio is 0/0)."""
    v = np.asarray(v, dtype=np.float64)
    if not v.shape[0]:
        return np.full(v.shape[1:], math.nan), np.full(v.shape[1:], math.nan)
    q = (1 - confidence) / 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN column: its interval is NaN
        low, high = np.nanquantile(v, [q, 1 - q], axis=0)
    return low, high


def ratio_interval(
    num: np.ndarray, den: np.ndarray, seed: int = 0, confidence: float = CONFIDENCE
) -> tuple[np.ndarray, np.ndarray]:
    """Bootstrap interval over samples of the pooled ratio Σᵢ numᵢ / Σᵢ denᵢ (per-sample rows, shapes (n, …)):
    the interval of a share Σ⟨a, b⟩/Σ‖b‖² or of a ratio of two means on the same samples. NaN where Σ den = 0."""
    a, b = resampled_sums(seed, num, den)
    with np.errstate(divide="ignore", invalid="ignore"):
        return percentile_interval(np.where(b != 0, a / np.where(b != 0, b, 1.0), np.nan), confidence)


def onset(
    t: np.ndarray, k_mean: np.ndarray, t_split: float, factor: float = ONSET_FACTOR
) -> tuple[float | None, float, str | None]:
    """(onset, threshold, reason): the largest grid t up to which K̄ stays above ``factor`` × the median of K̄
    over t ≥ ``t_split`` at every grid point; None (with the reason) where there is no such t."""
    t, k = np.asarray(t, dtype=np.float64), np.asarray(k_mean, dtype=np.float64)
    order = np.argsort(t, kind="stable")
    t, k = t[order], k[order]
    high = k[t >= t_split]
    if not high.size or not np.isfinite(np.median(high)):
        return None, math.nan, f"no grid point at t ≥ {t_split:g} to take the median of"
    thr = factor * float(np.median(high))
    above = k > thr
    if not above[0]:
        return (
            None,
            thr,
            (
                f"K at the smallest t ({t[0]:g}) is {k[0]:.4g}, not above {factor:g}× the median over t ≥ {t_split:g} "
                f"({thr:.4g}): no singular range"
            ),
        )
    run = int(np.argmin(above)) if not above.all() else len(t)
    return float(t[run - 1]), thr, None
