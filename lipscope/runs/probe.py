"""``probe`` and ``compare`` runs: lipschitz.csv, run.json, lipschitz.png; overlays of several runs."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from .. import io as lio
from .. import labels, shard
from ..budgetplot import mark_steps
from ..data import check_data_range
from ..errors import InputError, short_error
from ..etsdm import Etsdm
from ..explain import explain
from ..io import WriteFailure
from ..journal import DamagedJournal, Journal, interrupted
from ..models import EpsModel
from ..plots import figure_png, plot_attribution, plot_compare, plot_lipschitz
from ..probe import probe
from ..reduction import check_t_split, summary
from ..speed import Speed, accelerated
from ..targets import TARGETS
from ..zoo import DEFAULT_DATA
from .common import (
    ConditioningOptions,
    ModelOptions,
    check_out_dir,
    check_out_file,
    main_lock,
    model_digest,
    model_info,
    write_on_main,
)
from .steps import check_specs, default_train_timesteps, steps_and_coverage

log = logging.getLogger("lipscope")


@dataclass(frozen=True)
class ProbeOptions(ConditioningOptions, ModelOptions):
    """``lipscope probe``: K(t) of a model, written to lipschitz.csv, run.json and lipschitz.png."""

    data: str | None = None  # None: the built-in's data, else samples of the model
    out: str = "runs/probe"
    timesteps: str = "default"
    dt: float = 1.0
    scheme: str = "forward"
    method: str = "fd"
    space: str = "time"
    samples: int = 64
    seed: int = 0
    batch_size: str = "auto"
    t_split: float | None = None
    overwrite: bool = False  # replace a non-empty `out`
    resume: bool = False  # continue the interrupted probe `out` holds (lipscope.journal)
    precision: str | None = None  # bf16/fp16/fp32/fp64 network arithmetic, with the K_rel_err_est guard
    tf32: bool = False  # speed paths (lipscope.speed): TF32 on CUDA, channels-last weights, torch.compile mode
    channels_last: bool = False
    compile: str | None = None
    allow_noise_limited: bool = False  # keep float16/bfloat16 FD rows limited by rounding noise
    # the range the model was trained on: pixel data is mapped into it, float data must lie inside
    # it and is fed unchanged; None feeds float data as it is (lipscope.data)
    # "auto": the process family's convention ([−1, 1]; [0, 1] for score-SDE VE), printed and recorded
    data_range: tuple[float, float] | None | str = "auto"
    target: str = "eps"  # the parameterisation measured: eps (the paper's), x0, v, score, velocity
    attribute: str | None = None  # blocks or layers: ∂ε/∂t split over the time-embedding consumers (attribution.csv)
    reference: str | None = None  # empirical and/or gaussian: the optimal denoisers' rows (comma list)
    plot_x: str = "t"  # lipschitz.png against t, or K per unit λ against log-SNR λ ("lambda")
    sampler: str | None = None  # NAME:STEPS[,…]: the step budget of each sampler (steps.csv; lipscope.budget)
    train_timesteps: str | None = None  # a training timestep distribution: its mass where K is singular

    def resolved(self) -> ProbeOptions:
        """Defaults filled in: ``data`` becomes the built-in's data set or ``model``."""
        if self.data is not None:
            return self
        return dataclasses.replace(self, data=DEFAULT_DATA if self.model.startswith("builtin:") else "model")


@dataclass
class ProbeResult:
    table: pd.DataFrame
    summary: dict[str, Any]
    meta: dict[str, Any]
    model: EpsModel
    out: Path


