"""``groundtruth`` runs: E-TSDM's effect measured exactly on data with a known density (:mod:`lipscope.mixtures`).

Per replicate seed s: a base model trained ``steps`` from weights drawn from s, E-TSDM and control fine-tunes of it
(``finetune_steps``, the same loop and draws, with and without the map; ``etsdm_from='scratch'``: E-TSDM trained
from s like the base, which is then its control), for each architecture; then, on the same x_T and x_t for every
model, the exact ODE endpoint, ε*-driven and network-driven samplers, network error and K (:mod:`.gt_eval`).

The run folder is written at once at the end (tables, plots, run.json, mixture.npz, ``models/``); until then the
training folders and finished items live in the journal beside it (``.<out>.partial``), so ``resume`` continues a
killed run: training from its last checkpoint, measurements from the last finished block.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch

from .. import io as lio
from .. import solvers
from ..checkpoints import write_folder
from ..errors import InputError
from ..etsdm import Etsdm
from ..gtplots import plot_network_error, plot_sampler_error
from ..journal import Journal
from ..mixtures import exact_model, mixture_npz, parse_density
from ..plots import figure_png
from ..processes import process_from_config
from ..schedules import parse_grid
from . import gt_models as gm
from .common import check_out_dir
from .gt_eval import Cache, bands, distribution_table, evaluate_seed, network_table, sampler_table
from .gt_summary import paired_tables, summary_lines

# the sizes of --size (fields left None take them); "reduced" runs on 2 CPU cores in under 10 minutes
SIZES: dict[str, dict[str, Any]] = {
    "full": {"steps": 20000, "finetune_steps": 5000, "samples": 2048, "eval_samples": 512, "seeds": 3,
             "arch": ("unet", "dit"), "samplers": solvers.SAMPLERS, "nfe": (5, 10, 20, 50)},
    "reduced": {"steps": 400, "finetune_steps": 150, "samples": 256, "eval_samples": 128, "seeds": 2,
                "arch": ("unet",), "samplers": ("ddim", "dpmsolver++:2"), "nfe": (5, 10, 20)},
}  # fmt: skip
DEFAULT_GRID = (
    "0,1,2,3,4,5,6,8,10,12,14,16,18,19,20,25,30,39,40,50,60,70,79,80,90,99,100,150,200,300,400,500,700,900,998"
)


@dataclass(frozen=True)
class GroundTruthOptions:
    """``lipscope groundtruth``: see the module docstring. None fields take the values of ``size``."""

    data: str = "digits-gmm:10"
    process: str = "vp"
    size: str = "full"
    arch: tuple[str, ...] | None = None
    train: tuple[str, ...] = ("base", "etsdm", "control")
    etsdm_from: str = "base"
    steps: int | None = None
    finetune_steps: int | None = None
    batch_size: int = 64
    lr: float = 1e-3
    finetune_lr: float = 2e-4
    warmup: int = 100
    ema_decay: float = 0.999
    t_tilde: float | None = None  # model steps; None: 0.1·T
    n_sub: int = 5
    samplers: tuple[str, ...] | None = None
    nfe: tuple[int, ...] | None = None
    seeds: int | None = None
    samples: int | None = None
    eval_samples: int | None = None
    timesteps: str = DEFAULT_GRID
    dt: float = 1.0
    rtol: float = 1e-10
    eval_batch: int = 256
    checkpoint_every: int = 200
    model_config: str | None = None
    keep_models: bool = True
    keep_journal: bool = False  # keep .<out>.partial after writing: `resume` + `overwrite` re-tabulates from it
    out: str = "runs/groundtruth"
    resume: bool = False
    overwrite: bool = False

    def resolved(self) -> GroundTruthOptions:
        """Sizes filled in, names canonical, every value checked (one InputError line naming the option)."""
        if self.size not in SIZES:
            raise InputError(f"`size` {self.size!r} not known; use {' or '.join(SIZES)}")
        fill = {k: v for k, v in SIZES[self.size].items() if getattr(self, k) is None}
        o = replace(self, **fill)
        o = replace(o, samplers=tuple(dict.fromkeys(solvers.parse_sampler(s) for s in o.samplers or ())))
        _check(o)
        return o

    def key(self) -> dict[str, Any]:
        """What changes the numbers (the journal refuses a resume with other values)."""
        skip = {"out", "resume", "overwrite", "keep_models", "keep_journal", "checkpoint_every", "eval_batch"}
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip}


def _check(o: GroundTruthOptions) -> None:
    if o.process not in ("vp", "flow"):
        raise InputError(f"`process` {o.process!r}: use vp or flow (the processes lipscope trains)")
    for name, vals, allowed in (("arch", o.arch, gm.ARCHS), ("train", o.train, gm.VARIANTS)):
        bad = [v for v in vals or () if v not in allowed]
        if bad or not vals:
            raise InputError(f"`{name}` {','.join(vals or ())!r}: use one or more of {', '.join(allowed)}")
    if "base" not in o.train:
        raise InputError("`train` must include base (E-TSDM and control are compared with it, or fine-tuned from it)")
    if o.etsdm_from not in ("base", "scratch"):
        raise InputError(f"`etsdm_from` {o.etsdm_from!r}: use base (fine-tune, with a control) or scratch")
    if o.etsdm_from == "scratch" and "control" in o.train:
        raise InputError(
            "with `etsdm_from` scratch the base is E-TSDM's control (same loop and steps): remove control from `train`"
        )
    ints = {"steps": 1, "finetune_steps": 1, "batch_size": 1, "seeds": 1, "samples": 2, "eval_samples": 2,
            "n_sub": 1, "eval_batch": 1, "checkpoint_every": 1, "warmup": 0}  # fmt: skip
    for k, lo in ints.items():
        v = getattr(o, k)
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise InputError(f"`{k}` must be a whole number ≥ {lo} (got {v!r})")
    for k in ("lr", "finetune_lr", "rtol", "dt"):
        if not (isinstance(getattr(o, k), (int, float)) and 0 < getattr(o, k) < float("inf")):
            raise InputError(f"`{k}` must be a finite number > 0 (got {getattr(o, k)!r})")
    if not 0 <= o.ema_decay < 1:
        raise InputError(f"`ema_decay` must be in [0, 1) (got {o.ema_decay})")
    if not 1e-14 <= o.rtol <= 1e-4:
        raise InputError(f"`rtol` {o.rtol:g}: use a tolerance in [1e-14, 1e-4] (the endpoint is the reference)")
    if not o.samplers or not o.nfe:
        raise InputError("`samplers` and `nfe` need at least one value each")
    for s in o.samplers:
        for f in o.nfe:
            solvers.steps_for(s, f)
    if o.model_config is not None and len(o.arch or ()) != 1:
        raise InputError("`model_config` gives one architecture's config: pass exactly one `arch`")


def run_groundtruth(opts: GroundTruthOptions) -> dict[str, Any]:
    """Train, measure and write the run folder; returns run.json's content (``summary`` holds the sentences)."""
    o = opts.resolved()
    out = check_out_dir(o.out, overwrite=o.overwrite, resume=o.resume, inputs=(o.data, o.model_config))
    start = time.time()
    with lio.run_lock(out):
        sched_cfg = gm.scheduler_config(o.process)
        process = process_from_config(sched_cfg)
        t_tilde = o.t_tilde if o.t_tilde is not None else 0.1 * process.T
        etsdm = Etsdm(t_tilde, o.n_sub)
        if not t_tilde < process.T:
            raise InputError(f"`t_tilde` {t_tilde:g} must be below T = {process.T}")
        grid = parse_grid(o.timesteps, process.T, t_max=process.T - 1 - o.dt)
        kd = parse_density(o.data)
        gm.check_shape(kd.shape)
        cfgs = {a: gm.read_arch_config(o.model_config, a, kd.shape) for a in o.arch or ()}
        journal = Journal(out, {**o.key(), "mixture": kd.digest}, resume=o.resume, overwrite=o.overwrite)
        journal.add("started", torch.zeros(1, dtype=torch.long), torch.zeros(1))
        journal.flush()  # the options are on disk before the first training step: a killed run can resume
        try:
            meta = _run(o, kd, process, sched_cfg, etsdm, grid, cfgs, journal, out, start)
        finally:
            journal.flush()
        if not o.keep_journal:
            journal.discard()
        return meta


