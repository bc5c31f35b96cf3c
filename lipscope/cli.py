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
