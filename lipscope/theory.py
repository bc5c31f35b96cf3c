"""The Theorem 3.1 experiment: closed forms vs FD, JVP and a trained toy net on Gaussian data.

The closed forms themselves are in :mod:`lipscope.gaussian`; the toy net is trained with the one
diffusion loss of :mod:`lipscope.training`.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from . import rng
from .errors import InputError
from .etsdm import Etsdm
from .exponent import fit_exponent, fit_range
from .gaussian import (
    GaussianMixture,
    closed_form_samples,
    dtau_exact_ms,
    exponent_limit,
    fd_exact_ms,
    gaussian_eps_model,
    rms_band,
    terms_exact_ms,
)
from .models import EpsModel, from_callable
from .objectives import diffusion_loss
from .probe import probe
from .processes import EDMProcess, FlowProcess, VEProcess
from .schedules import NoiseProcess, named_schedule

MAX_DIM = 4096  # D×D float64 eigenvectors: 128 MiB per component at this size


def make_distribution(
    dim: int | None = None,
    mean: tuple[float, ...] | list[float] | None = None,
    var: tuple[float, ...] | list[float] | None = None,
    cov: str | None = None,
    mixture: int = 0,
    seed: int = 0,
    rank: int | None = None,
    floor: float | None = None,
) -> tuple[GaussianMixture, int]:
    """The data distribution of a theory run and its dimension D.

    ``mixture`` K ≥ 2: a seeded random K-component mixture; otherwise N(mean, Σ) with Σ the full
    matrix in the .npy file ``cov``, or diag(``var``) (default geomspace(0.01, 1, D)), mean 0 unless given.
    ``rank`` r with ``floor`` s: r directions of variances ``var`` (r values; default geomspace(0.01, 1, r)) and the
    other D − r at s² (data near an r-dimensional set; with ``mixture`` K, K such components on random subspaces).
    """
    if rank is not None or floor is not None:
        return _low_rank(dim, mean, var, cov, mixture, seed, rank, floor)
    if dim is not None and not 1 <= dim <= MAX_DIM:
        raise InputError(f"`dim` must be in 1..{MAX_DIM} (got {dim}); the closed forms hold D×D matrices")
    D = dim if dim is not None else (len(mean) if mean else len(var) if var else 2)
    if D > MAX_DIM:
        raise InputError(f"{D} dimensions is over {MAX_DIM}; the closed forms hold D×D matrices: use a smaller `dim`")
    for name, v in (("mean", mean), ("var", var)):
        if v is not None and len(v) != D:
            raise InputError(f"`{name}` has {len(v)} values but `dim` is {D}; give exactly D values")
        if v is not None and not all(math.isfinite(x) and abs(x) < 1e15 for x in v):
            raise InputError(f"`{name}` must be finite numbers of moderate size (got {list(v)}); fix `{name}`")
    if var is not None and min(var) < 0:
        raise InputError("`var` must be ≥ 0")
    if mixture >= 2 and mixture * D * D * 8 > 2**31:
        raise InputError(f"`mixture` {mixture} × `dim` {D} needs {mixture * D * D * 8 / 2**30:.3g} GiB; use fewer")
    if mixture >= 2:
        return GaussianMixture.random(mixture, D, seed=seed), D
    if mixture == 1 or mixture < 0:
        raise InputError("`mixture` K needs K ≥ 2 (leave it out for a single Gaussian)")
    if cov is not None and var is not None:
        raise InputError("`cov` and `var` both give the covariance; pass only one of them")
    if cov is not None:
        if not Path(cov).is_file():
            raise InputError(f"`cov` {cov}: no such file; check the path")
        try:
            c = np.load(cov, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise InputError(
                f"`cov` {cov} is not a numeric .npy matrix ({type(e).__name__}); save it with numpy.save(path, matrix)"
            ) from e
        if c.shape != (D, D) or not np.allclose(c, c.T) or np.linalg.eigvalsh(c).min() < -1e-10:
            raise InputError(f"`cov` must be a symmetric positive semi-definite {D}×{D} matrix")
    else:
        c = np.asarray(var if var is not None else np.geomspace(0.01, 1.0, D))
    return GaussianMixture.gaussian(torch.tensor(list(mean) if mean else [0.0] * D), torch.as_tensor(c)), D


PROCESSES = ("vp", "ve", "edm", "flow")


def make_process(
    process: str = "vp",
    schedule: str = "linear",
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    rho: float | None = None,
) -> NoiseProcess:
    """The process of a theory run: ``vp`` with the named ``schedule``; ``ve`` (σ_min, σ_max), ``edm`` (σ_min, σ_max,
    ρ; Karras ramp) and ``flow`` with diffusers' defaults unless given (T = 1000 for all)."""
    if process not in PROCESSES:
        raise InputError(f"`process` {process!r} not known; use one of {', '.join(PROCESSES)}")
    given: dict[str, Any] = {
        k: v for k, v in (("sigma_min", sigma_min), ("sigma_max", sigma_max), ("rho", rho)) if v is not None
    }
    takes = {"vp": (), "flow": (), "ve": ("sigma_min", "sigma_max"), "edm": ("sigma_min", "sigma_max", "rho")}[process]
    extra = [k for k in given if k not in takes]
    if extra:
        raise InputError(f"`{extra[0]}` is not an option of the {process} process; leave it out")
    if any(not (math.isfinite(v) and v > 0) for v in given.values()):
        raise InputError("`sigma_min`, `sigma_max` and `rho` must be finite and > 0")
    if process == "vp":
        return named_schedule(schedule)
    if process == "flow":
        return FlowProcess(steps=1000)
    p = dataclasses.replace(VEProcess(steps=1000) if process == "ve" else EDMProcess(steps=1000), **given)
    if not p.sigma_min < p.sigma_max:
        raise InputError(f"`sigma_min` must be below `sigma_max` (got {p.sigma_min:g} and {p.sigma_max:g})")
    return p


