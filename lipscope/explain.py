"""The diagnosis of a probe table in numbers and sentences (docs/probe.md, "Diagnosis"). Pure pandas/numpy.

Every sentence is generated from a measured value with its interval, or says "n/a" with the reason: the exponent
and onset per method (:mod:`lipscope.exponent`), the share of t itself along the ODE (``jvp-ode``/``fd-ode`` rows),
where ∂ε/∂t enters the network (``attrs["attribution"]``), and the optimal denoisers' K against the network's
(``ref-*`` rows).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from .exponent import fit_exponent, onset, percentile_interval, ratio_interval, resampled_sums

NETWORK_ORDER = ("jvp", "fd-forward", "fd-central", "jvp-ode", "fd-ode", "fd-condition")


def _pct(v: float) -> str:
    return f"{100 * v:.0f} %"


def _num(v: float) -> float | None:
    return None if v is None or not math.isfinite(v) else float(v)


def _ci(v: float, lo: float, hi: float, fmt=_pct) -> str:
    """A value with its interval, or with the reason it has none."""
    if lo == lo and hi == hi:
        return f"{fmt(v)} [{fmt(lo)}, {fmt(hi)}]"
    return f"{fmt(v)} (interval n/a, because the per-sample values are not in the table)"


def method_diagnosis(df: pd.DataFrame, method: str, T: int, t_split: float, seed: int = 0) -> dict[str, Any]:
    """Exponent (with its bootstrap interval when ``attrs["K_samples"]`` is there) and onset of one method's rows."""
    rows = (df["method"] == method).to_numpy()
    d = df[rows]
    K = df.attrs.get("K_samples")
    if K is not None and K.shape[1] == len(df):
        ex = fit_exponent(d["t"].to_numpy(), K[:, rows], T, seed).as_dict()
    else:  # a table read back from lipschitz.csv: the mean only, no interval
        ex = fit_exponent(d["t"].to_numpy(), d["K_mean"].to_numpy()[None, :], T, seed).as_dict()
        ex["ci_reason"] = "the table has no per-sample K (attrs K_samples) to resample"
    t0, thr, why = onset(d["t"].to_numpy(), d["K_mean"].to_numpy(), t_split)
    return {"exponent": ex, "onset": t0, "onset_threshold": _num(thr), "onset_reason": why}


def explain(df: pd.DataFrame, T: int | None = None, t_split: float | None = None, seed: int = 0) -> dict[str, Any]:
    """The diagnosis of a probe table (``lipscope.probe``'s DataFrame, or lipschitz.csv read back): per method the
    exponent, its interval and the onset; the ODE split, the attribution and the references where the table has
    them; and ``sentences``, each generated from those numbers. ``exponent``, ``exponent_ci`` and ``onset`` are the
    first network method's (what run.json's ``summary`` carries)."""
    T = int(T if T is not None else df.attrs.get("T", 1000))
    t_split = T / 10 if t_split is None else float(t_split)
    methods = [m for m in pd.unique(df["method"]) if not str(m).startswith("ref-")]
    per = {m: method_diagnosis(df, m, T, t_split, seed) for m in pd.unique(df["method"])}
    out: dict[str, Any] = {"t_split": t_split, "methods": per, "sentences": []}
    first = methods[0] if methods else None
    if first is not None:
        e = per[first]["exponent"]
        out |= {
            "method": first,
            "exponent": _num(e["p"]),
            "exponent_ci": [_num(e["ci_low"]), _num(e["ci_high"])],
            "exponent_range": [_num(e["t_lo"]), _num(e["t_hi"])],
            "onset": per[first]["onset"],
        }
    for m in methods:
        out["sentences"] += _method_sentences(m, per[m], t_split)
    out["ode"] = _ode(df, seed)
    out["sentences"] += out["ode"].pop("sentences")
    if isinstance(df.attrs.get("attribution"), pd.DataFrame):
        out["attribution"] = _attribution(df.attrs["attribution"], t_split, seed)
        out["sentences"] += out["attribution"].pop("sentences")
    out["reference"] = _reference(df, methods, seed)
    out["sentences"] += out["reference"].pop("sentences")
    return out


