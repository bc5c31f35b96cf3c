"""What every command shares: the typer app, logging to one line, and the one error-mapping layer.

Library errors name parameters in backticks (`` `dt` must be > 0``); :func:`render_error` turns each
into the command-line flag that sets it (``--dt must be > 0``). The table :data:`FLAGS` is the only
place parameters are mapped to flags.
"""

from __future__ import annotations

import errno
import functools
import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from .. import shard
from ..errors import InputError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Find, explain and fix the Lipschitz singularity of diffusion models near t = 0 (Yang et al., 2306.11251).",
)
err = Console(stderr=True)
out = Console()

# parameter name (as in the Python API) → flag; parameters not listed map to --name-with-dashes
FLAGS: dict[str, str] = {
    "out": "--out",
    "out_dir": "--out",
    "n_sub": "--n",
    "n": "--n",
    "warmup_steps": "--warmup",
    "config": "--config",
    "spec": "--model",
    "model": "--model",
    "model_args": "--model-arg",
    "class_labels": "--class-label",
    "data": "--data",
}
# Python-API parameters no command exposes: shown as they are, never as an invented flag
API_ONLY = frozenset(
    {"keep_checkpoints", "weight_decay", "lr_schedule", "stop_after", "component", "confidence", "grid", "images"}
)
_PARAM = re.compile(r"`([A-Za-z_][A-Za-z0-9_]*)`")


def flag(param: str) -> str:
    """The command-line flag of a library parameter (``param`` itself for API-only parameters)."""
    if param in API_ONLY:
        return param
    return FLAGS.get(param, "--" + param.replace("_", "-"))


def render_error(message: str) -> str:
    """A library message in command-line words: each `param` becomes its flag."""
    return _PARAM.sub(lambda m: flag(m.group(1)), message)


class _OneLine(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        err.print(
            f"[yellow]{record.levelname.lower()}:[/] {escape(record.getMessage())}", highlight=False, soft_wrap=True
        )


def setup_logging(verbose: bool) -> None:
    lg = logging.getLogger("lipscope")
    lg.handlers[:] = [_OneLine()]
    lg.setLevel(logging.INFO if verbose else logging.WARNING)
    if shard.world_size() > 1 and not shard.is_main():
        lg.setLevel(logging.ERROR)  # several processes: warnings once, from the main one
    lg.propagate = False
    from diffusers.utils import logging as dlogging

    dlogging.set_verbosity_error()
    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)


F = TypeVar("F", bound=Callable[..., Any])


class Terminated(KeyboardInterrupt):
    """SIGTERM, turned into an interrupt so the same clean-up runs (exit 143)."""


def what_is_left(out: Path | None) -> str:
    """After an interrupt: what the run folder holds and whether ``--resume`` applies."""
    if out is not None and (out.parent / f".{out.name}.partial" / "options.json").is_file():
        return f"the finished part of the probe is kept beside {out}; continue with --resume (same options)"
    if out is None or not out.is_dir() or not any(out.iterdir()):
        return "no output was written"
    steps = sorted(
        (int(p.name.split("-")[1]) for p in (out / "checkpoints").glob("step-*") if p.name.split("-")[1].isdigit()),
    )
    if steps:
        return f"{out} holds checkpoints up to step {steps[-1]}; continue with --resume (same options)"
    return f"nothing new was written; {out} is as it was before this run"


def cli_errors(fn: F) -> F:
    """Bad input → one line on stderr and exit 2; interrupts → 130 (SIGTERM 143) with what is left;
    anything else is an internal error (1)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except InputError as e:
            line = render_error(str(e)).replace("\r", "\\r").replace("\n", "\\n")  # one line, even for odd paths
            err.print(f"[red]error:[/] {escape(line)}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except OSError as e:
            if e.errno != errno.ENAMETOOLONG:
                raise
            name = str(e.filename or "")
            msg = f"a path is too long for the file system ({name[:60]}…); use a shorter path"
            err.print(f"[red]error:[/] {escape(msg)}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt as e:
            out_dir = kwargs.get("out_dir")
            left = what_is_left(Path(out_dir) if out_dir is not None else None)
            err.print(f"[red]interrupted[/]: {escape(left)}", highlight=False, soft_wrap=True)
            raise typer.Exit(143 if isinstance(e, Terminated) else 130) from None

    return wrapper  # type: ignore[return-value]


def parse_list(s: str, conv: Callable[[str], Any], param: str) -> list[Any]:
    """A comma list like ``1,-0.5`` (the library's parameter ``param``)."""
    try:
        vals = [conv(v) for v in s.split(",") if v.strip()]
    except ValueError as e:
        raise InputError(f"`{param}` {s!r}: use a comma list like 1,-0.5") from e
    if not vals:
        raise InputError(f"`{param}` is empty; give a comma list like 5,10")
    return vals
