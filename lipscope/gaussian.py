"""Closed forms on Gaussian data (Theorem 3.1 of Yang et al., 2306.11251), usable as an EpsModel.

Pure maths: the experiment that compares them with the probe is :mod:`lipscope.theory`.

Data x0 ~ Σ_k w_k N(μ_k, Σ_k) with Σ_k = U_k diag(λ_k) U_kᵀ; x = α x0 + σ ε. Then
q_τ = Σ_k w_k N(αμ_k, A_k), A_k = α²Σ_k + σ²I, and with z_k = U_kᵀ(x − αμ_k), c_k = α²λ_k + σ²:

    ∇log q_τ(x) = Σ_k r_k(x) s_k(x),  s_k = −U_k (z_k / c_k),  r_k = softmax_k(log w_k + log N_k(x))
    ε*(x, τ)     = −σ ∇log q_τ(x)                                       (paper, Sec. 3)
    ∂ε*/∂τ       = (α/σ)(dα/dτ) ∇log q_τ  −  σ ∂_τ∇log q_τ              (Theorem 3.1: term1 + term2)

with, at fixed x (primes are d/dτ): z_k' = −α' U_kᵀμ_k, c_k' = 2αα'λ_k + 2σσ',
(log N_k)' = −½Σ c'/c − Σ z z'/c + ½Σ z² c'/c², r_k' = r_k((log N_k)' − Σ_j r_j (log N_j)'),
s_k' = −U_k (z_k'/c_k − z_k c_k'/c_k²). Derivations in docs/theory.md. All float64.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch

from .models import EpsModel, from_callable
from .schedules import NoiseProcess, default_schedule
from .targets import noisy


@dataclass
class GaussianMixture:
    """Σ_k w_k N(μ_k, U_k diag(λ_k) U_kᵀ) over D = numel(shape) dimensions (K = 1: a Gaussian)."""

    weights: torch.Tensor  # (K,)
    means: torch.Tensor  # (K, D)
    eigvals: torch.Tensor  # (K, D), ≥ 0
    eigvecs: torch.Tensor  # (K, D, D), columns are eigenvectors
    shape: tuple[int, ...]

    @property
    def D(self) -> int:  # noqa: N802
        return int(self.means.shape[1])

    @property
    def K(self) -> int:  # noqa: N802
        return int(self.means.shape[0])

    # ---- constructors -------------------------------------------------------------------------
    @classmethod
    def gaussian(cls, mean, cov, shape: tuple[int, ...] | None = None) -> GaussianMixture:
        """N(mean, cov); ``cov`` is a full (D, D) matrix or a (D,) vector of variances (diagonal)."""
        mu = torch.as_tensor(mean, dtype=torch.float64).reshape(-1)
        cov = torch.as_tensor(cov, dtype=torch.float64)
        if cov.ndim == 1:
            lam, U = cov.clone(), torch.eye(mu.numel(), dtype=torch.float64)
        else:
            lam, U = torch.linalg.eigh(0.5 * (cov + cov.T))
        return cls(
            torch.ones(1, dtype=torch.float64),
            mu[None],
            lam.clamp(min=0.0)[None],
            U[None],
            tuple(shape) if shape else (mu.numel(),),
        )

    @classmethod
    def fit(cls, x0: torch.Tensor) -> GaussianMixture:
        """Maximum-likelihood Gaussian of samples (N, …)."""
        flat = x0.reshape(x0.shape[0], -1).double()
        mu = flat.mean(0)
        c = flat - mu
        return cls.gaussian(mu, c.T @ c / flat.shape[0], tuple(x0.shape[1:]))

    @classmethod
    def low_rank(
        cls, dim: int, variances, floor: float, mean=None, k: int = 1, seed: int = 0, spread: float = 2.0
    ) -> GaussianMixture:
        """Data near an r-dimensional set: r = len(``variances``) directions of those variances, the other D − r at
        ``floor``² (s ≪ the variances: a thickened r-dimensional subspace). k = 1: the first r coordinate axes, mean
        ``mean`` (default 0); k ≥ 2: a seeded mixture of k such components, each on its own random r-dimensional
        subspace, means ~ N(0, spread²I), equal weights."""
        lam = torch.full((dim,), float(floor) ** 2, dtype=torch.float64)
        var = torch.as_tensor(variances, dtype=torch.float64).reshape(-1)
        lam[: var.numel()] = var
        if k == 1:
            mu = torch.zeros(dim, dtype=torch.float64) if mean is None else torch.as_tensor(mean, dtype=torch.float64)
            return cls.gaussian(mu, lam)
        g = torch.Generator().manual_seed(seed)
        means = spread * torch.randn(k, dim, generator=g, dtype=torch.float64)
        qs = torch.linalg.qr(torch.randn(k, dim, dim, generator=g, dtype=torch.float64)).Q
        return cls(torch.full((k,), 1.0 / k, dtype=torch.float64), means, lam.expand(k, dim).clone(), qs, (dim,))

    @classmethod
    def random(cls, k: int, dim: int, seed: int = 0, spread: float = 2.0) -> GaussianMixture:
        """A seeded random mixture: means ~ N(0, spread²/D·I)·√D, random full covariances."""
        g = torch.Generator().manual_seed(seed)
        means = spread * torch.randn(k, dim, generator=g, dtype=torch.float64)
        lam = torch.exp(torch.empty(k, dim, dtype=torch.float64).uniform_(math.log(0.05), math.log(1.0), generator=g))
        qs = torch.linalg.qr(torch.randn(k, dim, dim, generator=g, dtype=torch.float64)).Q
        w = torch.softmax(0.5 * torch.randn(k, generator=g, dtype=torch.float64), 0)
        return cls(w, means, lam, qs, (dim,))

    # ---- sampling -----------------------------------------------------------------------------
    def sample(self, n: int, seed: int = 0) -> torch.Tensor:
        """n samples (float64, shape (n, *shape)), seeded."""
        g = torch.Generator().manual_seed(seed)
        comp = torch.multinomial(self.weights, n, replacement=True, generator=g)
        z = torch.randn(n, self.D, generator=g, dtype=torch.float64) * self.eigvals[comp].sqrt()
        x = self.means[comp] + torch.einsum("nde,ne->nd", self.eigvecs[comp], z)
        return x.reshape(n, *self.shape)

    # ---- closed forms -------------------------------------------------------------------------
    def _parts(self, x: torch.Tensor, a: torch.Tensor, s: torch.Tensor):
        flat = x.reshape(x.shape[0], -1).double()
        a, s = a.double().reshape(-1, 1, 1), s.double().reshape(-1, 1, 1)
        z = torch.einsum("bkd,kde->bke", flat[:, None, :] - a * self.means[None], self.eigvecs)
        c = a * a * self.eigvals[None] + s * s
        logn = -0.5 * (torch.log(c).sum(-1) + (z * z / c).sum(-1) + self.D * math.log(2 * math.pi))
        r = torch.softmax(torch.log(self.weights)[None] + logn, dim=1)  # (B, K)
        return z, c, r

    def _to_pixels(self, coords: torch.Tensor) -> torch.Tensor:
        """Σ-eigenbasis coordinates (B, K, D) → pixel space per component."""
        return torch.einsum("kde,bke->bkd", self.eigvecs, coords)

    def score(self, x: torch.Tensor, a: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """∇log q_τ(x) for rows of x with per-row α, σ."""
        z, c, r = self._parts(x, a, s)
        sk = -self._to_pixels(z / c)
        return (r[..., None] * sk).sum(1).reshape(x.shape)

    def eps_star(self, x: torch.Tensor, a: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """ε*(x, τ) = −σ ∇log q_τ(x)."""
        return -s.double().reshape(-1, *([1] * (x.ndim - 1))) * self.score(x, a, s)

    def theorem_terms(self, x, a, s, da, ds) -> tuple[torch.Tensor, torch.Tensor]:
        """(term1, term2) of Theorem 3.1 at fixed x: −σ'∇log q and −σ ∂_τ∇log q (′ = d/dτ).

        On VP (α² + σ² = 1, so −σ' = αα'/σ) term1 is the paper's (α/σ)α'∇log q; written as −σ'∇log q it holds
        for every process x = αx0 + σε (VE: α' = 0 but σ' ≠ 0; flow; EDM)."""
        z, c, r = self._parts(x, a, s)
        a3, s3 = a.double().reshape(-1, 1, 1), s.double().reshape(-1, 1, 1)
        da3, ds3 = da.double().reshape(-1, 1, 1), ds.double().reshape(-1, 1, 1)
        m = torch.einsum("kd,kde->ke", self.means, self.eigvecs)[None]  # U_kᵀ μ_k
        dz = -da3 * m
        dc = 2 * a3 * da3 * self.eigvals[None] + 2 * s3 * ds3
        dlogn = -0.5 * (dc / c).sum(-1) - (z * dz / c).sum(-1) + 0.5 * (z * z * dc / (c * c)).sum(-1)
        dr = r * (dlogn - (r * dlogn).sum(1, keepdim=True))
        sk = -self._to_pixels(z / c)
        dsk = -self._to_pixels(dz / c - z * dc / (c * c))
        score = (r[..., None] * sk).sum(1)
        dscore = (dr[..., None] * sk + r[..., None] * dsk).sum(1)
        shape = x.shape
        term1 = -ds.double().reshape(-1, 1) * score
        term2 = -s.double().reshape(-1, 1) * dscore
        return term1.reshape(shape), term2.reshape(shape)

    def deps_dtau(self, x, a, s, da, ds) -> torch.Tensor:
        """∂ε*/∂τ at fixed x (Theorem 3.1)."""
        t1, t2 = self.theorem_terms(x, a, s, da, ds)
        return t1 + t2


# ---- schedule-level helpers (k in model steps, float64) ---------------------------------------


def _coeffs(schedule: NoiseProcess, k: torch.Tensor):
    k = torch.as_tensor(k, dtype=torch.float64)
    return schedule.alpha(k), schedule.sigma(k), schedule.dalpha_dtau(k), schedule.dsigma_dtau(k)


def gaussian_eps_model(g: GaussianMixture, schedule: NoiseProcess | None = None, name: str = "gaussian") -> EpsModel:
    """The exact ε* as an EpsModel (float64) under any process, differentiable in t, so FD and JVP probes run on it."""
    schedule = schedule or default_schedule()

    def eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        tt = t.double()
        return g.eps_star(x, schedule.alpha(tt), schedule.sigma(tt)).to(x.dtype)

    return from_callable(
        eps,
        dataclasses.replace(schedule, prediction_type="epsilon"),  # type: ignore[type-var]  # ε* under any process (every process is a dataclass)
        sample_shape=g.shape,
        name=name,
        dtype="float64",
        config={"closed_form": "gaussian_mixture", "K": g.K, "D": g.D},
        data_range=None,  # Gaussian data is unbounded
    )


# ---- exact references for the Gaussian (K = 1) --------------------------------------------------


def _gauss_only(g: GaussianMixture) -> tuple[torch.Tensor, torch.Tensor]:
    if g.K != 1:
        raise ValueError("exact FD/derivative moments are implemented for a single Gaussian (K = 1)")
    m = g.eigvecs[0].T @ g.means[0]
    return m, g.eigvals[0]


def fd_exact_ms(g: GaussianMixture, schedule: NoiseProcess, t, t_a, t_b) -> np.ndarray:
    """E‖ε*(x_t, t_b) − ε*(x_t, t_a)‖² in closed form (x_t drawn at t).

    In the eigenbasis y = Uᵀx ~ N(α_t m, diag(c_t)) with independent coordinates, and
    ε*(x, j) = g_j (y − α_j m), g_j = σ_j / (α_j²λ + σ_j²); the difference is Gaussian with mean
    ((g_b − g_a)α_t − (g_b α_b − g_a α_a)) m and variance (g_b − g_a)² c_t per coordinate.
    """
    m, lam = _gauss_only(g)

    def coeffs(k):
        k = torch.tensor(np.asarray(k, dtype=np.float64).reshape(-1, 1))
        return schedule.alpha(k), schedule.sigma(k)

    (at, st), (aa, sa), (ab, sb) = coeffs(t), coeffs(t_a), coeffs(t_b)
    ga, gb = sa / (aa * aa * lam + sa * sa), sb / (ab * ab * lam + sb * sb)
    mean = ((gb - ga) * at - (gb * ab - ga * aa)) * m
    var = (gb - ga) ** 2 * (at * at * lam + st * st)
    return (var + mean * mean).sum(-1).numpy()


def _dtau_ms(g: GaussianMixture, schedule: NoiseProcess, k: torch.Tensor) -> torch.Tensor:
    """E‖∂ε*/∂τ (x_t, t)‖² at steps k (G,), torch float64: coordinates g'(y − αm) − gα'm with y ~ N(αm, c)."""
    m, lam = _gauss_only(g)
    a, s, da, ds = _coeffs(schedule, k.reshape(-1, 1))
    c = a * a * lam + s * s
    dc = 2 * a * da * lam + 2 * s * ds
    gk = s / c
    dg = ds / c - s * dc / (c * c)
    return (dg * dg * c + gk * gk * da * da * m * m).sum(-1)


def dtau_exact_ms(g: GaussianMixture, schedule: NoiseProcess, t) -> np.ndarray:
    """E‖∂ε*/∂τ (x_t, t)‖² in closed form: coordinates g'(y − αm) − gα'm with y ~ N(αm, c)."""
    return _dtau_ms(g, schedule, torch.as_tensor(np.atleast_1d(t), dtype=torch.float64)).numpy()


def terms_exact_ms(g: GaussianMixture, schedule: NoiseProcess, t) -> tuple[np.ndarray, np.ndarray]:
    """E‖term1‖² and E‖term2‖² of Theorem 3.1 (Gaussian), each linear in y like ∂ε*/∂τ."""
    m, lam = _gauss_only(g)
    k = torch.as_tensor(np.atleast_1d(t), dtype=torch.float64)[:, None]
    a, s, da, ds = _coeffs(schedule, k)
    c = a * a * lam + s * s
    dc = 2 * a * da * lam + 2 * s * ds
    # score coords = −(y − αm)/c: term1 = −σ'·score (= (α α'/σ)·score on VP), term2 = σ (z'/c − z c'/c²), z' = −α'm
    t1 = ds**2 * (1.0 / c)  # E[(y−αm)²]/c² = 1/c, zero mean
    t2 = (s * dc / (c * c)) ** 2 * c + (s * da / c) ** 2 * m * m
    return t1.sum(-1).numpy(), t2.sum(-1).numpy()


def closed_form_samples(g: GaussianMixture, schedule: NoiseProcess, x0: torch.Tensor, noise: torch.Tensor, grid):
    """Per-sample closed-form ‖∂ε*/∂τ‖, ‖term1‖, ‖term2‖ at x_t = α x0 + σ ε: three (n, G) arrays."""
    n = x0.shape[0]
    out = np.zeros((3, n, len(grid)))
    for j, t in enumerate(np.asarray(grid, dtype=np.float64)):
        k = torch.full((n,), float(t), dtype=torch.float64)
        a, s, da, ds = _coeffs(schedule, k)
        x = noisy(x0.double(), noise.double(), a, s)
        t1, t2 = g.theorem_terms(x, a, s, da, ds)
        for r, v in enumerate((t1 + t2, t1, t2)):
            out[r, :, j] = torch.linalg.vector_norm(v.reshape(n, -1), dim=1).numpy()
    return out


# ---- along the probability-flow ODE, and the exponent the closed form gives ------------------------------------


def ode_samples(g: GaussianMixture, schedule: NoiseProcess, x0: torch.Tensor, noise: torch.Tensor, grid) -> np.ndarray:
    """Per-sample closed forms along the exact probability-flow ODE of one Gaussian at x_t = αx0 + σε: (3, n, G) of
    ‖dε*/dτ‖ (total), ‖∂ε*/∂τ‖ (partial) and ‖∇ₓε*·dx/dτ‖ (space).

    In the eigenbasis z = Uᵀ(x − αμ) the ODE's solution is z(τ) = √(c(τ)/c(τ₀)) z(τ₀), c = α²λ + σ² (DESIGN.md), and
    ε* = (σ/c) z, so along it dε*/dτ = (σ'/c − σc'/(2c²)) z; at fixed x, ∂ε*/∂τ = (σ'/c − σc'/c²) z − (σα'/c) Uᵀμ;
    the space part is their difference, (σc'/(2c²)) z + (σα'/c) Uᵀμ. Derived from the ODE's solution, not the
    chain rule.
    """
    m, lam = _gauss_only(g)
    n = x0.shape[0]
    flat0, flatn = x0.reshape(n, -1).double() @ g.eigvecs[0], noise.reshape(n, -1).double() @ g.eigvecs[0]
    out = np.zeros((3, n, len(np.atleast_1d(grid))))
    for j, t in enumerate(np.atleast_1d(np.asarray(grid, dtype=np.float64))):
        a, s, da, ds = _coeffs(schedule, torch.tensor(float(t), dtype=torch.float64))
        c, dc = a * a * lam + s * s, 2 * a * da * lam + 2 * s * ds
        z = a * flat0 + s * flatn - a * m
        total = (ds / c - s * dc / (2 * c * c)) * z
        partial = (ds / c - s * dc / (c * c)) * z - (s * da / c) * m
        for r, v in enumerate((total, partial, total - partial)):
            out[r, :, j] = torch.linalg.vector_norm(v, dim=1).numpy()
    return out


def rms_band(g: GaussianMixture, schedule: NoiseProcess, t) -> tuple[float, float, float]:
    """(p, lo, hi) of the closed form over grid points ``t`` (one Gaussian): p the least-squares slope of
    log √E‖∂ε*/∂τ‖² against log τ, and [lo, hi] the range of the slopes between neighbouring points.

    A least-squares slope is a weighted mean of the pairwise secant slopes, and each of those a weighted mean of the
    neighbouring ones, so p ∈ [lo, hi]: the band a fitted exponent of this curve on this grid must fall in
    (docs/theory.md derives where it tends near t = 0 for each process and data rank)."""
    tt = np.sort(np.asarray(t, dtype=np.float64))
    if tt.size < 2 or tt[0] <= 0:
        raise ValueError("the band needs ≥ 2 grid points, all t > 0")
    x = np.log(tt / schedule.T)
    y = 0.5 * np.log(dtau_exact_ms(g, schedule, tt))
    sec = np.diff(y) / np.diff(x)
    xc = x - x.mean()
    return float((xc * y).sum() / (xc * xc).sum()), float(sec.min()), float(sec.max())


def exponent_limit(process: NoiseProcess, g: GaussianMixture, t_lo: float, t_hi: float) -> tuple[float, str]:
    """(p₀, regime): the exponent the closed form tends to as t → 0 in the regime the fit range [t_lo, t_hi] is in
    (docs/theory.md, "Exponent bands"), NaN where the range sits between regimes.

    Per eigen-direction of variance λ, K² gathers σ′²/λ where σ² ≪ α²λ and σ′²/σ² where σ² ≫ α²λ. With
    σ ∝ τ^a near 0 (a = ½ continuous VP, 1 flow): every direction above the noise (full rank) gives p₀ = a − 1; the
    directions below it (a floor s ≪ σ) dominate with p₀ = −1 while σ ≫ s. σ(0) > 0 (discrete VP, VE, EDM): K is
    finite at t = 0, p₀ = 0 in both."""
    k = torch.tensor([float(t_lo), float(t_hi)], dtype=torch.float64)
    a, s = process.alpha(k), process.sigma(k)
    lam = g.eigvals.reshape(-1)
    lo_var, hi_var = float(lam.min()), float(lam.max())
    if float(s[1] ** 2) <= 1e-2 * float(a[1] ** 2) * lo_var:
        regime, floor = "full rank (σ² ≪ α²λ in every direction)", False
    elif float(s[0] ** 2) >= 1e2 * float(a[0] ** 2) * lo_var and float(s[1] ** 2) <= 1e-2 * float(a[1] ** 2) * hi_var:
        regime, floor = "low rank (s² ≪ σ² ≪ α²λ: the directions under the noise dominate)", True
    else:
        return math.nan, "between regimes: σ² crosses a data variance inside the fit range (see the band)"
    s0 = float(process.sigma(torch.tensor(0.0, dtype=torch.float64)))
    if s0 > 0:
        return 0.0, f"{regime}; σ(0) = {s0:.3g} > 0, so K is finite at t = 0"
    t1 = torch.tensor([1e-9, 2e-9], dtype=torch.float64) * process.T
    expo = float(torch.log(process.sigma(t1[1]) / process.sigma(t1[0])) / math.log(2.0))
    return (-1.0 if floor else round(expo, 6) - 1.0), f"{regime}; σ ∝ τ^{expo:.3g} near t = 0"
