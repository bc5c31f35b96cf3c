"""Figures of a ground-truth run (``lipscope groundtruth``): sampler error against NFE, network error and K against t.
Figure objects, drawn in the style of :mod:`lipscope.plots` (no global state changed)."""

from __future__ import annotations

import matplotlib.ticker
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from .plots import _t_axes, _themed

STYLE = {"base": ("C0", "-"), "control": ("C1", "-"), "etsdm": ("C2", "-"), "eps*": ("0.3", "--")}


@_themed
def plot_sampler_error(samp: pd.DataFrame, title: str = "") -> Figure:
    """One panel per sampler: ‖x̂0 − x0(exact ODE)‖/√D against NFE per model (mean over seeds; the band spans the
    seeds' 95 % intervals over samples), and the ε*-driven sampler's (the discretisation error) dashed."""
    samplers = list(dict.fromkeys(samp["sampler"]))
    fig = Figure(figsize=(4.2 * len(samplers), 3.8), dpi=110)
    axes = np.atleast_1d(fig.subplots(1, len(samplers), squeeze=False)[0])
    for ax, s in zip(axes, samplers, strict=True):
        d = samp[samp["sampler"] == s]
        for (arch, variant), g in d.groupby(["arch", "variant"], sort=False):
            m = g.groupby("nfe").agg(
                mean=("total_mean", "mean"), lo=("total_ci_low", "min"), hi=("total_ci_high", "max")
            )
            color, ls = STYLE.get(variant, ("C3", "-"))
            label = "ε* (discretisation)" if variant == "eps*" else f"{arch} {variant}"
            ax.plot(m.index, m["mean"], ls, color=color, marker="o", ms=3, label=label)
            ax.fill_between(m.index, m["lo"], m["hi"], color=color, alpha=0.15, lw=0)
        ax.set_xscale("log")
        ax.set_yscale("log")
        nfes = sorted(set(d["nfe"]))
        ax.set_xticks(nfes, [str(int(v)) for v in nfes])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_xlabel("NFE")
        ax.set_title(s)
    axes[0].set_ylabel("‖x̂0 − x0(exact ODE)‖ / √D")
    axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


@_themed
def plot_network_error(net: pd.DataFrame, boundaries: list[float], title: str = "") -> Figure:
    """E‖εθ − ε*‖²/D against t per model (mean over seeds), and K(t) of each network against K of ε* on the same
    x_t; E-TSDM's sub-interval boundaries dotted."""
    fig = Figure(figsize=(11, 4), dpi=110)
    ax1, ax2 = fig.subplots(1, 2)
    for (arch, variant), g in net.groupby(["arch", "variant"], sort=False):
        m = g.groupby("t")[["eps_mse_mean", "K_net_mean", "K_exact_mean"]].mean()
        color, ls = STYLE.get(variant, ("C3", "-"))
        ax1.plot(m.index, m["eps_mse_mean"], ls, color=color, marker="o", ms=2, label=f"{arch} {variant}")
        k = m["K_net_mean"].where(m["K_net_mean"] > 0)
        ax2.plot(m.index, k, ls, color=color, marker="o", ms=2, label=f"{arch} {variant}")
    ex = net.groupby("t")["K_exact_mean"].mean()
    ax2.plot(ex.index, ex.where(ex > 0), "--", color="0.3", label="ε*")
    for ax in (ax1, ax2):
        _t_axes(ax)
        for b in boundaries[1:]:
            ax.axvline(b, color="0.6", ls=":", lw=0.8)
        ax.set_xlabel("t (model steps)")
    ax1.set_ylabel("E‖εθ − ε*‖² / D")
    ax2.set_ylabel("K(t) per unit τ")
    ax2.set_title("network vs ε* on the same x_t (E-TSDM: K = 0 inside sub-intervals, not drawn)", fontsize=8)
    ax1.set_title("network error", fontsize=8)
    ax1.legend(fontsize=7)
    ax2.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig
