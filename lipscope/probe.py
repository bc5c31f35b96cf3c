"""Lipschitz-in-t estimators over an EpsModel, and the batched runner.

Finite differences (paper, Fig. 1; DESIGN.md):

    K(t) = E_{x0,ε} ‖εθ(x_t, t_b) − εθ(x_t, t_a)‖₂ / ((t_b − t_a)/T)

with x_t = α_t x0 + σ_t ε drawn at t and the SAME x_t fed at both conditions. Schemes:
``forward`` (t_a = t, t_b = t + Δ) and ``central`` (t_a = t − Δ/2, t_b = t + Δ/2). Δ is in model
steps and may be fractional. K is per unit of normalised time τ = t/T.

The runner packs (sample, timestep) pairs of many timesteps into each forward pass: every batch holds
P pairs, i.e. 2P forwards (the P inputs at t_a followed by the same P inputs at t_b).
Sample i always uses the noise ε_i of its own generator (stream NOISE of :mod:`lipscope.rng`), shared across
timesteps (common random numbers), so results do not depend on the batch size or the grid.
"""

from __future__ import annotations

import dataclasses
import logging
import math

import numpy as np
import pandas as pd
import torch

from . import rng
from .attribution import attribution_norms, attribution_table, consumers
from .axes import per_axis_factors
from .batching import RunStats, check_memory
from .conditioning import Conditioning
from .data import DataScaling, array_digest, load_data_with_scaling, resolve_data_range, scale_array
from .errors import InputError
from .families import resolve_conditioning
from .fd import fd_checks
from .fd import fd_norms as fd_norms  # re-exported, as jvp_norms: the Python API's lower level
from .journal import Journal
from .jvp import jvp_norms as jvp_norms
from .latents import latent_x0
from .models import EpsModel, check_fractional_dt
from .ode import ODE_METHODS, ode_columns, ode_norms
from .optimal import check_reference_data, parse_references, references
from .points import SCHEMES as SCHEMES  # re-exported: cli/options
from .points import (
    FDPoints,
    check_dt,
    check_noise,
    condition_points,
    crosses_boundary,
    fd_noise,
    fd_points,
    generated_grid,
    noise_columns,
    valid_range,
)
from .precision import (
    DEFAULT_TOLERANCE,
    PRECISIONS,
    REFERENCE,
    cast,
    check_precision,
    guard_samples,
    rel_err,
    report,
    sample_rel_err,
)
from .reduction import summarize_samples
from .resolution import check_time_resolution
from .sampling import model_samples_with_source
from .schedules import parse_grid
from .targets import check_target_defined

log = logging.getLogger("lipscope")


# ---------------------------------------------------------------------------------------------
# reduction
# ---------------------------------------------------------------------------------------------


def k_table(
    model: EpsModel, pts: FDPoints, K: np.ndarray, method: str, D: int, noise: np.ndarray | None = None
) -> pd.DataFrame:
    """Long-format table from per-sample K (n, G), one row per grid point (DESIGN.md contract columns).

    ``noise`` (n, G): the FD rounding-noise estimate in K's units (columns ``fd_noise_rel``,
    ``fd_noise_limited``; None for JVP rows: NaN, False)."""
    T = model.T
    s = summarize_samples(K)
    t64 = torch.as_tensor(pts.t, dtype=torch.float64)
    if pts.conditions:
        c_a, c_b = pts.t_a, pts.t_b
    else:
        c_a = model.network_timesteps(torch.as_tensor(pts.t_a, dtype=torch.float64)).numpy()
        c_b = model.network_timesteps(torch.as_tensor(pts.t_b, dtype=torch.float64)).numpy()
    rel, limited = noise_columns(K, noise, np.asarray(c_a) == np.asarray(c_b))  # same condition fed: exact zero
    df = pd.DataFrame(
        {
            "t": pts.t,
            "t_prime": pts.t_b,
            "t_a": pts.t_a,
            "t_b": pts.t_b,
            "dt": pts.dt,
            "tau": pts.t / T,
            "method": method,
            "n": K.shape[0],
            "K_mean": s["mean"],
            "K_std": s["std"],
            "K_sem": s["sem"],
            "K_ci_low": s["ci_low"],
            "K_ci_high": s["ci_high"],
            "K_median": np.median(K, axis=0),
            "K_max": K.max(axis=0),
            "K_mean_per_dim": s["mean"] / math.sqrt(D),
            "alpha": model.schedule.alpha(t64).numpy(),
            "sigma": model.schedule.sigma(t64).numpy(),
            "lambda": model.schedule.log_snr(t64).numpy(),
            "t_native": model.schedule.native_time(t64).numpy(),
            "c_a": c_a,
            "c_b": c_b,
            # time space only: condition-space pairs span a sub-interval by construction
            "crosses_boundary": crosses_boundary(pts.t_a, pts.t_b, None if pts.conditions else model.etsdm),
            "fd_noise_rel": rel,
            "fd_noise_limited": limited,
            "target": model.target,
        }
    )
    for axis, f in per_axis_factors(model, pts.t_a, pts.t_b).items():  # K per unit of log-SNR λ and of the native time
        for col in ("K_mean", "K_ci_low", "K_ci_high"):
            df[col.replace("K_", f"K_per_{axis}_", 1) if col != "K_mean" else f"K_per_{axis}"] = df[col] * f
    return df


