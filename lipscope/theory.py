"""Closed forms on Gaussian data (Theorem 3.1 of Yang et al., 2306.11251), usable as an EpsModel.

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

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from .models import EpsModel, from_callable
from .schedules import Schedule, default_schedule


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
        """(term1, term2) of Theorem 3.1 at fixed x: (α/σ)α'∇log q and −σ ∂_τ∇log q (α' = dα/dτ)."""
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
        term1 = (a.double() / s.double() * da.double()).reshape(-1, 1) * score
        term2 = -s.double().reshape(-1, 1) * dscore
        return term1.reshape(shape), term2.reshape(shape)

    def deps_dtau(self, x, a, s, da, ds) -> torch.Tensor:
        """∂ε*/∂τ at fixed x (Theorem 3.1)."""
        t1, t2 = self.theorem_terms(x, a, s, da, ds)
        return t1 + t2


# ---- schedule-level helpers (k in model steps, float64) ---------------------------------------


def _coeffs(schedule: Schedule, k: torch.Tensor):
    k = torch.as_tensor(k, dtype=torch.float64)
    return schedule.alpha(k), schedule.sigma(k), schedule.dalpha_dtau(k), schedule.dsigma_dtau(k)


def gaussian_eps_model(g: GaussianMixture, schedule: Schedule | None = None, name: str = "gaussian") -> EpsModel:
    """The exact ε* as an EpsModel (float64), differentiable in t, so FD and JVP probes run on it."""
    schedule = schedule or default_schedule()

    def eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        tt = t.double()
        return g.eps_star(x, schedule.alpha(tt), schedule.sigma(tt)).to(x.dtype)

    m = from_callable(eps, schedule, sample_shape=g.shape, name=name, dtype="float64")
    m.config = {"closed_form": "gaussian_mixture", "K": g.K, "D": g.D}
    return m


# ---- exact references for the Gaussian (K = 1) --------------------------------------------------


def _gauss_only(g: GaussianMixture) -> tuple[torch.Tensor, torch.Tensor]:
    if g.K != 1:
        raise ValueError("exact FD/derivative moments are implemented for a single Gaussian (K = 1)")
    m = g.eigvecs[0].T @ g.means[0]
    return m, g.eigvals[0]


def fd_exact_ms(g: GaussianMixture, schedule: Schedule, t, t_a, t_b) -> np.ndarray:
    """E‖ε*(x_t, t_b) − ε*(x_t, t_a)‖² in closed form (x_t drawn at t).

    In the eigenbasis y = Uᵀx ~ N(α_t m, diag(c_t)) with independent coordinates, and
    ε*(x, j) = g_j (y − α_j m), g_j = σ_j / (α_j²λ + σ_j²); the difference is Gaussian with mean
    ((g_b − g_a)α_t − (g_b α_b − g_a α_a)) m and variance (g_b − g_a)² c_t per coordinate.
    """
    m, lam = _gauss_only(g)

    def coeffs(k):
        k = torch.as_tensor(np.asarray(k, dtype=np.float64).reshape(-1, 1))
        return schedule.alpha(k), schedule.sigma(k)

    (at, st), (aa, sa), (ab, sb) = coeffs(t), coeffs(t_a), coeffs(t_b)
    ga, gb = sa / (aa * aa * lam + sa * sa), sb / (ab * ab * lam + sb * sb)
    mean = ((gb - ga) * at - (gb * ab - ga * aa)) * m
    var = (gb - ga) ** 2 * (at * at * lam + st * st)
    return (var + mean * mean).sum(-1).numpy()


def dtau_exact_ms(g: GaussianMixture, schedule: Schedule, t) -> np.ndarray:
    """E‖∂ε*/∂τ (x_t, t)‖² in closed form: coordinates g'(y − αm) − gα'm with y ~ N(αm, c)."""
    m, lam = _gauss_only(g)
    k = torch.as_tensor(np.atleast_1d(t), dtype=torch.float64)[:, None]
    a, s, da, ds = _coeffs(schedule, k)
    c = a * a * lam + s * s
    dc = 2 * a * da * lam + 2 * s * ds
    gk = s / c
    dg = ds / c - s * dc / (c * c)
    return (dg * dg * c + gk * gk * da * da * m * m).sum(-1).numpy()


def terms_exact_ms(g: GaussianMixture, schedule: Schedule, t) -> tuple[np.ndarray, np.ndarray]:
    """E‖term1‖² and E‖term2‖² of Theorem 3.1 (Gaussian), each linear in y like ∂ε*/∂τ."""
    m, lam = _gauss_only(g)
    k = torch.as_tensor(np.atleast_1d(t), dtype=torch.float64)[:, None]
    a, s, da, ds = _coeffs(schedule, k)
    c = a * a * lam + s * s
    dc = 2 * a * da * lam + 2 * s * ds
    # score coords = −(y − αm)/c: term1 = (α α'/σ)·score, term2 = σ (z'/c − z c'/c²) with z' = −α'm
    t1 = (a * da / s) ** 2 * (1.0 / c)  # E[(y−αm)²]/c² = 1/c, zero mean
    t2 = (s * dc / (c * c)) ** 2 * c + (s * da / c) ** 2 * m * m
    return t1.sum(-1).numpy(), t2.sum(-1).numpy()


# ---- the `lipscope theory` table -----------------------------------------------------------------


def closed_form_samples(g: GaussianMixture, schedule: Schedule, x0: torch.Tensor, noise: torch.Tensor, grid):
    """Per-sample closed-form ‖∂ε*/∂τ‖, ‖term1‖, ‖term2‖ at x_t = α x0 + σ ε: three (n, G) arrays."""
    n = x0.shape[0]
    out = np.zeros((3, n, len(grid)))
    for j, t in enumerate(np.asarray(grid, dtype=np.float64)):
        k = torch.full((n,), float(t), dtype=torch.float64)
        a, s, da, ds = _coeffs(schedule, k)
        shape = (-1,) + (1,) * (x0.ndim - 1)
        x = a.reshape(shape) * x0.double() + s.reshape(shape) * noise.double()
        t1, t2 = g.theorem_terms(x, a, s, da, ds)
        for r, v in enumerate((t1 + t2, t1, t2)):
            out[r, :, j] = torch.linalg.vector_norm(v.reshape(n, -1), dim=1).numpy()
    return out


def theory_table(
    g: GaussianMixture,
    schedule: Schedule,
    grid: np.ndarray,
    dt: float = 1.0,
    samples: int = 512,
    seed: int = 0,
    nets: dict[str, EpsModel] | None = None,
) -> pd.DataFrame:
    """Closed forms vs estimators on Gaussian (mixture) data, one row per grid step t.

    Columns: ``K_fd_exact_rms`` = √E‖ε*(x_t,t+Δ) − ε*(x_t,t)‖² / Δτ (closed form, single Gaussian;
    NaN for mixtures), ``K_fd_mc`` and its 95% CI (the probe's FD on ε*), ``dtau_exact_rms`` =
    √E‖∂ε*/∂τ‖² (closed form; Monte Carlo of the per-sample closed form for mixtures),
    ``dtau_closed_mean`` (mean per-sample closed-form ‖∂ε*/∂τ‖ on the probe's samples),
    ``dtau_jvp`` (the probe's JVP on ε*, same samples), ``term1_rms``, ``term2_rms`` (Theorem 3.1),
    and per trained net ``K_fd_<name>``, ``dtau_jvp_<name>``.
    """
    from .data import per_sample_noise
    from .probe import probe

    T = schedule.T
    model = gaussian_eps_model(g, schedule, name="eps*")
    x0 = g.sample(samples, seed)
    df = probe(model, x0, timesteps=grid, dt=dt, method="fd,jvp", samples=samples, seed=seed)
    fd, jv = df[df["method"] == "fd-forward"].reset_index(drop=True), df[df["method"] == "jvp"].reset_index(drop=True)
    noise = per_sample_noise(seed, samples, tuple(x0.shape[1:]), dtype=torch.float64)
    cf = closed_form_samples(g, schedule, x0, noise, grid)
    exact = g.K == 1
    rms = lambda a: np.sqrt((a**2).mean(0))  # noqa: E731
    if exact:
        k_fd = np.sqrt(fd_exact_ms(g, schedule, fd["t"], fd["t_a"], fd["t_b"])) / (dt / T)
        d_rms = np.sqrt(dtau_exact_ms(g, schedule, grid))
        t1, t2 = (np.sqrt(v) for v in terms_exact_ms(g, schedule, grid))
    else:
        k_fd = np.full(len(grid), np.nan)
        d_rms, t1, t2 = rms(cf[0]), rms(cf[1]), rms(cf[2])
    out = pd.DataFrame(
        {
            "t": fd["t"],
            "dt": fd["dt"],
            "tau": fd["tau"],
            "alpha": fd["alpha"],
            "sigma": fd["sigma"],
            "K_fd_exact_rms": k_fd,
            "K_fd_mc": fd["K_mean"],
            "K_fd_ci_low": fd["K_ci_low"],
            "K_fd_ci_high": fd["K_ci_high"],
            "dtau_exact_rms": d_rms,
            "dtau_closed_mean": cf[0].mean(0),
            "dtau_jvp": jv["K_mean"],
            "dtau_jvp_ci_low": jv["K_ci_low"],
            "dtau_jvp_ci_high": jv["K_ci_high"],
            "term1_rms": t1,
            "term2_rms": t2,
            "reference": "closed-form" if exact else "monte-carlo",
        }
    )
    for name, net in (nets or {}).items():
        d = probe(net, x0.float(), timesteps=grid, dt=dt, method="fd,jvp", samples=samples, seed=seed)
        out[f"K_fd_{name}"] = d[d["method"] == "fd-forward"]["K_mean"].to_numpy()
        out[f"dtau_jvp_{name}"] = d[d["method"] == "jvp"]["K_mean"].to_numpy()
    out.attrs["samples"] = samples
    return out


# ---- a small trained noise predictor on the toy data --------------------------------------------


class ToyEps(torch.nn.Module):
    """MLP noise predictor ε(x, t) for vector data with a Fourier embedding of the (mapped) step."""

    def __init__(self, dim: int, width: int = 128, freqs: int = 6, T: int = 1000):
        super().__init__()
        # Fourier features of τ = t/T at π·2^i: smooth in t (the fastest varies 0.1 rad per step), so
        # nothing in the embedding itself aliases between the integer training steps.
        self.register_buffer("freqs", math.pi * 2.0 ** torch.arange(freqs, dtype=torch.float32) / T)
        self.net = torch.nn.Sequential(
            torch.nn.Linear(dim + 2 * freqs, width),
            torch.nn.SiLU(),
            torch.nn.Linear(width, width),
            torch.nn.SiLU(),
            torch.nn.Linear(width, width),
            torch.nn.SiLU(),
            torch.nn.Linear(width, dim),
        )
        self.sample_shape = (dim,)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        ang = t.to(self.freqs.dtype)[:, None] * self.freqs[None]
        return self.net(torch.cat([x.to(self.freqs.dtype), ang.sin(), ang.cos()], dim=1)).to(x.dtype)


def train_toy(
    g: GaussianMixture,
    schedule: Schedule,
    steps: int = 3000,
    batch: int = 512,
    lr: float = 2e-3,
    seed: int = 0,
    etsdm: bool = False,
    t_tilde: float = 100.0,
    n_sub: int = 5,
) -> tuple[EpsModel, list[float]]:
    """Fit ToyEps with the ε-loss (t uniform over integer steps, fresh data each step; cosine LR).

    With ``etsdm`` the network is fed f(t) (lipscope.etsdm) while noise is drawn at the true t.
    Returns the model (EpsModel, with the map applied when etsdm) and the loss curve.
    """
    from .etsdm import etsdm_map

    torch.manual_seed(seed)
    net = ToyEps(g.D, T=schedule.T)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    fmap = (lambda t: etsdm_map(t, t_tilde, n_sub)) if etsdm else None
    gen = torch.Generator().manual_seed(seed + 1)
    losses = []
    for step in range(steps):
        x0 = g.sample(batch, seed=seed * 1_000_003 + step).float()
        t = torch.randint(0, schedule.T, (batch,), generator=gen).to(torch.float64)
        eps = torch.randn(x0.shape, generator=gen)
        a, s = schedule.alpha(t).float()[:, None], schedule.sigma(t).float()[:, None]
        cond = fmap(t) if fmap else t
        loss = ((net(a * x0 + s * eps, cond.float()) - eps) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    net.eval()
    m = from_callable(net, schedule, sample_shape=(g.D,), name="toy-etsdm" if etsdm else "toy")
    m.timestep_map = fmap
    return m, losses
