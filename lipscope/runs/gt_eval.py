"""The measurements of a ground-truth run, item by item through its journal (a killed run continues where it
stopped), and the tables they make: network_error.csv, sampler_error.csv, distribution.csv, paired.csv."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch

from .. import rng, solvers
from ..etsdm import Etsdm
from ..exactode import pf_ode_endpoint
from ..gaussian import GaussianMixture
from ..groundtruth import (
    eval_points,
    exponent,
    lipschitz_pair,
    network_error,
    nll_per_dim,
    per_sample_rms,
    stats_row,
    swd,
)
from ..journal import Journal
from ..mixtures import TRUE_SET, TRUE_SET_2, draw
from ..models import EpsModel
from ..reduction import summarize_samples

ODE_CHECK = 16  # samples re-solved at 100× tighter tolerances: the endpoint's accuracy, measured


def _label(*parts: Any) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "_", "-".join(str(p) for p in parts))


@dataclass
class Cache:
    """Items of the run's journal: finished ones read back, the others computed in blocks of ``batch`` and kept."""

    journal: Journal
    computed: list[str] = field(default_factory=list)

    def rows(self, label: str, n: int, batch: int, compute: Callable[[int, int], torch.Tensor]) -> torch.Tensor:
        idx, vals = self.journal.done(label)
        have = torch.zeros(n, dtype=torch.bool)
        out = None
        if idx.numel():
            out = torch.empty((n, *vals.shape[1:]), dtype=vals.dtype)
            out[idx], have[idx] = vals, True
        for lo in range(0, n, batch):
            hi = min(n, lo + batch)
            if bool(have[lo:hi].all()):
                continue
            v = compute(lo, hi).detach().cpu()
            if out is None:
                out = torch.empty((n, *v.shape[1:]), dtype=v.dtype)
            out[lo:hi] = v
            self.journal.add(label, torch.arange(lo, hi), v)
            self.computed.append(label)
        assert out is not None
        return out


@dataclass
class SeedResults:
    """Everything measured for one replicate seed (per-sample arrays), keyed by model name."""

    seed: int
    starts: dict[tuple[str, int], float]  # (sampler, nfe) → start step
    calls: dict[tuple[str, int], int]
    ode: dict[float, torch.Tensor]
    ode_check: dict[float, float]
    exact: dict[tuple[str, int], torch.Tensor]
    samples: dict[str, dict[tuple[str, int], torch.Tensor]]
    neterr: dict[str, np.ndarray]  # (n, G)
    k_net: dict[str, np.ndarray]  # (G, 3): mean, ci_low, ci_high
    k_exact: np.ndarray