# ---------------------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------------------


METHODS = ("fd", "jvp", *ODE_METHODS)


def parse_methods(method: str) -> list[str]:
    """``fd``, ``jvp``, ``jvp-ode``, ``fd-ode`` (:mod:`lipscope.ode`) or a comma list of them (``fd,jvp``)."""
    ms = [m.strip() for m in method.split(",") if m.strip()]
    if not ms or any(m not in METHODS for m in ms):
        raise InputError(f"`method` {method!r} not known; use fd, jvp, jvp-ode, fd-ode or a comma list (fd,jvp)")
    return list(dict.fromkeys(ms))


def probe(
    model: EpsModel,
    data: str | np.ndarray | torch.Tensor = "digits",
    *,
    timesteps: str | np.ndarray | list[float] | None = None,
    dt: float = 1.0,
    scheme: str = "forward",
    method: str = "fd",
    space: str = "time",
    samples: int = 64,
    seed: int = 0,
    batch_size: int | str = "auto",
    progress: bool = False,
    cache_dir: str | None = None,
    data_range: tuple[float, float] | None | str = "auto",
    allow_noise_limited: bool = False,
    target: str = "eps",
    conditioning: Conditioning | None = None,
    journal: Journal | None = None,
    precision: str | None = None,
    precision_tolerance: float = DEFAULT_TOLERANCE,
    attribute: str | None = None,
    reference: str | list[str] | tuple[str, ...] | None = None,
) -> pd.DataFrame:
    """Measure K(t) of ``model``: finite differences (``fd``, paper Fig. 1) and/or the exact
    ‖∂εθ/∂τ‖ by forward-mode AD (``jvp``). Returns the long-format table.

    ``data_range`` is the range the model was trained on (see :mod:`lipscope.data`): pixel data is
    mapped into it, float data must lie inside it and is fed unchanged (None: fed as it is; ``"auto"``:
    the process family's convention, [−1, 1] for VP/EDM/flow, [0, 1] for score-SDE VE).

    ``target`` (eps, x0, v, score, velocity): the parameterisation measured, converted from ε at the true t
    (:func:`lipscope.targets.from_epsilon`); the paper's quantity is ε. Every row also carries K per unit of
    log-SNR λ (``K_per_lambda``) and of the process's native time (``K_per_native``).

    ``conditioning`` (class labels, prompt embeddings, guidance scale:
    :func:`lipscope.families.resolve_conditioning`): sample i is conditioned on condition i mod P; a
    conditional model without it is probed unconditionally (the null class), or refused where that needs
    a text encoder.

    ``df.attrs`` holds run statistics (forwards, seconds, forwards_per_s, batch_size), the
    per-sample K matrix ``K_samples`` (n × rows, columns aligned with the rows of ``df``) and the
    ``data_scaling`` applied to x0 (a :class:`lipscope.data.DataScaling`: its ``source`` names the sample cache read
    for ``data="model"`` and the sha256 of x0 as fed).

    ``precision`` (bf16, fp16, fp32, fp64; :mod:`lipscope.precision`): the network's arithmetic for this run
    (weights cast, restored afterwards); every row gets ``K_rel_err_est`` against a reference precision on a
    few samples, and ``attrs["precision"]`` the guard's report (a warning above ``precision_tolerance``).

    ``journal`` (:class:`lipscope.journal.Journal`): keep finished items in a run folder as they go, and skip
    those an interrupted run finished. Launched with several processes (``torchrun``, ``accelerate launch``),
    each computes its share of the items (:mod:`lipscope.shard`) and every one returns the whole table.

    Diagnosis (docs/probe.md): ``method`` jvp-ode/fd-ode (:mod:`lipscope.ode`); ``attribute`` blocks|layers:
    ``attrs["attribution"]`` (:mod:`lipscope.attribution`); ``reference`` empirical, gaussian (:mod:`lipscope.optimal`).

    FD rows carry ``fd_noise_rel``/``fd_noise_limited`` (rounding noise vs ‖Δε‖; ``attrs["fd_noise"]``:
    how it was estimated); a float16/bfloat16 FD run with a noise-limited row is refused unless
    ``allow_noise_limited``.
    """
    methods, kinds = parse_methods(method), parse_references(reference)
    check_reference_data(kinds, data)
    if attribute is not None:
        consumers(model, attribute)  # the granularity, and where the network consumes t: refused before any work
    if target != model.target:
        model = dataclasses.replace(model, target=target)
    if model.conditioning is None and conditioning is None:
        conditioning = resolve_conditioning(model)  # a conditional family's default (unconditional), or None
    if conditioning is not None:
        model = dataclasses.replace(model, conditioning=conditioning)
    if samples < 1:
        raise InputError(f"`samples` must be ≥ 1 (got {samples})")
    if int(seed) != seed or seed < 0:
        raise InputError(f"`seed` must be an integer ≥ 0 (got {seed})")
    if {"fd", "fd-ode"} & set(methods):
        check_dt(dt, model.T)
    check_memory(samples, model.sample_shape)
    check_precision(precision, model)
    if space not in ("time", "condition"):
        raise InputError(f"`space` {space!r}: use time or condition")
    if space == "condition" and (methods != ["fd"] or scheme != "forward"):
        raise InputError(
            "`space` condition measures forward differences between conditions: use `method` fd and `scheme` forward"
        )
    T = model.T
    use_fd = bool({"fd", "fd-ode"} & set(methods))
    lo, hi = valid_range(dt, scheme, T) if use_fd and dt > 0 else (0.0, T - 1.0)
    if timesteps is None or isinstance(timesteps, str):  # an E-TSDM default grid: both sides of every boundary
        step, s = (dt, dt / 2 if scheme == "central" else 0.0) if use_fd else (1.0, 0.0)
        grid = generated_grid(timesteps, T, lo, hi, None if space == "condition" else model.etsdm, step, s)
    else:
        grid = parse_grid(",".join(repr(float(v)) for v in np.asarray(timesteps).ravel()), T)
    check_fractional_dt(model, dt if use_fd else 1.0, scheme=scheme, method=method, timesteps=grid)
    if not use_fd:
        pts = None
    elif space == "condition":
        pts = condition_points(grid, dt, T, model.etsdm)
    else:
        pts = fd_points(grid, dt, scheme, T)
    auto = isinstance(data_range, str) and data_range.strip().lower() == "auto"
    default = model.schedule.default_data_range if isinstance(model.data_range, str) else model.data_range
    data_range = resolve_data_range(data_range, default)
    check_target_defined(model.target, model.schedule, grid if pts is None else np.concatenate([pts.t_a, pts.t_b]))
    scaling: DataScaling
    if (
        isinstance(data, torch.Tensor)
        and data.is_floating_point()
        and data.shape[0] == samples
        and (model.latent is None or tuple(data.shape[1:]) == tuple(model.sample_shape or ()))
    ):
        x0 = data  # used as given (dtype, device); its range is still checked and reported
        scaling = scale_array(data.detach().float().cpu().numpy(), "`data` tensor", data_range)[1]
    elif isinstance(data, str) and data == "model":  # x0 drawn from the model itself, cached
        x0, src = model_samples_with_source(model, samples, seed, cache_dir)  # several processes: sampled together
        scaling = DataScaling("model samples", "samples of the model, kept as generated", src)
    elif model.latent is not None:  # images through the pipeline's autoencoder, or precomputed latents
        x0, scaling = latent_x0(model.latent, data, samples, seed, data_range, model.sample_shape)
        if scaling.source_kind == "latents" and not auto:
            log.warning("precomputed latents are fed as they are: the declared data range applies to images only")
    else:
        x0, scaling = load_data_with_scaling(data, samples, seed, model.sample_shape, data_range)
    if auto and scaling.source_kind != "model samples":
        where = "none" if data_range is None else f"{data_range[0]:g},{data_range[1]:g}"
        scaling = dataclasses.replace(
            scaling,
            mapping=f"{scaling.mapping} (data range {where}: "
            + (f"the {model.schedule.kind} default)" if model.data_range == "auto" else f"{model.name}'s own)"),
        )
    if model.sample_shape is not None and tuple(x0.shape[1:]) != tuple(model.sample_shape):
        raise InputError(
            f"data samples have shape {tuple(x0.shape[1:])} but the model takes {tuple(model.sample_shape)}"
        )
    x0 = x0.contiguous()  # memory layout changes kernels and so float32 rounding: one layout for every source
    scaling = dataclasses.replace(scaling, source=scaling.source | {"x0_sha256": array_digest(x0)})  # as fed
    noise = rng.noise(seed, x0.shape[0], tuple(x0.shape[1:]), dtype=x0.dtype)
    stats = RunStats()
    low = PRECISIONS[precision] if precision is not None else model.dtype
    ref = REFERENCE[precision] if precision is not None else None
    how = (pts, grid, methods, f"fd-{scheme}" if space != "condition" else "fd-condition", batch_size, attribute)
    guard = guard_samples(x0.shape[0]) if ref is not None else None
    K_ref: list[np.ndarray] = []
    if guard is not None and ref is not None:  # the guard samples at the reference precision, first
        with cast(model, ref) as mref:
            K_ref = _measure(mref, x0[guard], noise[guard], how, False, RunStats(), None, tabulate=False)[1]
    with cast(model, low, precision) as m:  # as it is without `precision`; the FD rows' resolution, truncation checked
        tres = None if pts is None else check_time_resolution(m, noise, pts.t_a, pts.t_b, pts.conditions)
        tables, Ks = _measure(m, x0, noise, how, progress, stats, journal)
        K_fd = Ks[0] if pts is not None and "fd" in methods else None  # the plain FD table (fd-ode's K is K_total)
        stats.extra |= fd_checks(m, x0, noise, pts, tables, K_fd, tres, scheme, stats.batch_size or batch_size)
    for i, tab in enumerate(tables):
        tab["K_rel_err_est"] = rel_err(Ks[i][guard], K_ref[i]) if guard is not None else np.nan
    if guard is not None:
        worst = max(sample_rel_err(Ks[i][guard], K_ref[i]) for i in range(len(tables)))
        stats.extra["precision"] = report(model.name, precision, ref, guard, tables, precision_tolerance, worst)
    refs, stats.extra["reference"] = references(model, kinds, data, data_range, x0, noise, grid, seed)
    for name, K in refs.items():  # the optimal denoisers' rows (lipscope.optimal), on the same x_t
        Ks.append(K)
        tables.append(
            k_table(dataclasses.replace(model, etsdm=None), FDPoints(grid, grid, grid), K, name, x0[0].numel())
        )
    df = pd.concat(tables, ignore_index=True)
    check_noise(df, low, allow_noise_limited, precision)
    df.attrs.update(
        {
            "forwards": stats.forwards,
            "seconds": stats.seconds,
            "forwards_per_s": stats.forwards_per_s,
            "batch_size": stats.batch_size,
            "T": T,
            "K_samples": np.concatenate(Ks, axis=1),
            "data_scaling": scaling,
            "data_range": None if data_range is None else list(data_range),
            "conditioning": model.conditioning.info | {"guidance_scale": model.conditioning.guidance_scale}
            if model.conditioning is not None
            else None,
            **stats.extra,
        }
    )
    return df


