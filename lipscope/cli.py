"""The ``lipscope`` command line (typer). Thin: parse, call the library, print a rich summary.

Exit codes: 0 ok, 2 bad input (one line on stderr), 1 internal error.
"""

from __future__ import annotations

import functools
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from .errors import InputError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Find, explain and fix the Lipschitz singularity of diffusion models near t = 0 (Yang et al., 2306.11251).",
)
err = Console(stderr=True)
out = Console()


class _OneLine(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        err.print(f"[yellow]{record.levelname.lower()}:[/] {record.getMessage()}", highlight=False)


def _setup_logging(verbose: bool) -> None:
    lg = logging.getLogger("lipscope")
    lg.handlers[:] = [_OneLine()]
    lg.setLevel(logging.INFO if verbose else logging.WARNING)
    lg.propagate = False
    from diffusers.utils import logging as dlogging

    dlogging.set_verbosity_error()
    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)


def cli_errors(fn: Callable) -> Callable:
    """Bad input → one line on stderr and exit 2; interrupts → 130; anything else is an internal error (1)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except InputError as e:
            err.print(f"[red]error:[/] {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err.print("[red]interrupted[/]: no output was written")
            raise typer.Exit(130) from None

    return wrapper


@app.callback()
def _root() -> None:
    """Find, explain and fix the Lipschitz singularity of diffusion models near t = 0."""


@app.command()
@cli_errors
def probe(
    model: str = typer.Option(
        "builtin:digits-ddpm",
        "--model",
        "-m",
        help="hub id, pipeline/unet folder, weights file (+ --config), py:module:factory or builtin:NAME.",
    ),
    data: str | None = typer.Option(
        None,
        "--data",
        "-d",
        help="digits, model, hf:NAME[:split], an image folder or a .npy/.npz/.pt file. "
        "Default: the built-in's data, else samples of the model.",
    ),
    out_dir: Path = typer.Option(
        Path("runs/probe"), "--out", "-o", help="Output folder for lipschitz.csv, run.json, lipschitz.png."
    ),
    timesteps: str = typer.Option(
        "default",
        "--timesteps",
        "-t",
        help="default, all, linear:N, log:N, range:a:b:s or a list 0,1,2.5 (model steps).",
    ),
    dt: float = typer.Option(1.0, "--dt", help="FD step Δt in model steps (fractional allowed)."),
    scheme: str = typer.Option("forward", "--scheme", help="forward (t, t+Δt) or central (t−Δt/2, t+Δt/2)."),
    method: str = typer.Option(
        "fd", "--method", help="fd (finite differences), jvp (exact ‖∂ε/∂τ‖ by forward AD) or fd,jvp."
    ),
    space: str = typer.Option(
        "time",
        "--space",
        help="time, or condition: K between consecutive conditions the network is fed (E-TSDM: sub-interval starts).",
    ),
    samples: int = typer.Option(64, "--samples", "-n", help="Number of (x0, ε) samples per timestep."),
    seed: int = typer.Option(0, "--seed", help="Seed; every number is reproducible and independent of --batch-size."),
    batch_size: str = typer.Option(
        "auto", "--batch-size", help="Forwards per batch, or auto (largest that fits, backing off on OOM)."
    ),
    device: str = typer.Option("auto", "--device", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N, mps."),
    dtype: str = typer.Option("float32", "--dtype", help="float32, float64, float16 or bfloat16."),
    config: Path | None = typer.Option(None, "--config", help="UNet config.json for a single weights file."),
    scheduler_config: Path | None = typer.Option(
        None, "--scheduler-config", help="scheduler_config.json (default: from the model, else DDPM linear)."
    ),
    revision: str | None = typer.Option(None, "--revision", help="Hub revision (branch, tag or commit)."),
    subfolder: str | None = typer.Option(None, "--subfolder", help="Subfolder holding the UNet."),
    offline: bool = typer.Option(
        False, "--offline", help="Only use the local Hugging Face cache (also: HF_HUB_OFFLINE=1)."
    ),
    trust_pickle: bool = typer.Option(
        False, "--trust-pickle", help="Allow full unpickling of .pt/.bin checkpoints (runs code from the file)."
    ),
    t_split: float | None = typer.Option(None, "--t-split", help="Split for the summary (default T/10 = 100 of 1000)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Measure the Lipschitz constant of ε_θ in t: writes lipschitz.csv, run.json and lipschitz.png."""
    _setup_logging(verbose)
    from . import io as lio
    from .builtins import DEFAULT_DATA
    from .models import load_model
    from .plots import figure_png, plot_lipschitz
    from .probe import probe as run_probe
    from .probe import summary

    if samples < 2:
        raise InputError("--samples must be ≥ 2 (a confidence interval needs at least two samples)")
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"--out {out_dir} exists and is not a folder; choose another path")
    start = time.time()
    m = load_model(
        model,
        config=config,
        scheduler_config=scheduler_config,
        revision=revision,
        subfolder=subfolder,
        offline=offline or None,
        trust_pickle=trust_pickle,
        device=device,
        dtype=dtype,
    )
    if data is None:
        data = DEFAULT_DATA if model.startswith("builtin:") else "model"
    df = run_probe(
        m,
        data,
        timesteps=timesteps,
        dt=dt,
        scheme=scheme,
        method=method,
        space=space,
        samples=samples,
        seed=seed,
        batch_size=batch_size,
        progress=progress and sys.stderr.isatty(),
        cache_dir=str(out_dir),
    )
    summ = summary(df, m.T, t_split)
    wall = time.time() - start
    run = {
        "command": "probe",
        "options": {
            "model": model,
            "data": data,
            "timesteps": timesteps,
            "dt": dt,
            "scheme": scheme,
            "method": method,
            "space": space,
            "samples": samples,
            "seed": seed,
            "batch_size": batch_size,
            "device": device,
            "dtype": dtype,
            "config": config,
            "scheduler_config": scheduler_config,
            "revision": revision,
            "subfolder": subfolder,
            "offline": offline,
        },
        "model": {
            "etsdm": m.etsdm,
            "name": m.name,
            "config_hash": m.config_hash,
            "T": m.T,
            "prediction_type": m.prediction_type,
            "sample_shape": m.sample_shape,
            "config": m.config,
            "scheduler_config": m.scheduler_config,
        },
        "device": str(m.device),
        "dtype": str(m.dtype).removeprefix("torch."),
        "seed": seed,
        "versions": lio.package_versions(),
        "wall_time_s": wall,
        "probe_time_s": df.attrs["seconds"],
        "forwards": df.attrs["forwards"],
        "forwards_per_s": df.attrs["forwards_per_s"],
        "batch_size_used": df.attrs["batch_size"],
        "grid_points": len(df),
        "summary": summ,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    png = figure_png(plot_lipschitz(df, title=f"{m.name}  (n={samples}, Δt={dt:g}, {scheme})", t_split=summ["t_split"]))
    files = {"lipschitz.csv": lio.csv_bytes(df), "run.json": lio.json_bytes(run), "lipschitz.png": png}
    lio.write_outputs(out_dir, files)
    _print_summary(m.name, summ, df, out_dir, wall)


@app.command()
@cli_errors
def theory(
    dim: int | None = typer.Option(None, "--dim", help="Data dimension D (default: from --mean/--var, else 2)."),
    mean: str | None = typer.Option(None, "--mean", help="Gaussian mean, comma list of D numbers (default 0)."),
    var: str | None = typer.Option(None, "--var", help="Diagonal variances (default: geomspace(0.01, 1, D))."),
    cov: Path | None = typer.Option(None, "--cov", help="Full covariance as a .npy (D×D) file instead of --var."),
    mixture: int = typer.Option(0, "--mixture", help="K ≥ 2: a seeded random K-component mixture instead."),
    schedule: str = typer.Option(
        "linear", "--schedule", help="linear, scaled_linear, cosine, sigmoid, vp-linear, vp-cosine."
    ),
    timesteps: str = typer.Option("default", "--timesteps", "-t", help="Grid (as for probe)."),
    dt: float = typer.Option(1.0, "--dt", help="Forward FD step in model steps."),
    samples: int = typer.Option(512, "--samples", "-n", help="Monte Carlo samples."),
    seed: int = typer.Option(0, "--seed"),
    train: bool = typer.Option(False, "--train", help="Also fit a small MLP noise predictor and overlay it."),
    steps: int = typer.Option(3000, "--steps", help="Training steps for --train."),
    etsdm: bool = typer.Option(False, "--etsdm", help="With --train: also train the E-TSDM variant."),
    out_dir: Path = typer.Option(Path("runs/theory"), "--out", "-o"),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Theorem 3.1 on Gaussian data: closed forms vs FD, JVP and (optionally) a trained net."""
    _setup_logging(verbose)
    import numpy as np
    import torch

    from . import io as lio
    from .plots import figure_png, plot_theory
    from .schedules import CONTINUOUS, named_schedule, parse_grid
    from .theory import GaussianMixture, theory_table, train_toy

    mu = None if mean is None else _list(mean, float, "--mean")
    vv = None if var is None else _list(var, float, "--var")
    D = dim or (len(mu) if mu else len(vv) if vv else 2)
    if D < 1 or samples < 2 or steps < 1:
        raise InputError("--dim, --steps must be ≥ 1 and --samples ≥ 2")
    for name, v in (("--mean", mu), ("--var", vv)):
        if v is not None and len(v) != D:
            raise InputError(f"{name} has {len(v)} values but --dim is {D}; give exactly D values")
    if vv is not None and min(vv) < 0:
        raise InputError("--var must be ≥ 0")
    sched = named_schedule(schedule)
    if mixture >= 2:
        g = GaussianMixture.random(mixture, D, seed=seed)
    elif mixture == 1 or mixture < 0:
        raise InputError("--mixture K needs K ≥ 2 (leave it out for a single Gaussian)")
    else:
        if cov is not None:
            try:
                c = np.load(cov)
            except (OSError, ValueError) as e:
                raise InputError(f"--cov {cov}: cannot read a .npy matrix ({e})") from e
            if c.shape != (D, D) or not np.allclose(c, c.T) or np.linalg.eigvalsh(c).min() < -1e-10:
                raise InputError(f"--cov must be a symmetric positive semi-definite {D}×{D} matrix")
        else:
            c = np.asarray(vv if vv is not None else np.geomspace(0.01, 1.0, D))
        g = GaussianMixture.gaussian(torch.tensor(mu or [0.0] * D), torch.as_tensor(c))
    t_min = 1.0 if schedule in CONTINUOUS else 0.0  # σ(0) = 0 in continuous time: ε* is singular there
    grid = parse_grid(timesteps, sched.T, t_max=sched.T - 1 - dt)
    grid = grid[grid >= t_min] if timesteps in ("default", "all") or timesteps.startswith(("linear", "log")) else grid
    start = time.time()
    nets, losses = {}, {}
    if train:
        for e in (False, True) if etsdm else (False,):
            m, lc = train_toy(g, sched, steps=steps, seed=seed, etsdm=e)
            nets[m.name.replace("-", "_")] = m
            losses[m.name] = {"final_loss_mean_last_100": float(np.mean(lc[-100:])), "steps": steps}
    elif etsdm:
        raise InputError("--etsdm goes with --train")
    df = theory_table(g, sched, grid, dt=dt, samples=samples, seed=seed, nets=nets)
    rel = np.abs(df["dtau_jvp"] / df["dtau_closed_mean"] - 1.0)
    run = {
        "command": "theory",
        "options": {
            "dim": D,
            "mean": mu,
            "var": vv,
            "cov": cov,
            "mixture": mixture,
            "schedule": schedule,
            "timesteps": timesteps,
            "dt": dt,
            "samples": samples,
            "seed": seed,
            "train": train,
            "steps": steps,
            "etsdm": etsdm,
        },
        "reference": df["reference"].iloc[0],
        "max_rel_err_jvp_vs_closed_form": float(rel.max()),
        "training": losses,
        "versions": lio.package_versions(),
        "wall_time_s": time.time() - start,
    }
    title = f"Gaussian{' mixture K=' + str(mixture) if mixture >= 2 else ''}, D={D}, {schedule} schedule"
    files = {
        "theory.csv": lio.csv_bytes(df),
        "run.json": lio.json_bytes(run),
        "theory.png": figure_png(plot_theory(df, title)),
    }
    lio.write_outputs(out_dir, files)
    tab = Table(title=f"lipscope theory — {title}", show_header=False, title_justify="left")
    first, last = df.iloc[0], df.iloc[-1]
    tab.add_row(
        f"at t = {first['t']:g}",
        f"‖∂ε*/∂τ‖ RMS {first['dtau_exact_rms']:.4g}; term1 {first['term1_rms']:.4g}, term2 {first['term2_rms']:.4g}",
    )
    tab.add_row(f"at t = {last['t']:g}", f"‖∂ε*/∂τ‖ RMS {last['dtau_exact_rms']:.4g}")
    tab.add_row("JVP vs closed form", f"max relative error {rel.max():.2e} over {len(df)} steps")
    for name in nets:
        tab.add_row(
            f"net {name} at t = {first['t']:g}", f"FD {df['K_fd_' + name].iloc[0]:.4g} (truth {first['K_fd_mc']:.4g})"
        )
    tab.add_row("written", f"{out_dir}/theory.csv, run.json, theory.png")
    out.print(tab)


def _train_config(opts: dict):
    """The TrainConfig of the options train and finetune share."""
    from .training import TrainConfig

    return TrainConfig(
        steps=opts["steps"],
        batch_size=opts["batch_size"],
        lr=opts["lr"],
        warmup_steps=opts["warmup"],
        ema_decay=opts["ema_decay"],
        grad_clip=opts["grad_clip"],
        mixed_precision=opts["mixed_precision"],
        seed=opts["seed"],
        checkpoint_every=opts["checkpoint_every"],
        etsdm=opts["etsdm"],
        t_tilde=opts["t_tilde"],
        n=opts["n_sub"],
    )


def _run_training(unet, sched_cfg, data: str, out_dir: Path, cfg, resume: bool, progress: bool, source: str) -> None:
    from .data import load_data
    from .training import train_loop

    c = int(unet.config.in_channels)
    s = unet.config.sample_size
    hw = (s, s) if isinstance(s, int) else tuple(s)
    x = load_data(data, None, cfg.seed, (c, *hw))
    res = train_loop(unet, sched_cfg, x, cfg, out_dir, resume=resume, progress=progress, source=source)
    out.print(
        f"trained {cfg.steps} steps on {x.shape[0]} samples; final loss (mean of last 100) "
        f"{res['final_loss_mean_last_100']:.4g}; model in {out_dir}/pipeline"
    )


@app.command()
@cli_errors
def train(
    config: Path = typer.Option(..., "--config", help="UNet2DModel config.json to train from scratch."),
    data: str = typer.Option("digits", "--data", "-d", help="Training data (as for probe)."),
    scheduler_config: Path | None = typer.Option(None, "--scheduler-config", help="Default: DDPM linear, T=1000."),
    out_dir: Path = typer.Option(Path("runs/train"), "--out", "-o"),
    steps: int = typer.Option(20000, "--steps"),
    batch_size: int = typer.Option(64, "--batch-size", help="Per process."),
    lr: float = typer.Option(2e-4, "--lr"),
    warmup: int = typer.Option(200, "--warmup"),
    ema_decay: float = typer.Option(0.999, "--ema-decay"),
    grad_clip: float = typer.Option(1.0, "--grad-clip"),
    mixed_precision: str = typer.Option("no", "--mixed-precision", help="no, fp16 or bf16 (accelerate)."),
    seed: int = typer.Option(0, "--seed"),
    checkpoint_every: int = typer.Option(500, "--checkpoint-every"),
    etsdm: bool = typer.Option(False, "--etsdm/--no-etsdm", help="Train with the E-TSDM timestep map."),
    t_tilde: float = typer.Option(100.0, "--t-tilde", help="E-TSDM: map steps below t̃."),
    n_sub: int = typer.Option(5, "--n", help="E-TSDM: number of sub-intervals of [0, t̃)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the last checkpoint in --out."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Train a UNet2DModel from a config (optionally with E-TSDM)."""
    _setup_logging(verbose)
    from .models import _read_json, _read_scheduler_config, _unet_class
    from .schedules import DEFAULT_SCHEDULER_CONFIG

    cfg = _read_json(config if not config.is_dir() else config / "config.json", "model config")
    try:
        unet = _unet_class(cfg).from_config(cfg)
    except (TypeError, ValueError, KeyError) as e:
        raise InputError(f"--config {config}: not a valid UNet2DModel config ({e})") from e
    sched_cfg = _read_scheduler_config(scheduler_config) if scheduler_config else dict(DEFAULT_SCHEDULER_CONFIG)
    cfg = _train_config(locals())
    _run_training(unet, sched_cfg, data, out_dir, cfg, resume, progress and sys.stderr.isatty(), f"config {config}")


@app.command()
@cli_errors
def finetune(
    model: str = typer.Option(..., "--model", "-m", help="Pretrained model (as for probe)."),
    data: str = typer.Option("digits", "--data", "-d", help="Fine-tuning data (as for probe)."),
    out_dir: Path = typer.Option(Path("runs/finetune"), "--out", "-o"),
    steps: int = typer.Option(2000, "--steps"),
    batch_size: int = typer.Option(64, "--batch-size", help="Per process."),
    lr: float = typer.Option(5e-5, "--lr"),
    warmup: int = typer.Option(100, "--warmup"),
    ema_decay: float = typer.Option(0.999, "--ema-decay"),
    grad_clip: float = typer.Option(1.0, "--grad-clip"),
    mixed_precision: str = typer.Option("no", "--mixed-precision", help="no, fp16 or bf16 (accelerate)."),
    seed: int = typer.Option(0, "--seed"),
    checkpoint_every: int = typer.Option(500, "--checkpoint-every"),
    etsdm: bool = typer.Option(False, "--etsdm/--no-etsdm", help="Retrofit E-TSDM (off: the control run)."),
    t_tilde: float = typer.Option(100.0, "--t-tilde"),
    n_sub: int = typer.Option(5, "--n"),
    resume: bool = typer.Option(False, "--resume"),
    revision: str | None = typer.Option(None, "--revision"),
    offline: bool = typer.Option(False, "--offline"),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Fine-tune a pretrained UNet with the same loop; --etsdm retrofits the fix, without it a control."""
    _setup_logging(verbose)
    from .models import load_model

    m = load_model(model, revision=revision, offline=offline or None)
    if m.module is None:
        raise InputError("finetune needs a diffusers UNet (hub id, folder or weights file), not a callable")
    cfg = _train_config(locals())
    _run_training(
        m.module,
        m.scheduler_config,
        data,
        out_dir,
        cfg,
        resume,
        progress and sys.stderr.isatty(),
        f"finetune of {model}",
    )


@app.command()
@cli_errors
def sample(
    model: str = typer.Option(..., "--model", "-m"),
    scheduler: str = typer.Option("ddim", "--scheduler", help="ddpm, ddim, dpmsolver (DPM-Solver++ 2M)."),
    steps: int = typer.Option(50, "--steps"),
    num: int = typer.Option(64, "--num", "-n"),
    seed: int = typer.Option(0, "--seed"),
    batch_size: int = typer.Option(256, "--batch-size"),
    device: str = typer.Option("auto", "--device"),
    out_dir: Path = typer.Option(Path("runs/samples"), "--out", "-o"),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Sample a model (E-TSDM map honoured): writes samples.png (grid) and samples.npz."""
    _setup_logging(verbose)
    from . import io as lio
    from .models import load_model
    from .sampling import image_grid, png_bytes
    from .sampling import sample as draw

    if num < 1:
        raise InputError("--num must be ≥ 1")
    m = load_model(model, device=device)
    x = draw(m, num, scheduler=scheduler, steps=steps, seed=seed, batch_size=batch_size)
    meta = {
        "model": model,
        "config_hash": m.config_hash,
        "scheduler": scheduler,
        "steps": steps,
        "num": num,
        "seed": seed,
        "etsdm": m.etsdm,
        "versions": lio.package_versions(),
    }
    lio.write_outputs(
        out_dir,
        {
            "samples.png": png_bytes(image_grid(x)),
            "samples.npz": lio.npz_bytes(x0=x.numpy()),
            "run.json": lio.json_bytes(meta),
        },
    )
    out.print(f"{num} samples ({scheduler}, {steps} steps) written to {out_dir}/samples.png and samples.npz")


def _list(s: str, conv, what: str) -> list:
    try:
        vals = [conv(v) for v in s.split(",") if v.strip()]
    except ValueError as e:
        raise InputError(f"{what} {s!r}: use a comma list like 1,-0.5") from e
    if not vals:
        raise InputError(f"{what} is empty")
    return vals


@app.command()
@cli_errors
def evaluate(
    model: str = typer.Option(..., "--model", "-m"),
    baseline: list[str] = typer.Option(
        [], "--baseline", "-b", help="Model(s) to compare with, same seeds (repeatable)."
    ),
    data: str = typer.Option("digits", "--data", "-d", help="Reference data."),
    scheduler: str = typer.Option("ddim,dpmsolver", "--scheduler", help="Comma list: ddpm, ddim, dpmsolver."),
    steps: str = typer.Option("5,10,20,50", "--steps", help="Comma list of sampling step counts."),
    num: int = typer.Option(500, "--num", "-n", help="Samples per (model, scheduler, steps, seed)."),
    seeds: int = typer.Option(3, "--seeds", help="Number of seeds (0..S−1): the spread of each metric."),
    inception_weights: str | None = typer.Option(
        None, "--inception-weights", help="Local Inception weights for FID (torchmetrics, extra 'fid')."
    ),
    device: str = typer.Option("auto", "--device"),
    out_dir: Path = typer.Option(Path("runs/eval"), "--out", "-o"),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Sample quality vs steps for a model and a baseline: Fréchet distances (pixels, digits-classifier
    features), sliced Wasserstein, FID when Inception weights are available. Writes eval.csv,
    eval_summary.csv, eval.png."""
    _setup_logging(verbose)
    from . import io as lio
    from .data import load_data
    from .evaluate import evaluate_models, summarize_eval
    from .models import load_model
    from .plots import figure_png, plot_eval
    from .sampling import SAMPLERS

    schedulers = _list(scheduler, str, "--scheduler")
    for sch in schedulers:
        if sch not in SAMPLERS:
            raise InputError(f"--scheduler {sch!r} not known; use {', '.join(SAMPLERS)}")
    step_list = _list(steps, int, "--steps")
    if num < 3 or seeds < 1:
        raise InputError("--num must be ≥ 3 and --seeds ≥ 1")
    specs = {"model": model}
    for i, b in enumerate(baseline):
        specs["baseline" if i == 0 else f"baseline{i + 1}"] = b
    models = {k: load_model(v, device=device) for k, v in specs.items()}
    shapes = {tuple(m.sample_shape) for m in models.values()}
    if len(shapes) != 1:
        raise InputError(f"model and baseline take different sample shapes {sorted(shapes)}")
    ref = load_data(data, None, 0, models["model"].sample_shape)
    if inception_weights and not Path(inception_weights).exists():
        raise InputError(f"--inception-weights {inception_weights}: no such file")
    df = evaluate_models(
        models,
        ref,
        schedulers=schedulers,
        steps=step_list,
        num=num,
        seeds=list(range(seeds)),
        inception_weights=inception_weights,
    )
    df.insert(1, "spec", df["model"].map(specs))
    summ = summarize_eval(df)
    fid_ok = bool(df["fid_available"].any())
    meta = {
        "model": model,
        "baseline": baseline,
        "data": data,
        "schedulers": schedulers,
        "steps": step_list,
        "num": num,
        "seeds": seeds,
        "fid": "computed" if fid_ok else "unavailable (no local Inception weights)",
        "reference_size": int(len(ref)),
        "versions": lio.package_versions(),
    }
    lio.write_outputs(
        out_dir,
        {
            "eval.csv": lio.csv_bytes(df),
            "eval_summary.csv": lio.csv_bytes(summ),
            "eval.png": figure_png(plot_eval(summ)),
            "run.json": lio.json_bytes(meta),
        },
    )
    tab = Table(title="lipscope evaluate (mean ± std over seeds)", title_justify="left")
    for c in ("model", "scheduler", "steps", "FD digits", "FD pixel", "SWD", "FID"):
        tab.add_column(c)
    for _, r in summ.iterrows():
        fid = f"{r['fid_mean']:.3g}" if fid_ok else "unavailable"
        tab.add_row(
            r["model"],
            r["scheduler"],
            str(r["steps"]),
            f"{r['fd_digits_mean']:.3g} ± {r['fd_digits_std']:.2g}",
            f"{r['fd_pixel_mean']:.3g} ± {r['fd_pixel_std']:.2g}",
            f"{r['swd_pixel_mean']:.3g} ± {r['swd_pixel_std']:.2g}",
            fid,
        )
    out.print(tab)


@app.command()
@cli_errors
def compare(
    runs: list[Path] = typer.Argument(..., help="Probe run folders (each with lipschitz.csv and run.json)."),
    out_file: Path = typer.Option(Path("compare.png"), "--out", "-o"),
    t_split: float | None = typer.Option(None, "--t-split"),
) -> None:
    """Overlay the Lipschitz-vs-t curves of several probe runs, E-TSDM boundaries marked."""
    import json

    import pandas as pd

    from . import io as lio
    from .etsdm import etsdm_boundaries
    from .plots import figure_png, plot_compare
    from .probe import summary

    if out_file.suffix.lower() != ".png":
        raise InputError(f"--out {out_file}: compare writes a .png")
    frames, bounds = {}, set()
    tab = Table(title="lipscope compare", title_justify="left")
    for c in ("run", "method", "peak K (t)", "median K above", "singularity ratio"):
        tab.add_column(c)
    for r in runs:
        if not (r / "lipschitz.csv").exists():
            raise InputError(f"{r}: no lipschitz.csv; pass folders written by lipscope probe")
        df = pd.read_csv(r / "lipschitz.csv")
        meta = json.loads((r / "run.json").read_text()) if (r / "run.json").exists() else {}
        et = meta.get("model", {}).get("etsdm")
        if et:
            bounds.update(etsdm_boundaries(et["t_tilde"], et["n"])[1:])
        frames[r.name] = df
        T = int(meta.get("model", {}).get("T", 1000))
        for method in df["method"].unique():
            s = summary(df, T, t_split, method=method)
            tab.add_row(
                r.name,
                method,
                f"{s['peak_K']:.4g} ({s['peak_t']:g})",
                f"{s['median_K_above']:.4g}",
                f"{s['singularity_ratio']:.3g}",
            )
    lio.atomic_write_bytes(out_file, figure_png(plot_compare(frames, sorted(bounds))))
    out.print(tab)
    out.print(f"written {out_file}")


@app.command()
@cli_errors
def models() -> None:
    """List the built-in models with their provenance (model cards)."""
    from .builtins import card, list_builtins

    tab = Table(title="lipscope built-in models", title_justify="left")
    for c in (
        "model",
        "what",
        "recipe / provenance",
        "final loss",
        "singularity (one-step FD, t<100 max / t≥100 median)",
    ):
        tab.add_column(c, overflow="fold")
    for name in list_builtins():
        c = card(name)
        if c.get("kind") == "closed form":
            tab.add_row(c["name"], c["description"], "closed form (lipscope.theory)", "—", "—")
            continue
        fd = c["probe_one_step_fd"]
        what = "E-TSDM retrofit" if c["etsdm"] else ("control fine-tune" if "control" in name else "base DDPM")
        tab.add_row(
            c["name"],
            f"{what}; {c['data']}",
            f"{c['recipe']} ({c['steps']} steps, seed {c['seed']})",
            f"{c['final_loss_mean_last_100']:.4f}",
            f"{fd['max_below']:.4g} / {fd['median_above']:.4g}",
        )
    out.print(tab)


def _print_summary(name: str, s: dict[str, float], df, out_dir: Path, wall: float) -> None:
    tab = Table(title=f"lipscope probe — {name}", show_header=False, title_justify="left")
    tab.add_row("peak K", f"{s['peak_K']:.4g}  at t = {s['peak_t']:g}")
    tab.add_row(f"median K, t ≥ {s['t_split']:g}", f"{s['median_K_above']:.4g}")
    tab.add_row(f"mean K, t < {s['t_split']:g}", f"{s['mean_K_below']:.4g}")
    tab.add_row("singularity ratio", f"{s['singularity_ratio']:.3g}")
    tab.add_row("forwards/s", f"{df.attrs['forwards_per_s']:.1f}  ({df.attrs['forwards']} forwards, {wall:.1f} s)")
    tab.add_row("written", f"{out_dir}/lipschitz.csv, run.json, lipschitz.png")
    out.print(tab)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
