"""The ``lipscope`` command line (typer): one small module per command group, parsing and printing only.

Exit codes: 0 ok, 2 bad input (one line on stderr), 1 internal error, 130 interrupted.
"""

from __future__ import annotations

import signal
import sys

import typer
from rich.markup import escape
from typer.exceptions import TyperException

from . import compare, groundtruth, probe, sample, theory, train
from .common import Terminated, app, err


@app.callback()
def _root() -> None:
    """Find, explain and fix the Lipschitz singularity of diffusion models near t = 0."""


# the commands, in the order --help lists them
for _command in (
    probe.probe,
    theory.theory,
    train.train,
    train.finetune,
    sample.sample,
    sample.evaluate,
    compare.compare,
    compare.models,
    groundtruth.groundtruth,
):
    app.command()(_command)


def _terminate(signum: int, frame: object) -> None:
    raise Terminated()


def main() -> None:
    """Entry point: usage errors (unknown flag, wrong type, value out of range) become one line, exit 2;
    SIGTERM interrupts like Ctrl-C (the run's clean-up runs; exit 143)."""
    signal.signal(signal.SIGTERM, _terminate)
    try:
        rc = app(standalone_mode=False)
    except typer.Abort:
        err.print("[red]interrupted[/]: no output was written")
        sys.exit(130)
    except TyperException as e:  # click's UsageError/BadParameter family (typer vendors click)
        fmt = getattr(e, "format_message", None)
        if fmt is None:
            raise
        ctx, msg = getattr(e, "ctx", None), fmt()
        if msg:  # (an empty message: help was printed for a bare command)
            where = f" (see {ctx.command_path} --help)" if ctx is not None else ""
            err.print(f"[red]error:[/] {escape(msg)}{where}", highlight=False, soft_wrap=True)
        sys.exit(int(getattr(e, "exit_code", 2)))
    sys.exit(rc if isinstance(rc, int) else 0)


__all__ = ["app", "main"]
