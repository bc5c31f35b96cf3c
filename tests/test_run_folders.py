"""Output folders, journals and resume under hostile use (issues 23 and 26): symlinked and current-folder ``--out``,
a live run's journal, a resumed probe on other weights, damaged journal blocks, refusals that leave no journal, and
``--resume`` with nothing to resume. Every case runs the real command in-process on conftest's tiny pipeline."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from test_bad_inputs import ANSI, assert_one_line_refusal, run_inprocess, snapshot

from lipscope.errors import InputError

TINY = ["--data", "digits", "--samples", "2", "-t", "0,1,2", "--batch-size", "4", "--device", "cpu", "--no-progress"]
FILES = ["lipschitz.csv", "lipschitz.png", "run.json"]


@pytest.fixture
def cli(capfd, monkeypatch, tmp_path):
    """Run ``lipscope ARGS`` in-process from tmp_path; returns the Result (code, stdout, stderr)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("COLUMNS", "200")

    def run(*argv: str):
        capfd.readouterr()
        return run_inprocess([str(a) for a in argv], capfd, monkeypatch)

    return run


def _probe(pipe: Path, out: Path | str, *extra: str) -> list[str]:
    return ["probe", "--model", str(pipe), *TINY, "--out", str(out), *extra]


def _lines(res) -> list[str]:
    return [ln for ln in ANSI.sub("", res.stderr).splitlines() if ln.strip()]


@contextlib.contextmanager
def _fail_mid_run(exc: BaseException, at: int = 2):
    """Within the block the probe's FD evaluation raises ``exc`` from its ``at``-th batch on (after ``at`` − 1
    finished ones)."""
    mod = sys.modules["lipscope.fd"]  # the FD runner's module
    real, calls = mod.fd_pair, [0]

    def failing(*a, **k):
        calls[0] += 1
        if calls[0] >= at:
            raise exc
        return real(*a, **k)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(mod, "fd_pair", failing)
        yield


# ---------------------------------------------------------------------------------------------
# symlinks and the current folder as --out
# ---------------------------------------------------------------------------------------------


def test_live_symlink_out_is_written_through(tmp_path, pipeline_dir, cli):
    """A symlinked --out is the folder it points to: the run lands in the target, the link stays a link, and
    --overwrite replaces the target's contents with no .old-/.tmp- folders left anywhere."""
    target, link = tmp_path / "store" / "run", tmp_path / "link"
    target.mkdir(parents=True)
    link.symlink_to(target, target_is_directory=True)
    res = cli(*_probe(pipeline_dir, link))
    assert res.code == 0, res.stderr + res.exc
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert sorted(p.name for p in target.iterdir()) == FILES
    first = (target / "run.json").read_text()
    res = cli(*_probe(pipeline_dir, link, "--overwrite", "--seed", "1"))
    assert res.code == 0, res.stderr + res.exc
    assert link.is_symlink() and sorted(p.name for p in target.iterdir()) == FILES
    assert (target / "run.json").read_text() != first  # the target was replaced, not the link
    left = [p.name for d in (tmp_path, target.parent) for p in d.iterdir() if ".old-" in p.name or ".tmp-" in p.name]
    assert left == [] and not (tmp_path / ".link.partial").exists()


def test_dangling_symlink_out_creates_its_target(tmp_path, pipeline_dir, cli):
    """A dangling link is followed too: the run folder is created where it points; no journal is left."""
    link, target = tmp_path / "link", tmp_path / "later" / "run"
    link.symlink_to(target)
    res = cli(*_probe(pipeline_dir, link))
    assert res.code == 0, res.stderr + res.exc
    assert link.is_symlink() and sorted(p.name for p in target.iterdir()) == FILES
    assert not list(tmp_path.rglob(".*.partial")) and not list(tmp_path.rglob("*.tmp-*"))


def test_symlink_loop_out_is_one_line(tmp_path, pipeline_dir, cli):
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    assert_one_line_refusal(cli(*_probe(pipeline_dir, tmp_path / "a")), ("--out", "symlink loop"))


def test_out_dot_is_refused_before_any_work_and_leaves_nothing(tmp_path, pipeline_dir, cli, monkeypatch):
    """`-o .` in an empty folder: refused at once (the run folder is renamed into place, which the current folder
    cannot take), with no ..lock/..partial left to block the next run."""
    work = tmp_path / "empty"
    work.mkdir()
    monkeypatch.chdir(work)
    for _ in range(2):  # the same answer every time
        assert_one_line_refusal(cli(*_probe(pipeline_dir, ".")), ("--out", "current folder"))
        assert list(work.iterdir()) == [] and not list(tmp_path.glob(".*"))


# ---------------------------------------------------------------------------------------------
# a live run, and what a resume must match
# ---------------------------------------------------------------------------------------------


