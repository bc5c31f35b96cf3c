"""One output path, without markup or emoji (issue 26), and stderr kept to lipscope's own lines (issue 23 §2).

rich would turn ``:abc:`` into 🔤 and eat ``[bold]``; everything lipscope prints goes through the markup-free
printer of ``lipscope.cli.common`` (:func:`say`, :func:`warn`, :func:`error`, :func:`stopped`), and a clean
``--no-progress`` run of a text-conditioned pipeline prints no library progress bars or notices."""

from __future__ import annotations

import ast
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from rich.table import Table
from test_bad_inputs import ANSI

import lipscope

CLI = Path(lipscope.__file__).parent / "cli"
ODD = "patches:abc: [bold]x[/bold] [x] :smile:"


def test_the_printer_prints_text_as_it_is(capfd):
    from lipscope.cli.common import error, say, stopped, warn

    capfd.readouterr()
    say(ODD)
    tab = Table(title=f"title {ODD}")
    tab.add_column(f"col {ODD}")
    tab.add_row(f"cell {ODD}")
    say(tab)
    warn(ODD)
    error(f"{ODD}\nsecond")
    stopped(ODD)
    o, e = capfd.readouterr()
    o, e = ANSI.sub("", o), ANSI.sub("", e)
    for text in (ODD, f"title {ODD}", f"col {ODD}", f"cell {ODD}"):
        assert text in o, (text, o)
    assert e.splitlines() == [f"warning: {ODD}", f"error: {ODD}\\nsecond", f"interrupted: {ODD}"], e


def test_warnings_are_one_line_however_long(capfd, monkeypatch):
    """A logged warning longer than the terminal stays one line (rich would wrap it at 80 columns)."""
    import warnings

    from lipscope.cli.common import setup_logging

    lg = logging.getLogger("lipscope")
    monkeypatch.setattr(lg, "handlers", list(lg.handlers))  # put back after the test (as run_inprocess does)
    monkeypatch.setattr(lg, "propagate", lg.propagate)
    level = lg.level
    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)
    monkeypatch.setenv("COLUMNS", "40")
    setup_logging(False)
    capfd.readouterr()
    logging.getLogger("lipscope").warning("a long warning about `samples` %s", "x" * 120)
    lg.setLevel(level)
    e = ANSI.sub("", capfd.readouterr().err)
    assert e.splitlines() == [f"warning: a long warning about --samples {'x' * 120}"], e


def test_no_command_prints_around_the_printer():
    """The cli modules print only through the printer: no other Console, no markup strings, no print()."""
    bad = []
    for f in sorted(CLI.glob("*.py")):
        src = f.read_text()
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, ast.Call):
                fn = node.func
                name = fn.id if isinstance(fn, ast.Name) else fn.attr if isinstance(fn, ast.Attribute) else ""
                if name == "print" and isinstance(fn, ast.Name):
                    bad.append(f"{f.name}:{node.lineno}: print()")
                if name == "Console" and f.name != "common.py":
                    bad.append(f"{f.name}:{node.lineno}: a Console of its own")
                if isinstance(fn, ast.Attribute) and fn.attr == "print" and f.name != "common.py":
                    bad.append(f"{f.name}:{node.lineno}: .print()")
        for marker in ("[red]", "[/]", "[yellow]", "[bold]", "rich.markup"):
            if marker in src and f.name != "common.py":
                bad.append(f"{f.name}: markup {marker}")
    assert not bad, "\n".join(bad)


def test_help_is_printed_as_written(capfd, monkeypatch):
    """--help text is not rich markup: `range:a:b:s` is not 🅰 (rich's emoji code :a:), brackets stay."""
    from lipscope.cli import main

    monkeypatch.setattr(sys, "argv", ["lipscope", "probe", "--help"])
    monkeypatch.setenv("COLUMNS", "200")
    capfd.readouterr()
    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code in (0, None)
    o = capfd.readouterr().out
    assert "range:a:b:s" in o and "🅰" not in o, o[:3000]
    assert "patches[:SIZE[:SCALE]]" in o and "py:module:factory" in o, o[:3000]


def test_render_error_rewrites_only_lipscope_parameters():
    from lipscope.cli.common import render_error

    torch_says = "In PyTorch 2.6, we changed the default value of the `weights_only` argument from `False` to `True`"
    assert render_error(f"`resume`: cannot be loaded ({torch_says})") == f"--resume: cannot be loaded ({torch_says})"
    assert render_error("`lora_targets` x: `to_q` is no layer") == "--lora-targets x: `to_q` is no layer"
    assert render_error("`stop_after` must be ≥ 1") == "stop_after must be ≥ 1"


@pytest.mark.slow
def test_a_clean_no_progress_run_prints_only_lipscope_lines(tmp_path):
    """`probe --prompt` of a text-conditioned SD pipeline with --no-progress: stderr holds lipscope's own lines only
    (no diffusers/transformers progress bars, no torchvision notice, no FutureWarning); --verbose lets them through."""
    from text_fixtures import save_sd_text_pipeline

    pipe = save_sd_text_pipeline(tmp_path / "sd")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TRANSFORMERS_", "HF_HUB_DISABLE", "DIFFUSERS_"))}
    env |= {"HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(lipscope.__file__).parents[1]), "COLUMNS": "80"}
    base = [sys.executable, "-m", "lipscope", "probe", "--model", str(pipe), "--prompt", "a cat", "--samples", "2"]
    base += ["-t", "0,1", "--batch-size", "4", "--device", "cpu", "--no-progress"]
    r = subprocess.run([*base, "--out", str(tmp_path / "a")], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [ln for ln in ANSI.sub("", r.stderr).splitlines() if ln.strip()]
    assert lines and all(ln.startswith(("warning: ", "info: ")) for ln in lines), lines
    v = subprocess.run([*base, "--verbose", "--out", str(tmp_path / "b")], capture_output=True, text=True, env=env,
                       timeout=600)  # fmt: skip
    assert v.returncode == 0, v.stderr[-3000:]
    assert len(v.stderr.splitlines()) > len(lines)  # the libraries' own lines, with --verbose
