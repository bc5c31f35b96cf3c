"""``lipscope compare`` (overlay probe runs) and ``lipscope models`` (the built-ins)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from .common import cli_errors, say


@cli_errors
def compare(
    runs: list[Path] = typer.Argument(..., help="Probe run folders (each with lipschitz.csv and run.json)."),
    out_file: Path = typer.Option(Path("compare.png"), "--out", "-o"),
    t_split: float | None = typer.Option(None, "--t-split"),
) -> None:
    """Overlay the Lipschitz-vs-t curves of several probe runs, E-TSDM boundaries marked."""
    from ..runs import compare_runs

    rows = compare_runs(list(runs), out_file, t_split)
    tab = Table(title="lipscope compare", title_justify="left")
    for c in ("run", "method", "peak K (t)", "median K above", "singularity ratio"):
        tab.add_column(c)
    for s in rows:
        tab.add_row(
            s["run"],
            s["method"],
            f"{s['peak_K']:.4g} ({s['peak_t']:g})",
            f"{s['median_K_above']:.4g}",
            f"{s['singularity_ratio']:.3g}",
        )
    say(tab)
    say(f"written {out_file}")


@cli_errors
def models() -> None:
    """List the built-in models with their provenance (model cards)."""
    from ..zoo import card, list_builtins

    tab = Table(title="lipscope built-in models", title_justify="left")
    for col in (
        "model",
        "what",
        "recipe / provenance",
        "final loss",
        "singularity (one-step FD, t<100 max / t≥100 median)",
    ):
        tab.add_column(col, overflow="fold")
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
    say(tab)
