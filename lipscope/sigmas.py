"""σ(k) of the α = 1 processes (VE, EDM) and its inverse k(σ), as small pure float64 functions of the model step k.

* VE (score-SDE, Song et al. 2021, Eq. 31): σ(k) = σ_min (σ_max/σ_min)^(k/T); k/T is the SDE's own time t, so
  k is linear in ln σ.
* EDM (Karras et al. 2022, Eq. 5 and Table 1): σ on the model's discretisation read from the low-noise end,
  r = k/(T−1): the ρ-ramp σ = (σ_min^{1/ρ} + r(σ_max^{1/ρ} − σ_min^{1/ρ}))^ρ (``karras``), or σ = σ_min
  (σ_max/σ_min)^r (``exponential``) — ``EDMEulerScheduler.set_timesteps(T)``'s grid, reversed.

The inverses give the (fractional) model step of any σ > 0 (below 0 under σ_min, above T−1 over σ_max): the σ a
sampler visits or an EDM training loss draws from its log-normal density. Both directions keep autograd and
forward-AD graphs, so derivatives in k flow through them.
"""

from __future__ import annotations

import math

import torch


def _f64(v: torch.Tensor | float) -> torch.Tensor:
    return v.to(torch.float64) if isinstance(v, torch.Tensor) else torch.as_tensor(v, dtype=torch.float64)


def ve_sigma(k: torch.Tensor | float, T: int, sigma_min: float, sigma_max: float) -> torch.Tensor:  # noqa: N803
    """VE: σ(k) = σ_min (σ_max/σ_min)^(k/T)."""
    return sigma_min * torch.exp(_f64(k) / T * math.log(sigma_max / sigma_min))


def ve_step(sigma: torch.Tensor | float, T: int, sigma_min: float, sigma_max: float) -> torch.Tensor:  # noqa: N803
    """VE: the model step of σ, k = T ln(σ/σ_min) / ln(σ_max/σ_min)."""
    return T * torch.log(_f64(sigma) / sigma_min) / math.log(sigma_max / sigma_min)


def edm_sigma(k: torch.Tensor | float, T: int, lo: float, hi: float, rho: float, ramp: str) -> torch.Tensor:  # noqa: N803
    """EDM: σ at step k of the model's ramp from σ_min = ``lo`` to σ_max = ``hi`` (``karras`` ρ-ramp or
    ``exponential``), r = k/(T−1)."""
    r = _f64(k) / (T - 1)
    if ramp == "exponential":
        return torch.exp(math.log(lo) + r * math.log(hi / lo))
    a, b = lo ** (1 / rho), hi ** (1 / rho)
    return (a + r * (b - a)) ** rho


def edm_step(sigma: torch.Tensor | float, T: int, lo: float, hi: float, rho: float, ramp: str) -> torch.Tensor:  # noqa: N803
    """EDM: the model step of σ on the ramp, the inverse of :func:`edm_sigma`."""
    s = _f64(sigma)
    if ramp == "exponential":
        return (T - 1) * torch.log(s / lo) / math.log(hi / lo)
    a, b = lo ** (1 / rho), hi ** (1 / rho)
    return (T - 1) * (s ** (1 / rho) - a) / (b - a)