def test_a_live_run_is_named_not_called_interrupted(tmp_path, pipeline_dir, cli):
    """A second process aimed at the --out of a running probe (which holds the lock and a journal) is told who
    writes it (pid, host), not to continue an interrupted run with --resume."""
    from lipscope.io import run_lock
    from lipscope.journal import journal_dir

    out = tmp_path / "out"
    journal_dir(out).mkdir()
    (journal_dir(out) / "options.json").write_text("{}")
    with run_lock(out):  # held by "another process": flock is per open file, so this process counts as one
        for extra in ((), ("--resume",)):
            line = assert_one_line_refusal(cli(*_probe(pipeline_dir, out, *extra)), "--out")
            assert f"lipscope process {os.getpid()} on {platform.node()}" in line and "interrupted" not in line


def _interrupted_probe(pipeline_dir: Path, out: Path, cli, pipe: Path | None = None) -> None:
    with _fail_mid_run(KeyboardInterrupt()):
        res = cli(*_probe(pipe or pipeline_dir, out))
    assert res.code == 130 and "--resume" in res.stderr, res.stderr + res.exc
    assert list((out.parent / f".{out.name}.partial").glob("fd-*.npz"))


def test_resume_refuses_other_weights_of_the_same_config(tmp_path, pipeline_dir, cli, monkeypatch):
    """Kill a probe, put other weights of the same config in the model folder, --resume: refused naming the model
    weights (the table would mix two networks); the original weights resume."""
    from conftest import tiny_unet

    pipe, out = tmp_path / "pipe", tmp_path / "out"
    shutil.copytree(pipeline_dir, pipe)
    _interrupted_probe(pipeline_dir, out, cli, pipe=pipe)
    kept = pipe / "unet.kept"
    shutil.move(pipe / "unet", kept)
    tiny_unet(seed=1).save_pretrained(pipe / "unet")
    assert json.loads((pipe / "unet" / "config.json").read_text()) == json.loads((kept / "config.json").read_text())
    line = assert_one_line_refusal(cli(*_probe(pipe, out, "--resume")), ("--resume", "model weights"))
    assert "model config" not in line
    shutil.rmtree(pipe / "unet")
    shutil.move(kept, pipe / "unet")
    res = cli(*_probe(pipe, out, "--resume"))
    assert res.code == 0, res.stderr + res.exc