def _method_sentences(m: str, d: dict[str, Any], t_split: float) -> list[str]:
    e = d["exponent"]
    if e["reason"]:
        s = [f"{m}: exponent n/a, because {e['reason']}"]
    else:
        ci = (
            f" [{e['ci_low']:.2f}, {e['ci_high']:.2f}]"
            if e["ci_low"] == e["ci_low"]
            else f" (interval n/a, because {e.get('ci_reason') or 'no resample gave a slope'})"
        )
        s = [f"{m}: K ∝ τ^{e['p']:.2f}{ci} for t in [{e['t_lo']:g}, {e['t_hi']:g}]"]
    if d["onset"] is not None:
        s.append(f"{m}: onset t = {d['onset']:g} (K > 3× the median over t ≥ {t_split:g}, {d['onset_threshold']:.4g})")
    else:
        s.append(f"{m}: onset n/a, because {d['onset_reason']}")
    return s


def _ode(df: pd.DataFrame, seed: int = 0) -> dict[str, Any]:
    """Per ODE method: K_partial/K_total and the share of t at each grid t, with bootstrap intervals over samples
    where the per-sample values are there (``attrs["ode_samples"]``); a sentence at the smallest t > 0."""
    out: dict[str, Any] = {"sentences": []}
    for m in ("jvp-ode", "fd-ode"):
        d = df[df["method"] == m]
        if d.empty:
            continue
        nan = np.full(len(d), np.nan)
        r_lo, r_hi, s_lo, s_hi = nan, nan, nan, nan
        v = (df.attrs.get("ode_samples") or {}).get(m)
        if v is not None and v.shape[1] == len(d) and v.shape[0] > 1:  # (n, G, 5) in the rows' order
            r_lo, r_hi = ratio_interval(v[:, :, 1], v[:, :, 0], seed)
            s_lo, s_hi = ratio_interval(v[:, :, 3], v[:, :, 4], seed)
        order = np.argsort(d["t"].to_numpy(), kind="stable")
        d = d.iloc[order]
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = d["K_partial"].to_numpy() / d["K_mean"].to_numpy()
        out[m] = {
            "t": d["t"].tolist(),
            "K_partial_over_K_total": ratio.tolist(),
            "K_partial_over_K_total_ci": [r_lo[order].tolist(), r_hi[order].tolist()],
            "t_share": d["t_share"].tolist(),
            "t_share_ci": [s_lo[order].tolist(), s_hi[order].tolist()],
        }
        pos = np.flatnonzero(d["t"].to_numpy() > 0)
        if not pos.size:
            out["sentences"].append(f"{m}: along the ODE n/a, because the grid has no t > 0")
            continue
        i = int(pos[0])
        r, j = d.iloc[i], order[i]
        share = "n/a, because dε/dt = 0 there" if r["t_share"] != r["t_share"] else _ci(r["t_share"], s_lo[j], s_hi[j])
        rat = (
            _ci(ratio[i], r_lo[j], r_hi[j], lambda x: f"{x:.3g}")
            if math.isfinite(ratio[i])
            else "n/a, because K_total = 0 there"
        )
        out["sentences"].append(
            f"{m}: along the ODE at t = {r['t']:g}, K_total = {r['K_mean']:.4g} [{r['K_ci_low']:.4g}, "
            f"{r['K_ci_high']:.4g}] against K_partial = {r['K_partial']:.4g} at fixed x (K_partial/K_total = {rat}); "
            f"t itself carries {share} of dε/dt (⟨∂ε/∂t, dε/dt⟩/‖dε/dt‖²)"
        )
    return out


