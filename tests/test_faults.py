"""Faults: signals mid-run, malicious pickles in every file lipscope reads, a full disk while writing.

The promise (README): Ctrl-C exits 130, a run folder is complete or absent (never half-written),
nothing is unpickled without --trust-pickle, bad input is one line on stderr with exit 2.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import HANG_S
from test_bad_inputs import ANSI, assert_one_line_refusal, run_inprocess

PROBE_FILES = ("lipschitz.csv", "run.json", "lipschitz.png")
SAMPLE_FILES = ("samples.png", "samples.npz", "run.json")

# ---------------------------------------------------------------------------------------------
# signals during a real run (console script in a subprocess)
# ---------------------------------------------------------------------------------------------

PROBE_LONG = [
    "probe",
    "--model",
    "builtin:digits-ddpm",
    "--data",
    "digits",
    "--samples",
    "64",
    "-t",
    "all",
    "--batch-size",
    "8",
    "--no-progress",
]
SAMPLE_LONG = ["sample", "--model", "builtin:digits-ddpm", "--num", "4000", "--steps", "50", "--batch-size", "16"]
RUNNING_S = 2.0  # after the run is under way, at least this long into the work (a slower machine: further in)
CLEANUP_CPU_S = 10.0  # CPU seconds a run may spend after the signal: clean-up and exit, not the rest of the work


def _default_sigint() -> None:
    """In the child before exec: SIGINT at its default, as in a terminal. A test run launched in the background of a
    non-interactive shell inherits SIGINT ignored, and Python then installs no KeyboardInterrupt handler (a program
    started with SIGINT ignored keeps ignoring it, by convention): the Ctrl-C these tests stand for would never come."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start(args: list[str], out: Path, cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "lipscope", *args, "--out", str(out)],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_default_sigint,
    )


def _wait_until_running(p: subprocess.Popen, out: Path) -> None:
    """The sign lipscope gives that a command is under way: the run's lock file beside ``out`` holds its pid (taken
    after the imports, with the signal handlers installed). However slow the machine, nothing is sent before."""
    lock = out.parent / f".{out.name}.lock"
    deadline = time.monotonic() + HANG_S
    while not (lock.is_file() and lock.read_text().strip()):
        if p.poll() is not None or time.monotonic() > deadline:
            p.kill()
            o, e = p.communicate()
            pytest.fail(f"the run never took its lock (rc {p.returncode}); stderr tail: {e[-2000:]}")
        time.sleep(0.05)