def _low_rank(dim, mean, var, cov, mixture, seed, rank, floor) -> tuple[GaussianMixture, int]:
    if rank is None or floor is None:
        raise InputError("`rank` and `floor` go together: r directions of variances `var`, the others at `floor`²")
    if cov is not None:
        raise InputError("`cov` gives a full covariance; with `rank` and `floor` give the r variances as `var`")
    D = dim if dim is not None else (len(mean) if mean else 2 * rank if rank else 2)
    if not 1 <= D <= MAX_DIM or not 1 <= rank <= D:
        raise InputError(f"`rank` must be in 1..`dim` and `dim` in 1..{MAX_DIM} (got rank {rank}, dim {D})")
    if not (math.isfinite(floor) and floor >= 0):
        raise InputError(f"`floor` must be a finite standard deviation ≥ 0 (got {floor})")
    v = list(var) if var is not None else list(np.geomspace(0.01, 1.0, rank))
    if len(v) != rank or not all(math.isfinite(x) and 0 < x < 1e15 for x in v):
        raise InputError(f"`var` must give `rank` = {rank} positive variances (got {len(v)})")
    if mean is not None and (len(mean) != D or not all(math.isfinite(x) for x in mean)):
        raise InputError(f"`mean` must give `dim` = {D} finite values")
    if mixture == 1 or mixture < 0 or (mixture >= 2 and mixture * D * D * 8 > 2**31):
        raise InputError("`mixture` K needs K ≥ 2 and K·D² float64 values under 2 GiB")
    k = max(mixture, 1)
    return GaussianMixture.low_rank(D, v, floor, mean if k == 1 else None, k=k, seed=seed), D


