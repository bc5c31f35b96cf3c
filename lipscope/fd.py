"""Finite differences over an EpsModel, batched, and how far each FD row can be trusted beyond rounding noise.

:func:`fd_norms` evaluates the FD pairs (packed across timesteps by :func:`lipscope.batching.run_batched`).
:func:`fd_checks` adds to the table what limits an FD row besides the rounding noise of its outputs
(``fd_noise_rel``, :mod:`lipscope.points`):

* ``fd_time_rel`` / ``fd_time_limited``: the rounding of the network's time input (:mod:`lipscope.resolution`);
* ``fd_trunc_rel`` / ``fd_trunc_limited``: the truncation of the FD step, estimated by Richardson extrapolation on
  a few samples (:func:`truncation_rel`);
* ``usable``: neither noise- nor time-limited. Only usable rows enter the summary (:func:`lipscope.reduction.summary`).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pandas as pd
import torch

from .batching import RunStats, check_finite, run_batched
from .journal import Journal
from .models import EpsModel
from .points import FDPoints, fd_pair
from .precision import guard_samples
from .resolution import TIME_LIMIT

log = logging.getLogger("lipscope")

TRUNC_LIMIT = 0.1  # a row whose K the FD step's truncation may move by more than this share is flagged


def fd_norms(
    model: EpsModel,
    x0: torch.Tensor,
    noise: torch.Tensor,
    pts: FDPoints,
    batch_size: int | str = "auto",
    progress: bool = False,
    stats: RunStats | None = None,
    journal: Journal | None = None,
    label: str = "fd",
) -> tuple[torch.Tensor, torch.Tensor]:
    """‖ε(x_t, t_b) − ε(x_t, t_a)‖₂ and ‖ε(x_t, t_a)‖₂ + ‖ε(x_t, t_b)‖₂ (the scale of its rounding noise,
    :func:`lipscope.points.fd_noise`) for every (sample i, grid point j): two float64 (n, G).

    Items are ordered grid-major (j, i) and packed P pairs per batch, whatever j they belong to:
    the P inputs at t_a, then the same P inputs at t_b, in one call.
    """
    n, G = x0.shape[0], len(pts.t)
    t_a, t_b = torch.as_tensor(pts.t_a), torch.as_tensor(pts.t_b)

    def compute(idx: torch.Tensor) -> torch.Tensor:
        m = idx.numel()
        eps = fd_pair(model, x0, noise, pts, idx)
        check_finite([eps[:m], eps[m:]], t_a[idx // n], t_b[idx // n], "output")
        scale = torch.linalg.vector_norm(eps.reshape(2, m, -1).double(), dim=2).sum(0)
        return torch.stack([torch.linalg.vector_norm((eps[m:] - eps[:m]).reshape(m, -1).double(), dim=1), scale], 1)

    out = run_batched(model, n * G, 2, compute, batch_size, progress, stats, label, journal)
    return out[:, 0].reshape(G, n).T.contiguous(), out[:, 1].reshape(G, n).T.contiguous()


def half_points(pts: FDPoints, scheme: str) -> FDPoints:
    """The same FD pairs with half the step: (t, t + Δt/2) forward, (t − Δt/4, t + Δt/4) central."""
    mid = (pts.t_a + pts.t_b) / 2
    if scheme == "central":
        return FDPoints(pts.t, mid - pts.dt / 4, mid + pts.dt / 4)
    return FDPoints(pts.t, pts.t_a, mid)


def truncation_rel(
    model: EpsModel, x0: torch.Tensor, noise: torch.Tensor, pts: FDPoints, K: np.ndarray, scheme: str, batch_size
) -> tuple[np.ndarray, dict[str, Any]]:
    """Per row, the estimated relative truncation error of the FD K: K(Δt) against K(Δt/2) on the guard samples
    (:func:`lipscope.precision.guard_samples`), Richardson with the scheme's order p (1 forward, 2 central):
    E(Δt) ≈ 2ᵖ/(2ᵖ − 1)·|ΣK(Δt) − ΣK(Δt/2)| / ΣK(Δt/2). NaN where it is not defined: condition space, E-TSDM's
    piecewise-constant condition below t̃ (an FD there measures a jump, not a derivative), a half step a rounding
    adapter cannot take."""
    G = len(pts.t)
    est = np.full(G, np.nan)
    p = 2 if scheme == "central" else 1
    info: dict[str, Any] = {"method": "K(dt) vs K(dt/2) on the guard samples, Richardson", "order": p}
    if pts.conditions:
        return est, {**info, "method": "not estimated: `space` condition pairs conditions, not steps of t"}
    half = half_points(pts, scheme)
    ok = np.ones(G, dtype=bool)
    if model.etsdm is not None:
        ok &= half.t_a >= model.etsdm.t_tilde
    if model.rounds_timesteps:
        ok &= (half.t_a == np.round(half.t_a)) & (half.t_b == np.round(half.t_b))
    g = guard_samples(x0.shape[0])
    info |= {"samples": g.tolist(), "limit": TRUNC_LIMIT, "rows_estimated": int(ok.sum())}
    if not ok.any():
        return est, info
    sub = FDPoints(pts.t[ok], half.t_a[ok], half.t_b[ok])
    st = RunStats()
    norms = fd_norms(model, x0[g], noise[g], sub, batch_size, stats=st, label="fd-half")[0].numpy()
    k_half, k_full = (norms / (sub.dt / model.T)[None]).sum(0), K[g][:, ok].sum(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = 2**p / (2**p - 1) * np.abs(k_full - k_half) / k_half
    est[ok] = np.where(k_full == k_half, 0.0, np.where(np.isfinite(r), r, np.inf))
    return est, info | {"forwards": st.forwards}


def fd_checks(
    model: EpsModel,
    x0: torch.Tensor,
    noise: torch.Tensor,
    pts: FDPoints | None,
    tables: list[pd.DataFrame],
    K: np.ndarray | None,
    time_info: dict[str, Any] | None,
    scheme: str,
    batch_size: int | str,
) -> dict[str, Any]:
    """Add ``fd_time_rel``/``fd_time_limited``, ``fd_trunc_rel``/``fd_trunc_limited`` (NaN/False on JVP rows) and
    ``usable`` to the tables (the FD one first, K its per-sample K); returns what run.json records. A truncation
    estimate is flagged above :data:`TRUNC_LIMIT` where it stands above the rounding it carries itself (both
    differences' noise and time rounding, the half step's twice the full one's), with one warning."""
    for tab in tables:
        tab["fd_time_rel"], tab["fd_time_limited"] = np.nan, False
        tab["fd_trunc_rel"], tab["fd_trunc_limited"] = np.nan, False
    out: dict[str, Any] = {}
    if pts is not None and K is not None and time_info is not None:
        tab, rel = tables[0], time_info["rel"]
        tab["fd_time_rel"], tab["fd_time_limited"] = rel, rel > TIME_LIMIT
        est, info = truncation_rel(model, x0, noise, pts, K, scheme, batch_size)
        p = info["order"]
        own = 2**p / (2**p - 1) * 3 * (tab["fd_noise_rel"].to_numpy() + rel)
        flagged = (est > TRUNC_LIMIT) & (est > own)
        tab["fd_trunc_rel"], tab["fd_trunc_limited"] = est, flagged
        if flagged.any():
            j = int(np.nanargmax(np.where(flagged, est, np.nan)))
            log.warning(
                "%s: K at t = %g (%s) carries an estimated %.3g%% truncation error of its FD step (K(dt) against "
                "K(dt/2) on %d samples; %d of %d FD rows above %g%%, flagged in fd_trunc_limited); use a smaller "
                "`dt`, `scheme` central, or `method` jvp",
                model.name, pts.t[j], tab["method"].iloc[j], 100 * est[j], len(info["samples"]), int(flagged.sum()),
                len(est), 100 * TRUNC_LIMIT,
            )  # fmt: skip
        out = {
            "fd_time": {k: v for k, v in time_info.items() if k != "rel"},
            "fd_truncation": info | {"rows_limited": int(flagged.sum())},
        }
    for tab in tables:
        tab["usable"] = ~(tab["fd_noise_limited"].astype(bool) | tab["fd_time_limited"].astype(bool))
    return out