def evaluate_seed(
    seed: int,
    g: GaussianMixture,
    models: dict[str, EpsModel],
    exact: EpsModel,
    opts: Any,
    grid: np.ndarray,
    cache: Cache,
) -> SeedResults:
    """Sampler outputs from the same x_T (SAMPLER_INIT stream of ``seed``) for every model, ε* and the exact ODE;
    network error and K on the same x_t (:func:`lipscope.groundtruth.eval_points`)."""
    p, n, b = exact.schedule, opts.samples, opts.eval_batch
    x_t = rng.normal(seed, rng.Stream.SAMPLER_INIT, n, tuple(g.shape), dtype=torch.float64)
    runs = [(s, f) for s in opts.samplers for f in opts.nfe]
    starts = {(s, f): solvers.start_step(s, exact, solvers.steps_for(s, f)) for s, f in runs}
    calls = {(s, f): solvers.nfe_of(s, f) for s, f in runs}

    def endpoint(k: float, tol: float) -> Callable[[int, int], torch.Tensor]:
        return lambda lo, hi: pf_ode_endpoint(g, p, x_t[lo:hi], k, rtol=tol, atol=tol)[0]

    def sampled(m: EpsModel, r: tuple[str, int]) -> Callable[[int, int], torch.Tensor]:
        return lambda lo, hi: solvers.run(m, r[0], r[1], x_t[lo:hi], b)[0]

    ode, check, m_chk = {}, {}, min(ODE_CHECK, n)
    for k in sorted(set(starts.values())):
        ode[k] = cache.rows(_label("s", seed, "ode", f"{k:.6f}"), n, b, endpoint(k, opts.rtol))
        tight = cache.rows(_label("s", seed, "odecheck", f"{k:.6f}"), m_chk, m_chk, endpoint(k, opts.rtol / 100))
        diff = (ode[k][:m_chk] - tight).reshape(m_chk, -1).norm(dim=1) / tight.reshape(m_chk, -1).norm(dim=1)
        check[k] = float(diff.max())
    ex = {r: cache.rows(_label("s", seed, "exact", *r), n, b, sampled(exact, r)) for r in runs}
    samples = {name: {r: cache.rows(_label(name, *r), n, b, sampled(m, r)) for r in runs} for name, m in models.items()}
    x0, noise = eval_points(g, seed, opts.eval_samples)

    def errors(m: EpsModel) -> Callable[[int, int], torch.Tensor]:
        return lambda lo, hi: torch.from_numpy(network_error(m, g, grid, x0[lo:hi], noise[lo:hi], b))

    def lipschitz(m: EpsModel) -> Callable[[int, int], torch.Tensor]:
        cols = ["K_mean", "K_ci_low", "K_ci_high"]

        def both(lo: int, hi: int) -> torch.Tensor:
            a, e = lipschitz_pair(m, g, grid, x0, seed, opts.dt)
            return torch.from_numpy(np.concatenate([a[cols].to_numpy(), e[cols].to_numpy()], axis=1))

        return both

    neterr = {name: cache.rows(_label(name, "neterr"), len(x0), b, errors(m)).numpy() for name, m in models.items()}
    k_net, k_exact = {}, np.zeros((len(grid), 3))
    for name, m in models.items():
        kk = cache.rows(_label(name, "K"), len(grid), len(grid), lipschitz(m)).numpy()
        k_net[name], k_exact = kk[:, :3], kk[:, 3:]
    return SeedResults(seed, starts, calls, ode, check, ex, samples, neterr, k_net, k_exact)


def _unit(name: str) -> dict[str, Any]:
    arch, variant, seed = name.rsplit("-", 2)
    return {"arch": arch, "variant": variant, "seed": int(seed[1:])}


def sampler_table(res: list[SeedResults]) -> pd.DataFrame:
    """Per model, seed, sampler and NFE: total error ‖x̂0 − x0(ODE)‖/√D, its discretisation part (ε*-driven
    sampler against the ODE) and the network's part ‖x̂0(net) − x̂0(ε*)‖/√D, each mean and 95 % CI over samples."""
    rows = []
    for r in res:
        for (s, f), ex in r.exact.items():
            ode = r.ode[r.starts[(s, f)]]
            disc = per_sample_rms(ex, ode)
            head = {"sampler": s, "nfe": f, "nfe_actual": r.calls[(s, f)], "start_step": r.starts[(s, f)]}
            rows.append({"arch": "exact", "variant": "eps*", "seed": r.seed, **head, **stats_row(disc, "total"),
                         **stats_row(disc, "disc"), **stats_row(np.zeros_like(disc), "net")})  # fmt: skip
            for name, xs in r.samples.items():
                total, net = per_sample_rms(xs[(s, f)], ode), per_sample_rms(xs[(s, f)], ex)
                rows.append({**_unit(name), **head, **stats_row(total, "total"), **stats_row(disc, "disc"),
                             **stats_row(net, "net")})  # fmt: skip
    return pd.DataFrame(rows)


def _dist_row(g: GaussianMixture, head: dict[str, Any], x: torch.Tensor, ref: dict[str, Any]) -> dict[str, Any]:
    v, nll_t = nll_per_dim(g, x), ref["nll"]
    gap = v.mean() - nll_t.mean()
    half = 1.96 * np.sqrt(v.var(ddof=1) / len(v) + nll_t.var(ddof=1) / len(nll_t))
    return {**head, **stats_row(v, "nll"), **stats_row(nll_t, "nll_true"), "nll_gap": gap,
            "nll_gap_ci_low": gap - half, "nll_gap_ci_high": gap + half, "swd": swd(x, ref["true"]),
            "swd_floor": ref["floor"]}  # fmt: skip


