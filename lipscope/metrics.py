"""Sample-quality metrics: functional cores, each tested against an independent reference.

* ``frechet_distance``: ‖μ₁ − μ₂‖² + tr(Σ₁ + Σ₂ − 2(Σ₁Σ₂)^½) between Gaussian fits (as FID does).
* ``sliced_wasserstein``: mean over random unit directions of the 1-D Wasserstein-1 distance
  between the projected samples (exact 1-D W1 from the two empirical CDFs).
  (The digits-classifier feature space these are computed in lives with the built-in assets,
  :mod:`lipscope.zoo`.)
* ``kid``: kernel inception distance (Bińkowski et al. 2018): the unbiased MMD² with the cubic polynomial
  kernel k(x, y) = (x·y/d + 1)³, averaged over random subsets (mean and spread), which unlike a Fréchet
  distance has no bias at small N.
* ``fid_inception``: FID through torchmetrics when Inception weights are available locally, else
  ``None`` (reported as unavailable, never estimated another way).
"""

from __future__ import annotations

import numpy as np
import torch


def gaussian_fit(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
    return x.mean(0), np.cov(x, rowvar=False, ddof=1)


def frechet_from_stats(mu1, s1, mu2, s2) -> float:
    """Fréchet distance of N(mu1, s1) and N(mu2, s2); the matrix square root through the symmetric
    form (s1^½ s2 s1^½)^½, whose trace equals tr((s1 s2)^½) and which stays real and PSD."""
    s1, s2 = np.atleast_2d(s1), np.atleast_2d(s2)
    w, v = np.linalg.eigh(s1)
    r1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = r1 @ s2 @ r1
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh(0.5 * (m + m.T)), 0, None)).sum()
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt)


def frechet_distance(x: np.ndarray, y: np.ndarray) -> float:
    """Fréchet distance between Gaussian fits of two sample sets (rows are samples)."""
    return frechet_from_stats(*gaussian_fit(x), *gaussian_fit(y))


def wasserstein_1d(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Exact W1 between empirical distributions, column-wise: ∫|F_a − F_b| over the merged support."""
    a, b = np.sort(a, axis=0), np.sort(b, axis=0)
    allv = np.sort(np.concatenate([a, b], axis=0), axis=0)
    deltas = np.diff(allv, axis=0)
    out = np.empty(a.shape[1])
    for j in range(a.shape[1]):
        ca = np.searchsorted(a[:, j], allv[:-1, j], side="right") / a.shape[0]
        cb = np.searchsorted(b[:, j], allv[:-1, j], side="right") / b.shape[0]
        out[j] = np.sum(np.abs(ca - cb) * deltas[:, j])
    return out


def sliced_wasserstein(x: np.ndarray, y: np.ndarray, n_proj: int = 128, seed: int = 0) -> float:
    """Mean 1-D W1 over ``n_proj`` seeded random unit directions."""
    x = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
    y = np.asarray(y, dtype=np.float64).reshape(len(y), -1)
    d = np.random.default_rng(seed).standard_normal((x.shape[1], n_proj))
    d /= np.linalg.norm(d, axis=0, keepdims=True)
    return float(wasserstein_1d(x @ d, y @ d).mean())


def fid_inception(x: torch.Tensor, ref: torch.Tensor, weights: str | None = None) -> float | None:
    """FID through torchmetrics with local Inception weights; ``None`` when not available."""
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance
    except ImportError:
        return None
    try:
        kw = {"feature_extractor_weights_path": weights} if weights else {}
        fid = FrechetInceptionDistance(normalize=True, **kw)
    except Exception:  # weights not downloadable offline / not found
        return None

    def prep(t):
        t = ((t.clamp(-1, 1) + 1) / 2).float()
        return t.expand(-1, 3, -1, -1) if t.shape[1] == 1 else t

    fid.update(prep(ref), real=True)
    fid.update(prep(x), real=False)
    return float(fid.compute())


def mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD² between samples x (m, d) and y (n, d) with k(a, b) = (a·b/d + 1)³ (the KID kernel):
    the within-sample means leave out the diagonal."""
    x = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
    y = np.asarray(y, dtype=np.float64).reshape(len(y), -1)
    d, m, n = x.shape[1], len(x), len(y)
    kxx, kyy, kxy = ((a @ b.T / d + 1) ** 3 for a, b in ((x, x), (y, y), (x, y)))
    within_x = (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
    within_y = (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
    return float(within_x + within_y - 2 * kxy.mean())


def kid(
    x: np.ndarray, y: np.ndarray, subsets: int = 100, subset_size: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """KID: mean and standard deviation (ddof 0, as torchmetrics) of :func:`mmd2_unbiased` over ``subsets``
    random subsets of min(``subset_size``, len(x), len(y)) samples of each, drawn without replacement."""
    k = min(subset_size, len(x), len(y))
    if k < 2:
        raise ValueError("KID needs at least 2 samples on each side")
    g = np.random.default_rng(seed)
    vals = [mmd2_unbiased(x[g.choice(len(x), k, replace=False)], y[g.choice(len(y), k, replace=False)])
            for _ in range(subsets)]  # fmt: skip
    return float(np.mean(vals)), float(np.std(vals))
