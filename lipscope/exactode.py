"""The exact probability-flow ODE endpoint of a Gaussian mixture, from any x_T of any process.

For x = α x0 + σ ε the probability-flow ODE (Song et al. 2021; DDIM's limit) is the same for every process once
written in y = x/α and σ̃ = σ/α: dy/dσ̃ = ε*(x, t) = (y − x̂0*)/σ̃ (Karras et al. 2022, eq. 4, with the exact
denoiser). It is integrated in two phases, each with a smooth field (:mod:`lipscope.odesolve`, Dormand–Prince 5(4),
one step size per sample, tolerances stated in every result):

1. from the start down to σ̃ = 1, in z = x/σ against r = α/σ = 1/σ̃: dz/dr = x̂0*(z; α = r, σ = 1), the posterior
   mean given z = r x0 + ε — finite at r = 0, so a flow sampler's start at σ = 1 (α = 0, σ̃ = ∞) is exact;
2. from σ̃ = 1 to σ̃ = 0 in y: dy/dσ̃ = ε*(y; α = 1, σ = σ̃) (finite at σ̃ = 0 for every variance > 0).

For one Gaussian N(μ, Σ) the solution is closed-form (DESIGN.md): along each eigenvector of Σ (variance λ),
x_t − α_t μ = √(α_t²λ + σ_t²)/√(α_T²λ + σ_T²)·(x_T − α_T μ) (:func:`gaussian_endpoint`), which the tests check.
"""

from __future__ import annotations

from typing import Any

import torch

from .gaussian import GaussianMixture
from .mixtures import posterior_mean
from .odesolve import solve
from .schedules import NoiseProcess

RTOL, ATOL = 1e-10, 1e-10  # the default tolerance of the endpoint (per sample, RMS over its components)


def pf_ode_endpoint(
    g: GaussianMixture,
    process: NoiseProcess,
    x_t: torch.Tensor,
    k: float,
    *,
    rtol: float = RTOL,
    atol: float = ATOL,
    chunk: int = 4096,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """x0 = the probability-flow ODE solution at σ = 0 from x_t (float64 (B, *shape)) at model step ``k``, with
    the exact field of ``g``; returns it and the solver's statistics and tolerances."""
    kk = torch.tensor([float(k)], dtype=torch.float64)
    a, s = float(process.alpha(kk)), float(process.sigma(kk))
    if s <= 0:
        return x_t.double().clone(), {"start_sigma_tilde": 0.0, "note": "σ = 0 at the start: x_t is the endpoint"}
    outs, stats = [], []
    for lo in range(0, x_t.shape[0], chunk):
        x = x_t[lo : lo + chunk].double().reshape(-1, g.D)
        y, st = _two_phase(g, x, a, s, rtol, atol)
        outs.append(y)
        stats.append(st)
    info = {"method": "Dormand-Prince 5(4), per-sample step control (lipscope.odesolve)", "rtol": rtol, "atol": atol,
            "start_step": float(k), "start_alpha": a, "start_sigma": s,
            "start_sigma_tilde": s / a if a > 0 else float("inf"),
            "phases": _merge(stats)}  # fmt: skip
    return torch.cat(outs).reshape(x_t.shape), info


def _merge(stats: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """The phases' statistics over chunks: counts summed where they are totals, else the largest."""
    out = []
    for j, first in enumerate(stats[0]):
        row: dict[str, Any] = {}
        for key, v in first.items():
            vals = [d[j][key] for d in stats]
            row[key] = sum(vals) if key == "rejected_total" else max(vals) if isinstance(v, (int, float)) else v
        out.append(row)
    return out


def _two_phase(g: GaussianMixture, x: torch.Tensor, a: float, s: float, rtol: float, atol: float):
    phases = []
    if a < s:  # σ̃ > 1: phase 1 in (r, z) up to r = 1
        ones = torch.ones(x.shape[0], dtype=torch.float64)

        def dz_dr(r: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
            return posterior_mean(g, z, r, torch.ones_like(r))

        z, st = solve(dz_dr, x / s, a / s * ones, 1.0, rtol=rtol, atol=atol)
        phases.append({"variable": "r = alpha/sigma", "from": a / s, "to": 1.0, **st.describe()})
        y, st_start = z, 1.0  # at r = 1: y = z/r = z
    else:
        y, st_start = x / a, s / a

    def dy_ds(sig: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return g.eps_star(y, torch.ones_like(sig), sig)

    y, st = solve(dy_ds, y, st_start, 0.0, rtol=rtol, atol=atol)
    phases.append({"variable": "sigma_tilde = sigma/alpha", "from": st_start, "to": 0.0, **st.describe()})
    return y, phases


def gaussian_endpoint(mean: torch.Tensor, cov: torch.Tensor, process: NoiseProcess, x_t: torch.Tensor, k: float):
    """The closed-form endpoint at σ = 0 for data N(mean, cov): per eigen-direction of cov (variance λ),
    x0 − μ = √λ/√(α_T²λ + σ_T²)·(x_T − α_T μ)."""
    kk = torch.tensor([float(k)], dtype=torch.float64)
    a, s = process.alpha(kk), process.sigma(kk)
    lam, u = torch.linalg.eigh(cov.double())
    mu = mean.double().reshape(-1)
    z = (x_t.double().reshape(x_t.shape[0], -1) - a * mu) @ u
    return (mu + (z * lam.sqrt() / (a * a * lam + s * s).sqrt()) @ u.T).reshape(x_t.shape)