def distribution_table(res: list[SeedResults], g: GaussianMixture) -> pd.DataFrame:
    """Per sample set: mean −log q/D under the true mixture against true samples' (``nll_gap``, with a normal-
    approximation 95 % interval from the two sets' s.e.m.), and SWD to true samples against SWD of a second true
    set (``swd_floor``: the finite-sample floor)."""
    rows = []
    for r in res:
        n = next(iter(r.ode.values())).shape[0]
        true = draw(g, r.seed, TRUE_SET, n)
        ref = {"true": true, "nll": nll_per_dim(g, true), "floor": swd(draw(g, r.seed, TRUE_SET_2, n), true)}
        for k, x in r.ode.items():
            head = {"arch": "exact", "variant": "ode", "sampler": "exact-ode", "nfe": np.nan, "start_step": k}
            rows.append(_dist_row(g, {**head, "seed": r.seed}, x, ref))
        for (s, f), ex in r.exact.items():
            head = {"sampler": s, "nfe": f, "start_step": r.starts[(s, f)], "seed": r.seed}
            rows.append(_dist_row(g, {"arch": "exact", "variant": "eps*", **head}, ex, ref))
            for name, xs in r.samples.items():
                u = _unit(name)
                rows.append(_dist_row(g, {"arch": u["arch"], "variant": u["variant"], **head}, xs[(s, f)], ref))
    return pd.DataFrame(rows)


def network_table(res: list[SeedResults], grid: np.ndarray, exact: EpsModel, etsdm: Etsdm, dt: float) -> pd.DataFrame:
    """Per model, seed and t: E‖εθ − ε*‖²/D and its x0-space image (σ/α)²·that (mean, 95 % CI over samples), the
    condition the network is fed, and K(t) of the network and of ε* on the same x_t."""
    p = exact.schedule
    tt = torch.as_tensor(grid, dtype=torch.float64)
    ratio = ((p.sigma(tt) / p.alpha(tt)) ** 2).numpy()
    crosses = etsdm.crosses(grid, grid + dt)
    rows = []
    for r in res:
        for name, err in r.neterr.items():
            u, s_eps = _unit(name), summarize_samples(err)
            s_x0 = summarize_samples(err * ratio[None])
            k = r.k_net[name]
            mapped = u["variant"] == "etsdm"
            fed = etsdm.map(tt).numpy() if mapped else grid
            for j, t in enumerate(grid):
                rows.append({**u, "t": t, "condition": fed[j], "alpha": float(p.alpha(tt[j])),
                             "sigma": float(p.sigma(tt[j])), "n": err.shape[0], "eps_mse_mean": s_eps["mean"][j],
                             "eps_mse_ci_low": s_eps["ci_low"][j], "eps_mse_ci_high": s_eps["ci_high"][j],
                             "x0_mse_mean": s_x0["mean"][j], "x0_mse_ci_low": s_x0["ci_low"][j],
                             "x0_mse_ci_high": s_x0["ci_high"][j], "dt": dt, "K_net_mean": k[j, 0],
                             "K_net_ci_low": k[j, 1], "K_net_ci_high": k[j, 2], "K_exact_mean": r.k_exact[j, 0],
                             "K_exact_ci_low": r.k_exact[j, 1], "K_exact_ci_high": r.k_exact[j, 2],
                             "crosses_boundary": bool(crosses[j]) and mapped})  # fmt: skip
    return pd.DataFrame(rows)


def bands(net: pd.DataFrame, etsdm: Etsdm, T: int) -> pd.DataFrame:
    """Per model and seed: mean network error over the first E-TSDM sub-interval [0, t̃/n), over [0, t̃) and over
    [t̃, T), and the exponent of K(t) (network, ε*) over [1, t̃) and [t̃, T)."""
    rows = []
    edges = {
        "first_subinterval": (0.0, etsdm.width),
        "below_t_tilde": (0.0, etsdm.t_tilde),
        "above": (etsdm.t_tilde, T),
    }
    for (arch, variant, seed), d in net.groupby(["arch", "variant", "seed"]):
        row: dict[str, Any] = {"arch": arch, "variant": variant, "seed": seed}
        for band, (lo, hi) in edges.items():
            sel = (d["t"] >= lo) & (d["t"] < hi)
            row[f"eps_mse_{band}"] = float(d.loc[sel, "eps_mse_mean"].mean()) if sel.any() else np.nan
        for which in ("net", "exact"):
            row[f"K_{which}_exponent_below"] = exponent(d["t"], d[f"K_{which}_mean"], 1.0, etsdm.t_tilde)
            row[f"K_{which}_exponent_above"] = exponent(d["t"], d[f"K_{which}_mean"], etsdm.t_tilde, T)
        rows.append(row)
    return pd.DataFrame(rows)
