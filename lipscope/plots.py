"""Figures as ``matplotlib.figure.Figure`` objects: no pyplot, so no backend is chosen or changed and no
figure is left registered; the seaborn style applies inside each function only (:func:`_themed`)."""

from __future__ import annotations

import functools
import io
import logging
import warnings
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import matplotlib.ticker
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

from . import labels

log = logging.getLogger("lipscope")
P = ParamSpec("P")
R = TypeVar("R")


def _themed(fn: Callable[P, R]) -> Callable[P, R]:
    """Draw inside seaborn's whitegrid/notebook style, restored afterwards (no global theme change)."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        with sns.axes_style("whitegrid"), sns.plotting_context("notebook"), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # matplotlib's glyph/log-scale notes are not the user's
            return fn(*args, **kwargs)

    return wrapper


def _t_axes(ax) -> None:
    """Timestep on a symlog x axis starting at 0 (so t = 0 shows), K on a log y axis."""
    ax.set_xscale("symlog", linthresh=1.0)
    ax.set_xlim(left=0)
    ax.set_yscale("log")


@_themed
def plot_lipschitz(
    df: pd.DataFrame,
    title: str = "",
    t_split: float | None = None,
    x: str = "t",
    fits: dict | None = None,
    marks: dict[str, float] | None = None,
):
    """K vs t on log-log axes (symlog in t so t = 0 shows), with the 95% CI band per method; the optimal denoisers'
    rows (``ref-*``) dashed. Legend entries and the y axis say what each method measured and with which step
    (:mod:`lipscope.labels`); rows with K = 0 exactly (E-TSDM inside a sub-interval) are drawn as markers on the
    axis floor, counted in the legend.

    ``x="lambda"``: K per unit of log-SNR λ = log(α²/σ²) (``K_per_lambda`` columns), the axis on which
    models of different noise processes compare; low noise (small t) is on the right. ``fits`` (method →
    :func:`lipscope.explain.method_diagnosis`): each method's fitted power law drawn over its range (``x="t"``).
    ``marks`` (label → position on the x axis, e.g. t_split and E-TSDM's t̃, as λ for ``x="lambda"``): dashed
    vertical lines; ``t_split`` alone draws one unlabelled line (``x="t"``)."""
    if x not in ("t", "lambda"):
        raise ValueError(f"x must be t or lambda, got {x!r}")
    xcol, k = ("t", "K") if x == "t" else ("lambda", "K_per_lambda")
    fig = Figure(figsize=(7, 4.2), dpi=120)
    ax = fig.subplots()
    palette = sns.color_palette("deep")
    undrawn = int((~np.isfinite(df[xcol])).sum())
    if undrawn:  # e.g. flow's σ = 0 at t = 0: λ = +∞
        log.warning("%d rows at %s = ±∞ have no place on the plot's axis; they are in lipschitz.csv", undrawn, xcol)
    zeros = []
    for c, (method, d) in zip(palette, df.groupby("method", sort=False), strict=False):
        d = d[np.isfinite(d[xcol])].sort_values(xcol)
        mean = d[f"{k}_mean" if k == "K" else k]
        ref = str(method).startswith("ref-")
        ax.plot(d[xcol], mean, marker="" if ref else "o", ms=2.5, lw=1.4, color=c, ls="--" if ref else "-",
                label=labels.legend(str(method), d, x))  # fmt: skip
        zeros.append((c, method, d.loc[labels.exact_zeros(d), xcol]))
        e = (fits or {}).get(method, {}).get("exponent") if x == "t" else None
        if e and not e.get("reason"):
            tt = np.geomspace(e["t_lo"], e["t_hi"], 20)
            ci = f" [{e['ci_low']:.2f}, {e['ci_high']:.2f}]" if e["ci_low"] == e["ci_low"] else ""
            ax.plot(tt, np.exp(e["intercept"]) * (tt / df.attrs.get("T", 1000)) ** e["p"], color=c, lw=3, alpha=0.35,
                    label=f"{method}: τ^{e['p']:.2f}{ci}")  # fmt: skip
        if {f"{k}_ci_low", f"{k}_ci_high"} <= set(d.columns):
            lo = d[f"{k}_ci_low"].clip(lower=mean.min() * 1e-3)
            ax.fill_between(d[xcol], lo, d[f"{k}_ci_high"], color=c, alpha=0.25, lw=0, label=f"{method} 95% CI")
    if x == "t":
        _t_axes(ax)
        ax.set_xlabel("timestep t (model steps)")
        if t_split is not None and not marks:
            ax.axvline(t_split, color="0.4", ls="--", lw=0.8)
    else:
        ax.set_yscale("log")
        ax.set_xlabel("log-SNR λ = log(α²/σ²)   → less noise (small t on the right)")
    for (label, pos), ls in zip((marks or {}).items(), ("--", "-.", ":"), strict=False):
        ax.axvline(pos, color="0.4", ls=ls, lw=0.9, label=label)
    ax.set_ylabel(labels.y_label(df, x))
    _floor_marks(ax, zeros)
    ax.set_title(title, fontsize=10)
    if len(ax.get_legend_handles_labels()[1]) > 6 or any(len(t) > 60 for t in ax.get_legend_handles_labels()[1]):
        fig.set_size_inches(11, 4.2)  # the diagnosis' fits and references, the methods' formulas: beside the axes
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    else:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _floor_marks(ax, zeros: list) -> None:
    """Rows with K = 0 exactly cannot sit on a log axis: a triangle per row on the axis floor, one legend entry per
    method with their count."""
    if not any(len(z) for _, _, z in zeros):
        return
    if not ax.has_data() or ax.get_ylim()[0] <= 0 or not np.isfinite(ax.get_ylim()).all():
        ax.set_ylim(1e-3, 1.0)  # every drawn value is 0: the axis has no data range of its own
    floor = ax.get_ylim()[0]
    ax.set_ylim(bottom=floor)  # fixed, so the markers stay on the floor
    many = sum(len(z) > 0 for _, _, z in zeros) > 1
    for c, method, z in zeros:
        if len(z):
            what = f"{method}: " if many else ""
            ax.scatter(z, np.full(len(z), floor), marker="v", s=28, color=c, clip_on=False, zorder=6,
                       label=f"{what}K = 0 exactly ({len(z)} points)")  # fmt: skip


def figure_png(fig) -> bytes:
    """Render a figure to PNG bytes (so it can be written atomically) and close it."""
    buf = io.BytesIO()
    with warnings.catch_warnings():  # missing glyphs (e.g. emoji in a model name) only change how text looks
        warnings.simplefilter("ignore", UserWarning)
        fig.savefig(buf, format="png")
    return buf.getvalue()


@_themed
def plot_theory(df: pd.DataFrame, title: str = "", exponent: dict | None = None):
    """Closed forms vs estimators against t (log-log; t = 0 drawn at symlog origin); with ``exponent``
    (:func:`lipscope.theory.theory_exponents`), the JVP's fitted power law and the closed form's band in the legend."""
    fig = Figure(figsize=(7.5, 4.6), dpi=120)
    ax = fig.subplots()
    t = df["t"]
    series = [
        ("K_fd_exact_rms", "FD on ε*, exact RMS", "-", 2.0),
        ("K_fd_mc", "FD on ε*, Monte Carlo mean", "--", 1.2),
        ("dtau_exact_rms", "‖∂ε*/∂τ‖ RMS (closed form)", "-", 2.0),
        ("dtau_jvp", "‖∂ε*/∂τ‖ by JVP (mean)", ":", 1.6),
        ("term1_rms", "Theorem 3.1 term 1 (α/σ)α′∇log q", "-.", 1.2),
        ("term2_rms", "Theorem 3.1 term 2 −σ∂τ∇log q", "-.", 1.2),
    ]
    series += [(c, c.replace("_", " "), "-", 1.0) for c in df.columns if c.startswith(("K_fd_toy", "dtau_jvp_toy"))]
    pal = sns.color_palette("deep", len(series))
    for (col, label, ls, lw), c in zip(series, pal, strict=True):
        if col in df and df[col].notna().any():
            y = df[col].where(df[col] > 0)  # exact zeros (E-TSDM inside a sub-interval) cannot sit on a log axis
            ax.plot(t, y, ls=ls, lw=lw, color=c, label=label, marker="." if "toy" in col else None, ms=3)
    if {"K_fd_ci_low", "K_fd_ci_high"} <= set(df.columns):
        ax.fill_between(t, df["K_fd_ci_low"], df["K_fd_ci_high"], color=pal[1], alpha=0.2, lw=0)
    if "dtau_jvp_fit" in df and df["dtau_jvp_fit"].notna().any() and exponent is not None:
        e, cf = exponent["jvp"], exponent["closed_form"]
        band = f"; band [{cf['band'][0]:.2f}, {cf['band'][1]:.2f}]" if cf["band"][0] == cf["band"][0] else ""
        ax.plot(t, df["dtau_jvp_fit"], color="k", lw=2.2, alpha=0.5,
                label=f"fit τ^p, p = {e['p']:.3f} [{e['ci_low']:.3f}, {e['ci_high']:.3f}]{band}")  # fmt: skip
    if "sigma" in df and (df["sigma"] > 0).all():
        guide = df["term1_rms"].iloc[0] * df["sigma"].iloc[0] / df["sigma"]  # pinned at the first t
        near = t <= 0.1 * t.max()
        ax.plot(t[near], guide[near], color="0.3", lw=0.8, ls=(0, (1, 3)), label="∝ 1/σ_t (≈ (t+1)^−1/2 near 0)")
    _t_axes(ax)
    ax.set_xlabel("timestep t (model steps)")
    ax.set_ylabel("per unit τ")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    return fig


@_themed
def plot_attribution(att: pd.DataFrame, title: str = ""):
    """attribution.csv as a heatmap: the share of ∂ε/∂t of each part (rows) at each grid t (columns), and the
    embedding's ‖∂e/∂τ‖ per t beside it."""
    parts = att[att["kind"].isin(["part", "outside"])]
    grid = parts.pivot_table(index="part", columns="t", values="share", sort=False)
    emb = att[att["kind"] == "embedding"]
    fig = Figure(figsize=(min(14, 4 + 0.35 * grid.shape[1]), 2 + 0.3 * grid.shape[0] + 2.2), dpi=110)
    ax, ax2 = fig.subplots(2, 1, gridspec_kw={"height_ratios": [max(2, grid.shape[0]), 2]})
    lim = float(np.nanmax(np.abs(grid.to_numpy()))) if np.isfinite(grid.to_numpy()).any() else 1.0
    im = ax.imshow(grid.to_numpy(), aspect="auto", cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
    ax.grid(False)
    ax.set_yticks(range(grid.shape[0]), [str(p) for p in grid.index], fontsize=7)
    ax.set_xticks(range(grid.shape[1]), [f"{t:g}" for t in grid.columns], fontsize=6, rotation=90)
    ax.set_xlabel("grid t (model steps); white: ∂ε/∂t = 0 (no share)")
    ax.set_title(f"{title}: share of ∂ε/∂t per part, ⟨J_c, J⟩/‖J‖²".strip(": "), fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.03)
    for name, d in emb.groupby("part", sort=False):
        ax2.plot(d["t"], d["K_part"], marker=".", label=str(name).removeprefix("embedding "))
    _t_axes(ax2)
    ax2.set_xlabel("timestep t")
    ax2.set_ylabel("‖∂e/∂τ‖", fontsize=8)
    if not emb.empty:
        ax2.legend(fontsize=7)
    fig.tight_layout()
    return fig


@_themed
def plot_eval(summary: pd.DataFrame, metrics=("fd_digits", "kid_digits", "fd_pixel", "swd_pixel")):
    """Metric vs number of sampling steps, one panel per metric (its unit on the y-axis), a line per (model spec,
    scheduler); the step counts are the only x labels (no log-axis minor labels to collide)."""
    fig = Figure(figsize=(4.2 * len(metrics), 3.8), dpi=110)
    axes = fig.subplots(1, len(metrics))
    label = "spec" if "spec" in summary.columns else "model"
    for ax, met in zip(np.atleast_1d(axes), metrics, strict=True):
        for (model, spec, sch), d in summary.groupby(["model", label, "scheduler"], sort=False):
            d = d.sort_values("steps")
            ax.errorbar(
                d["steps"],
                d[f"{met}_mean"],
                yerr=d[f"{met}_std"],
                marker="o",
                ms=3,
                capsize=2,
                label=f"{spec} · {sch}",
                ls="-" if "base" not in model else "--",
            )
        ax.set_xscale("log")
        ax.set_xticks(sorted(summary["steps"].unique()))
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.get_xaxis().set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("sampling steps")
        ax.set_ylabel(_eval_unit(met), fontsize=8)
        ax.set_title(met.replace("_", " "), fontsize=10)
    np.atleast_1d(axes)[0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def _eval_unit(metric: str) -> str:
    """What an evaluate metric is measured in (its y-axis label)."""
    kind, _, space = metric.partition("_")
    return {
        "fd": "Fréchet distance (squared pixel units)" if space == "pixel" else f"Fréchet distance ({space} features²)",
        "kid": f"KID (unbiased MMD², cubic kernel on {space} features)",
        "swd": "sliced Wasserstein (pixel values in [−1, 1])",
        "fid": "FID (Inception-v3 pool features²)",
    }.get(kind, metric)


@_themed
def plot_compare(runs: dict[str, pd.DataFrame], boundaries: list[float] | None = None, title: str = ""):
    """Overlay K(t) of several probe runs (first method of each), with E-TSDM boundaries marked."""
    fig = Figure(figsize=(7.5, 4.4), dpi=120)
    ax = fig.subplots()
    for c, (name, df) in zip(sns.color_palette("deep", len(runs)), runs.items(), strict=True):
        for method, d in df.groupby("method", sort=False):
            d = d.sort_values("t")
            y = d["K_mean"].where(d["K_mean"] > 0)
            ls = "-" if method.startswith("fd") and method != "fd-condition" else ("--" if method == "jvp" else ":")
            ax.plot(d["t"], y, color=c, ls=ls, marker="o", ms=2.5, lw=1.3, label=f"{name} ({method})")
            if "crosses_boundary" in d and d["crosses_boundary"].any():
                b = d[d["crosses_boundary"]]
                ax.scatter(b["t"], b["K_mean"], color=c, marker="x", s=30, zorder=5)
    for b in boundaries or []:
        ax.axvline(b, color="0.5", lw=0.7, ls=":")
    _t_axes(ax)
    ax.set_xlabel("timestep t (model steps); dotted: E-TSDM boundaries, ×: Δt crosses one")
    ax.set_ylabel("K(t)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