def run_probe(opts: ProbeOptions, progress: bool = False) -> ProbeResult:
    """Probe, then write the run folder ``opts.out`` (all files or none)."""

    if opts.samples < 2:
        raise InputError("`samples` must be ≥ 2 (a confidence interval needs at least two samples)")
    if not isinstance(opts.data_range, str):
        check_data_range(opts.data_range)
    if opts.plot_x not in ("t", "lambda"):
        raise InputError(f"`plot_x` {opts.plot_x!r}: use t or lambda")
    if opts.target not in TARGETS:
        raise InputError(f"`target` {opts.target!r} not known; use one of {', '.join(TARGETS)}")
    opts = dataclasses.replace(opts, train_timesteps=default_train_timesteps(opts.train_timesteps, opts.model))
    check_specs(opts.sampler, opts.train_timesteps)
    if opts.resume and opts.overwrite:
        raise InputError("give `resume` (continue the run in `out`) or `overwrite` (replace it), not both")
    reads = (opts.model, opts.data, opts.config, opts.scheduler_config, *opts.conditioning_reads())
    reads += (opts.train_timesteps,)  # FILE.npy or a run folder (a distribution's name is no path)
    out = check_out_dir(opts.out, overwrite=opts.overwrite, resume=opts.resume, inputs=reads)
    opts = opts.resolved()
    with main_lock(out):  # first: a live run of `out` is refused by its lock (naming it), not taken for a stopped one
        _continues(opts, out)
        return _probe(opts, out, progress)


def _continues(opts: ProbeOptions, out: Path) -> None:
    """What ``resume`` finds in ``out``: an interrupted run (continued), or nothing (a fresh start, said so); a
    finished run folder is not replaced unless the run that is continued was started with ``overwrite``."""
    prior = interrupted(out, opts.resume, opts.overwrite)
    full = out.is_dir() and any(out.iterdir())
    if opts.resume and prior is None:
        if full:
            raise InputError(
                f"`resume`: {opts.out} holds a finished run and no interrupted one, so there is nothing to continue; "
                "pass `overwrite` to run it again or choose another `out`"
            )
        log.warning("`resume`: %s has no interrupted run to continue; starting it from the beginning", opts.out)
    elif prior is not None and full and not prior.get("_overwrite"):
        check_out_dir(out)  # the run it continues may not replace this folder: refused as a fresh run would be


# options that do not change the numbers: a resumed run may change them
RESUMABLE = ("out", "overwrite", "resume", "batch_size", "t_split", "plot_x", "allow_noise_limited", "sampler",
             "train_timesteps")  # fmt: skip


