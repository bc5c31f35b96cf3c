"""The paired comparisons of a ground-truth run and the sentences its summary prints, each generated from a measured
value and its interval (:func:`lipscope.groundtruth.describe_diff`)."""

from __future__ import annotations

from typing import Any

import pandas as pd

from ..groundtruth import describe_diff, paired

PAIRS = (("etsdm", "control"), ("etsdm", "base"), ("control", "base"))


def paired_tables(samp: pd.DataFrame, dist: pd.DataFrame, band: pd.DataFrame) -> pd.DataFrame:
    """paired.csv: differences a − b per seed between models (E-TSDM − control, E-TSDM − base, control − base), mean
    and Student-t 95 % interval over seeds, for sampler error, distribution error and network error bands."""
    keys = ["arch", "sampler", "nfe"]
    parts = [paired(samp, keys, m, PAIRS).assign(table="sampler_error") for m in ("total_mean", "net_mean")]
    parts += [paired(dist[dist["arch"] != "exact"], keys, m, PAIRS).assign(table="distribution")
              for m in ("nll_mean", "swd")]  # fmt: skip
    cols = [c for c in band.columns if c.startswith("eps_mse_")]
    parts += [paired(band, ["arch"], m, PAIRS).assign(table="network_error") for m in cols]
    parts = [p for p in parts if not p.empty]
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


def summary_lines(pair: pd.DataFrame, band: pd.DataFrame, o: Any) -> list[str]:
    """What the run measured, one sentence per comparison (E-TSDM against its control, or against the base when
    there is no control)."""
    if pair.empty:
        return ["one model per seed: no paired comparison (train base and etsdm, and control for a fine-tune)"]
    b = "control" if "control" in o.train else "base"
    lines = []
    pick = pair[(pair["a"] == "etsdm") & (pair["b"] == b)]
    for _, r in pick[pick["table"] == "sampler_error"].iterrows():
        what = "sampler error" if r["metric"] == "total_mean" else "network share of the sampler error"
        lines.append(f"{r['arch']} {r['sampler']} {int(r['nfe'])} NFE, {what}: {describe_diff(r)}")
    for _, r in pick[pick["table"] == "network_error"].iterrows():
        lines.append(f"{r['arch']} network error {r['metric'].removeprefix('eps_mse_')}: {describe_diff(r)}")
    for _, r in pick[pick["table"] == "distribution"].iterrows():
        what = "NLL per dim under the true density" if r["metric"] == "nll_mean" else "sliced Wasserstein"
        lines.append(f"{r['arch']} {r['sampler']} {int(r['nfe'])} NFE, {what}: {describe_diff(r)}")
    for _, r in band.iterrows():
        lines.append(
            f"{r['arch']}-{r['variant']}-s{r['seed']}: slope of log K against log t over [1, t̃): network "
            f"{_slope(r['K_net_exponent_below'], r['variant'])}, ε* {_slope(r['K_exact_exponent_below'], '')}"
        )
    return lines


def _slope(v: float, variant: str) -> str:
    if v == v:
        return f"{v:.3g}"
    return "n/a (K = 0 inside the E-TSDM sub-intervals)" if variant == "etsdm" else "n/a (K not > 0 on [1, t̃))"
