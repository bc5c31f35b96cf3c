"""Sharded probes (torchrun / accelerate, 2 CPU processes over gloo) and resumable probes give the table of one
uninterrupted single-process run: the same items in the same network calls (fixed batch size, one thread each,
so float32 kernels round the same way)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pandas as pd
import pytest
import torch

from lipscope.errors import InputError
from lipscope.io import WriteFailure
from lipscope.runs import ProbeOptions, run_probe

GRID = "0,1,2,5,10,50,100,500"


def _opts(tmp_path, name: str, **kw) -> ProbeOptions:
    base = dict(model="builtin:digits-ddpm", data="digits", timesteps=GRID, samples=6, batch_size="8",
                method="fd,jvp", device="cpu", out=str(tmp_path / name))  # fmt: skip
    return ProbeOptions(**{**base, **kw})


def _torchrun(tmp_path, out: str, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg", "COLUMNS": "200"}
    args = ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(29400 + os.getpid() % 500)]
    probe = ["--data", "digits", "--timesteps", GRID, "--samples", "6", "--batch-size", "8", "--method", "fd,jvp"]
    cmd = [sys.executable, *args, "-m", "lipscope", "probe", *probe, "--device", "cpu", "--no-progress", "--out", out]
    return subprocess.run([*cmd, *extra], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _same_numbers(a: pd.DataFrame, b: pd.DataFrame) -> None:
    cols = [c for c in a.columns if c.startswith(("K", "t", "fd_noise", "method", "lambda", "sigma", "alpha"))]
    assert cols and a.shape == b.shape
    pd.testing.assert_frame_equal(
        a[cols].reset_index(drop=True), b[cols].reset_index(drop=True), check_exact=True, check_dtype=False
    )


@pytest.fixture
def interrupted(tmp_path, monkeypatch, one_thread):
    """An uninterrupted probe, and the same probe stopped by Ctrl-C after two FD batches."""
    full = run_probe(_opts(tmp_path, "full"))
    _fail_at_call(monkeypatch, 3, KeyboardInterrupt)
    with pytest.raises(KeyboardInterrupt):
        run_probe(_opts(tmp_path, "cut"))
    monkeypatch.undo()
    return full


def _fail_at_call(monkeypatch, n: int, exc) -> None:
    """The probe's FD pair evaluation raises ``exc`` from its n-th call on (after n − 1 finished batches)."""
    mod = sys.modules["lipscope.probe"]  # the module (`lipscope.probe` is the function)
    real, calls = mod.fd_pair, [0]

    def failing(*a, **k):
        calls[0] += 1
        if calls[0] >= n:
            raise exc
        return real(*a, **k)

    monkeypatch.setattr(mod, "fd_pair", failing)


def test_resume_gives_the_uninterrupted_table(tmp_path, interrupted):
    cut = tmp_path / "cut"
    assert not cut.exists()  # the run folder is written whole, or not at all
    blocks = sorted(p.name for p in (tmp_path / ".cut.partial").glob("*.npz"))
    assert blocks == ["fd-r0-0-8.npz"], blocks  # two batches of 4 pairs were finished
    with pytest.raises(InputError, match=r"has an interrupted run .*; continue it with `resume`, or pass `overwrite`"):
        run_probe(_opts(tmp_path, "cut"))
    with pytest.raises(InputError, match="was started with other seed"):
        run_probe(_opts(tmp_path, "cut", seed=1, resume=True))
    with pytest.raises(InputError, match="not both"):
        run_probe(_opts(tmp_path, "cut", resume=True, overwrite=True))
    res = run_probe(_opts(tmp_path, "cut", resume=True, t_split=50.0))  # t_split does not change the numbers
    _same_numbers(res.table, interrupted.table)
    assert res.meta["forwards"] == interrupted.meta["forwards"] - 16  # the 8 finished pairs were not recomputed
    assert sorted(p.name for p in cut.iterdir()) == ["lipschitz.csv", "lipschitz.png", "run.json"]
    assert not (tmp_path / ".cut.partial").exists()
    fresh = run_probe(_opts(tmp_path, "never", resume=True))  # nothing to resume: a fresh start (issue 23 §3)
    _same_numbers(fresh.table, interrupted.table)


def test_a_failing_run_leaves_nothing(tmp_path, monkeypatch):
    def broken(*a, **k):
        raise InputError("`model` broken")

    monkeypatch.setattr(sys.modules["lipscope.probe"], "fd_pair", broken)
    with pytest.raises(InputError, match="broken"):
        run_probe(_opts(tmp_path, "bad"))
    assert not (tmp_path / "bad").exists() and not (tmp_path / ".bad.partial").exists()


