"""Library errors name Python parameters (`dt`), never command-line flags; the CLI maps them in one place."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import numpy as np
import pytest

import lipscope
from lipscope.errors import InputError

PACKAGE = Path(lipscope.__file__).parent
ERRORS = {"InputError", "ModelOutputError", "ValueError"}
FLAG = re.compile(r"(?<![\w-])--[A-Za-z][\w-]*")
PARAM = re.compile(r"`([A-Za-z_][A-Za-z0-9_]*)`")


def _library_modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "cli" not in p.relative_to(PACKAGE).parts[:1] and p.stem != "cli")


def _error_strings(path: Path) -> list[tuple[int, str]]:
    """(line, text) of every string constant (f-string parts included) inside ``raise X(...)`` for X in ERRORS."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if not isinstance(node, ast.Raise) or not isinstance(node.exc, ast.Call):
            continue
        func = node.exc.func
        name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else None
        if name not in ERRORS:
            continue
        for arg in [*node.exc.args, *(k.value for k in node.exc.keywords)]:
            for sub in ast.walk(arg):
                if isinstance(sub, ast.Constant) and isinstance(sub.value, str):
                    found.append((sub.lineno, sub.value))
    return found


def test_library_modules_are_found():
    names = {p.stem for p in _library_modules()}
    assert {"probe", "loading", "data", "schedules", "training"} <= names
    assert not any("cli" in p.relative_to(PACKAGE).parts for p in _library_modules())


def test_no_library_error_speaks_in_flags():
    bad = [
        f"{p.relative_to(PACKAGE.parent)}:{line}: {text!r}"
        for p in _library_modules()
        for line, text in _error_strings(p)
        if FLAG.search(text)
    ]
    assert not bad, "library errors should name the parameter in backticks (`dt`), not the flag:\n" + "\n".join(bad)


def test_render_error_maps_parameters_to_flags():
    from lipscope.cli.common import render_error

    assert render_error("`dt` must be > 0") == "--dt must be > 0"
    assert render_error("`n_sub` must be ≥ 1") == "--n must be ≥ 1"
    assert render_error("choose another `out_dir`") == "choose another --out"
    assert render_error("pass `trust_pickle` only if") == "pass --trust-pickle only if"
    assert render_error("`batch_size` 1: must be ≥ 2") == "--batch-size 1: must be ≥ 2"
    assert render_error("`model` x does not match `config` y") == "--model x does not match --config y"
    assert render_error("no parameter here: 1-2 --") == "no parameter here: 1-2 --"


def test_every_named_parameter_has_a_flag():
    """Each `name` a library error uses renders to a flag some command really has."""
    import typer.main

    from lipscope.cli import app
    from lipscope.cli.common import API_ONLY, flag

    def opts(cmd) -> set[str]:
        out = {o for p in cmd.params for o in [*p.opts, *p.secondary_opts]}
        out |= {f"argument {p.name}" for p in cmd.params if p.param_type_name == "argument"}  # positional: by name
        for sub in getattr(cmd, "commands", {}).values():
            out |= opts(sub)
        return out

    known = opts(typer.main.get_command(app))
    unknown = sorted(
        f"{p.relative_to(PACKAGE.parent)}:{line}: `{name}` → {flag(name)}"
        for p in _library_modules()
        for line, text in _error_strings(p)
        for name in PARAM.findall(text)
        if flag(name) not in known and f"argument {name}" not in known and name not in API_ONLY
    )
    assert not unknown, "no command has these flags:\n" + "\n".join(unknown)


def _fd_points():
    from lipscope.probe import fd_points

    fd_points(np.array([0.0]), dt=0, scheme="forward", T=1000)


def _fd_points_outside():
    from lipscope.probe import fd_points

    fd_points(np.array([999.0]), dt=1, scheme="forward", T=1000)


def _parse_grid():
    from lipscope.schedules import parse_grid

    parse_grid("banana", 1000)


def _named_schedule():
    from lipscope.schedules import named_schedule

    named_schedule("banana")


def _parse_methods():
    from lipscope.probe import parse_methods

    parse_methods("banana")


def _dtype():
    from lipscope.models import resolve_dtype

    resolve_dtype("float8")


def _device():
    from lipscope.models import resolve_device

    resolve_device("banana")


def _batch_size():
    from lipscope.batching import resolve_batch_size

    resolve_batch_size("banana", None, 10)


def _load_data(tmp_path: Path):
    from lipscope.data import load_data

    load_data(str(tmp_path / "missing.npy"), 2)


def _load_model(tmp_path: Path):
    from lipscope.loading import load_model

    load_model(str(tmp_path / "missing.safetensors"))


@pytest.mark.parametrize(
    ("call", "param", "rendered"),
    [
        (_fd_points, "dt", "--dt must be > 0"),
        (_fd_points_outside, "timesteps", "drop it from --timesteps or change --dt/--scheme"),
        (_parse_grid, "timesteps", "--timesteps 'banana' not understood"),
        (_named_schedule, "schedule", "--schedule 'banana' not known"),
        (_parse_methods, "method", "--method 'banana' not known"),
        (_dtype, "dtype", "--dtype 'float8' not supported"),
        (_device, "device", "--device 'banana' not understood"),
        (_batch_size, "batch_size", "--batch-size 'banana'"),
        (_load_data, "data", "--data "),
        (_load_model, "model", "--model "),
    ],
    ids=lambda v: v.__name__.strip("_") if callable(v) else None,
)
def test_python_errors_name_the_parameter(tmp_path, call, param, rendered):
    from lipscope.cli.common import render_error

    with pytest.raises(InputError) as info:
        call(tmp_path) if call in (_load_data, _load_model) else call()
    msg = str(info.value)
    assert f"`{param}`" in msg, msg
    assert not FLAG.search(msg), msg
    assert rendered in render_error(msg), render_error(msg)
