"""What a probe's rows measured, in words: the plot's axis label, legend entries and title, and the summary's
speed and exact-zero lines. Everything is read from the rows (``method``, ``dt``) and the run's statistics, never
from the options, so a JVP run never reads as a finite difference and a condition-space run gives its pairs' real
spacing (docs/probe.md, "Plots and the summary")."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

# per unit τ (x = t) and per unit λ (x = lambda) of each method (lipscope.probe, lipscope.ode, lipscope.optimal)
FORMULAS: dict[str, tuple[str, str]] = {
    "fd-forward": ("E‖ε(x_t,t+Δt) − ε(x_t,t)‖ / Δτ", "E‖Δε‖ / |Δλ|"),
    "fd-central": ("E‖ε(x_t,t+Δt/2) − ε(x_t,t−Δt/2)‖ / Δτ", "E‖Δε‖ / |Δλ|"),
    "fd-condition": ("E‖ε(x_t,c_b) − ε(x_t,c_a)‖ / Δτ", "E‖Δε‖ / |Δλ|"),
    "jvp": ("E‖∂ε/∂τ‖", "E‖∂ε/∂λ‖"),
    "jvp-ode": ("E‖dε/dτ‖ along the ODE", "E‖dε/dλ‖ along the ODE"),
    "fd-ode": ("E‖Δε‖ / Δτ along the ODE", "E‖Δε‖ / |Δλ| along the ODE"),
}
REFERENCE = ("E‖∂ε*/∂τ‖ (optimal denoiser)", "E‖∂ε*/∂λ‖ (optimal denoiser)")
LIMITED = ("fd_noise_limited", "fd_time_limited", "fd_trunc_limited")  # a row flagged by any is no exact zero


def formula(method: str, x: str = "t") -> str:
    """The quantity a method's rows hold, per unit τ (``x="t"``) or per unit λ (``x="lambda"``)."""
    pair = REFERENCE if method.startswith("ref-") else FORMULAS.get(method, ("K per unit τ", "K per unit λ"))
    return pair[x == "lambda"]


def _span(v: pd.Series) -> str:
    lo, hi = float(v.min()), float(v.max())
    return f"{lo:g}" if np.isclose(lo, hi, rtol=1e-9, atol=0) else f"{lo:g}–{hi:g}"


def step(method: str, rows: pd.DataFrame) -> str:
    """How the method's rows were taken: the FD step actually used (from ``dt`` = t_b − t_a), or "exact, no Δt"."""
    if method.startswith("fd") and "dt" in rows and len(rows):
        if method == "fd-condition":
            return f"condition pairs c_b − c_a = {_span(rows['dt'])} steps apart"
        return f"Δt = {_span(rows['dt'])}"
    return "JVP, exact, no Δt" if method in ("jvp", "jvp-ode") else "exact, no Δt"


def legend(method: str, rows: pd.DataFrame, x: str = "t") -> str:
    """A legend entry: the method, what it measured and its step."""
    return f"{method}: {formula(method, x)}, {step(method, rows)}"


def y_label(df: pd.DataFrame, x: str = "t") -> str:
    """The y axis: the one method's formula, or the unit where several methods share the axis."""
    unit = "τ" if x == "t" else "λ"
    methods = list(dict.fromkeys(df["method"].astype(str)))
    if len(methods) == 1:
        return f"K per unit {unit} = {formula(methods[0], x)}"
    return f"K per unit {unit} (methods: legend)"


def title(name: str, n: int, df: pd.DataFrame) -> str:
    """The plot's title: model, samples and each method's step as the rows hold it."""
    parts = [f"{m} {step(m, d)}" for m, d in df.groupby("method", sort=False) if not str(m).startswith("ref-")]
    return f"{name}  (n={n}; {'; '.join(parts)})"


def exact_zeros(df: pd.DataFrame) -> np.ndarray:
    """Rows whose K is exactly 0 in every sample and that no limit flags (E-TSDM inside a sub-interval: the network
    is fed one condition, so FD and JVP are 0 exactly) — a finding, not noise."""
    k = df["K_max"] if "K_max" in df else df["K_mean"]
    flagged = np.zeros(len(df), dtype=bool)
    for c in LIMITED:
        if c in df:
            flagged |= df[c].fillna(False).to_numpy(dtype=bool)
    return np.asarray((k.to_numpy(dtype=np.float64) == 0) & ~flagged)


def zero_line(df: pd.DataFrame) -> str | None:
    """The summary's line on exact zeros per method (None without any)."""
    zero = exact_zeros(df)
    if not zero.any():
        return None
    m = df["method"].astype(str)
    counts = [f"{int((zero & (m == k)).sum())} of {int((m == k).sum())} {k} rows" for k in dict.fromkeys(m[zero])]
    return (
        f"{', '.join(counts)} (t = {_span(df.loc[zero, 't'])}): the network is fed one condition at both points, "
        "∂ε/∂τ = 0 there (e.g. inside an E-TSDM sub-interval); a finding, not rounding noise"
    )


def speed_line(attrs: Mapping[str, Any], methods: list[str], wall: float) -> str:
    """The summary's speed line, each count named by what it counts: FD forwards, JVP evaluations, ODE items."""
    parts = []
    if any(m.startswith("fd") and m != "fd-ode" for m in methods):
        parts.append(f"{attrs['forwards']} FD forwards ({attrs['forwards_per_s']:.1f}/s)")
    if "jvp" in methods and attrs.get("jvp_items") is not None:
        if attrs["jvp_items"] == 0:  # with jvp-ode, the jvp rows come from its first JVP
            parts.append("jvp rows: the first JVP of jvp-ode")
        else:
            rate = attrs["jvp_items"] / attrs["jvp_seconds"] if attrs.get("jvp_seconds") else float("nan")
            parts.append(f"{attrs['jvp_items']} JVP evaluations ({rate:.1f}/s)")
    if {"jvp-ode", "fd-ode"} & set(methods) and attrs.get("ode_items") is not None:
        what = ", ".join(
            w for k, w in (("jvp-ode", "JVPs of jvp-ode"), ("fd-ode", "forwards of fd-ode")) if k in methods
        )
        parts.append(f"{attrs['ode_items']} ODE network evaluations ({what})")
    return f"{'; '.join(parts) or 'no network evaluations'}; {wall:.1f} s wall"