def _probe(opts: ProbeOptions, out: Path, progress: bool) -> ProbeResult:
    start = time.time()
    m = opts.load()
    cond = opts.conditioning(m, opts.model, opts.revision, opts.offline or None)
    m = dataclasses.replace(m, conditioning=cond) if cond is not None else m  # a generic pipeline's space comes with it
    check_t_split(opts.t_split, m.T)
    key = {k: v for k, v in asdict(opts).items() if k not in RESUMABLE}
    key |= {"config_hash": m.config_hash, "conditioning": cond.digest() if cond is not None else None}
    key["weights_sha256"] = model_digest(m, opts.model)  # a resume on other weights of the same config is refused
    key["_overwrite"] = opts.overwrite  # not compared on resume: the consent to replace `out`
    journal = Journal(out, key, opts.resume, opts.overwrite)
    try:
        df = _run(opts, m, cond, progress, journal)
    except KeyboardInterrupt:
        raise  # the finished blocks stay: `resume` continues from them
    except BaseException as e:
        # kept for `resume` only when a rerun with the same options can go on: an internal error, or an output that
        # could not be written (full disk); bad input or a refused result (a failing model, noise-limited rows)
        # would meet the same refusal, so nothing is left behind (the advised rerun with other options starts clean)
        kept = isinstance(e, (WriteFailure, DamagedJournal))  # fixed by the user, not by other options
        if not journal.has_blocks() or (isinstance(e, InputError) and not kept):
            if shard.is_main():
                journal.discard()
        elif isinstance(e, WriteFailure):
            raise WriteFailure(f"{e}; the finished items are kept: fix that and rerun with `resume`") from e
        raise
    summ = summary(df, m.T, opts.t_split)
    diag = explain(df, m.T, opts.t_split, opts.seed)  # exponent, onset, ODE split, attribution, references
    summ |= {k: diag.get(k) for k in ("exponent", "exponent_ci", "onset")} | {"diagnosis": diag}
    extra, more, lines, (steps, density) = steps_and_coverage(df, m, diag, opts.sampler, opts.train_timesteps)
    summ |= more
    diag["sentences"] = diag["sentences"] + lines
    wall = time.time() - start
    meta = {
        "command": "probe",
        "options": asdict(opts),
        "model": model_info(m),
        "device": str(m.device),
        "dtype": str(m.dtype).removeprefix("torch."),
        "seed": opts.seed,
        "data_range": df.attrs["data_range"],
        "target": opts.target,
        "conditioning": df.attrs["conditioning"],
        "process": m.schedule.describe(),
        "data_scaling": asdict(df.attrs["data_scaling"]),
        "versions": lio.package_versions(),
        "wall_time_s": wall,
        "probe_time_s": df.attrs["seconds"],
        "forwards": df.attrs["forwards"],
        "forwards_per_s": df.attrs["forwards_per_s"],
        "batch_size_used": df.attrs["batch_size"],
        "grid_points": len(df),
        "summary": summ,
        # how fd_noise_rel was estimated: c·u·(‖ε_a‖ + ‖ε_b‖), c measured or the constant (docs/probe.md)
        "fd_noise": df.attrs.get("fd_noise"),
        "fd_noise_limited_rows": int(df["fd_noise_limited"].sum()),
        "fd_time": df.attrs.get("fd_time"),  # the network's time resolution and the FD rows below it (docs/probe.md)
        "fd_truncation": df.attrs.get("fd_truncation"),  # the FD step's estimated truncation per row
        "precision": df.attrs.get("precision"),  # the accuracy guard of `precision` (None without it)
        "reference": df.attrs.get("reference") or None,  # the data set of the optimal denoisers' rows
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    fig = plot_lipschitz(df, labels.title(m.name, opts.samples, df), x=opts.plot_x, fits=diag["methods"],
                         marks=split_marks(m, summ["t_split"], opts.plot_x))  # fmt: skip
    if opts.plot_x == "t":
        mark_steps(fig, steps, density, str(opts.train_timesteps))
    png = figure_png(fig)
    files = {"lipschitz.csv": lio.csv_bytes(df), "run.json": lio.json_bytes(meta), "lipschitz.png": png, **extra}
    if isinstance(att := df.attrs.get("attribution"), pd.DataFrame):
        files |= {"attribution.csv": lio.csv_bytes(att), "attribution.png": figure_png(plot_attribution(att, m.name))}
    write_on_main(out, files, opts.overwrite or bool(journal.started_with("_overwrite")))
    if shard.is_main():
        journal.discard()  # after the folder is in place: a failed write can still be resumed
    return ProbeResult(df, summ, meta, m, out)


def split_marks(m: EpsModel, t_split: float, x: str = "t") -> dict[str, float]:
    """The plot's vertical marks: t_split and, for an E-TSDM model, its t̃ (one mark where they coincide), as
    positions on the plot's x axis (λ = log(α²/σ²) of the step for ``x="lambda"``)."""
    at = {"t_split": t_split} | ({"E-TSDM t̃": m.etsdm.t_tilde} if m.etsdm is not None else {})
    if len(set(at.values())) == 1:
        at = {" = ".join(at): t_split}
    if x == "lambda":
        lam = m.schedule.log_snr(torch.tensor(list(at.values()), dtype=torch.float64)).tolist()
        return {f"{k} = {t:g} (λ = {v:.3g})": v for (k, t), v in zip(at.items(), lam, strict=True)}
    return {f"{k} = {t:g}": t for k, t in at.items()}


def _run(opts: ProbeOptions, m: EpsModel, cond, progress: bool, journal: Journal) -> pd.DataFrame:
    speed = Speed(opts.tf32, opts.channels_last, opts.compile)
    speed.check(opts.method.split(","))
    with accelerated(m, speed) as fast:
        return probe(
            fast,
            str(opts.data),
            timesteps=opts.timesteps,
            dt=opts.dt,
            scheme=opts.scheme,
            method=opts.method,
            space=opts.space,
            samples=opts.samples,
            seed=opts.seed,
            batch_size=opts.batch_size,
            progress=progress,
            cache_dir=str(lio.user_cache_dir() / "samples"),
            data_range=opts.data_range,
            allow_noise_limited=opts.allow_noise_limited,
            target=opts.target,
            conditioning=cond,
            journal=journal,
            precision=opts.precision,
            attribute=opts.attribute,
            reference=opts.reference,
        )


def read_probe_run(folder: str | Path) -> tuple[pd.DataFrame, dict[str, Any]]:
    """lipschitz.csv and run.json of a probe run folder, checked."""
    r = Path(folder)
    csv = r / "lipschitz.csv"
    if not csv.is_file():
        raise InputError(f"{r}: no lipschitz.csv; pass folders written by lipscope probe")
    try:
        df = pd.read_csv(csv)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as e:
        raise InputError(f"{csv} is not a readable table ({type(e).__name__}); rerun lipscope probe") from e
    missing = [c for c in ("t", "method", "K_mean") if c not in df.columns]
    if missing or df.empty:
        what = f"lacks the columns {', '.join(missing)}" if missing else "has no rows"
        raise InputError(f"{csv} {what}; pass folders written by lipscope probe")
    for c in ("t", "K_mean"):  # a probe writes finite numbers only: anything else is a damaged or foreign table
        v = pd.to_numeric(df[c], errors="coerce")
        bad = ~np.isfinite(v.to_numpy(dtype=np.float64))
        if bad.any():
            raise InputError(
                f"{csv}: column {c} holds {int(bad.sum())} values that are no finite number (e.g. "
                f"{df[c][bad].iloc[0]!r}); rerun lipscope probe for that folder"
            )
        df[c] = v
    meta: dict[str, Any] = {}
    if (r / "run.json").exists():
        try:
            meta = json.loads((r / "run.json").read_text())
        except (ValueError, UnicodeDecodeError) as e:
            raise InputError(f"{r / 'run.json'} is not valid JSON; rerun lipscope probe or remove it") from e
        if not isinstance(meta, dict):
            raise InputError(f"{r / 'run.json'} must hold a JSON object; rerun lipscope probe or remove it")
    return df, meta


def compare_runs(runs: list[str | Path], out_file: str | Path, t_split: float | None = None) -> list[dict[str, Any]]:
    """Overlay the K(t) curves of several probe runs (E-TSDM boundaries marked) into ``out_file``;
    returns one summary row per (run, method)."""

    if Path(out_file).suffix.lower() != ".png":
        raise InputError(f"`out` {out_file}: compare writes a .png; give `out` a name ending in .png")
    frames, bounds, rows, steps = {}, set(), [], set()
    for r in runs:
        df, meta = read_probe_run(r)
        model_meta = meta.get("model")
        info: dict[str, Any] = model_meta if isinstance(model_meta, dict) else {}
        et, T = info.get("etsdm"), _steps_of(info.get("T", 1000), r)
        if et:
            bounds.update(_etsdm_of(et, r).boundaries()[1:])
        frames[Path(r).name] = df
        steps.add(T)
        for method in df["method"].unique():
            rows.append({"run": Path(r).name, **summary(df, T, t_split, method=method)})
    targets = {str(t) for df in frames.values() for t in df.get("target", pd.Series(["eps"])).unique()}
    if len(targets) > 1:
        raise InputError(f"the runs measure different targets ({', '.join(sorted(targets))}); compare runs of one")
    if len(steps) > 1:
        log.warning("the runs have different T (%s): their t axes differ; compare K per λ instead", sorted(steps))
    check_out_file(out_file, runs, "compares")
    png = figure_png(plot_compare(frames, sorted(bounds)))
    lio.atomic_write_bytes(out_file, png)
    return rows


def _steps_of(T: Any, run: str | Path) -> int:
    """run.json's model.T: a whole number of steps ≥ 1."""
    ok = not isinstance(T, bool) and isinstance(T, (int, float)) and math.isfinite(T) and T >= 1 and T == int(T)
    if not ok:
        raise InputError(
            f"{Path(run) / 'run.json'}: model.T {T!r} is not a whole number of steps; rerun lipscope probe"
        )
    return int(T)


def _etsdm_of(et: Any, run: str | Path) -> Etsdm:
    """run.json's model.etsdm record as the map it describes."""
    try:
        if not isinstance(et, dict):
            raise TypeError(type(et).__name__)
        return Etsdm(float(et["t_tilde"]), int(et["n"]))
    except (KeyError, TypeError, ValueError, InputError) as e:
        raise InputError(
            f"{Path(run) / 'run.json'}: model.etsdm {str(et)[:80]} is not an E-TSDM record (t_tilde, n) "
            f"({short_error(e)[:80]}); rerun lipscope probe"
        ) from e
