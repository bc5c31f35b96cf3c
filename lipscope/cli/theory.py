"""``lipscope theory``: Theorem 3.1 on Gaussian data."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from .common import cli_errors, parse_list, say, setup_logging
from .options import SCHEDULE, VERBOSE, choice

PROCESS = choice("vp", "ve", "edm", "flow")


@cli_errors
def theory(
    dim: int | None = typer.Option(None, "--dim", help="Data dimension D (default: from --mean/--var, else 2)."),
    mean: str | None = typer.Option(None, "--mean", help="Gaussian mean, comma list of D numbers (default 0)."),
    var: str | None = typer.Option(None, "--var", help="Diagonal variances (default: geomspace(0.01, 1, D))."),
    cov: Path | None = typer.Option(None, "--cov", help="Full covariance as a .npy (D×D) file instead of --var."),
    mixture: int = typer.Option(0, "--mixture", help="K ≥ 2: a seeded random K-component mixture instead."),
    rank: int | None = typer.Option(
        None, "--rank", help="r: data near an r-dim set: r directions of the --var variances, the others at --floor²."
    ),
    floor: float | None = typer.Option(None, "--floor", help="With --rank: standard deviation s of the other D − r."),
    process: str = typer.Option(
        "vp", "--process", parser=PROCESS, help="vp (with --schedule), ve, edm (--sigma-min/--sigma-max/--rho), flow."
    ),
    sigma_min: float | None = typer.Option(None, "--sigma-min", help="ve/edm: smallest σ (default 0.01 / 0.002)."),
    sigma_max: float | None = typer.Option(None, "--sigma-max", help="ve/edm: largest σ (default 1348 / 80)."),
    rho: float | None = typer.Option(None, "--rho", help="edm: Karras ramp exponent ρ (default 7)."),
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
            rank=rank,
            floor=floor,
            process=process,
            sigma_min=sigma_min,
            sigma_max=sigma_max,
            rho=rho,
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
    for line in exponent_lines(res.meta["exponent"]):
        tab.add_row(*line)
    for name in res.nets:
        tab.add_row(
            f"net {name} at t = {first['t']:g}", f"FD {df['K_fd_' + name].iloc[0]:.4g} (truth {first['K_fd_mc']:.4g})"
        )
    tab.add_row("written", f"{res.out}/theory.csv, run.json, theory.png")
    say(tab)


def exponent_lines(ex: dict) -> list[tuple[str, str]]:
    """The exponent per method next to the closed form's band and limit, as table rows."""
    cf = ex["closed_form"]
    rows = []
    for m, e in ex.items():
        if m == "closed_form":
            continue
        ci = (
            f"[{e['ci_low']:.3f}, {e['ci_high']:.3f}]"
            if e["ci_low"] == e["ci_low"]
            else f"(interval n/a, because {e.get('ci_reason')})"
        )
        val = f"n/a, because {e['reason']}" if e["reason"] else f"{e['p']:.3f} {ci}"
        rows.append((f"exponent ({m})", f"K ∝ τ^p, p = {val} over t ∈ [{e['t_lo']:g}, {e['t_hi']:g}]"))
    lo, hi = cf["band"]
    band = (
        f"[{lo:.3f}, {hi:.3f}] (exact RMS slope {cf['closed_form_rms']:.3f})"
        if lo == lo
        else f"n/a, because {cf.get('band_reason')}"
    )
    lim = (
        f"{cf['limit']:.3g} ({cf['limit_reason']})"
        if cf["limit"] == cf["limit"]
        else f"n/a, because {cf['limit_reason']}"
    )
    rows.append(("closed-form band", f"{band}; limit t → 0: {lim}"))
    return rows
