"""K per unit of another time axis: log-SNR λ = log(α²/σ²) (comparable across noise processes) and the process's
native time (σ for EDM), from K per unit of normalised time τ (docs/probe.md, "The estimator")."""

from __future__ import annotations

import numpy as np
import torch

from .models import EpsModel


def per_axis_factors(model: EpsModel, t_a: np.ndarray, t_b: np.ndarray) -> dict[str, np.ndarray]:
    """Per row, what turns K per unit τ into K per unit λ (log-SNR) and per unit of the native time:
    Δτ/|Δλ| for an FD pair, 1/|dλ/dτ| for a JVP point (t_a = t_b); likewise for the native time."""
    p = model.schedule
    ta, tb = (torch.as_tensor(v, dtype=torch.float64) for v in (t_a, t_b))
    dtau = (tb - ta) / model.T
    jvp = dtau == 0
    out = {}
    for axis, fn, dfn in (("lambda", p.log_snr, p.dlog_snr_dtau), ("native", p.native_time, p.dnative_dtau)):
        with np.errstate(divide="ignore", invalid="ignore"):
            d = torch.where(jvp, dfn(ta), (fn(tb) - fn(ta)) / torch.where(jvp, 1.0, dtau))
            # a point at λ = ±∞ (σ = 0 or α = 0) has no place on the λ axis: undefined (NaN), never 0
            finite = torch.isfinite(fn(ta)) & torch.isfinite(fn(tb)) & torch.isfinite(d)
            out[axis] = torch.where(finite, 1.0 / d.abs(), torch.nan).numpy()
    return out
