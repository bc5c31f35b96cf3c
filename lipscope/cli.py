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
        "builtin:digits-gaussian",
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
        data = DEFAULT_DATA.get(model.removeprefix("builtin:"), "model") if model.startswith("builtin:") else "model"
    df = run_probe(
        m,
        data,
        timesteps=timesteps,
        dt=dt,
        scheme=scheme,
        method=method,
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


def _floats(s: str | None, what: str) -> list[float] | None:
    if s is None:
        return None
    try:
        return [float(v) for v in s.split(",") if v.strip()]
    except ValueError as e:
        raise InputError(f"{what} {s!r}: use a comma list of numbers like 1,-0.5") from e


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

    mu, vv = _floats(mean, "--mean"), _floats(var, "--var")
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