def theory_table(
    g: GaussianMixture,
    schedule: NoiseProcess,
    grid: np.ndarray,
    dt: float = 1.0,
    samples: int = 512,
    seed: int = 0,
    nets: dict[str, EpsModel] | None = None,
) -> pd.DataFrame:
    """Closed forms vs estimators on Gaussian (mixture) data, one row per grid step t.

    Columns: ``K_fd_exact_rms`` = √E‖ε*(x_t,t+Δ) − ε*(x_t,t)‖² / Δτ (closed form, single Gaussian;
    NaN for mixtures), ``K_fd_mc`` and its 95% CI (the probe's FD on ε*), ``dtau_exact_rms`` =
    √E‖∂ε*/∂τ‖² (closed form; Monte Carlo of the per-sample closed form for mixtures),
    ``dtau_closed_mean`` (mean per-sample closed-form ‖∂ε*/∂τ‖ on the probe's samples),
    ``dtau_jvp`` (the probe's JVP on ε*, same samples), ``term1_rms``, ``term2_rms`` (Theorem 3.1),
    ``dtau_jvp_fit`` (the power law fitted to ``dtau_jvp`` over its fit range, :mod:`lipscope.exponent`; NaN
    outside it) and per trained net ``K_fd_<name>``, ``dtau_jvp_<name>``. ``attrs["exponent"]``: the exponent per
    method with its bootstrap interval, and the closed form's band and t → 0 limit (:func:`theory_exponents`).
    """
    T = schedule.T
    model = gaussian_eps_model(g, schedule, name="eps*")
    x0 = g.sample(samples, seed)
    df = probe(model, x0, timesteps=grid, dt=dt, method="fd,jvp", samples=samples, seed=seed, data_range=None)
    fd, jv = df[df["method"] == "fd-forward"].reset_index(drop=True), df[df["method"] == "jvp"].reset_index(drop=True)
    noise = rng.noise(seed, samples, tuple(x0.shape[1:]), dtype=torch.float64)
    cf = closed_form_samples(g, schedule, x0, noise, grid)
    exact = g.K == 1
    rms = lambda a: np.sqrt((a**2).mean(0))  # noqa: E731
    if exact:
        k_fd = np.sqrt(fd_exact_ms(g, schedule, fd["t"], fd["t_a"], fd["t_b"])) / (dt / T)
        d_rms = np.sqrt(dtau_exact_ms(g, schedule, grid))
        t1, t2 = (np.sqrt(v) for v in terms_exact_ms(g, schedule, grid))
    else:
        k_fd = np.full(len(grid), np.nan)
        d_rms, t1, t2 = rms(cf[0]), rms(cf[1]), rms(cf[2])
    out = pd.DataFrame(
        {
            "t": fd["t"],
            "dt": fd["dt"],
            "tau": fd["tau"],
            "alpha": fd["alpha"],
            "sigma": fd["sigma"],
            "K_fd_exact_rms": k_fd,
            "K_fd_mc": fd["K_mean"],
            "K_fd_ci_low": fd["K_ci_low"],
            "K_fd_ci_high": fd["K_ci_high"],
            "dtau_exact_rms": d_rms,
            "dtau_closed_mean": cf[0].mean(0),
            "dtau_jvp": jv["K_mean"],
            "dtau_jvp_ci_low": jv["K_ci_low"],
            "dtau_jvp_ci_high": jv["K_ci_high"],
            "term1_rms": t1,
            "term2_rms": t2,
            "reference": "closed-form" if exact else "monte-carlo",
        }
    )
    for name, net in (nets or {}).items():
        d = probe(net, x0.float(), timesteps=grid, dt=dt, method="fd,jvp", samples=samples, seed=seed, data_range=None)
        out[f"K_fd_{name}"] = d[d["method"] == "fd-forward"]["K_mean"].to_numpy()
        out[f"dtau_jvp_{name}"] = d[d["method"] == "jvp"]["K_mean"].to_numpy()
    out.attrs["samples"] = samples
    out.attrs["exponent"] = ex = theory_exponents(g, schedule, grid, df, seed)
    fit = fit_range(out["t"].to_numpy())
    e = ex["jvp"]
    tau = np.where(fit, out["tau"].to_numpy(), 1.0)  # fit rows have τ > 0
    out["dtau_jvp_fit"] = np.where(fit, np.exp(e["intercept"]) * tau ** e["p"], np.nan)
    return out


