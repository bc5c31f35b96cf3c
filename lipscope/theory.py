"""Closed forms for Gaussian data (Theorem 3.1 of Yang et al., 2306.11251), usable as an EpsModel.

For x0 ~ N(μ, Σ) and x = α x0 + σ ε: q_τ = N(αμ, α²Σ + σ²I), so the optimal noise predictor is
ε*(x, τ) = −σ ∇log q_τ(x) = σ (α²Σ + σ²I)⁻¹ (x − αμ). With Σ = U diag(λ) Uᵀ this is
σ U diag(1/(α²λ + σ²)) Uᵀ (x − αμ), evaluated in float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .models import EpsModel, from_callable
from .schedules import Schedule, default_schedule


@dataclass
class Gaussian:
    """x0 ~ N(mean, cov) over D = numel(shape) dimensions, stored as mean and eigen-decomposition."""

    mean: torch.Tensor  # (D,) float64
    eigvals: torch.Tensor  # (D,) float64, ≥ 0
    eigvecs: torch.Tensor  # (D, D) float64, columns
    shape: tuple[int, ...]

    @classmethod
    def from_cov(cls, mean: torch.Tensor, cov: torch.Tensor, shape: tuple[int, ...] | None = None) -> Gaussian:
        mean = torch.as_tensor(mean, dtype=torch.float64).reshape(-1)
        cov = torch.as_tensor(cov, dtype=torch.float64)
        cov = 0.5 * (cov + cov.T)
        lam, U = torch.linalg.eigh(cov)
        return cls(mean, lam.clamp(min=0.0), U, tuple(shape) if shape else (mean.numel(),))

    @classmethod
    def fit(cls, x0: torch.Tensor) -> Gaussian:
        """Maximum-likelihood Gaussian of samples (N, …)."""
        flat = x0.reshape(x0.shape[0], -1).double()
        mu = flat.mean(0)
        c = flat - mu
        return cls.from_cov(mu, c.T @ c / flat.shape[0], tuple(x0.shape[1:]))

    def eps_star(self, x: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """ε*(x) = σ (α²Σ + σ²I)⁻¹ (x − αμ) for rows of x with per-row α, σ (float64)."""
        flat = x.reshape(x.shape[0], -1).double()
        a, s = alpha.double().reshape(-1, 1), sigma.double().reshape(-1, 1)
        z = (flat - a * self.mean) @ self.eigvecs
        z = z * (s / (a * a * self.eigvals + s * s))
        return (z @ self.eigvecs.T).reshape(x.shape)


def gaussian_eps_model(g: Gaussian, schedule: Schedule | None = None, name: str = "gaussian") -> EpsModel:
    """The exact ε* of Gaussian data as an EpsModel (float64), so the same probe measures it."""
    schedule = schedule or default_schedule()

    def eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        tt = t.detach().double().cpu()
        a, s = schedule.alpha(tt).to(x.device), schedule.sigma(tt).to(x.device)
        return g.eps_star(x, a, s).to(x.dtype)

    m = from_callable(eps, schedule, sample_shape=g.shape, name=name, dtype="float64")
    m.config = {"closed_form": "gaussian", "D": int(g.mean.numel())}
    return m
