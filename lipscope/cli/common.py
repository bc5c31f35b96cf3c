"""What every command shares: the typer app, the one output path, logging to one line, and the one error layer.

Everything lipscope prints goes through :func:`say` (stdout), :func:`warn`, :func:`error` and :func:`stopped`
(stderr): rich consoles with markup, emoji and highlighting off, so text is printed as it is (``patches:abc:`` and
``[x]`` stay so, in messages, warnings and tables) and a message is never wrapped into two lines. Launched with
several processes (torchrun, accelerate), only the main process prints.

Library errors name parameters in backticks (`` `dt` must be > 0``); :func:`render_error` turns each into the
command-line flag that sets it (``--dt must be > 0``); backticked text that names no lipscope parameter (a
library's own message) is left as it is. The table :data:`FLAGS` is the only place parameters are mapped to flags.
"""

from __future__ import annotations

import errno
import functools
import json
import logging
import os
import re
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.text import Text

from ..errors import InputError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode=None,  # help is printed as written: no markup, no emoji codes
    pretty_exceptions_enable=False,
    help="Find, explain and fix the Lipschitz singularity of diffusion models near t = 0 (Yang et al., 2306.11251).",
)
_PLAIN = dict(markup=False, emoji=False, highlight=False, soft_wrap=True)
err = Console(stderr=True, **_PLAIN)  # type: ignore[arg-type]
out = Console(**_PLAIN)  # type: ignore[arg-type]


def launched_rank() -> int:
    """This process's rank under torchrun/accelerate (0 when started directly), read from the environment: never
    starts a process group."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def say(*renderables: Any) -> None:
    """Print results (text or tables) on stdout, as they are; from the main process only. Text is never wrapped
    (a path stays one line); a table is laid out to the terminal's width (its cells wrap between words)."""
    if launched_rank() == 0:
        for r in renderables:
            out.print(r, soft_wrap=isinstance(r, str | Text))


def one_line(text: str) -> str:
    return str(text).replace("\r", "\\r").replace("\n", "\\n")  # one line, even for odd paths


def _line(label: str, style: str, text: str) -> None:
    if launched_rank() == 0:
        err.print(Text.assemble((label, style), " ", one_line(text)))


def warn(text: str) -> None:
    """``warning: …`` on stderr, one line."""
    _line("warning:", "yellow", text)


def error(text: str) -> None:
    """``error: …`` on stderr, one line (also into torchrun's error file, so its report names the cause)."""
    _line("error:", "red", text)
    _torchrun_error_file(f"error: {one_line(text)}")


def stopped(text: str) -> None:
    """``interrupted: …`` on stderr, one line."""
    _line("interrupted:", "red", text)


