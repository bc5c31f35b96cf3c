"""The optimal denoiser beside the network (DESIGN.md, "The optimal denoiser of a finite data set"): the Bayes-optimal
ε of the data set itself and of a Gaussian fitted to it, on the probe's x_t and grid, with exact t-derivatives.

* ``empirical``: the data set {xᵢ} (N points, D = numel of one) as the mixture (1/N) Σᵢ N(αxᵢ, σ²I) at time t:
  ε*(x, t) = (x − α Σᵢ wᵢ xᵢ)/σ with w = softmax_i(−‖x − αxᵢ‖²/2σ²). It memorises: its K is what a network that
  reproduced its training set would show. Evaluated in float64 with a running log-sum-exp over chunks of the data
  (never an N × D float64 copy, nor a B × N matrix), so N up to 10⁵ and D up to 16 384 fit in memory.
* ``gaussian``: N(μ, Σ) with the data's mean and covariance: ε* = σ(α²Σ + σ²I)⁻¹(x − αμ). Full Σ for
  D ≤ ``FULL_MAX``; above, low rank plus floor (probabilistic PCA): the top r = ``RANK`` directions of the data and
  the mean of the remaining variance, s² = (tr Σ − Σ λ_top)/(D − r), in every other direction.

Both derivatives ∂ε*/∂τ are forward-mode AD through these formulas (α(t), σ(t) of the model's process), so
``K`` = ‖∂ε*/∂τ‖ is exact, per sample, at the same x_t the network is probed on. Latent models: the data set is
encoded by the pipeline's autoencoder (or given as latents), as the probe's x0 are.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import rng
from .data import ARRAY_SUFFIXES, DataRange, load_array, load_data_with_scaling, scale_array
from .devices import machine_memory
from .errors import InputError
from .models import EpsModel
from .schedules import NoiseProcess
from .targets import noisy

REFERENCES = ("empirical", "gaussian")
FULL_MAX = 2048  # the fitted Gaussian keeps its full covariance up to this D (32 MiB of float64)
RANK = 256  # above it: this many directions plus a floor
CHUNK_ELEMENTS = 2**24  # float64 values of one data chunk (128 MiB)
QUERIES = 64  # x_t evaluated together


def parse_references(reference: str | list[str] | tuple[str, ...] | None) -> list[str]:
    """``empirical``, ``gaussian`` or both (a comma string or a list)."""
    if reference is None:
        return []
    items = reference.split(",") if isinstance(reference, str) else list(reference)
    refs = [str(r).strip() for r in items if str(r).strip()]
    bad = [r for r in refs if r not in REFERENCES]
    if bad or not refs:
        raise InputError(f"`reference` {bad[0] if bad else reference!r} not known; use empirical, gaussian or both")
    return list(dict.fromkeys(refs))


# ---- the data set in the model's space -------------------------------------------------------------------------


def check_reference_data(kinds: list[str], data: Any) -> None:
    """The references are the optimal denoisers of the data set: refused, before any work, without one."""
    if kinds and isinstance(data, str) and data == "model":
        raise InputError("`reference` needs the data set itself: pass `data` (samples of the model are not its data)")


def reference_data(model: EpsModel, data: Any, data_range: DataRange, seed: int = 0) -> torch.Tensor:
    """Every item of ``data`` (N, D) float32 on the CPU, as the probe feeds it: pixels in the model's data range, or
    latents of a latent model (encoded by its autoencoder, or an array of the latent shape taken as latents)."""
    check_reference_data(["data"], data)
    shape = tuple(model.sample_shape or ())
    raw = data.detach().cpu().numpy() if isinstance(data, torch.Tensor) else data
    path = Path(str(data))
    if not isinstance(raw, np.ndarray) and path.suffix.lower() in ARRAY_SUFFIXES and path.is_file():
        raw = load_array(path)
    if isinstance(raw, np.ndarray) and tuple(raw.shape[1:]) == shape:  # the model's own shape: latents or samples
        x = torch.as_tensor(raw if model.latent is not None else scale_array(raw, "`data`", data_range)[0]).float()
    elif model.latent is None:
        x = load_data_with_scaling(data, None, seed, model.sample_shape, data_range)[0]
    else:
        x = model.latent.encode(load_data_with_scaling(data, None, seed, model.latent.pixel_shape, data_range)[0])
    if tuple(x.shape[1:]) != shape:
        raise InputError(f"`reference`: the data has samples of shape {tuple(x.shape[1:])}, the model takes {shape}")
    check_fits(x.shape[0], math.prod(shape))
    return x.reshape(x.shape[0], -1).contiguous()


def check_fits(n: int, d: int) -> None:
    """Refuse a data set whose float32 copy would take over half of this machine's memory."""
    need, ram = n * d * 4, machine_memory()
    if ram is not None and need > ram // 2:
        raise InputError(
            f"`reference`: the data set ({n:,} × {d:,} float32 = {need / 2**30:.3g} GiB) needs over half of this "
            f"machine's {ram / 2**30:.3g} GiB; use a smaller data set"
        )