def _cpu_s(pid: int) -> float:
    """CPU seconds (user + system) process ``pid`` has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _interrupt(p: subprocess.Popen, sig: int, out: Path, cpu_before: float) -> tuple[int, str, str, float]:
    """Signal the run once it is under way; (exit code, stdout, stderr, CPU seconds the run used after the signal:
    what it spent ending, which, unlike wall time, does not grow with other work on the machine)."""
    _wait_until_running(p, out)
    time.sleep(RUNNING_S)
    assert p.poll() is None, f"the run finished before the signal (rc {p.returncode}); make it longer"
    at_signal = _cpu_s(p.pid)
    p.send_signal(sig)
    try:
        o, e = p.communicate(timeout=HANG_S)
    except subprocess.TimeoutExpired:
        p.kill()
        o, e = p.communicate()
        pytest.fail(f"still running {HANG_S} s after signal {sig}; stderr tail: {e[-2000:]}")
    total = _children_cpu_s() - cpu_before
    return p.returncode, o, e, total - at_signal


def _children_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _assert_complete_or_absent(out: Path, names: tuple[str, ...], allow_tmp: bool = False) -> None:
    if not out.exists():
        return
    present = sorted(f.name for f in out.iterdir())
    final = [n for n in names if (out / n).exists()]
    assert len(final) in (0, len(names)), f"half-written run folder {out}: {present}"
    if not allow_tmp:
        assert not [n for n in present if n.endswith(".tmp") or ".tmp" in n], f"temp files left in {out}: {present}"
    # whatever carries a final name must be whole
    if (out / "lipschitz.csv").exists():
        pd.read_csv(out / "lipschitz.csv")
    if (out / "run.json").exists():
        json.loads((out / "run.json").read_text())
    if (out / "samples.npz").exists():
        with np.load(out / "samples.npz") as z:
            z["x0"]


def _no_traceback(o: str, e: str) -> None:
    assert "Traceback" not in o + e, f"traceback printed:\n{e[-3000:]}"


@pytest.mark.slow
@pytest.mark.parametrize(
    "what,args,names",
    [("probe", PROBE_LONG, PROBE_FILES), ("sample", SAMPLE_LONG, SAMPLE_FILES)],
    ids=["probe", "sample"],
)
@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM", "SIGKILL"])
def test_signal_mid_run(what, args, names, sig, tmp_path):
    out = tmp_path / "out"
    cpu_before = _children_cpu_s()
    p = _start(args, out, tmp_path)
    rc, o, e, cpu = _interrupt(p, getattr(signal, sig), out, cpu_before)
    print(f"{what} {sig}: rc={rc}, {cpu:.1f} CPU s after the signal; stderr: {ANSI.sub('', e).strip()[-300:]!r}")
    if sig == "SIGKILL":
        assert rc == -signal.SIGKILL
        _assert_complete_or_absent(out, names, allow_tmp=True)
        return
    _no_traceback(o, e)
    assert cpu < CLEANUP_CPU_S, f"{sig}: the run used {cpu:.1f} CPU s after the signal; it should end at once"
    if sig == "SIGINT":
        assert rc == 130, f"SIGINT: exit {rc}, expected 130; stderr: {e[-1000:]}"
    else:
        assert rc in (143, 130), f"SIGTERM: exit {rc}, expected 143 (or 130); stderr: {e[-1000:]}"
    lines = [ln for ln in ANSI.sub("", e).splitlines() if ln.strip()]
    assert len(lines) <= 1, f"{len(lines)} stderr lines after {sig}: {lines[-5:]}"
    _assert_complete_or_absent(out, names)


def test_interrupt_before_any_work_leaves_nothing(tmp_path):
    """Ctrl-C while the command is still loading (before the run folder is staged): exit 130 and
    nothing written. (An interrupt inside Python's own import of torch, in the first second, ends
    with Python's KeyboardInterrupt message: docs/reliability.md.)"""
    out = tmp_path / "out"
    p = _start(PROBE_LONG, out, tmp_path)
    _wait_until_running(p, out)
    p.send_signal(signal.SIGINT)
    o, e = p.communicate(timeout=HANG_S)
    _no_traceback(o, e)
    assert p.returncode == 130
    assert not out.exists() or not any(out.iterdir())


# ---------------------------------------------------------------------------------------------
# malicious pickles: the marker file must never appear
# ---------------------------------------------------------------------------------------------


class Evil:
    """Unpickling this creates ``marker`` (a stand-in for arbitrary code)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


TINY_PROBE = ["--samples", "2", "-t", "0,1", "--batch-size", "4", "--device", "cpu", "--no-progress"]


def _refuses_without_unpickling(argv, marker: Path, capfd, monkeypatch, mentions=()):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    capfd.readouterr()
    res = run_inprocess(argv, capfd, monkeypatch)
    assert not marker.exists(), "the malicious pickle was executed"
    assert_one_line_refusal(res, mentions)


@pytest.mark.parametrize("kind", ["npy", "npz", "pt", "pth"])
def test_pickle_in_data_file_never_runs(kind, tmp_path, pipeline_dir, capfd, monkeypatch):
    marker = tmp_path / "PWNED"
    f = tmp_path / f"x.{kind}"
    evil = np.array([Evil(marker), Evil(marker)], dtype=object)
    if kind == "npy":
        np.save(f, evil, allow_pickle=True)
    elif kind == "npz":
        np.savez(f, x0=evil)
    else:
        torch.save(Evil(marker), f)
    assert not marker.exists()
    out = tmp_path / "out"
    argv = ["probe", "--model", str(pipeline_dir), "--data", str(f), *TINY_PROBE, "--out", str(out)]
    _refuses_without_unpickling(argv, marker, capfd, monkeypatch, mentions=f.name)
    assert not out.exists() or not any(out.iterdir())


def test_pickle_in_data_file_for_train_never_runs(tmp_path, pipeline_dir, capfd, monkeypatch):
    marker = tmp_path / "PWNED"
    f = tmp_path / "x.pt"
    torch.save({"x0": Evil(marker)}, f)
    argv = ["train", "--config", str(pipeline_dir / "unet" / "config.json"), "--data", str(f)]
    argv += ["--steps", "1", "--batch-size", "2", "--no-progress", "--out", str(tmp_path / "out")]
    _refuses_without_unpickling(argv, marker, capfd, monkeypatch, mentions="x.pt")


def test_pickle_in_model_weights_never_runs_without_trust(tmp_path, pipeline_dir, capfd, monkeypatch):
    marker = tmp_path / "PWNED"
    f = tmp_path / "w.pt"
    torch.save({"conv_in.weight": Evil(marker)}, f)
    argv = ["probe", "--model", str(f), "--config", str(pipeline_dir / "unet" / "config.json"), "--data", "digits"]
    argv += [*TINY_PROBE, "--out", str(tmp_path / "out")]
    _refuses_without_unpickling(argv, marker, capfd, monkeypatch, mentions="w.pt")


def test_pickle_in_pipeline_bin_never_runs(tmp_path, pipeline_dir, capfd, monkeypatch):
    """A pipeline folder whose UNet weights are a .bin pickle (no safetensors)."""
    import shutil

    marker = tmp_path / "PWNED"
    pipe = tmp_path / "pipe"
    shutil.copytree(pipeline_dir, pipe)
    (pipe / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    torch.save({"conv_in.weight": Evil(marker)}, pipe / "unet" / "diffusion_pytorch_model.bin")
    argv = ["probe", "--model", str(pipe), "--data", "digits", *TINY_PROBE, "--out", str(tmp_path / "out")]
    _refuses_without_unpickling(argv, marker, capfd, monkeypatch, mentions="pipe")


def test_pickle_in_probe_sample_cache_never_runs(tmp_path, pipeline_dir, capfd, monkeypatch):
    """`--data model` caches x0 drawn from the model in the out folder; a planted cache must not unpickle."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("LIPSCOPE_CACHE", str(cache))
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def argv(out):
        return ["probe", "--model", str(pipeline_dir), "--data", "model", *TINY_PROBE, "--out", str(out)]

    res = run_inprocess(argv(tmp_path / "out1"), capfd, monkeypatch)
    assert res.code == 0, res.stderr + res.exc
    caches = sorted([*(tmp_path / "out1").rglob("x0_model_*.npz"), *cache.rglob("x0_model_*.npz")])
    assert caches, "no x0_model_*.npz sample cache found (out folder or LIPSCOPE_CACHE); where did it go?"
    marker = tmp_path / "PWNED"
    for c in caches:
        np.savez(c, x0=np.array([Evil(marker), Evil(marker)], dtype=object))
    capfd.readouterr()
    res = run_inprocess(argv(tmp_path / "out2"), capfd, monkeypatch)
    print(f"planted cache {caches[0].name}: rc={res.code}; stderr={ANSI.sub('', res.stderr).strip()!r}")
    assert not marker.exists(), "the malicious pickle in the sample cache was executed"
    assert "Traceback" not in res.stdout + res.stderr + res.exc, res.exc[-2000:] or res.stderr[-2000:]
    # either refused in one line, or the cache ignored (one warning) and the samples drawn again
    if res.code != 0:
        assert_one_line_refusal(res, mentions="x0_model_")


# ---------------------------------------------------------------------------------------------
# a full disk while the run folder is written
# ---------------------------------------------------------------------------------------------


def _assert_run_folder_untouched(res, out: Path) -> None:
    assert "Traceback" not in res.stdout + res.stderr + res.exc, res.exc[-3000:] or res.stderr[-3000:]
    assert res.code in (1, 2), f"exit {res.code}; the write failure went unnoticed"
    lines = [ln for ln in ANSI.sub("", res.stderr).splitlines() if ln.strip() and not ln.startswith("warning:")]
    assert len(lines) == 1 and lines[0].startswith("error:"), lines
    if out.exists():
        present = sorted(f.name for f in out.iterdir())
        assert not set(present) & set(PROBE_FILES), f"half-written run folder: {present}"
    left = sorted(f.name for f in out.parent.iterdir() if f.name.startswith(f".{out.name}") and ".tmp" in f.name)
    assert not left, f"temp files/folders left beside --out: {left}"
    left = sorted(f.name for f in out.rglob("*.tmp*")) if out.exists() else []
    assert not left, f"temp files left in --out: {left}"


@pytest.mark.parametrize("fail_on", [2, 3])
def test_disk_full_while_writing_run_folder(fail_on, tmp_path, pipeline_dir, capfd, monkeypatch):
    """The 2nd (3rd) file of the run folder fails to reach the disk: fsync raises ENOSPC."""
    real = os.fsync
    calls = []

    def flaky(fd):
        calls.append(fd)
        if len(calls) == fail_on:
            raise OSError(28, "No space left on device")
        return real(fd)

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "out"
    argv = ["probe", "--model", str(pipeline_dir), "--data", "digits", *TINY_PROBE, "--out", str(out)]
    monkeypatch.setattr(os, "fsync", flaky)
    capfd.readouterr()
    res = run_inprocess(argv, capfd, monkeypatch)
    monkeypatch.setattr(os, "fsync", real)
    print(
        f"disk full on fsync {fail_on} ({len(calls)} fsyncs): rc={res.code}; "
        f"stderr={ANSI.sub('', res.stderr).strip()!r}"
    )
    assert len(calls) >= fail_on, f"only {len(calls)} fsyncs: the run folder is not written file by file with fsync"
    _assert_run_folder_untouched(res, out)


def test_disk_full_on_os_replace(tmp_path, pipeline_dir, capfd, monkeypatch):
    """The same fault one level down: os.replace of run.json (the 2nd file) fails with ENOSPC."""
    real = os.replace
    out = tmp_path / "out"

    def flaky(src, dst, *a, **k):  # run.json replaced into out, or the staged folder renamed to out
        d = Path(dst).resolve()
        if d == out.resolve() or (d.name == "run.json" and d.parent == out.resolve()):
            raise OSError(28, "No space left on device")
        return real(src, dst, *a, **k)

    monkeypatch.setattr(os, "replace", flaky)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    argv = ["probe", "--model", str(pipeline_dir), "--data", "digits", *TINY_PROBE, "--out", str(out)]
    capfd.readouterr()
    res = run_inprocess(argv, capfd, monkeypatch)
    monkeypatch.setattr(os, "replace", real)
    print(f"os.replace ENOSPC: rc={res.code}; stderr={ANSI.sub('', res.stderr).strip()!r}")
    _assert_run_folder_untouched(res, out)


def test_outputs_follow_the_umask_and_theory_prints_no_warning(tmp_path, recwarn):
    """Files get 0666 & ~umask (not mkstemp's 0600); a theory run raises no (NumPy/PyTorch) warning."""
    from lipscope.io import atomic_write_bytes
    from lipscope.runs import TheoryOptions, run_theory

    old = os.umask(0o022)
    try:
        run_theory(TheoryOptions(dim=2, timesteps="0,10,500", samples=8, out=str(tmp_path / "th")))
        single = atomic_write_bytes(tmp_path / "one.png", b"x")
    finally:
        os.umask(old)
    for f in [*(tmp_path / "th").iterdir(), single]:
        assert f.stat().st_mode & 0o777 == 0o644, f
    assert not [w for w in recwarn if issubclass(w.category, UserWarning)], [str(w.message) for w in recwarn]


def test_overwrite_never_deletes_the_current_folder_or_an_input(tmp_path, monkeypatch):
    """`--overwrite` replaces a run folder; it refuses the current folder, anything above it, and a folder that
    holds what the run reads (found by a hostile review: such runs used to delete the model and the cwd)."""
    from lipscope.errors import InputError
    from lipscope.io import check_out_dir

    (tmp_path / "work" / "model").mkdir(parents=True)
    (tmp_path / "work" / "thesis.tex").write_text("keep me")
    monkeypatch.chdir(tmp_path / "work")
    for out in (".", "..", str(tmp_path / "work")):
        with pytest.raises(InputError, match="would delete it"):
            check_out_dir(out, overwrite=True)
    with pytest.raises(InputError, match="which this run reads"):
        check_out_dir(".", overwrite=True, inputs=["model"])
    with pytest.raises(InputError, match="which this run reads"):
        check_out_dir("model", overwrite=True, inputs=["model"])
    assert (tmp_path / "work" / "thesis.tex").read_text() == "keep me"
    assert check_out_dir("new-run", overwrite=True, inputs=["model"]).name == "new-run"
