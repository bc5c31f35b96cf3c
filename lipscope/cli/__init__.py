"""The ``lipscope`` command line (typer): one small module per command group, parsing and printing only.

Exit codes: 0 ok, 2 bad input (one line on stderr), 1 internal error, 130 interrupted.
"""

from __future__ import annotations

import signal
import sys

import typer
from typer.exceptions import TyperException

from . import compare, groundtruth, probe, report, sample, theory, train
from .common import Terminated, app, error, stopped


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
    report.report,
    compare.models,
    groundtruth.groundtruth,
):
    app.command()(_command)


def _terminate(signum: int, frame: object) -> None:
    # one interrupt: a second SIGTERM (torchrun sends one to every worker when a peer stops) must not raise inside
    # the clean-up the first one started
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Terminated()


def main() -> None:
    """Entry point: usage errors (unknown flag, wrong type, value out of range) become one line, exit 2;
    SIGTERM interrupts like Ctrl-C (the run's clean-up runs; exit 143)."""
    signal.signal(signal.SIGTERM, _terminate)
    try:
        _run()
    finally:
        # the command has returned: a SIGTERM now (torchrun's to every worker once one exits) changes nothing — no
        # traceback from an atexit callback, and the exit code stays the command's (SIG_IGN also survives Python's
        # finalization, which resets the handlers it installed to the default, so a late one cannot kill it either)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _run() -> None:
    try:
        rc = app(standalone_mode=False)
    except typer.Abort:
        stopped("no output was written")
        sys.exit(130)
    except TyperException as e:  # click's UsageError/BadParameter family (typer vendors click)
        fmt = getattr(e, "format_message", None)
        if fmt is None:
            raise
        ctx, msg = getattr(e, "ctx", None), fmt()
        if msg:  # (an empty message: help was printed for a bare command)
            where = f" (see {ctx.command_path} --help)" if ctx is not None else ""
            error(f"{msg}{where}")
        sys.exit(int(getattr(e, "exit_code", 2)))
    sys.exit(rc if isinstance(rc, int) else 0)


__all__ = ["app", "main"]