def _measure(model: EpsModel, x0, noise, how, progress: bool, stats: RunStats, journal, tabulate: bool = True):
    """(tables, per-sample K) of the methods, FD then JVP; ``tabulate`` False: K alone (the guard's reference)."""
    pts, grid, methods, fd_name, batch_size, attribute = how
    T, D = model.T, math.prod(x0.shape[1:])
    tables, Ks = [], []
    if "fd" in methods:
        norms, scale = fd_norms(model, x0, noise, pts, batch_size, progress, stats, journal)
        Ks.append(norms.numpy() / (pts.dt / T)[None, :])
    if "fd" in methods and tabulate:
        stats.extra["fd_noise"] = est = fd_noise(model, x0, noise, pts)
        noise_K = float(est["c"]) * float(est["u"]) * scale.numpy() / (pts.dt / T)[None, :]
        tables.append(k_table(model, pts, Ks[-1], fd_name, D, noise_K))
    c = float(stats.extra["fd_noise"]["c"]) if "fd" in methods and tabulate else None
    ode = ode_norms(model, x0, noise, pts, grid, methods, batch_size, progress, stats, journal, c)  # lipscope.ode
    if "jvp" in methods:
        jst = RunStats()  # with jvp-ode, its first JVP is the jvp row
        Ks.append(
            ode["jvp-ode"][1][:, :, 1]
            if "jvp-ode" in ode
            else jvp_norms(model, x0, noise, grid, batch_size, progress, jst, journal).numpy()
        )
        if tabulate:
            tables.append(k_table(model, FDPoints(grid, grid, grid), Ks[-1], "jvp", D))
        stats.extra.update(jvp_items=jst.forwards, jvp_seconds=jst.seconds, jvp_items_per_s=jst.forwards_per_s)
        if "fd" not in methods:
            stats.forwards, stats.seconds, stats.batch_size = jst.forwards, jst.seconds, jst.batch_size
    for name, (p, vals, noise_k) in ode.items():
        Ks.append(vals[:, :, 0])
        if tabulate:
            tables.append(k_table(model, p, Ks[-1], name, D, noise_k).assign(**ode_columns(vals)))
    if tabulate and attribute is not None:  # where t enters the network (lipscope.attribution)
        vals, parts, emb = attribution_norms(
            model, x0, noise, grid, attribute, batch_size, progress, RunStats(), journal
        )
        stats.extra["attribution"] = attribution_table(vals, grid, parts, emb, attribute)
    return tables, Ks