def _torchrun_error_file(message: str) -> None:
    """Under torchrun each process may leave the reason it failed where the launcher's report reads it."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        try:
            Path(path).write_text(json.dumps({"message": message, "timestamp": int(time.time())}))
        except OSError:
            pass


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
    "runs": "RUN",  # lipscope report's arguments
}
# Python-API parameters no command exposes: shown as they are, never as an invented flag
API_ONLY = frozenset(
    {"keep_checkpoints", "weight_decay", "lr_schedule", "stop_after", "component", "confidence", "grid", "images"}
) | {"axis", "df", "mu"}  # with_etsdm's VE / EDM axis; step_budget's table and build_scheduler's shift
_PARAM = re.compile(r"`([A-Za-z_][A-Za-z0-9_]*)`")


def flag(param: str) -> str:
    """The command-line flag of a library parameter (``param`` itself for API-only parameters)."""
    if param in API_ONLY:
        return param
    return FLAGS.get(param, "--" + param.replace("_", "-"))


@functools.cache
def command_flags() -> frozenset[str]:
    """Every option of every lipscope command (``--dt``, ``--out``, …)."""
    import typer.main

    def opts(cmd: Any) -> set[str]:
        found = {o for p in cmd.params for o in [*p.opts, *p.secondary_opts]}
        for sub in getattr(cmd, "commands", {}).values():
            found |= opts(sub)
        return found

    return frozenset(opts(typer.main.get_command(app)))


def render_error(message: str) -> str:
    """A library message in command-line words: each `param` that names a lipscope parameter becomes its flag; other
    backticked words (a torch or diffusers message quoted in ours: `weights_only`, `False`) stay as they are."""

    def sub(m: re.Match[str]) -> str:
        name = m.group(1)
        if name in API_ONLY or flag(name) in command_flags():
            return flag(name)
        return m.group(0)

    return _PARAM.sub(sub, message)


class _OneLine(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        _line(f"{record.levelname.lower()}:", "yellow", render_error(record.getMessage()))


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
    """Python warnings: lipscope's own as one ``warning:`` line; other libraries' only with ``--verbose``."""
    if "lipscope" in Path(str(filename)).parts:
        warn(str(message))
    elif logging.getLogger("lipscope").isEnabledFor(logging.INFO):
        _line("warning:", "yellow", f"{category.__name__}: {message} ({Path(str(filename)).name}:{lineno})")


def setup_logging(verbose: bool) -> None:
    """lipscope's messages as one line each (info with ``verbose``); the libraries it drives (diffusers,
    transformers, huggingface_hub) keep quiet, progress bars included, unless ``verbose``. What it changes is put
    back by :func:`restore_logging` when the command ends (:func:`cli_errors`), so a command run inside another
    program (a notebook, a test) leaves its logging as it was."""
    _SAVED.append(_logging_state())
    lg = logging.getLogger("lipscope")
    lg.handlers[:] = [_OneLine()]
    lg.setLevel(logging.INFO if verbose else logging.WARNING)
    if launched_rank() != 0:
        lg.setLevel(logging.ERROR)  # several processes: warnings once, from the main one
    lg.propagate = False
    warnings.showwarning = _show_warning
    quiet_libraries(not verbose)


# how to put back the logging state each setup_logging changed, latest last
_SAVED: list[Callable[[], None]] = []


def _logging_state() -> Callable[[], None]:
    """A function that puts back what :func:`setup_logging` changes, as it is now: the lipscope logger (handlers,
    level, propagation), Python's warning printer, and the libraries' levels and progress bars."""
    from diffusers.utils import logging as dlogging
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    lg, hub = logging.getLogger("lipscope"), logging.getLogger("huggingface_hub")
    handlers, level, propagate, show = list(lg.handlers), lg.level, lg.propagate, warnings.showwarning
    d_level, d_bars = dlogging.get_verbosity(), dlogging.is_progress_bar_enabled()
    hub_level, hub_bars_off = hub.level, are_progress_bars_disabled()
    env = os.environ.get("TRANSFORMERS_VERBOSITY")
    tlog = _transformers_logging()
    t_level = tlog.get_verbosity() if tlog is not None else None

    def restore() -> None:
        lg.handlers[:] = handlers
        lg.setLevel(level)
        lg.propagate = propagate
        warnings.showwarning = show
        dlogging.set_verbosity(d_level)
        (dlogging.enable_progress_bar if d_bars else dlogging.disable_progress_bar)()
        hub.setLevel(hub_level)
        (disable_progress_bars if hub_bars_off else enable_progress_bars)()
        if env is None:
            os.environ.pop("TRANSFORMERS_VERBOSITY", None)
        else:
            os.environ["TRANSFORMERS_VERBOSITY"] = env
        if tlog is not None:
            tlog.set_verbosity(t_level)

    return restore


def _transformers_logging() -> Any:
    """transformers' logging module when transformers is imported already (and real), else None."""
    import sys

    if sys.modules.get("transformers") is None:
        return None
    try:
        from transformers.utils import logging as tlog
    except ImportError:  # a stand-in module (transformers not installed)
        return None
    return tlog


