"""Per-sample values → statistics: mean, spread and Student-t intervals; the singularity summary.

Pure functions on arrays and tables (no model, no torch).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats as st

from .errors import InputError


def summarize_samples(values: np.ndarray, confidence: float = 0.95) -> dict[str, np.ndarray]:
    """Mean, std (ddof=1), s.e.m. and Student-t CI over axis 0 of an (n, G) array."""
    v = np.asarray(values, dtype=np.float64)
    n = v.shape[0]
    mean = v.mean(axis=0)
    std = v.std(axis=0, ddof=1) if n > 1 else np.full_like(mean, np.nan)
    sem = std / np.sqrt(n)
    q = st.t.ppf(0.5 + confidence / 2, df=n - 1) if n > 1 else np.nan
    return {"mean": mean, "std": std, "sem": sem, "ci_low": mean - q * sem, "ci_high": mean + q * sem}


def check_t_split(t_split: float | None, T: int) -> None:
    """The summary's split must lie strictly inside the schedule."""
    if t_split is not None and not (math.isfinite(t_split) and 0 < t_split < T):
        raise InputError(f"`t_split` must lie inside (0, {T}) (got {t_split}); leave it out for T/10")


def summary(df: pd.DataFrame, T: int, t_split: float | None = None, method: str | None = None) -> dict[str, Any]:
    """Peak K and its t, median K over t ≥ t_split, and the singularity ratio, over the usable rows.

    ``t_split`` defaults to T/10 (= 100 for T = 1000, the paper's t̃). Ratio = mean K over t < t_split
    divided by median K over t ≥ t_split. Rows flagged unusable (``usable`` False: limited by rounding noise or
    by the network's time resolution, :mod:`lipscope.fd`) never enter it: ``excluded_rows`` counts them, and a
    statistic with no usable row is NaN.
    """
    check_t_split(t_split, T)
    t_split = T / 10 if t_split is None else t_split
    method = df["method"].iloc[0] if method is None else method
    df = df[df["method"] == method]
    usable = df["usable"].astype(bool).to_numpy() if "usable" in df else np.ones(len(df), dtype=bool)
    k = df["K_mean"].to_numpy()[usable]
    t = df["t"].to_numpy()[usable]
    i = int(np.nanargmax(k)) if k.size and not np.isnan(k).all() else None
    low, high = k[t < t_split], k[t >= t_split]
    med_hi = float(np.median(high)) if high.size else float("nan")
    mean_lo = float(np.mean(low)) if low.size else float("nan")
    return {
        "method": method,
        "peak_K": float(k[i]) if i is not None else float("nan"),
        "peak_t": float(t[i]) if i is not None else float("nan"),
        "excluded_rows": int((~usable).sum()),
        "t_split": float(t_split),
        "median_K_above": med_hi,
        "mean_K_below": mean_lo,
        "singularity_ratio": mean_lo / med_hi if med_hi and math.isfinite(med_hi) and med_hi > 0 else float("nan"),
    }