# ---- the two optimal denoisers --------------------------------------------------------------------------------


def _col(v: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, 1)


def empirical_eps(points: torch.Tensor, x: torch.Tensor, a: torch.Tensor, s: torch.Tensor, chunk: int | None = None):
    """ε*(x, t) of the empirical distribution of ``points`` (N, D) at queries x (B, D), per-row α, σ (B,): float64,
    a running log-sum-exp over chunks of the points (differentiable, so forward AD gives ∂ε*/∂t)."""
    n, d = points.shape
    chunk = chunk or max(1, min(n, CHUNK_ELEMENTS // max(d, 1)))
    x = x.double()
    a, s = _col(a.double()), _col(s.double())
    xx = (x * x).sum(1, keepdim=True)
    top = s0 = s1 = None
    for lo in range(0, n, chunk):
        pts = points[lo : lo + chunk].to(x.device, torch.float64)
        d2 = xx - 2 * a * (x @ pts.T) + a * a * (pts * pts).sum(1)[None]
        logit = -d2 / (2 * s * s)
        m = logit.max(1, keepdim=True).values
        new = m if top is None else torch.maximum(top, m)
        w = torch.exp(logit - new)
        if top is None or s0 is None or s1 is None:
            s0, s1 = w.sum(1, keepdim=True), w @ pts
        else:
            r = torch.exp(top - new)
            s0, s1 = s0 * r + w.sum(1, keepdim=True), s1 * r + w @ pts
        top = new
    assert s0 is not None and s1 is not None
    return (x - a * s1 / s0) / s


@dataclass(frozen=True)
class FittedGaussian:
    """N(μ, U diag(λ) Uᵀ + s²(I − UUᵀ)): the data's mean, its top directions U (D, r) with variances λ, and the
    floor s² of every other direction (0 when r = D: the full covariance)."""

    mean: torch.Tensor
    vecs: torch.Tensor
    vals: torch.Tensor
    floor: float

    @property
    def rank(self) -> int:
        return int(self.vals.numel())

    def eps(self, x: torch.Tensor, a: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """ε* = σ(α²Σ + σ²I)⁻¹(x − αμ) for queries x (B, D), per-row α, σ; float64."""
        a, s = _col(a.double()), _col(s.double())
        z = x.double() - a * self.mean.to(x.device)
        u = self.vecs.to(x.device)
        proj = z @ u
        c = a * a * self.vals.to(x.device) + s * s
        out = (proj / c) @ u.T
        if self.rank < self.mean.numel():
            out = out + (z - proj @ u.T) / (a * a * self.floor + s * s)
        return s * out


def fit_gaussian(points: torch.Tensor, seed: int = 0, full_max: int = FULL_MAX, rank: int = RANK) -> FittedGaussian:
    """The maximum-likelihood Gaussian of ``points`` (N, D): full for D ≤ ``full_max``, else the top ``rank``
    directions (randomised SVD, seeded) plus the mean remaining variance as the floor (probabilistic PCA)."""
    n, d = points.shape
    chunk = max(1, CHUNK_ELEMENTS // max(d, 1))
    mean = sum(points[lo : lo + chunk].double().sum(0) for lo in range(0, n, chunk)) / n
    assert isinstance(mean, torch.Tensor)
    if d <= full_max:
        cov = torch.zeros(d, d, dtype=torch.float64)
        for lo in range(0, n, chunk):
            c = points[lo : lo + chunk].double() - mean
            cov += c.T @ c
        vals, vecs = torch.linalg.eigh(cov / n)
        return FittedGaussian(mean, vecs, vals.clamp(min=0.0), 0.0)
    r = max(1, min(rank, n - 1, d - 1))
    with rng.isolated_torch_rng(seed):  # torch.svd_lowrank draws its test matrix from the global generator
        basis = torch.svd_lowrank(points, q=min(r + 10, n, d), niter=4, M=mean.float()[None])[2]
    # Rayleigh–Ritz in float64: the covariance restricted to the subspace, diagonalised (orthonormal to float64)
    q = torch.linalg.qr(basis.double()).Q
    proj = torch.cat([(points[lo : lo + chunk].double() - mean) @ q for lo in range(0, n, chunk)])
    vals, rot = torch.linalg.eigh(proj.T @ proj / n)
    vals, vecs = vals.flip(0)[:r].clamp(min=0.0), (q @ rot.flip(1))[:, :r]
    total = sum(((points[lo : lo + chunk].double() - mean) ** 2).sum() for lo in range(0, n, chunk)) / n
    floor = max(float(total) - float(vals.sum()), 0.0) / (d - r)
    return FittedGaussian(mean, vecs, vals, floor)


# ---- K of the references on the probe's points ------------------------------------------------------------------


def reference_norms(
    process: NoiseProcess,
    eps_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    x0: torch.Tensor,
    noise: torch.Tensor,
    grid: np.ndarray,
    device: torch.device | str = "cpu",
) -> np.ndarray:
    """‖∂ε*/∂τ‖ per sample and grid point (n, G) at x_t = α x0 + σ ε (drawn at t, held fixed), by forward-mode AD of
    ``eps_fn(x, α(t), σ(t))`` in t; float64, ``QUERIES`` points at a time."""
    n, G = x0.shape[0], len(grid)
    flat0, flatn = x0.reshape(n, -1).double().to(device), noise.reshape(n, -1).double().to(device)
    t_all = torch.as_tensor(np.repeat(np.asarray(grid, dtype=np.float64), n), device=device)  # grid-major
    i_all = torch.arange(n, device=device).repeat(G)
    out = torch.empty(n * G, dtype=torch.float64)
    for lo in range(0, n * G, QUERIES):
        t, i = t_all[lo : lo + QUERIES], i_all[lo : lo + QUERIES]
        x = noisy(flat0[i], flatn[i], process.alpha(t), process.sigma(t))

        def eps_at(tt: torch.Tensor, x: torch.Tensor = x) -> torch.Tensor:
            return eps_fn(x, process.alpha(tt), process.sigma(tt))

        with torch.no_grad():
            d = torch.func.jvp(eps_at, (t,), (torch.ones_like(t),))[1]
        if not torch.isfinite(d).all():
            k = float(t[~torch.isfinite(d).all(1)][0])
            raise InputError(f"`reference`: ∂ε*/∂t is not finite at t = {k:g} (σ = 0 there); leave that t out")
        out[lo : lo + QUERIES] = torch.linalg.vector_norm(d, dim=1).cpu() * process.T
    return out.reshape(G, n).T.numpy()


def references(
    model: EpsModel, kinds: list[str], data: Any, data_range: DataRange, x0: torch.Tensor, noise: torch.Tensor,
    grid: np.ndarray, seed: int = 0,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:  # fmt: skip
    """``ref-<kind>`` → per-sample K (n, G) of each reference, and what run.json records about them."""
    if not kinds:
        return {}, {}
    points = reference_data(model, data, data_range, seed)
    info: dict[str, Any] = {"N": int(points.shape[0]), "D": int(points.shape[1])}
    out = {}
    for kind in kinds:
        if kind == "empirical":
            pts = points.to(model.device)
            fn: Callable = lambda x, a, s, pts=pts: empirical_eps(pts, x, a, s)  # noqa: E731
            info["empirical"] = "the data set as a mixture of its N points, σ²I each (ε* exact, float64)"
        else:
            g = fit_gaussian(points, seed)
            fn = g.eps
            info["gaussian"] = {"rank": g.rank, "floor": g.floor, "full": g.rank == points.shape[1]}
        out[f"ref-{kind}"] = reference_norms(model.schedule, fn, x0, noise, grid, model.device)
    return out, info
