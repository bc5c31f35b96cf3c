"""``lipscope compare`` (overlay probe runs) and ``lipscope models`` (the built-ins)."""

from __future__ import annotations

import textwrap
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
    from ..cards import card, list_builtins
    from .common import out

    width = max(60, out.width)  # the terminal's (COLUMNS); lines wrap between words, under their label

    def field(label: str, text: str) -> str:
        return textwrap.fill(text, width, initial_indent=f"  {label:<13}", subsequent_indent=" " * 15,
                             break_long_words=False, break_on_hyphens=False)  # fmt: skip

    blocks = ["lipscope built-in models"]
    for name in list_builtins():
        c = card(name)
        if c.get("kind") == "closed form":
            blocks.append("\n".join([c["name"], field("what:", c["description"]),
                                      field("provenance:", "closed form (lipscope.theory)")]))  # fmt: skip
            continue
        fd = c["probe_one_step_fd"]
        what = "E-TSDM retrofit" if c["etsdm"] else ("control fine-tune" if "control" in name else "base DDPM")
        blocks.append("\n".join([
            c["name"],
            field("what:", f"{what}; {c['data']}"),
            field("recipe:", f"{c['recipe']} ({c['steps']} steps, seed {c['seed']})"),
            field("final loss:", f"{c['final_loss_mean_last_100']:.4f} (mean of the last 100 training steps)"),
            field("singularity:", f"one-step FD K: max over t < 100 {fd['max_below']:.4g}, mean over t < 100 "
                  f"{fd['mean_below']:.4g}, median over t ≥ 100 {fd['median_above']:.4g}; grid `all`, measured by "
                  f"{c['probe_settings']}"),
        ]))  # fmt: skip
    say("\n\n".join(blocks))
