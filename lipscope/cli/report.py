"""``lipscope report``: probe (and evaluate) runs → one self-contained HTML page (or markdown)."""

from __future__ import annotations

from pathlib import Path

import typer

from .common import cli_errors, say, setup_logging


@cli_errors
def report(
    runs: list[Path] = typer.Argument(..., help="Probe run folders (base, E-TSDM, control, …); the first is A."),
    eval_runs: list[Path] | None = typer.Option(
        None, "--eval", help="Evaluate run folders of these models (their paired differences; repeatable)."
    ),
    out_file: Path = typer.Option(Path("report.html"), "--out", "-o", help="The page: FILE.html (or FILE.md)."),
    format: str = typer.Option(
        "html", "--format", help="html (one file: figures embedded, no network, no script) or md (PNGs beside it)."
    ),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """One page of what the runs show: model cards, K(t) with intervals, exponent and onset, step budgets, training
    coverage, side by side with ratios and intervals, sample quality, and a verdict generated from the numbers."""
    setup_logging(verbose)
    from ..runs.report import report as make_report

    res = make_report(list(runs), out_file, list(eval_runs or ()), format)
    say("verdict:")
    for line in res.verdict:
        say(f"  • {line}")
    say(f"written {res.path}")
