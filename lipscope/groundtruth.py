"""The ground-truth measurements of a trained model on data with a known density (:mod:`lipscope.mixtures`).

* network error: E‖εθ(x_t, t) − ε*(x_t, t)‖²/D per t, and its x0-space image (σ/α)²·that, on x_t = α x0 + σ ε with
  fresh x0 (FRESH block :data:`~lipscope.mixtures.EVAL_X0`) and the probe's noise (NOISE stream), so the K of the
  network and of ε* (:func:`lipschitz_pair`, the probe's forward FD on the same x_t) belong to the same points;
* sampler error per sample: ‖x̂0 − x0(exact ODE)‖/√D for the network-driven sampler (total), the ε*-driven one
  (the discretisation error) and their difference ‖x̂0(net) − x̂0(ε*)‖/√D (the network's share);
* distribution error without a feature network: −log q(x̂0)/D under the true mixture against that of true samples,
  and the sliced Wasserstein distance to true samples;
* per-seed means and the paired differences between models over seeds (Student-t), :func:`paired`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable

import numpy as np
import pandas as pd
import torch

from . import rng
from .gaussian import GaussianMixture
from .metrics import sliced_wasserstein
from .mixtures import EVAL_X0, draw, exact_model, exact_refs, log_density
from .models import EpsModel
from .probe import probe
from .reduction import summarize_samples
from .targets import noisy


def eval_points(g: GaussianMixture, seed: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0, ε) of the per-t measurements: fresh x0 and the probe's noise of samples 0..n−1, float64."""
    x0 = draw(g, seed, EVAL_X0, n)
    return x0, rng.noise(seed, n, tuple(g.shape), dtype=torch.float64)


def network_error(
    model: EpsModel, g: GaussianMixture, grid: np.ndarray, x0: torch.Tensor, noise: torch.Tensor, batch_size: int = 512
) -> np.ndarray:
    """‖εθ(x_t, t) − ε*(x_t, t)‖²/D per sample and t: (n, G), all (t, sample) pairs packed into batches."""
    n, d = x0.shape[0], g.D
    model = model if model.target == "eps" else dataclasses.replace(model, target="eps")
    tt = torch.as_tensor(np.repeat(np.asarray(grid, dtype=np.float64), n))
    ii = torch.arange(n).repeat(len(grid))
    out = torch.empty(len(tt), dtype=torch.float64)
    p = model.schedule
    with torch.inference_mode():
        for lo in range(0, len(tt), batch_size):
            t, i = tt[lo : lo + batch_size], ii[lo : lo + batch_size]
            x = noisy(x0[i], noise[i], p.alpha(t), p.sigma(t))
            eps = model(x, t, i).double()
            ref = exact_refs(g, p, x, t)["eps"]
            out[lo : lo + batch_size] = (eps - ref).reshape(len(t), -1).pow(2).sum(1) / d
    return out.reshape(len(grid), n).T.numpy()