def _run(o, kd, process, sched_cfg, etsdm, grid, cfgs, journal: Journal, out: Path, start: float) -> dict[str, Any]:
    root = journal.root / "train"
    seeds = range(o.seeds or 1)
    units = [gm.Unit(a, v, s) for s in seeds for a in o.arch for v in o.train]
    training = {u.name: gm.train_unit(u, root, kd, sched_cfg, cfgs[u.arch], o) for u in units}
    trained_s = time.time() - start
    models = {u.name: gm.load(root / u.name / "pipeline", sched_cfg, u.name) for u in units}
    exact = exact_model(kd.mixture, process, sched_cfg, name="eps*")
    cache = Cache(journal)
    res = []
    for s in seeds:
        mine = {k: m for k, m in models.items() if k.endswith(f"-s{s}")}
        res.append(evaluate_seed(s, kd.mixture, mine, exact, o, grid, cache))
    samp, dist = sampler_table(res), distribution_table(res, kd.mixture)
    net = network_table(res, grid, exact, etsdm, o.dt)
    band = bands(net, etsdm, process.T)
    pair = paired_tables(samp, dist, band)
    meta = {
        "command": "groundtruth",
        "options": asdict(o),
        "data": kd.describe(),
        "process": process.describe(),
        "scheduler_config": sched_cfg,
        "etsdm": {"t_tilde_steps": etsdm.t_tilde, "n": etsdm.n, "width_steps": etsdm.width},
        "architectures": cfgs,
        "training": training,
        "exact_ode": {
            "rtol": o.rtol,
            "atol": o.rtol,
            "check": "16 samples per start re-solved at rtol/100",
            "max_rel_diff_vs_tighter": {f"s{r.seed}@{k:g}": v for r in res for k, v in r.ode_check.items()},
            "starts": {f"{s}@{f}": k for (s, f), k in res[0].starts.items()},
        },  # fmt: skip
        "bands": band.to_dict(orient="records"),
        "summary": summary_lines(pair, band, o),
        "assumptions": ASSUMPTIONS,
        "versions": lio.package_versions(),
        "wall_time_s": {"total": time.time() - start, "training": trained_s},
        "items_computed_this_session": len(set(cache.computed)),
    }
    title = f"{kd.spec}, {o.process}"
    files = {"network_error.csv": lio.csv_bytes(net), "sampler_error.csv": lio.csv_bytes(samp),
             "distribution.csv": lio.csv_bytes(dist), "paired.csv": lio.csv_bytes(pair),
             "bands.csv": lio.csv_bytes(band), "run.json": lio.json_bytes(meta), "mixture.npz": mixture_npz(kd.mixture),
             "sampler_error.png": figure_png(plot_sampler_error(samp, title)),
             "network_error.png": figure_png(plot_network_error(net, etsdm.boundaries(), title))}  # fmt: skip

    def fill(tmp: Path) -> None:
        for name, data in files.items():
            (tmp / name).write_bytes(data)
        if o.keep_models:
            for u in units:
                shutil.copytree(root / u.name / "pipeline", tmp / "models" / u.name)
                shutil.copy(root / u.name / "loss.csv", tmp / "models" / u.name / "loss.csv")

    write_folder(out, fill)
    return meta


ASSUMPTIONS = [
    "x_T ~ N(0, I) is taken as the process state at each sampler's start step (VP: T - 1 with trailing spacing; "
    "flow: the scheduler's first sigma); the exact ODE starts from the same x_T at the same step",
    "samplers run in float64 (the network in float32, its output cast to float64); diffusers keeps its "
    "sigmas/alphas_cumprod in float32, which is part of each sampler as shipped",
    "flow DPM-Solver++/UniPC: the network is fed sigma*T of the step's own sigma, not the scheduler's integer "
    "timestep (sigma*T truncated)",
    "errors are RMS per dimension, ||a - b|| / sqrt(D), per sample; intervals over samples are Student-t 95 %; "
    "paired differences are over seeds (Student-t 95 %, n/a with one seed)",
    "nll_gap interval: normal approximation from the s.e.m. of the two sample sets",
]


__all__ = ["SIZES", "GroundTruthOptions", "run_groundtruth"]