def _attribution(att: pd.DataFrame, t_split: float, seed: int = 0) -> dict[str, Any]:
    """The parts ranked by their mean share over grid t < t_split where ∂ε/∂t ≠ 0, with a bootstrap interval over
    samples of that mean (``attrs["share_samples"]``: per-sample ⟨J_c, J⟩ (n, G, P) and ‖J‖² (n, G))."""
    parts = att[att["kind"].isin(["part", "outside"])]
    low = parts[(parts["t"] < t_split) & parts["share"].notna()]
    if low.empty:
        why = f"∂ε/∂t is 0 at every grid t < {t_split:g} (or there is none)"
        return {"top": [], "reason": why, "sentences": [f"attribution: n/a, because {why}"]}
    mean = low.groupby("part", sort=False)["share"].mean().sort_values(ascending=False)
    names = list(parts["part"].drop_duplicates())  # the parts in the order of share_samples' last axis
    ts = pd.unique(parts["t"])  # the grid in the order of share_samples' second axis
    cis: dict[str, tuple[float, float]] = {}
    smp = att.attrs.get("share_samples")
    if smp is not None and smp[0].shape[1:] == (len(ts), len(names)) and smp[0].shape[0] > 1:
        keep = np.isin(ts, low["t"].unique())
        inner, norm2 = resampled_sums(seed, smp[0][:, keep], smp[1][:, keep])  # (B, g, P), (B, g)
        with np.errstate(divide="ignore", invalid="ignore"):
            lo, hi = percentile_interval((inner / norm2[:, :, None]).mean(1))  # (P,) each
        cis = {p: (float(lo[k]), float(hi[k])) for k, p in enumerate(names)}
    top = [(str(p), float(s)) for p, s in mean.head(3).items()]
    n_t = low["t"].nunique()
    text = ", ".join(f"{p} {_ci(s, *cis.get(p, (math.nan, math.nan)))}" for p, s in top)
    return {
        "top": top,
        "top_ci": [list(cis.get(p, (math.nan, math.nan))) for p, _ in top],
        "over": f"{n_t} grid points t < {t_split:g}",
        "sentences": [f"attribution: ∂ε/∂t enters through {text} (mean share over {n_t} grid points t < {t_split:g})"],
    }


def _reference(df: pd.DataFrame, methods: list[str], seed: int = 0) -> dict[str, Any]:
    """K of each optimal denoiser over the network's (the first of jvp, fd, …) at every grid t, with a bootstrap
    interval over the (shared) samples of that ratio of means where ``attrs["K_samples"]`` is there."""
    out: dict[str, Any] = {"sentences": []}
    net = next((m for m in NETWORK_ORDER if m in methods), methods[0] if methods else None)
    if net is None:
        return out
    base = df[df["method"] == net].set_index("t")
    K = df.attrs.get("K_samples")
    cols = {m: np.flatnonzero((df["method"] == m).to_numpy()) for m in pd.unique(df["method"])}
    for ref in [m for m in pd.unique(df["method"]) if str(m).startswith("ref-")]:
        r = df[df["method"] == ref].set_index("t")
        common = r.index.intersection(base.index).sort_values()
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = (r.loc[common, "K_mean"] / base.loc[common, "K_mean"]).to_numpy()
        lo = hi = np.full(len(common), np.nan)
        if K is not None and K.shape[1] == len(df) and K.shape[0] > 1 and len(common):
            ci, cn = (cols[m][pd.Index(df["t"].to_numpy()[cols[m]]).get_indexer(common)] for m in (ref, net))
            lo, hi = ratio_interval(K[:, ci], K[:, cn], seed)
        out[ref] = {"against": net, "t": [float(t) for t in common], "ratio": ratio.tolist()}
        out[ref]["ratio_ci"] = [lo.tolist(), hi.tolist()]
        if not len(common):
            out["sentences"].append(f"{ref}: n/a, because it shares no grid t with {net}")
            continue
        t0, k = float(common[0]), float(ratio[0])
        a, b = r.loc[t0], base.loc[t0]
        what = (
            f"{_ci(k, lo[0], hi[0], lambda x: f'{x:.3g}×')} the network's"
            if math.isfinite(k)
            else "n/a times the network's, because the network's K is 0 there"
        )
        out["sentences"].append(
            f"{ref}: at t = {t0:g} the optimal denoiser's K = {a['K_mean']:.4g} [{a['K_ci_low']:.4g}, "
            f"{a['K_ci_high']:.4g}] is {what} ({net}: {b['K_mean']:.4g} [{b['K_ci_low']:.4g}, {b['K_ci_high']:.4g}])"
        )
    return out