def test_resume_refuses_an_edited_py_callable(tmp_path, pipeline_dir, cli, monkeypatch):
    """A py: callable without weights: its source is what the numbers depend on."""
    (tmp_path / "lsmod_edit.py").write_text("def make():\n    return lambda x, t: x * 0.5\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    argv = ["probe", "--model", "py:lsmod_edit:make", *TINY, "--data", str(tmp_path / "x.npy")]
    argv += ["--scheduler-config", str(pipeline_dir / "scheduler" / "scheduler_config.json")]
    np.save(tmp_path / "x.npy", np.zeros((4, 1, 8, 8), np.float32))
    out = tmp_path / "out"
    with _fail_mid_run(KeyboardInterrupt()):
        assert cli(*argv, "--out", out).code == 130
    (tmp_path / "lsmod_edit.py").write_text("def make():\n    return lambda x, t: x * 0.25\n")
    sys.modules.pop("lsmod_edit", None)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert_one_line_refusal(cli(*argv, "--out", out, "--resume"), ("--resume", "model weights"))
    sys.modules.pop("lsmod_edit", None)


@pytest.mark.parametrize("damage", ["truncated", "object-array", "indices-out-of-range"])
def test_a_damaged_journal_block_is_one_line_naming_it(tmp_path, pipeline_dir, cli, monkeypatch, damage):
    """A block cut short, holding a pickled object array, or indices beyond the grid: one line naming the block,
    exit 2, nothing unpickled; deleting the block (as the line says) resumes."""
    out = tmp_path / "out"
    _interrupted_probe(pipeline_dir, out, cli)
    block = sorted((tmp_path / ".out.partial").glob("fd-*.npz"))[0]
    good = block.read_bytes()
    marker = tmp_path / "PWNED"
    if damage == "truncated":
        block.write_bytes(good[: len(good) // 2])
    elif damage == "object-array":
        from test_faults import Evil

        evil = np.array([Evil(marker), Evil(marker)], dtype=object)
        np.savez(block, idx=np.arange(2), vals=evil)
    else:
        np.savez(block, idx=np.array([10**6]), vals=np.array([1.0]))
    line = assert_one_line_refusal(cli(*_probe(pipeline_dir, out, "--resume")), ("--resume", block.name))
    assert "delete" in line and not marker.exists()
    block.unlink()
    res = cli(*_probe(pipeline_dir, out, "--resume"))
    assert res.code == 0, res.stderr + res.exc


def test_a_refused_result_leaves_no_journal_and_the_advised_rerun_runs(tmp_path, pipeline_dir, cli, monkeypatch):
    """A refusal the same options would meet again (here the model's output refused after a finished batch, as the
    fp16 noise guard refuses after FD rows) removes the journal: the advised rerun with other options (another
    method) is a fresh run, neither "an interrupted run" nor a resume of other options."""
    from lipscope.errors import ModelOutputError

    out = tmp_path / "out"
    with _fail_mid_run(ModelOutputError("model output has NaN/inf; use `method` jvp")):
        assert_one_line_refusal(cli(*_probe(pipeline_dir, out)), "--method")
    assert not (tmp_path / ".out.partial").exists() and not out.exists()
    res = cli(*_probe(pipeline_dir, out, "--method", "jvp"))
    assert res.code == 0, res.stderr + res.exc


def test_a_write_failure_keeps_the_finished_items_for_resume(tmp_path, pipeline_dir, cli, monkeypatch):
    """A full disk mid-run is fixed by the user, not by other options: the finished items stay for --resume."""
    from lipscope.io import WriteFailure

    out = tmp_path / "out"
    with _fail_mid_run(WriteFailure("could not write x (No space left on device); free some space")):
        line = assert_one_line_refusal(cli(*_probe(pipeline_dir, out)), "--resume")
    assert "finished items are kept" in line and list((tmp_path / ".out.partial").glob("fd-*.npz"))
    res = cli(*_probe(pipeline_dir, out, "--resume"))
    assert res.code == 0, res.stderr + res.exc


# ---------------------------------------------------------------------------------------------
# --resume with nothing to resume
# ---------------------------------------------------------------------------------------------


def test_probe_resume_with_nothing_to_resume_starts_fresh_and_says_so(tmp_path, pipeline_dir, cli):
    """A pre-emptible job passes --resume on every start: the first start runs the probe (one warning line); a start
    after the run finished is refused up front (nothing to continue, the folder is not recomputed)."""
    out = tmp_path / "out"
    res = cli(*_probe(pipeline_dir, out, "--resume"))
    assert res.code == 0, res.stderr + res.exc
    lines = _lines(res)  # the resume line, beside the tiny network's own FD-truncation warning (numbers, not resume)
    ours = [ln for ln in lines if "fd_trunc_limited" not in ln]
    assert len(ours) == 1 and ours[0].startswith("warning: --resume:") and "beginning" in ours[0], lines
    assert sorted(p.name for p in out.iterdir()) == FILES
    before = snapshot(out)
    line = assert_one_line_refusal(cli(*_probe(pipeline_dir, out, "--resume")), ("--resume", "finished run"))
    assert "--overwrite" in line and snapshot(out) == before


def test_resume_still_refuses_other_options(tmp_path, pipeline_dir, cli, monkeypatch):
    out = tmp_path / "out"
    _interrupted_probe(pipeline_dir, out, cli)
    line = assert_one_line_refusal(cli(*_probe(pipeline_dir, out, "--resume", "--seed", "5")), "--resume")
    assert "seed" in line


# ---------------------------------------------------------------------------------------------
# the library behind it
# ---------------------------------------------------------------------------------------------


def test_check_out_dir_returns_the_folder_written(tmp_path, monkeypatch):
    from lipscope.io import check_out_dir, resolve_out

    monkeypatch.chdir(tmp_path)
    (tmp_path / "t").mkdir()
    (tmp_path / "l").symlink_to(tmp_path / "t")
    assert check_out_dir("l") == resolve_out("l") == tmp_path / "t"
    assert check_out_dir("new") == tmp_path / "new"
    with pytest.raises(InputError, match="current folder"):
        check_out_dir(".")
    assert check_out_dir(tmp_path / "t", whole=False) == tmp_path / "t"
    (tmp_path / "t" / "f").write_text("x")
    with pytest.raises(InputError, match="pass `resume` to continue"):
        check_out_dir(tmp_path / "t", whole=False)
    with pytest.raises(InputError, match="pass `overwrite` to replace"):
        check_out_dir(tmp_path / "t")


def test_the_fp16_noise_refusal_leaves_no_journal(tmp_path, cli):
    """The precision guard's refusal (float16 FD rows limited by rounding noise) comes after finished items; the
    advised rerun with --method jvp must start clean, not meet "an interrupted run" or a resume of another method."""
    argv = ["probe", "--model", "builtin:digits-ddpm", "--samples", "4", "-t", "0,1,2,500", "--device", "cpu"]
    argv += ["--no-progress", "--out", "out"]
    res = cli(*argv, "--precision", "fp16")
    assert res.code == 2 and "--method jvp" in res.stderr, res.stderr + res.exc
    assert not (tmp_path / ".out.partial").exists() and not (tmp_path / "out").exists()
    res = cli(*argv, "--method", "jvp")
    assert res.code == 0, res.stderr + res.exc
