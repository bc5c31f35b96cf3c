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
from conftest import HANG_S
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


def test_a_command_run_in_process_puts_the_logging_state_back(tmp_path, monkeypatch, caplog):
    """setup_logging's changes (no propagation, its handler, the warning printer) end with the command: a command
    run in this process (no test helper putting anything back) then a caplog check, in that order, in one test."""
    import warnings

    from lipscope.cli import main

    lg = logging.getLogger("lipscope")
    before = (list(lg.handlers), lg.level, lg.propagate, warnings.showwarning)
    monkeypatch.setattr(sys, "argv", ["lipscope", "probe", "--timesteps", "nope", "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit) as ex:
        main()
    assert ex.value.code == 2  # the command ran (setup_logging first) and refused the grid
    assert (list(lg.handlers), lg.level, lg.propagate, warnings.showwarning) == before
    with caplog.at_level(logging.WARNING, logger="lipscope"):
        logging.getLogger("lipscope.probe").warning("seen by caplog")
    assert "seen by caplog" in caplog.text


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
    r = subprocess.run([*base, "--out", str(tmp_path / "a")], capture_output=True, text=True, env=env, timeout=HANG_S)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [ln for ln in ANSI.sub("", r.stderr).splitlines() if ln.strip()]
    assert lines and all(ln.startswith(("warning: ", "info: ")) for ln in lines), lines
    v = subprocess.run([*base, "--verbose", "--out", str(tmp_path / "b")], capture_output=True, text=True, env=env,
                       timeout=HANG_S)  # fmt: skip
    assert v.returncode == 0, v.stderr[-3000:]
    assert len(v.stderr.splitlines()) > len(lines)  # the libraries' own lines, with --verbose


def _render_80(*renderables) -> list[str]:
    from rich.console import Console

    c = Console(width=80, record=True, markup=False, emoji=False, highlight=False, file=open(os.devnull, "w"))
    for r in renderables:
        c.print(r)
    return [ln.rstrip() for ln in c.export_text().splitlines()]


def test_evaluate_tables_read_at_80_columns():
    """Issue 25 item 8: rows are labelled by the model specs (never "model"/"baseli…"), and at 80 columns nothing
    is cut ("…"), no line is wider and every spec, sampler and metric name stays whole on its line."""
    import pandas as pd

    from lipscope.cli.sample import _paired_table, _summary_table

    specs = {"model": "builtin:digits-etsdm", "baseline": "builtin:digits-control"}
    summary = pd.DataFrame(
        [
            {
                "model": m,
                "spec": specs[m],
                "scheduler": sch,
                "steps": k,
                "seeds": 3,
                **{
                    f"{c}_{s}": v
                    for c in ("fd_digits", "kid_digits", "fd_pixel", "swd_pixel", "fid")
                    for s, v in (("mean", -1234.567), ("std", 0.00012345))
                },
            }  # fmt: skip
            for m in specs
            for sch in ("dpmsolver", "ddim")
            for k in (5, 100)
        ]
    )
    paired = pd.DataFrame(
        [
            {
                "model": "model",
                "baseline": "baseline",
                "scheduler": "dpmsolver",
                "steps": 100,
                "metric": met,
                "n": 3,
                "diff_mean": -0.00012345,
                "ci_low": -1234.567,
                "ci_high": 0.00012345,
                "confidence": 0.95,
                "frac_better": 2 / 3,
            }  # fmt: skip
            for met in ("fd_digits", "kid_digits", "swd_pixel")
        ]
    )
    lines = _render_80(_summary_table(summary, "digits", False), _paired_table(paired, specs))
    text = "\n".join(lines)
    assert max(map(len, lines)) <= 80 and "…" not in text, text
    for word in (*specs.values(), "dpmsolver", "kid_digits", "swd_pixel", "-1.23e+03", "±0.00012"):
        assert word in text, (word, text)
    assert "baseli" not in text.replace("baseline", ""), text


def test_models_reads_at_80_columns():
    """`lipscope models` at 80 columns: every line fits, no word (a spec, a flag) is split across lines, and the
    singularity numbers say the grid they were measured on."""
    e = {**os.environ, "COLUMNS": "80"}
    r = subprocess.run([sys.executable, "-m", "lipscope", "models"], capture_output=True, text=True, env=e,
                       timeout=HANG_S)  # fmt: skip
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert max(map(len, lines)) <= 80, r.stdout
    words = r.stdout.split()
    for name in ("builtin:digits-ddpm", "builtin:digits-etsdm", "builtin:digits-control", "--checkpoint-every"):
        assert name in words, (name, r.stdout)
    assert r.stdout.count("grid `all`") == 3 and "median over t ≥ 100 15.9" in r.stdout


COMMANDS = ("probe", "theory", "train", "finetune", "sample", "evaluate", "compare", "models")
GRID_FORMS = ("default", "all", "linear:N", "log:N", "range:a:b:s", "0,1,2.5")  # parse_grid's forms


def _help(args: list[str], columns: int) -> str:
    e = {**os.environ, "COLUMNS": str(columns)}
    r = subprocess.run([sys.executable, "-m", "lipscope", *args, "--help"], capture_output=True, text=True, env=e,
                       timeout=HANG_S)  # fmt: skip
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_help_shows_every_grid_form_as_written_and_reads_at_80_columns():
    """Issue 25 items 3 and 8: the rendered help of `probe --help` (and docs/cli.md, generated from it) holds every
    grid form parse_grid accepts literally (no emoji code such as :a: → 🅰); every command's help fits 80 columns
    with its option descriptions at least 45 characters wide (not squeezed into a narrow column)."""
    probe = _help(["probe"], 80)
    flat = " ".join(probe.split())  # a form may sit at a line end; none is split (no spaces inside)
    cli_md = (Path(__file__).parents[1] / "docs" / "cli.md").read_text()
    for form in GRID_FORMS:
        assert form in flat and form in cli_md, form
    for args in ([], *([c] for c in COMMANDS)):
        text = _help(args, 80)
        assert not set(text) & {"🅰", "🅱", "\u2139"}, args
        lines = text.splitlines()
        assert max(map(len, lines)) <= 80, (args, text)
        opts = [ln for ln in lines if ln.startswith("  -")]
        starts = [len(ln) - len(ln.lstrip()) for ln in lines if ln.startswith(" " * 20) and ln.strip()]
        assert not opts or min(starts, default=0) <= 80 - 45, (args, text)


def test_compare_writes_its_default_png_into_the_current_folder(tmp_path, monkeypatch):
    """`lipscope compare RUN` with no --out writes compare.png beside the user (the current folder is not refused as
    if a run folder were renamed into it)."""
    from test_bad_inputs import GOOD_CSV, GOOD_META

    run = tmp_path / "r"
    run.mkdir()
    (run / "lipschitz.csv").write_text(GOOD_CSV)
    (run / "run.json").write_text(GOOD_META)
    r = subprocess.run(
        [sys.executable, "-m", "lipscope", "compare", "r"], cwd=tmp_path, capture_output=True, text=True, timeout=HANG_S
    )
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "compare.png").stat().st_size > 0