def theory_exponents(g: GaussianMixture, process: NoiseProcess, grid, df, seed: int = 0) -> dict:
    """The exponent per method (FD, JVP on ε*: bootstrap over samples) next to what the closed form gives on the same
    fit range: the exact RMS curve's slope and its band (one Gaussian) and the t → 0 limit (docs/theory.md)."""
    K, out = df.attrs["K_samples"], {}
    for m in df["method"].unique():
        cols = (df["method"] == m).to_numpy()
        out[m] = fit_exponent(df.loc[cols, "t"].to_numpy(), K[:, cols], process.T, seed).as_dict()
    mask = fit_range(np.asarray(grid))
    fit_t = np.asarray(grid, dtype=np.float64)[mask]
    band: dict = {"limit": math.nan, "limit_reason": "no grid point t > 0 in the fit range"}
    if fit_t.size and fit_t.min() > 0:
        band["limit"], band["limit_reason"] = exponent_limit(process, g, float(fit_t.min()), float(fit_t.max()))
    if g.K == 1 and fit_t.size >= 2 and fit_t.min() > 0:
        p, lo, hi = rms_band(g, process, fit_t)
        band |= {"closed_form_rms": p, "band": [lo, hi], "t_lo": float(fit_t.min()), "t_hi": float(fit_t.max())}
    else:
        why = "an exact band needs one Gaussian and ≥ 2 grid points t > 0 in the fit range"
        band |= {"closed_form_rms": math.nan, "band": [math.nan, math.nan], "band_reason": why}
    out["closed_form"] = band
    return out


# ---- a small trained noise predictor on the toy data --------------------------------------------


class ToyEps(torch.nn.Module):
    """MLP noise predictor ε(x, t) for vector data with a Fourier embedding of the (mapped) step."""

    freqs: torch.Tensor  # a registered buffer

    def __init__(self, dim: int, width: int = 128, freqs: int = 6, T: int = 1000):
        super().__init__()
        # Fourier features of τ = t/T at π·2^i: smooth in t (the fastest varies 0.1 rad per step), so
        # nothing in the embedding itself aliases between the integer training steps.
        self.register_buffer("freqs", math.pi * 2.0 ** torch.arange(freqs, dtype=torch.float32) / T)
        self.net = torch.nn.Sequential(
            torch.nn.Linear(dim + 2 * freqs, width),
            torch.nn.SiLU(),
            torch.nn.Linear(width, width),
            torch.nn.SiLU(),
            torch.nn.Linear(width, width),
            torch.nn.SiLU(),
            torch.nn.Linear(width, dim),
        )
        self.sample_shape = (dim,)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        ang = t.to(self.freqs.dtype)[:, None] * self.freqs[None]
        return self.net(torch.cat([x.to(self.freqs.dtype), ang.sin(), ang.cos()], dim=1)).to(x.dtype)


def train_toy(
    g: GaussianMixture,
    schedule: NoiseProcess,
    steps: int = 3000,
    batch: int = 512,
    lr: float = 2e-3,
    seed: int = 0,
    etsdm: bool = False,
    t_tilde: float = 100.0,
    n_sub: int = 5,
) -> tuple[EpsModel, list[float]]:
    """Fit ToyEps with the ε-loss (t uniform over integer steps, fresh data each step; cosine LR).

    With ``etsdm`` the network is fed f(t) (lipscope.etsdm) while noise is drawn at the true t.
    Returns the model (EpsModel, with the map applied when etsdm) and the loss curve.
    """
    etsdm_spec = Etsdm(t_tilde, n_sub) if etsdm else None
    with rng.isolated_torch_rng(seed):
        net = ToyEps(g.D, T=schedule.T)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    gen = torch.Generator().manual_seed(seed + 1)
    losses = []
    for step in range(steps):
        x0 = g.sample(batch, seed=seed * 1_000_003 + step).float()
        t = torch.randint(0, schedule.T, (batch,), generator=gen).to(torch.float64)
        eps = torch.randn(x0.shape, generator=gen)
        loss = diffusion_loss(lambda x, c: net(x, c.float()), x0, t, eps, schedule, "epsilon", etsdm_spec)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    net.eval()
    m = from_callable(net, schedule, sample_shape=(g.D,), name="toy-etsdm" if etsdm else "toy", etsdm=etsdm_spec)
    return m, losses
