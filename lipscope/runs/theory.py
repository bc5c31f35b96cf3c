"""``theory`` runs: Theorem 3.1 on Gaussian data, written to theory.csv, run.json, theory.png."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .. import io as lio
from ..errors import InputError
from ..plots import figure_png, plot_theory
from ..schedules import CONTINUOUS, named_schedule, parse_grid
from ..theory import make_distribution, theory_table, train_toy
from .common import check_out_dir


@dataclass(frozen=True)
class TheoryOptions:
    """``lipscope theory``: Theorem 3.1 on Gaussian data (closed forms vs FD, JVP, a trained net)."""

    dim: int | None = None
    mean: tuple[float, ...] | None = None
    var: tuple[float, ...] | None = None
    cov: str | None = None
    mixture: int = 0
    schedule: str = "linear"
    timesteps: str = "default"
    dt: float = 1.0
    samples: int = 512
    seed: int = 0
    train: bool = False
    steps: int = 3000
    etsdm: bool = False
    out: str = "runs/theory"
    overwrite: bool = False


@dataclass
class TheoryResult:
    table: pd.DataFrame
    meta: dict[str, Any]
    title: str
    nets: list[str]
    out: Path


def run_theory(opts: TheoryOptions) -> TheoryResult:
    """Build the distribution, compare closed forms with the estimators, write the run folder."""

    out = check_out_dir(opts.out, overwrite=opts.overwrite, inputs=(opts.cov,))
    with lio.run_lock(out):
        if opts.samples < 2 or opts.steps < 1:
            raise InputError("`samples` must be ≥ 2 and `steps` ≥ 1")
        if opts.etsdm and not opts.train:
            raise InputError("`etsdm` goes with `train`")
        g, D = make_distribution(opts.dim, opts.mean, opts.var, opts.cov, opts.mixture, opts.seed)
        sched = named_schedule(opts.schedule)
        t_min = 1.0 if opts.schedule in CONTINUOUS else 0.0  # σ(0) = 0 in continuous time: ε* is singular there
        grid = parse_grid(opts.timesteps, sched.T, t_max=sched.T - 1 - opts.dt)
        if opts.timesteps in ("default", "all") or opts.timesteps.startswith(("linear", "log")):
            grid = grid[grid >= t_min]
        start = time.time()
        nets, losses = {}, {}
        for e in ((False, True) if opts.etsdm else (False,)) if opts.train else ():
            m, lc = train_toy(g, sched, steps=opts.steps, seed=opts.seed, etsdm=e)
            nets[m.name.replace("-", "_")] = m
            losses[m.name] = {"final_loss_mean_last_100": float(np.mean(lc[-100:])), "steps": opts.steps}
        df = theory_table(g, sched, grid, dt=opts.dt, samples=opts.samples, seed=opts.seed, nets=nets)
        rel = np.abs(df["dtau_jvp"] / df["dtau_closed_mean"] - 1.0)
        meta = {
            "command": "theory",
            "options": {**asdict(opts), "dim": D},
            "reference": df["reference"].iloc[0],
            "max_rel_err_jvp_vs_closed_form": float(rel.max()),
            "training": losses,
            "versions": lio.package_versions(),
            "wall_time_s": time.time() - start,
        }
        mix = f" mixture K={opts.mixture}" if opts.mixture >= 2 else ""
        title = f"Gaussian{mix}, D={D}, {opts.schedule} schedule"
        files = {
            "theory.csv": lio.csv_bytes(df),
            "run.json": lio.json_bytes(meta),
            "theory.png": figure_png(plot_theory(df, title)),
        }
        lio.write_run_folder(out, files, overwrite=opts.overwrite)
        return TheoryResult(df, meta, title, list(nets), out)