def restore_logging() -> None:
    """Put back the logging state as it was before the command's :func:`setup_logging` (every call, latest first)."""
    while _SAVED:
        _SAVED.pop()()


def quiet_libraries(quiet: bool) -> None:
    """Errors only, and no progress bars, from diffusers, transformers and huggingface_hub (``quiet``); their
    defaults otherwise. transformers reads its level when first imported: set through its environment variable
    when it is not imported yet."""
    import sys

    from diffusers.utils import logging as dlogging
    from huggingface_hub.utils import disable_progress_bars, enable_progress_bars

    level = logging.ERROR if quiet else logging.WARNING
    dlogging.set_verbosity(level)
    (dlogging.disable_progress_bar if quiet else dlogging.enable_progress_bar)()
    (disable_progress_bars if quiet else enable_progress_bars)()
    logging.getLogger("huggingface_hub").setLevel(level)
    if sys.modules.get("transformers") is not None:
        tlog = _transformers_logging()
        if tlog is None:  # a stand-in module (transformers not installed): nothing to quiet
            return
        tlog.set_verbosity(level)
        (tlog.disable_progress_bar if quiet else tlog.enable_progress_bar)()
    elif quiet:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    elif os.environ.get("TRANSFORMERS_VERBOSITY") == "error":
        del os.environ["TRANSFORMERS_VERBOSITY"]


F = TypeVar("F", bound=Callable[..., Any])


class Terminated(KeyboardInterrupt):
    """SIGTERM, turned into an interrupt so the same clean-up runs (exit 143)."""


def what_is_left(out: Path | None) -> str:
    """After an interrupt: what the run folder holds and whether ``--resume`` applies."""
    from ..journal import journal_dir

    try:
        if out is not None and (journal_dir(out) / "options.json").is_file():
            return f"the finished part of the run is kept beside {out}; continue with --resume (same options)"
    except InputError:  # a symlink loop: nothing was written there
        return "no output was written"
    if out is None or not out.is_dir() or not any(out.iterdir()):
        return "no output was written"
    steps = sorted(
        (int(p.name.split("-")[1]) for p in (out / "checkpoints").glob("step-*") if p.name.split("-")[1].isdigit()),
    )
    if steps:
        return f"{out} holds checkpoints up to step {steps[-1]}; continue with --resume (same options)"
    return f"nothing new was written; {out} is as it was before this run"


# what torch.distributed's gloo/NCCL raise in a process whose peer has gone (killed, or stopped by its own error)
PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "gloo", "NCCL", "ProcessGroup")


def peer_lost(e: BaseException) -> bool:
    """A collective failed because another process of a launched run stopped."""
    if launched_world() < 2 or not isinstance(e, RuntimeError):
        return False
    return type(e).__name__.startswith("Dist") or any(m in str(e) for m in PEER_LOST)


def launched_world() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def cli_errors(fn: F) -> F:
    """Bad input → one line on stderr and exit 2; interrupts → 130 (SIGTERM 143) with what is left, as is a process
    of a launched run whose peer stopped (143); anything else is an internal error (1)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        out_dir = kwargs.get("out_dir")
        try:
            return fn(*args, **kwargs)
        except InputError as e:
            error(render_error(str(e)))
            raise typer.Exit(2) from None
        except OSError as e:
            if e.errno != errno.ENAMETOOLONG:
                raise
            name = str(e.filename or "")
            error(f"a path is too long for the file system ({name[:60]}…); use a shorter path")
            raise typer.Exit(2) from None
        except KeyboardInterrupt as e:
            stopped(what_is_left(Path(out_dir) if out_dir is not None else None))
            raise typer.Exit(143 if isinstance(e, Terminated) else 130) from None
        except RuntimeError as e:
            if not peer_lost(e):
                raise
            left = what_is_left(Path(out_dir) if out_dir is not None else None)
            stopped(f"another process of this run stopped (see the launcher's report); {left}")
            raise typer.Exit(143) from None
        finally:
            restore_logging()

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
