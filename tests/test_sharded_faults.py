"""Errors of sharded runs (torchrun, 2 CPU processes over gloo; issue 23 §2): a bad option, a lock another process
holds, ``--resume`` with nothing to resume, a killed rank and a terminated torchrun followed by a resume. lipscope's
processes print one line, from the main process, with the exit codes of a single process; no process prints a
traceback. (torchrun then prints its own failure report, with the workers' exit codes and the line lipscope left in
its error file; that report is torchrun's, not lipscope's.)"""

from __future__ import annotations

import fcntl
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import HANG_S
from test_bad_inputs import ANSI

PROBE = ["probe", "--model", "builtin:digits-ddpm", "--data", "digits", "--device", "cpu", "--no-progress"]
SHORT = [*PROBE, "--samples", "2", "-t", "0,1", "--batch-size", "4"]
LONG = [*PROBE, "--samples", "8", "-t", "all", "--batch-size", "8"]  # some seconds of work per process


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cmd(*args: str) -> list[str]:
    run = ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_port())]
    return [sys.executable, *run, "-m", "lipscope", *args]


ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg", "COLUMNS": "200"}


def _torchrun(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(_cmd(*args), capture_output=True, text=True, env=ENV, cwd=tmp_path, timeout=HANG_S)


def _ours(stderr: str) -> list[str]:
    """lipscope's lines on stderr (torchrun's own report and log lines left out)."""
    lines = [ln.strip() for ln in ANSI.sub("", stderr).splitlines()]
    return [ln for ln in lines if ln.startswith(("error:", "warning:", "interrupted:", "info:"))]


def _no_worker_traceback(stderr: str) -> None:
    """No traceback from a lipscope process (torchrun's own ChildFailedError report is not one of them)."""
    assert not re.search(r"^\[rank\d\]", stderr, re.M), stderr[-3000:]
    assert "lipscope/" not in stderr.split("ChildFailedError")[0], stderr[-3000:]


def _exit_codes(stderr: str) -> list[int]:
    """The workers' exit codes in torchrun's failure report."""
    return [int(c) for c in re.findall(r"exitcode\s+:\s+(-?\d+) \(pid", stderr)]


def test_bad_option_is_one_line_from_the_main_process(tmp_path):
    r = _torchrun(tmp_path, *SHORT, "--dt", "-1", "--out", "o")
    _no_worker_traceback(r.stderr)
    ours = _ours(r.stderr)
    assert len(ours) == 1 and ours[0].startswith("error: --dt must be > 0"), ours
    assert sorted(_exit_codes(r.stderr)) == [2, 2], r.stderr[-3000:]  # both processes: a single process's code
    assert "traceback : error: --dt must be > 0" in r.stderr  # the cause in torchrun's report, not a link
    assert not (tmp_path / "o").exists()


def test_a_held_out_is_refused_on_every_process(tmp_path):
    """Another lipscope process holds --out: the lock refusal (naming it) is every process's answer, exit 2."""
    lock = tmp_path / ".o.lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.write(fd, f"{os.getpid()} testhost\n".encode())
    try:
        r = _torchrun(tmp_path, *SHORT, "--out", "o")
    finally:
        os.close(fd)
    _no_worker_traceback(r.stderr)
    ours = _ours(r.stderr)
    assert len(ours) == 1 and f"being written by lipscope process {os.getpid()} on testhost" in ours[0], ours
    assert sorted(_exit_codes(r.stderr)) == [2, 2], r.stderr[-3000:]


def test_resume_with_nothing_to_resume_under_torchrun_starts_fresh(tmp_path):
    r = _torchrun(tmp_path, *SHORT, "--resume", "--out", "o")
    assert r.returncode == 0, r.stderr[-3000:]
    ours = _ours(r.stderr)  # the resume line, and the FD-truncation warning of t = 0, 1 (numbers): each once
    trunc = [ln for ln in ours if "fd_trunc_limited" in ln]
    rest = [ln for ln in ours if ln not in trunc]
    assert len(trunc) <= 1 and len(rest) == 1, ours
    assert rest[0].startswith("warning: --resume:") and "beginning" in rest[0], ours
    assert r.stdout.count("lipscope probe") == 1 and (tmp_path / "o" / "lipschitz.csv").is_file()


def _start(tmp_path: Path, out: str) -> subprocess.Popen:
    return subprocess.Popen(_cmd(*LONG, "--out", out), cwd=tmp_path, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip


def _ready(tmp_path: Path, out: str, p: subprocess.Popen) -> None:
    """Wait for the readiness signal lipscope gives: the main process holds the lock (its pid in the lock file)."""
    lock = tmp_path / f".{out}.lock"
    deadline = time.monotonic() + HANG_S
    while not (lock.is_file() and lock.read_text().strip()):
        if p.poll() is not None or time.monotonic() > deadline:
            p.kill()
            pytest.fail(f"the run never took its lock: {p.communicate()[1][-2000:]}")
        time.sleep(0.05)


def _worker(launcher: int, rank: int) -> int:
    """The pid of the worker of ``launcher`` (torchrun) with RANK ``rank``."""
    for _ in range(200):
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            try:
                stat = (d / "stat").read_text().rsplit(")", 1)[1].split()
                env = (d / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if int(stat[1]) == launcher and f"RANK={rank}".encode() in env:
                return int(d.name)
        time.sleep(0.05)
    raise AssertionError(f"no worker of rank {rank}")


@pytest.mark.slow
def test_a_killed_rank_is_one_line_and_the_run_resumes(tmp_path):
    p = _start(tmp_path, "o")
    _ready(tmp_path, "o", p)
    os.kill(_worker(p.pid, 1), signal.SIGKILL)
    _, err = p.communicate(timeout=HANG_S)
    _no_worker_traceback(err)
    ours = _ours(err)
    assert len(ours) <= 1 and all(ln.startswith("interrupted:") for ln in ours), ours
    assert -9 in _exit_codes(err) and p.returncode != 0
    r = _torchrun(tmp_path, *LONG, "--resume", "--out", "o")
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "o" / "lipschitz.csv").is_file() and not (tmp_path / ".o.partial").exists()


@pytest.mark.slow
def test_a_terminated_torchrun_is_one_line_and_the_run_resumes(tmp_path):
    p = _start(tmp_path, "o")
    _ready(tmp_path, "o", p)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=HANG_S)
    _no_worker_traceback(err)
    ours = _ours(err)
    assert len(ours) == 1 and ours[0].startswith("interrupted:"), ours  # one line: the main process's
    r = _torchrun(tmp_path, *LONG, "--resume", "--out", "o")
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("lipscope probe") == 1 and (tmp_path / "o" / "lipschitz.csv").is_file()


SHUT_DOWN = """
import atexit, os, signal, sys, time
import lipscope.cli.common as common, lipscope.runs as runs
from lipscope.cli import main
def term(*_a, **_k):
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(1)
{patch}
sys.argv = ["lipscope", "theory", "--dim", "2", "--out", "o", "-t", "1,2"]
main()
"""
PATCHES = {
    # the command finished; torchrun's SIGTERM arrives while the interpreter runs its atexit callbacks (CI's case)
    "at-exit": "atexit.register(term)",
    # a SIGTERM interrupts the run and a second one arrives during the first one's clean-up
    "twice": "left = common.what_is_left\n"
    "common.what_is_left = lambda out: (term(), left(out))[1]\n"
    "runs.run_theory = term",
}


@pytest.mark.parametrize("when", PATCHES)
def test_a_sigterm_during_shut_down_prints_no_traceback(tmp_path, when):
    """torchrun SIGTERMs every worker when a peer dies: one arriving while a worker already exits changes nothing (its
    exit code stays the command's), a second one during the first one's clean-up is ignored; no traceback."""
    code = SHUT_DOWN.format(patch=PATCHES[when])
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, cwd=tmp_path, timeout=300)
    assert "Traceback" not in r.stderr and "lipscope/" not in r.stderr, r.stderr[-3000:]
    # the command's own exit code: 0 (it had finished) or 143 (the first SIGTERM interrupted it)
    assert r.returncode == (0 if when == "at-exit" else 143), (r.returncode, r.stderr[-2000:])
    assert (tmp_path / "o" / "run.json").is_file() == (when == "at-exit")
