"""``lipscope theory``: Theorem 3.1 on Gaussian data."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from .common import cli_errors, parse_list, say, setup_logging
from .options import SCHEDULE, VERBOSE


@cli_errors
def theory(
    dim: int | None = typer.Option(None, "--dim", help="Data dimension D (default: from --mean/--var, else 2)."),
    mean: str | None = typer.Option(None, "--mean", help="Gaussian mean, comma list of D numbers (default 0)."),
    var: str | None = typer.Option(None, "--var", help="Diagonal variances (default: geomspace(0.01, 1, D))."),
    cov: Path | None = typer.Option(None, "--cov", help="Full covariance as a .npy (D×D) file instead of --var."),
    mixture: int = typer.Option(0, "--mixture", help="K ≥ 2: a seeded random K-component mixture instead."),
    schedule: str = typer.Option(
        "linear",
        "--schedule",
        parser=SCHEDULE,
        help="linear, scaled_linear, cosine, sigmoid, vp-linear, vp-cosine.",
    ),
    timesteps: str = typer.Option("default", "--timesteps", "-t", help="Grid (as for probe)."),
    dt: float = typer.Option(1.0, "--dt", help="Forward FD step in model steps."),
    samples: int = typer.Option(512, "--samples", "-n", min=2, help="Monte Carlo samples."),
    seed: int = typer.Option(0, "--seed", min=0),
    train: bool = typer.Option(False, "--train", help="Also fit a small MLP noise predictor and overlay it."),
    steps: int = typer.Option(3000, "--steps", min=1, help="Training steps for --train."),
    etsdm: bool = typer.Option(False, "--etsdm", help="With --train: also train the E-TSDM variant."),
    out_dir: Path = typer.Option(Path("runs/theory"), "--out", "-o"),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty --out folder (atomically)."),
    verbose: bool = VERBOSE,
) -> None:
    """Theorem 3.1 on Gaussian data: closed forms vs FD, JVP and (optionally) a trained net."""
    setup_logging(verbose)
    from ..runs import TheoryOptions, run_theory

    res = run_theory(
        TheoryOptions(
            dim=dim,
            mean=None if mean is None else tuple(parse_list(mean, float, "mean")),
            var=None if var is None else tuple(parse_list(var, float, "var")),
            cov=None if cov is None else str(cov),
            mixture=mixture,
            schedule=schedule,
            timesteps=timesteps,
            dt=dt,
            samples=samples,
            seed=seed,
            train=train,
            steps=steps,
            etsdm=etsdm,
            out=str(out_dir),
            overwrite=overwrite,
        )
    )
    df = res.table
    rel = (df["dtau_jvp"] / df["dtau_closed_mean"] - 1.0).abs()
    tab = Table(title=f"lipscope theory — {res.title}", show_header=False, title_justify="left")
    first, last = df.iloc[0], df.iloc[-1]
    tab.add_row(
        f"at t = {first['t']:g}",
        f"‖∂ε*/∂τ‖ RMS {first['dtau_exact_rms']:.4g}; term1 {first['term1_rms']:.4g}, term2 {first['term2_rms']:.4g}",
    )
    tab.add_row(f"at t = {last['t']:g}", f"‖∂ε*/∂τ‖ RMS {last['dtau_exact_rms']:.4g}")
    tab.add_row("JVP vs closed form", f"max relative error {rel.max():.2e} over {len(df)} steps")
    for name in res.nets:
        tab.add_row(
            f"net {name} at t = {first['t']:g}", f"FD {df['K_fd_' + name].iloc[0]:.4g} (truth {first['K_fd_mc']:.4g})"
        )
    tab.add_row("written", f"{res.out}/theory.csv, run.json, theory.png")
    say(tab)
