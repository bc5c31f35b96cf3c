"""Figures (Agg backend; library code never calls plt.show)."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402


def plot_lipschitz(df: pd.DataFrame, title: str = "", t_split: float | None = None):
    """K vs t on log-log axes (symlog in t so t = 0 shows), with the 95% CI band per method."""
    sns.set_theme(style="whitegrid", context="notebook")
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    palette = sns.color_palette("deep")
    for c, (method, d) in zip(palette, df.groupby("method", sort=False), strict=False):
        d = d.sort_values("t")
        ax.plot(d["t"], d["K_mean"], marker="o", ms=2.5, lw=1.4, color=c, label=method)
        if {"K_ci_low", "K_ci_high"} <= set(d.columns):
            lo = d["K_ci_low"].clip(lower=d["K_mean"].min() * 1e-3)
            ax.fill_between(d["t"], lo, d["K_ci_high"], color=c, alpha=0.25, lw=0, label=f"{method} 95% CI")
    ax.set_xscale("symlog", linthresh=1.0)
    ax.set_yscale("log")
    ax.set_xlabel("timestep t (model steps)")
    ax.set_ylabel("K(t) = E‖ε(x_t,t′) − ε(x_t,t)‖ / Δτ")
    if t_split is not None:
        ax.axvline(t_split, color="0.4", ls="--", lw=0.8)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def figure_png(fig) -> bytes:
    """Render a figure to PNG bytes (so it can be written atomically) and close it."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
