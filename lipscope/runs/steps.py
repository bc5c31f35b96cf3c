"""A probe run's step budgets (steps.csv) and training coverage (run.json ``summary.coverage``)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .. import io as lio
from ..budget import budget_sentences, budget_table, build_scheduler, parse_samplers, step_boundaries, uncovered
from ..coverage import coverage, coverage_sentence, parse_train_timesteps, train_distribution
from ..errors import InputError
from ..models import EpsModel
from ..processes import FlowProcess
from ..sampling import dynamic_shift_mu

log = logging.getLogger("lipscope")


def check_specs(sampler: str | None, train_timesteps: str | None) -> None:
    """Refuse bad ``sampler`` / ``train_timesteps`` specs before any work."""
    if sampler is not None:
        parse_samplers(sampler)
    if train_timesteps is not None:
        parse_train_timesteps(train_timesteps)


def default_train_timesteps(spec: str | None, model: str) -> str | None:
    """A fine-tune run's drawn timesteps (its ``timesteps.npy``): what ``train_timesteps`` means by default when
    ``model`` is that run (its folder or its pipeline/lora inside), and what a run folder given as
    ``train_timesteps`` stands for."""
    if spec is not None and Path(spec).is_dir():
        if not (Path(spec) / "timesteps.npy").is_file():
            raise InputError(f"`train_timesteps` {spec}: a folder without timesteps.npy; give a finetune run")
        return str(Path(spec) / "timesteps.npy")
    if spec is not None or model.startswith(("builtin:", "py:")):
        return spec
    for run in (Path(model), Path(model).parent):
        if (run / "timesteps.npy").is_file() and (run / "train.json").is_file():
            log.warning("training coverage from the timesteps the fine-tune %s drew (%s)", run, run / "timesteps.npy")
            return str(run / "timesteps.npy")
    return None


def budgets(df: pd.DataFrame, m: EpsModel, sampler: str) -> pd.DataFrame:
    """steps.csv for every NAME:STEPS of ``sampler``, on the model's scheduler config; warns about steps outside
    the probed grid, naming them."""
    cfg = dict(m.scheduler_config)
    mu = dynamic_shift_mu(m) if cfg.get("use_dynamic_shifting") else None
    tables = []
    for name, n in parse_samplers(sampler):
        if n > m.T:
            raise InputError(f"`sampler` {name}:{n}: at most T = {m.T} steps")
        sched = build_scheduler(name, cfg, n, mu)
        tables.append(budget_table(df, step_boundaries(sched, m.T), f"{name}:{n}", m.T))
    table = pd.concat(tables, ignore_index=True)
    if miss := uncovered(table):
        t = df["t"].to_numpy()
        log.warning("steps outside the probed grid (t %g … %g), their budget extrapolated with K held at the "
                    "grid's end (budget_err counts all of it): %s", t.min(), t.max(), "; ".join(miss))  # fmt: skip
    return table


def steps_and_coverage(
    df: pd.DataFrame, m: EpsModel, diag: dict[str, Any], sampler: str | None, train_timesteps: str | None
) -> tuple[dict[str, bytes], dict[str, Any], list[str], Any]:
    """(files, summary entries, sentences, (steps table, density)) of the probe's ``sampler`` and
    ``train_timesteps``."""
    files: dict[str, bytes] = {}
    summ: dict[str, Any] = {}
    lines: list[str] = []
    table = density = None
    if sampler:
        table = budgets(df, m, sampler)
        lines += budget_sentences(table)
        summ["step_budget"] = {str(name): _budget_summary(d) for name, d in table.groupby("sampler", sort=False)}
        summ["step_budget_sentences"] = list(lines)
    if train_timesteps:
        dist = parse_train_timesteps(train_timesteps)
        density = train_distribution(dist, m.T, isinstance(m.schedule, FlowProcess), dict(m.scheduler_config))
        onset = diag.get("onset")
        cov = coverage(density, None if onset is None else float(onset), table)
        if table is not None:
            table["train_mass"] = cov.pop("step_mass")
        line = coverage_sentence(train_timesteps, cov)
        summ["coverage"] = {"spec": train_timesteps, "distribution": dist, **cov, "sentence": line}
        lines.append(line)
    if table is not None:
        files["steps.csv"] = lio.csv_bytes(table)
    if density is not None:
        files["train_timesteps.csv"] = lio.csv_bytes(
            pd.DataFrame({"t": density.index, "mass": density.to_numpy(np.float64)})
        )
    return files, summ, lines, (table, density)


def _budget_summary(d: pd.DataFrame) -> dict[str, Any]:
    """run.json's ``summary.step_budget`` entry of one sampler."""
    big = d.loc[d["budget"].idxmax()]
    return {
        "steps": len(d),
        "total": float(d["budget"].sum()),
        "largest_step": int(big["step"]),
        "largest_t": [float(big["t_from"]), float(big["t_to"])],
        "largest_share": float(big["share"]),
        "last_share": float(d["share"].iloc[-1]),
        "uncovered_steps": [int(s) for s in d.loc[~d["covered"].astype(bool), "step"]],
    }