def lipschitz_pair(
    model: EpsModel, g: GaussianMixture, grid: np.ndarray, x0: torch.Tensor, seed: int, dt: float = 1.0
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The probe's forward-FD K(t) (ε, per unit τ) of the network and of ε*, on the same x_t: x0 as given and the
    NOISE stream of ``seed`` (the points of :func:`network_error` when x0 comes from :func:`eval_points`)."""
    exact = exact_model(g, model.schedule, model.scheduler_config, name="eps*")

    def run(m: EpsModel) -> pd.DataFrame:
        return probe(m, x0, timesteps=np.asarray(grid, dtype=np.float64), dt=dt, method="fd", samples=x0.shape[0],
                     data_range=None, target="eps", seed=seed)  # fmt: skip

    return run(model), run(exact)


def exponent(t: np.ndarray, k: np.ndarray, lo: float, hi: float) -> float:
    """The slope of log K against log t over lo ≤ t < hi (NaN where K is not > 0 at every such point: an
    E-TSDM network is flat in t inside its sub-intervals)."""
    t, k = np.asarray(t, dtype=np.float64), np.asarray(k, dtype=np.float64)
    sel = (t >= lo) & (t < hi) & (t > 0)
    if sel.sum() < 2 or not np.all(k[sel] > 0):
        return float("nan")
    return float(np.polyfit(np.log(t[sel]), np.log(k[sel]), 1)[0])


def per_sample_rms(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """‖a_i − b_i‖/√D per row."""
    diff = (a.double() - b.double()).reshape(a.shape[0], -1)
    return (diff.norm(dim=1) / math.sqrt(diff.shape[1])).numpy()


def nll_per_dim(g: GaussianMixture, x: torch.Tensor) -> np.ndarray:
    """−log q(x)/D per sample (nats per dimension) under the true mixture."""
    return (-log_density(g, x.reshape(x.shape[0], -1)) / g.D).numpy()


def swd(x: torch.Tensor, ref: torch.Tensor, seed: int = 0) -> float:
    """Sliced Wasserstein-1 distance (128 seeded directions) between two sample sets."""
    return sliced_wasserstein(x.reshape(x.shape[0], -1).numpy(), ref.reshape(ref.shape[0], -1).numpy(), seed=seed)


def stats_row(values: np.ndarray, prefix: str) -> dict[str, float]:
    """Mean and 95 % Student-t interval over samples of one quantity, as ``prefix_mean``, ``_ci_low``, ``_ci_high``."""
    s = summarize_samples(np.asarray(values, dtype=np.float64)[:, None])
    return {f"{prefix}_mean": float(s["mean"][0]), f"{prefix}_ci_low": float(s["ci_low"][0]),
            f"{prefix}_ci_high": float(s["ci_high"][0])}  # fmt: skip


def paired(
    df: pd.DataFrame, keys: list[str], metric: str, pairs: Iterable[tuple[str, str]], model_col: str = "variant"
) -> pd.DataFrame:
    """Paired differences ``a − b`` of ``metric`` (a per-seed value) between models at equal ``keys`` and seed:
    mean over seeds with a 95 % Student-t interval (NaN with one seed), and how many seeds each a − b is below 0."""
    rows = []
    for a, b in pairs:
        da = df[df[model_col] == a].set_index([*keys, "seed"])[metric].sort_index()
        db = df[df[model_col] == b].set_index([*keys, "seed"])[metric].sort_index()
        d = (da - db).dropna()
        if d.empty:
            continue
        for key, grp in d.groupby(level=list(range(len(keys)))):
            v = grp.to_numpy()
            s = summarize_samples(v[:, None])
            key = key if isinstance(key, tuple) else (key,)
            rows.append({**dict(zip(keys, key, strict=True)), "metric": metric, "a": a, "b": b, "seeds": len(v),
                         "diff_mean": float(s["mean"][0]), "diff_ci_low": float(s["ci_low"][0]),
                         "diff_ci_high": float(s["ci_high"][0]), "seeds_below_0": int((v < 0).sum()),
                         "b_mean": float(db.loc[key].mean()) if len(keys) else float(db.mean())})  # fmt: skip
    return pd.DataFrame(rows)


def describe_diff(row: pd.Series, unit: str = "") -> str:
    """One sentence for a paired difference, generated from its numbers: lower/higher when its interval excludes
    0, "no difference resolved" when it does not, "n/a" with one seed."""
    m, lo, hi = row["diff_mean"], row["diff_ci_low"], row["diff_ci_high"]
    rel = 100 * m / row["b_mean"] if row["b_mean"] else float("nan")
    base = f"{row['a']} − {row['b']} = {m:+.3g}{unit} ({rel:+.2g} % of {row['b']}'s {row['b_mean']:.3g})"
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return f"{base}; interval n/a (one seed)"
    verdict = "lower" if hi < 0 else "higher" if lo > 0 else "no difference resolved"
    return f"{base}, 95 % CI [{lo:+.3g}, {hi:+.3g}] over {row['seeds']} seeds: {verdict}"
