"""The derivative a sampler feels: εθ along the model's own probability-flow ODE (DESIGN.md, "Partial vs total
derivative"; sCM, Lu & Song 2025, Fig. 4).

A solver moves x with the ODE, dx/dτ = (α'/α) x + (σ' − α'σ/α) εθ(x, τ) (the guided ε with CFG), so its local
error follows the total derivative

    d/dτ εθ(x(τ), τ) = ∂εθ/∂τ + ∇ₓεθ · dx/dτ,

not the partial one the probe's FD/JVP measure at fixed x. Per (sample, t) the estimators give ``K_total`` =
‖dεθ/dτ‖, ``K_partial`` = ‖∂εθ/∂τ‖ (the JVP/FD of the same point), ``K_space`` = ‖∇ₓεθ·dx/dτ‖, and the share of t
itself, ⟨∂εθ/∂τ, dεθ/dτ⟩/‖dεθ/dτ‖² (pooled over samples: Σ⟨·,·⟩/Σ‖·‖², so a row's two shares sum to 1).

* ``jvp-ode``: one JVP with tangents (0, 1) gives εθ (its primal, which sets dx/dτ) and ∂εθ/∂τ; a second with
  tangents (dx/dτ, 0) gives ∇ₓεθ·dx/dτ. Two JVPs per item, packed by the batched runner (a run with ``jvp`` too
  takes its rows from the first).
* ``fd-ode``: εθ at (x + (t_b − t)/T·dx/dτ, t_b) against εθ at (x + (t_a − t)/T·dx/dτ, t_a), the FD scheme's
  points moved along the ODE's tangent, next to the same points at fixed x (the FD row) — one forward for dx/dτ,
  then two (forward scheme) or four (central) in one call.

K is per unit τ, as everywhere; ``target`` other than ε is differentiated as measured (dx/dτ always uses ε).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from .batching import RunStats, check_finite, run_batched
from .errors import InputError
from .fwad import check_tangent_reaches, forward_ad_patches, jvp, refuse_learned_embedding
from .journal import Journal
from .models import EpsModel
from .points import FDPoints, noisy_inputs
from .targets import ode_velocity

ODE_METHODS = ("jvp-ode", "fd-ode")
COLUMNS = ("K_total", "K_partial", "K_space")  # per-sample norms; the table's K is K_total


def _velocity(model: EpsModel, x: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """dx per model step along the ODE at (x, t) (dx/dτ / T), in the model's dtype."""
    p = model.schedule
    v = ode_velocity(x, eps, p.alpha(t), p.sigma(t), p.dalpha_dtau(t), p.dsigma_dtau(t))
    return v / model.T


def _eps(model: EpsModel) -> EpsModel:
    return model if model.target == "eps" else dataclasses.replace(model, target="eps")


def _stack(parts: list[torch.Tensor], m: int, scale: float) -> torch.Tensor:
    """(m, 5): ‖total‖, ‖partial‖, ‖space‖ (times ``scale``) and ⟨partial, total⟩, ‖total‖² (times scale²)."""
    p, s = (v.reshape(m, -1).double() for v in parts)
    tot = p + s
    norms = [torch.linalg.vector_norm(v, dim=1) * scale for v in (tot, p, s)]
    return torch.stack([*norms, (p * tot).sum(1) * scale**2, (tot * tot).sum(1) * scale**2], 1)


def jvp_ode_norms(
    model: EpsModel,
    x0: torch.Tensor,
    noise: torch.Tensor,
    t: np.ndarray,
    batch_size: int | str = "auto",
    progress: bool = False,
    stats: RunStats | None = None,
    journal: Journal | None = None,
) -> torch.Tensor:
    """(n, G, 5) per sample and grid point: K_total, K_partial, K_space, and the two sums of the t share (see
    :func:`_stack`), by forward-mode AD, x_t drawn at t."""
    if model.rounds_timesteps:
        raise InputError(f"`model` {model.name} rounds t to whole steps: its derivative in t is 0; use `method` fd-ode")
    refuse_learned_embedding(model.name, model.config)
    n, G, T = x0.shape[0], len(t), model.T
    t_x = torch.as_tensor(np.asarray(t, dtype=np.float64))
    checked = [False]
    tdtype = torch.float64 if model.dtype == torch.float64 else torch.float32

    def compute(idx: torch.Tensor) -> torch.Tensor:
        j, i = idx // n, idx % n
        x = noisy_inputs(model, x0[i], noise[i], t_x[j])
        tt = t_x[j].to(model.device, tdtype)
        out, d_t = jvp(model.name, lambda s: model(x, s, i), (tt,), (torch.ones_like(tt),))
        if not checked[0]:
            checked[0] = True
            check_tangent_reaches(model, model.name, x, tt, d_t, i)
        if model.target != "eps":
            with torch.inference_mode():
                out = _eps(model)(x, tt, i)
        v = _velocity(model, x, t_x[j].to(model.device), out)
        _, d_x = jvp(model.name, lambda y: model(y, tt, i), (x,), (v,))
        check_finite([out, d_t, d_x], t_x[j], t_x[j], "output or its derivatives along the ODE")
        return _stack([d_t, d_x], idx.numel(), T)

    with forward_ad_patches(model.module):
        out = run_batched(model, n * G, 2, compute, batch_size, progress, stats, "jvp-ode", journal)
    return out.reshape(G, n, 5).transpose(0, 1).contiguous()


