"""The step budget and the training coverage drawn on the K(t) figure (markers and a shaded density)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import seaborn as sns


def mark_steps(fig, steps: pd.DataFrame | None = None, density: pd.Series | None = None, label: str = "") -> None:
    """On ``fig`` (:func:`lipscope.plots.plot_lipschitz` against t): each sampler's step boundaries as ticks along
    the top of the axes (one row per sampler, the largest-budget step's interval highlighted), and the training
    timestep density (mass per model step) shaded under the curve on a second y axis."""
    ax = fig.axes[0]
    colors = sns.color_palette("dark")
    if steps is not None and len(steps):
        for i, (name, d) in enumerate(steps.groupby("sampler", sort=False)):
            y = 0.97 - 0.05 * i
            c = colors[(i + 3) % len(colors)]
            tr = ax.get_xaxis_transform()
            xs = np.maximum(np.r_[d["t_from"].to_numpy(), d["t_to"].iloc[-1]], 0)  # t < 0 (clean) drawn at 0
            ax.plot(xs, np.full(len(xs), y), "|", ms=7, mew=1.2, color=c, transform=tr, label=f"{name} steps")
            big = d.loc[d["budget"].idxmax()]
            ax.plot([max(big["t_to"], 0), big["t_from"]], [y, y], lw=3, color=c, alpha=0.6, transform=tr)
    if density is not None and len(density):
        ax2 = ax.twinx()
        t = density.index.to_numpy(np.float64)
        ax2.fill_between(t, 0, density.to_numpy(), step="mid", color="0.5", alpha=0.25, lw=0,
                         label=f"training timesteps ({label})")  # fmt: skip
        ax2.set_ylim(bottom=0)
        ax2.set_ylabel("training mass per step", fontsize=8)
        ax2.tick_params(labelsize=7)
        h1, l1 = ax.get_legend_handles_labels()
        h2, l2 = ax2.get_legend_handles_labels()
        ax.legend(h1 + h2, l1 + l2, fontsize=7)
    elif steps is not None and len(steps):
        ax.legend(fontsize=7)