def test_two_processes_give_the_one_process_table_and_resume_a_one_process_run(tmp_path, interrupted):
    """torchrun with 2 CPU processes (gloo): the table of one process, written once by the main process; then the
    1-process run interrupted above, continued by 2 processes."""
    r = _torchrun(tmp_path, "two")
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("lipscope probe") == 1  # one summary, from the main process
    two = pd.read_csv(tmp_path / "two" / "lipschitz.csv")
    _same_numbers(two, pd.read_csv(tmp_path / "full" / "lipschitz.csv"))
    meta = json.loads((tmp_path / "two" / "run.json").read_text())
    assert meta["forwards"] == interrupted.meta["forwards"]  # the work of both processes
    r = _torchrun(tmp_path, "cut", "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    _same_numbers(pd.read_csv(tmp_path / "cut" / "lipschitz.csv"), pd.read_csv(tmp_path / "full" / "lipschitz.csv"))


def test_sample_and_evaluate_with_two_processes(tmp_path):
    """Each process draws whole batches (per-sample noise streams), all gather: the samples of one process."""
    import numpy as np

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    sample = ["sample", "--model", "builtin:digits-ddpm", "-n", "5", "--steps", "3", "--batch-size", "2",
              "--device", "cpu"]  # fmt: skip
    one = subprocess.run([sys.executable, "-m", "lipscope", *sample, "--out", "one"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert one.returncode == 0, one.stderr[-2000:]
    run = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(29900 + os.getpid() % 90), "-m", "lipscope"]  # fmt: skip
    two = subprocess.run([*run, *sample, "--out", "two"], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    assert two.returncode == 0, two.stderr[-2000:]
    a, b = (np.load(tmp_path / d / "samples.npz")["x0"] for d in ("one", "two"))
    assert a.shape == (5, 1, 8, 8) and np.array_equal(a, b)
    ev = ["evaluate", "--model", "builtin:digits-ddpm", "-n", "4", "--seeds", "1", "--steps", "2",
          "--scheduler", "ddim", "--device", "cpu"]  # fmt: skip
    r1 = subprocess.run([sys.executable, "-m", "lipscope", *ev, "--out", "e1"], cwd=tmp_path, env=env,
                        capture_output=True, text=True, timeout=300)  # fmt: skip
    r2 = subprocess.run([*run, *ev, "--out", "e2"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r1.returncode == 0 and r2.returncode == 0, (r1.stderr[-1500:], r2.stderr[-1500:])
    e1, e2 = (pd.read_csv(tmp_path / d / "eval.csv") for d in ("e1", "e2"))
    pd.testing.assert_frame_equal(e1, e2)
    assert r2.stdout.count("lipscope evaluate") == 1


def test_an_interrupted_overwrite_resumes_and_a_late_failure_keeps_the_work(tmp_path, monkeypatch, one_thread):
    """`overwrite` of a finished run, interrupted, then `resume`: it may replace the folder (the consent is kept in
    the journal). A failure after items were finished keeps them and says so."""
    run_probe(_opts(tmp_path, "o"))
    first = (tmp_path / "o" / "lipschitz.csv").read_text()
    _fail_at_call(monkeypatch, 3, KeyboardInterrupt)
    with pytest.raises(KeyboardInterrupt):
        run_probe(_opts(tmp_path, "o", overwrite=True, seed=1))
    assert (tmp_path / "o" / "lipschitz.csv").read_text() == first  # untouched until written whole
    monkeypatch.undo()
    run_probe(_opts(tmp_path, "o", resume=True, seed=1))
    run_probe(_opts(tmp_path, "fresh", seed=1))
    _same_numbers(pd.read_csv(tmp_path / "o" / "lipschitz.csv"), pd.read_csv(tmp_path / "fresh" / "lipschitz.csv"))
    assert json.loads((tmp_path / "o" / "run.json").read_text())["seed"] == 1
    _fail_at_call(monkeypatch, 3, WriteFailure("could not write x (disk full)"))
    with pytest.raises(InputError, match="disk full.; the finished items are kept: fix that and rerun with `resume`"):
        run_probe(_opts(tmp_path, "late"))
    assert (tmp_path / ".late.partial").is_dir() and not (tmp_path / "late").exists()
    monkeypatch.undo()
    _fail_at_call(monkeypatch, 3, InputError("`model` went wrong"))  # the same options meet it again: nothing kept
    with pytest.raises(InputError, match="went wrong$"):
        run_probe(_opts(tmp_path, "late2"))
    assert not (tmp_path / ".late2.partial").exists() and not (tmp_path / "late2").exists()