def fd_ode_norms(
    model: EpsModel,
    x0: torch.Tensor,
    noise: torch.Tensor,
    pts: FDPoints,
    batch_size: int | str = "auto",
    progress: bool = False,
    stats: RunStats | None = None,
    journal: Journal | None = None,
) -> torch.Tensor:
    """(n, G, 6): as :func:`jvp_ode_norms` from finite differences at the FD scheme's points moved along the ODE,
    and ‖ε_a‖ + ‖ε_b‖ of the moved pair (the scale of its rounding noise, :func:`lipscope.points.fd_noise`)."""
    if pts.conditions:
        raise InputError("`space` condition pairs conditions at fixed x; `method` fd-ode needs `space` time")
    n, G = x0.shape[0], len(pts.t)
    t_x, t_a, t_b = (torch.as_tensor(np.asarray(v, dtype=np.float64)) for v in (pts.t, pts.t_a, pts.t_b))
    forward = bool(np.all(pts.t_a == pts.t))  # ε(x, t_a) is then the first forward itself

    def compute(idx: torch.Tensor) -> torch.Tensor:
        m = idx.numel()
        j, i = idx // n, idx % n
        x = noisy_inputs(model, x0[i], noise[i], t_x[j])
        ta, tb = t_a[j].to(model.device), t_b[j].to(model.device)
        with torch.inference_mode():
            eps = _eps(model)(x, t_x[j], i)
            out0 = eps if model.target == "eps" else model(x, t_x[j], i)
            v = _velocity(model, x, t_x[j].to(model.device), eps)
            xa, xb = (
                x + (per - t_x[j].to(x.device)).reshape(-1, *[1] * (x.ndim - 1)).to(x.dtype) * v for per in (ta, tb)
            )
            if forward:
                f = model(torch.cat([xb, x]), torch.cat([tb, tb]), torch.cat([i, i]))
                f_ab, f_xb, f_aa, f_xa = f[:m], f[m:], out0, out0
            else:
                f = model(torch.cat([xa, xb, x, x]), torch.cat([ta, tb, ta, tb]), torch.cat([i, i, i, i]))
                f_aa, f_ab, f_xa, f_xb = f[:m], f[m : 2 * m], f[2 * m : 3 * m], f[3 * m :]
        check_finite([f_aa, f_ab, f_xa, f_xb], t_a[j], t_b[j], "output")
        dtau = ((tb - ta) / model.T).double().reshape(-1, 1)
        partial, total = (f_xb - f_xa).reshape(m, -1).double() / dtau, (f_ab - f_aa).reshape(m, -1).double() / dtau
        scale = sum(torch.linalg.vector_norm(f.reshape(m, -1).double(), dim=1) for f in (f_aa, f_ab))
        return torch.cat([_stack([partial, total - partial], m, 1.0), scale[:, None]], 1)

    out = run_batched(model, n * G, 3 if forward else 5, compute, batch_size, progress, stats, "fd-ode", journal)
    return out.reshape(G, n, 6).transpose(0, 1).contiguous()


def ode_columns(vals: np.ndarray) -> dict[str, np.ndarray]:
    """Per row of a table: the means of K_partial and K_space over samples, and the share of t itself in the total
    derivative, Σ⟨∂εθ/∂τ, dεθ/dτ⟩ / Σ‖dεθ/dτ‖² (NaN where the total is 0)."""
    den = vals[:, :, 4].sum(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        share = np.where(den > 0, vals[:, :, 3].sum(0) / np.where(den > 0, den, 1.0), np.nan)
    return {"K_partial": vals[:, :, 1].mean(0), "K_space": vals[:, :, 2].mean(0), "t_share": share}


def ode_norms(
    model: EpsModel, x0: torch.Tensor, noise: torch.Tensor, pts: FDPoints | None, grid: np.ndarray, methods: list[str],
    batch_size: int | str, progress: bool, stats: RunStats, journal: Journal | None, noise_c: float | None = None,
) -> dict[str, tuple[FDPoints, np.ndarray, np.ndarray | None]]:  # fmt: skip
    """The ODE methods among ``methods``: name → (points, per-sample values (n, G, 5), FD rounding noise in K's units
    or None). ``noise_c``: the factor c of :func:`lipscope.points.fd_noise` (measured here when None)."""
    from .points import fd_noise, unit_roundoff

    out: dict[str, tuple[FDPoints, np.ndarray, np.ndarray | None]] = {}
    st = RunStats()
    if "jvp-ode" in methods:
        vals = jvp_ode_norms(model, x0, noise, grid, batch_size, progress, st, journal).numpy()
        out["jvp-ode"] = (FDPoints(grid, grid, grid), vals, None)
    if "fd-ode" in methods and pts is not None:
        vals = fd_ode_norms(model, x0, noise, pts, batch_size, progress, st, journal).numpy()
        c = float(fd_noise(model, x0, noise, pts)["c"]) if noise_c is None else noise_c
        noise_k = c * unit_roundoff(model.dtype) * vals[:, :, 5] / (pts.dt / model.T)[None, :]
        out["fd-ode"] = (pts, vals[:, :, :5], noise_k)
    stats.extra.update(ode_items=st.forwards, ode_seconds=st.seconds, ode_items_per_s=st.forwards_per_s)
    stats.extra["ode_samples"] = {k: v[1] for k, v in out.items()}  # per sample, for the intervals of lipscope.explain
    return out
