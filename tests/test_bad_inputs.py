"""Bad input, every command: exit 2, exactly one line on stderr (what is wrong + how to fix it), no
traceback, and the output folder untouched (absent, or byte-for-byte what it was).

The matrix runs in-process (``lipscope.cli.main`` with ``sys.argv`` patched, output captured at the
file-descriptor level); a few representative cases also run through ``python -m lipscope`` to prove the
console path behaves the same. Inputs are tiny (the 8×8 UNet of conftest, 2 samples, 1 step), so a case
that is wrongly accepted still finishes in seconds.
"""

# ruff: noqa: E501  (the case table keeps one case per line)
from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
# a hint of the fix: an instruction verb, or a statement of what is valid
HINT = re.compile(
    r";|\b(use|pass|choose|check|remove|install|free|keep|set|name|scale|resize|clean|fix|give|drop|add|"
    r"lower|raise|rename|download|point|delete|move|try|retrain|train|did you mean|must|should|expected|"
    r"one of|range|needs?|only|at least|at most|between)\b",
    re.IGNORECASE,
)
SEE_HELP = re.compile(r"\s*\(see [^()]*--help\)\s*$")


# ---------------------------------------------------------------------------------------------
# the helper every case goes through
# ---------------------------------------------------------------------------------------------


@dataclass
class Result:
    code: int | None
    stdout: str
    stderr: str
    exc: str = ""  # formatted exception that escaped main() (an internal error in console terms)


def assert_one_line_refusal(res: Result, mentions: str | tuple[str, ...] = ()) -> str:
    """Exit 2, one non-empty stderr line starting with ``error:`` that names ``mentions`` and hints the
    fix, and no traceback anywhere. Returns the line."""
    where = f"\n--- stderr ---\n{res.stderr[-3000:]}\n--- stdout ---\n{res.stdout[-1500:]}\n{res.exc[-3000:]}"
    tb = res.stdout + res.stderr + res.exc
    last = [ln for ln in tb.splitlines() if ln.strip()][-1:] if "Traceback" in tb else []
    assert "Traceback" not in tb, f"a traceback was printed (exit {res.code}): {last}" + where
    assert res.code == 2, f"exit code {res.code}, expected 2" + where
    err = ANSI.sub("", res.stderr)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and err.strip() == lines[0].strip(), f"{len(lines)} stderr lines, expected 1" + where
    line = lines[0].strip()
    assert line.startswith("error:"), f"stderr line does not start with 'error:': {line!r}"
    body = SEE_HELP.sub("", line[len("error:") :])
    assert body.strip(), f"empty error message: {line!r}"
    hinted = bool(HINT.search(body)) or body != line[len("error:") :]  # "(see lipscope X --help)" counts
    for m in (mentions,) if isinstance(mentions, str) else mentions:
        assert m.lower() in line.lower(), f"the line does not mention {m!r}: {line!r}"
    assert hinted, f"no hint of the fix in {line!r}"
    return line


def snapshot(p: Path) -> dict[str, str] | str | None:
    """Names + sha256 of everything under ``p`` (None: absent; a str: a file's hash)."""
    try:
        if not p.exists() and not p.is_symlink():
            return None
    except OSError:  # a name the file system cannot hold cannot exist
        return None
    if p.is_file():
        return hashlib.sha256(p.read_bytes()).hexdigest()
    out = {}
    for f in sorted(p.rglob("*")):
        rel = str(f.relative_to(p))
        out[rel] = hashlib.sha256(f.read_bytes()).hexdigest() if f.is_file() else "<dir>"
    return out


def run_inprocess(argv: list[str], capfd, monkeypatch) -> Result:
    """``lipscope ARGV`` in this process; the logging state a command sets up (its handler on the lipscope logger,
    no propagation, Python's warning printer, transformers' level) is put back afterwards, so tests that read
    lipscope's log through pytest's caplog see it whatever ran before."""
    import logging
    import warnings

    from lipscope.cli import main

    monkeypatch.setattr(sys, "argv", ["lipscope", *argv])
    lg = logging.getLogger("lipscope")
    monkeypatch.setattr(lg, "handlers", list(lg.handlers))
    monkeypatch.setattr(lg, "propagate", lg.propagate)
    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)
    monkeypatch.setenv("TRANSFORMERS_VERBOSITY", os.environ.get("TRANSFORMERS_VERBOSITY", ""))
    if not os.environ["TRANSFORMERS_VERBOSITY"]:
        monkeypatch.delenv("TRANSFORMERS_VERBOSITY")
    level = lg.level
    code: int | None
    exc = ""
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except KeyboardInterrupt:
        code = 130
    except BaseException:  # escaped main(): the console script would print a traceback, exit 1
        code, exc = 1, traceback.format_exc()
    finally:
        lg.setLevel(level)
    o, e = capfd.readouterr()
    return Result(code, o, e, exc)


def run_subprocess(argv: list[str], cwd: Path) -> Result:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200", "PYTHONPATH": str(cwd)}
    r = subprocess.run(
        [sys.executable, "-m", "lipscope", *argv], capture_output=True, text=True, env=env, cwd=cwd, timeout=300
    )
    return Result(r.returncode, r.stdout, r.stderr)


# ---------------------------------------------------------------------------------------------
# setups: each writes files under tmp (``pipe`` is the tiny pipeline folder of conftest)
# ---------------------------------------------------------------------------------------------

Setup = Callable[[Path, Path], None]


def _write(rel: str, data: bytes | str) -> Setup:
    def s(tmp: Path, pipe: Path) -> None:
        p = tmp / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data.encode() if isinstance(data, str) else data)

    return s


def _mkdir(rel: str) -> Setup:
    def s(tmp: Path, pipe: Path) -> None:
        (tmp / rel).mkdir(parents=True, exist_ok=True)

    return s


def _npy(rel: str, a: np.ndarray) -> Setup:
    def s(tmp: Path, pipe: Path) -> None:
        np.save(tmp / rel, a)

    return s


def _copy_pipe(rel: str) -> Setup:
    def s(tmp: Path, pipe: Path) -> None:
        import shutil

        shutil.copytree(pipe, tmp / rel)

    return s


def _fifo(rel: str) -> Setup:
    def s(tmp: Path, pipe: Path) -> None:
        os.mkfifo(tmp / rel)

    return s


def _edm_folder(tmp: Path, pipe: Path) -> None:
    """The conftest pipeline with an EDM scheduler: a real folder of a non-VP process."""
    import shutil

    shutil.copytree(pipe, tmp / "edm")
    (tmp / "edm" / "scheduler" / "scheduler_config.json").write_text(json.dumps({"_class_name": "EDMEulerScheduler"}))


def _chain(*ss: Setup) -> Setup:
    def s(tmp: Path, pipe: Path) -> None:
        for f in ss:
            f(tmp, pipe)

    return s


def _tiny_cfg(**over) -> Setup:
    """tmp/cfg.json: the tiny UNet config of conftest, with ``over`` applied."""

    def s(tmp: Path, pipe: Path) -> None:
        cfg = json.loads((pipe / "unet" / "config.json").read_text())
        cfg.update(over)
        (tmp / "cfg.json").write_text(json.dumps(cfg))

    return s


def _truncated_safetensors(tmp: Path, pipe: Path) -> None:
    b = (pipe / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    (tmp / "w.safetensors").write_bytes(b[: len(b) // 3])


def _random_pt(tmp: Path, pipe: Path) -> None:
    (tmp / "w.pt").write_bytes(np.random.default_rng(0).bytes(4096))


def _py_module(name: str, src: str) -> Setup:
    return _write(f"{name}.py", src)


def _image_folder_of_text(tmp: Path, pipe: Path) -> None:
    d = tmp / "notimages"
    d.mkdir()
    (d / "a.txt").write_text("hello")
    (d / "b.csv").write_text("1,2\n")


def _corrupt_images(tmp: Path, pipe: Path) -> None:
    d = tmp / "badimgs"
    d.mkdir()
    for i in range(3):
        (d / f"{i}.png").write_bytes(b"not a png at all" * 4)


def _run_folder(rel: str, csv: str | None, meta: str | None) -> Setup:
    def s(tmp: Path, pipe: Path) -> None:
        d = tmp / rel
        d.mkdir(parents=True, exist_ok=True)
        if csv is not None:
            (d / "lipschitz.csv").write_text(csv)
        if meta is not None:
            (d / "run.json").write_text(meta)

    return s


GOOD_CSV = (
    "t,t_prime,dt,method,n,K_mean,K_std,K_sem,K_ci_low,K_ci_high,K_mean_per_dim,alpha,sigma\n"
    "0,1,1,fd,2,5,1,0.7,4,6,0.1,1,0.01\n"
    "500,501,1,fd,2,1,0.1,0.07,0.9,1.1,0.01,0.5,0.8\n"
)
GOOD_META = json.dumps({"model": {"T": 1000, "etsdm": None}})


def _pipeline_16px(tmp: Path, pipe: Path) -> None:
    """tmp/big: a pipeline folder whose UNet takes 16×16 samples (the tiny one takes 8×8)."""
    import shutil

    from conftest import tiny_unet

    tiny_unet(sample_size=16).save_pretrained(tmp / "big" / "unet")
    shutil.copytree(pipe / "scheduler", tmp / "big" / "scheduler")
    shutil.copy(pipe / "model_index.json", tmp / "big" / "model_index.json")


def _sd_text_pipeline(tmp: Path, pipe: Path) -> None:
    """tmp/sd: a tiny text-conditioned Stable Diffusion pipeline (a latent model: fine-tuning caches latents)."""
    from text_fixtures import save_sd_text_pipeline

    save_sd_text_pipeline(tmp / "sd")


def _foreign_folder(tmp: Path, pipe: Path) -> None:
    d = tmp / "out"
    d.mkdir()
    (d / "thesis.tex").write_text("my precious work")
    (d / "lipschitz.csv").write_text("not,ours\n1,2\n")


def _readonly_parent(tmp: Path, pipe: Path) -> None:
    d = tmp / "ro"
    d.mkdir()
    d.chmod(0o555)


# ---------------------------------------------------------------------------------------------
# the matrix
# ---------------------------------------------------------------------------------------------

# tiny, fast baselines: the one bad thing of each case is added on top
BASE = {
    "probe": [
        "--model",
        "{pipe}",
        "--data",
        "digits",
        "--samples",
        "2",
        "-t",
        "0,1",
        "--batch-size",
        "4",
        "--device",
        "cpu",
        "--no-progress",
    ],
    "theory": ["--dim", "2", "--samples", "2", "-t", "0,1"],
    "train": ["--config", "{pipe}/unet/config.json", "--data", "digits", "--steps", "1", "--batch-size", "2"],
    "finetune": ["--model", "{pipe}", "--data", "digits", "--steps", "1", "--batch-size", "2"],
    "sample": ["--model", "{pipe}", "--num", "2", "--steps", "1", "--batch-size", "2", "--device", "cpu"],
    "evaluate": [
        "--model",
        "{pipe}",
        "--num",
        "3",
        "--seeds",
        "1",
        "--steps",
        "1",
        "--scheduler",
        "ddim",
        "--device",
        "cpu",
    ],
    "compare": [],
    "models": [],
}
NO_PROGRESS = {"probe", "train", "finetune"}


@dataclass
class Case:
    id: str
    cmd: str
    args: list[str]
    mentions: str | tuple[str, ...]
    setup: Setup | None = None
    base: bool = True  # prepend BASE[cmd]; options given in ``args`` replace the base's
    # root ignores permission bits: as root the kernel's answer to a user (os.access denies writing to mode 0555
    # folders) is given in its place, so the refusal is still exercised
    as_user: bool = False
    marks: list = field(default_factory=list)

    def argv(self, tmp: Path, pipe: Path) -> list[str]:
        base = list(BASE[self.cmd]) if self.base else []
        given = {a for a in self.args if a.startswith("-")}
        kept, i = [], 0
        while i < len(base):  # drop base options that the case sets itself
            a = base[i]
            takes_value = i + 1 < len(base) and not base[i + 1].startswith("--")
            if a in given:
                i += 2 if takes_value else 1
                continue
            kept.append(a)
            if takes_value:
                kept.append(base[i + 1])
            i += 2 if takes_value else 1
        argv = [self.cmd, *kept, *self.args]
        if self.cmd in NO_PROGRESS and "--no-progress" not in argv:
            argv.append("--no-progress")
        if self.cmd not in ("models", "compare") and "--out" not in argv and "-o" not in argv:
            argv += ["--out", "{tmp}/out"]
        return [a.format(tmp=tmp, pipe=pipe) for a in argv]


def C(id, cmd, *args, mentions, setup=None, base=True, as_user=False):
    args = list(args)
    if any(a.startswith("py:") for a in args) and cmd == "probe":  # no "no schedule given" warning
        args += ["--scheduler-config", "{pipe}/scheduler/scheduler_config.json"]
    return Case(id, cmd, args, mentions, setup, base, as_user)


PYNET = "import torch\n"

# fmt: off
CASES: list[Case] = [
    # ---- cli: unknown flags, wrong types -------------------------------------------------------
    C("probe-unknown-flag", "probe", "--banana", "1", mentions="--banana"),
    C("theory-unknown-flag", "theory", "--frobnicate", mentions="--frobnicate"),
    C("sample-unknown-flag", "sample", "--temperature", "2", mentions="--temperature"),
    C("compare-unknown-flag", "compare", "{tmp}/r", "--banana", mentions="--banana", setup=_run_folder("r", GOOD_CSV, GOOD_META)),
    C("models-unexpected-argument", "models", "extra", mentions="extra"),
    C("unknown-command", "probee", mentions="probee", base=False),
    C("probe-samples-not-int", "probe", "--samples", "abc", mentions="--samples"),
    C("probe-dt-not-float", "probe", "--dt", "x", mentions="--dt"),
    C("train-lr-not-float", "train", "--lr", "fast", mentions="--lr"),
    C("sample-num-not-int", "sample", "--num", "many", mentions="--num"),
    C("probe-seed-float", "probe", "--seed", "1.5", mentions="--seed"),
    # ---- probe: ranges ---------------------------------------------------------------------------
    C("probe-samples-1", "probe", "--samples", "1", mentions="--samples"),
    C("probe-samples-1e12", "probe", "--samples", "1000000000000", mentions="--samples"),
    C("probe-seed-negative", "probe", "--seed", "-1", mentions="--seed"),
    C("probe-batch-size-0", "probe", "--batch-size", "0", mentions="--batch-size"),
    C("probe-batch-size-1", "probe", "--batch-size", "1", mentions="--batch-size"),
    C("probe-batch-size-word", "probe", "--batch-size", "lots", mentions="--batch-size"),
    C("probe-dt-0", "probe", "--dt", "0", mentions="--dt"),
    C("probe-dt-negative", "probe", "--dt", "-1", mentions="--dt"),
    C("probe-dt-1e9", "probe", "--dt", "1e9", mentions="--dt"),
    C("probe-dt-nan", "probe", "--dt", "nan", mentions="--dt"),
    C("probe-dt-inf", "probe", "--dt", "inf", mentions="--dt"),
    C("probe-t-split-negative", "probe", "--t-split", "-5", mentions="--t-split"),
    C("probe-t-split-beyond-T", "probe", "--t-split", "5000", mentions="--t-split"),
    # ---- probe: choices --------------------------------------------------------------------------
    C("probe-method-banana", "probe", "--method", "banana", mentions="--method"),
    C("probe-scheme-up", "probe", "--scheme", "up", mentions="--scheme"),
    C("probe-space-foo", "probe", "--space", "foo", mentions="--space"),
    C("probe-dtype-float8", "probe", "--dtype", "float8", mentions="--dtype"),
    C("probe-device-banana", "probe", "--device", "banana", mentions="--device"),
    C("probe-device-meta", "probe", "--device", "meta", mentions="--device"),
    C("probe-device-mps-absent", "probe", "--device", "mps", mentions="mps"),
    C("probe-device-cuda7-absent", "probe", "--device", "cuda:7", mentions="cuda"),
    C("probe-space-condition-on-plain-model-jvp", "probe", "--method", "jvp", "--dt", "0.5", "--scheme", "central", "--space", "condition", mentions="--space"),
    # ---- probe: grids ----------------------------------------------------------------------------
    C("grid-empty", "probe", "-t", "", mentions="--timesteps"),
    C("grid-range-1e12-points", "probe", "-t", "range:0:1e12:1", mentions="--timesteps"),
    C("grid-log-0", "probe", "-t", "log:0", mentions="--timesteps"),
    C("grid-linear-negative", "probe", "-t", "linear:-3", mentions="--timesteps"),
    C("grid-step-5000-beyond-T", "probe", "-t", "5000", mentions="--timesteps"),
    C("grid-step-negative", "probe", "-t", "-1", mentions="--timesteps"),
    C("grid-word", "probe", "-t", "abc", mentions="--timesteps"),
    C("grid-range-step-0", "probe", "-t", "range:0:10:0", mentions="--timesteps"),
    C("grid-last-step-plus-dt-beyond-T", "probe", "-t", "999", "--dt", "5", mentions=("--timesteps", "--dt")),
    C("grid-nan", "probe", "-t", "nan", mentions="--timesteps"),
    # ---- models: paths and configs --------------------------------------------------------------
    C("model-missing-path", "probe", "--model", "./nope", mentions="./nope"),
    C("model-one-slash-typo-offline", "probe", "--model", "runs/my-typo", mentions="runs/my-typo"),
    C("model-empty-folder", "probe", "--model", "{tmp}/empty", mentions="empty", setup=_mkdir("empty")),
    C("model-garbage-config", "probe", "--model", "{tmp}/m", mentions="config", setup=_write("m/config.json", "{not json")),
    C("model-config-for-another-class", "probe", "--model", "{tmp}/m", mentions="m", setup=_write("m/config.json", json.dumps({"_class_name": "AutoencoderKL", "in_channels": 3, "latent_channels": 4}))),
    C("model-config-json-list", "probe", "--model", "{tmp}/m", mentions="config", setup=_write("m/config.json", "[1, 2]")),
    C("model-weights-without-config", "probe", "--model", "{pipe}/unet/diffusion_pytorch_model.safetensors", mentions="--config"),
    C("model-weights-mismatching-config", "probe", "--model", "{pipe}/unet/diffusion_pytorch_model.safetensors", "--config", "{tmp}/cfg.json", mentions="cfg.json", setup=_tiny_cfg(block_out_channels=[8, 16])),
    C("model-config-missing-file", "probe", "--model", "{pipe}/unet/diffusion_pytorch_model.safetensors", "--config", "{tmp}/nocfg.json", mentions="nocfg.json"),
    C("model-random-bytes-pt", "probe", "--model", "{tmp}/w.pt", "--config", "{pipe}/unet/config.json", mentions="w.pt", setup=_random_pt),
    C("model-random-bytes-pt-trust-pickle", "probe", "--model", "{tmp}/w.pt", "--config", "{pipe}/unet/config.json", "--trust-pickle", mentions="w.pt", setup=_random_pt),
    C("model-truncated-safetensors", "probe", "--model", "{tmp}/w.safetensors", "--config", "{pipe}/unet/config.json", mentions="w.safetensors", setup=_truncated_safetensors),
    C("model-unknown-suffix", "probe", "--model", "{tmp}/w.onnx", "--config", "{pipe}/unet/config.json", mentions="w.onnx", setup=_write("w.onnx", b"\x00" * 64)),
    C("model-builtin-nope", "probe", "--model", "builtin:nope", mentions="builtin:nope"),
    C("model-py-no-module", "probe", "--model", "py:nomodule_lipscope_xyz:f", mentions="nomodule_lipscope_xyz"),
    C("model-py-missing-factory", "probe", "--model", "py:lsmod_missing:missing", mentions="missing", setup=_py_module("lsmod_missing", "def f():\n    return None\n")),
    C("model-py-no-colon", "probe", "--model", "py:justamodule", mentions="py:justamodule"),
    C("model-py-syntax-error", "probe", "--model", "py:lsmod_syntax:f", mentions="lsmod_syntax", setup=_py_module("lsmod_syntax", "def f(:\n    pass\n")),
    C("model-py-factory-raises", "probe", "--model", "py:lsmod_raises:f", mentions="lsmod_raises", setup=_py_module("lsmod_raises", "def f():\n    raise RuntimeError('boom')\n")),
    C("model-py-factory-returns-3", "probe", "--model", "py:lsmod_three:f", mentions="lsmod_three", setup=_py_module("lsmod_three", "def f():\n    return 3\n")),
    C("model-py-net-wrong-shape", "probe", "--model", "py:lsmod_shape:f", "--data", "{tmp}/x.npy", mentions="--model", setup=_chain(_py_module("lsmod_shape", PYNET + "def f():\n    return lambda x, t: x[:, :, :2]\n"), _npy("x.npy", np.zeros((4, 1, 8, 8), np.float32)))),
    C("model-py-net-returns-tuple", "probe", "--model", "py:lsmod_tuple:f", "--data", "{tmp}/x.npy", mentions="--model", setup=_chain(_py_module("lsmod_tuple", PYNET + "def f():\n    return lambda x, t: (x, t)\n"), _npy("x.npy", np.zeros((4, 1, 8, 8), np.float32)))),
    C("model-py-net-returns-nan", "probe", "--model", "py:lsmod_nan:f", "--data", "{tmp}/x.npy", mentions="NaN", setup=_chain(_py_module("lsmod_nan", PYNET + "def f():\n    return lambda x, t: x * float('nan')\n"), _npy("x.npy", np.zeros((4, 1, 8, 8), np.float32)))),
    C("scheduler-config-folder-without-config", "probe", "--scheduler-config", "{tmp}/sdir", mentions="sdir", setup=_mkdir("sdir")),
    C("scheduler-config-negative-T", "probe", "--scheduler-config", "{tmp}/s.json", mentions="num_train_timesteps", setup=_write("s.json", json.dumps({"_class_name": "DDPMScheduler", "num_train_timesteps": -5}))),
    C("scheduler-config-garbage-json", "probe", "--scheduler-config", "{tmp}/s.json", mentions="s.json", setup=_write("s.json", "garbage{")),
    C("scheduler-config-missing-file", "probe", "--scheduler-config", "{tmp}/nope.json", mentions="nope.json"),
    C("scheduler-config-unknown-beta-schedule", "probe", "--scheduler-config", "{tmp}/s.json", mentions="beta_schedule", setup=_write("s.json", json.dumps({"num_train_timesteps": 1000, "beta_schedule": "wiggly"}))),
    C("model-subfolder-missing", "probe", "--subfolder", "nosuch", mentions="nosuch"),
    # ---- data ------------------------------------------------------------------------------------
    C("data-missing-path", "probe", "--data", "./nope", mentions="./nope"),
    C("data-empty-image-folder", "probe", "--data", "{tmp}/imgs", mentions="imgs", setup=_mkdir("imgs")),
    C("data-folder-of-non-images", "probe", "--data", "{tmp}/notimages", mentions="notimages", setup=_image_folder_of_text),
    C("data-folder-of-corrupt-pngs", "probe", "--data", "{tmp}/badimgs", mentions="badimgs", setup=_corrupt_images),
    C("data-npy-wrong-channels", "probe", "--data", "{tmp}/x.npy", mentions="x.npy", setup=_npy("x.npy", np.zeros((4, 3, 8, 8), np.float32))),
    C("data-npy-float-0-255", "probe", "--data", "{tmp}/x.npy", mentions="x.npy", setup=_npy("x.npy", np.linspace(0, 255, 4 * 64, dtype=np.float32).reshape(4, 1, 8, 8))),
    C("data-npy-nan", "probe", "--data", "{tmp}/x.npy", mentions="x.npy", setup=_npy("x.npy", np.full((4, 1, 8, 8), np.nan, np.float32))),
    C("data-npy-wrong-size", "probe", "--data", "{tmp}/x.npy", mentions="x.npy", setup=_npy("x.npy", np.zeros((4, 1, 16, 16), np.float32))),
    C("data-npy-2d", "probe", "--data", "{tmp}/x.npy", mentions="x.npy", setup=_npy("x.npy", np.zeros((4, 64), np.float32))),
    C("data-npy-zero-samples", "probe", "--data", "{tmp}/x.npy", mentions="x.npy", setup=_npy("x.npy", np.zeros((0, 1, 8, 8), np.float32))),
    C("data-npy-strings", "probe", "--data", "{tmp}/x.npy", mentions="x.npy", setup=_npy("x.npy", np.array([[[["a"] * 8] * 8]] * 2))),
    C("data-npz-two-unnamed-arrays", "probe", "--data", "{tmp}/x.npz", mentions="x.npz", setup=lambda t, p: np.savez(t / "x.npz", np.zeros((2, 1, 8, 8)), np.zeros((2, 1, 8, 8)))),
    C("data-npy-truncated", "probe", "--data", "{tmp}/x.npy", mentions="x.npy", setup=_write("x.npy", b"\x93NUMPY\x01\x00v\x00{'descr': '<f4', 'fortran_order': False, 'shape': (4, 1, 8, 8), }" + b" " * 50 + b"\n" + b"\x00" * 10)),
    C("data-pt-list", "probe", "--data", "{tmp}/x.pt", mentions="x.pt", setup=lambda t, p: torch.save([1, 2, 3], t / "x.pt")),
    C("data-txt-file", "probe", "--data", "{tmp}/x.txt", mentions="x.txt", setup=_write("x.txt", "0 1 2\n")),
    C("data-hf-without-name", "probe", "--data", "hf:", mentions="hf"),
    C("train-data-model", "train", "--data", "model", mentions="--data"),
    C("finetune-data-missing", "finetune", "--data", "./nope", mentions="./nope"),
    C("evaluate-data-missing", "evaluate", "--data", "./nope", mentions="./nope"),
    # ---- out folders -----------------------------------------------------------------------------
    C("probe-out-is-a-file", "probe", "--out", "{tmp}/out", mentions="--out", setup=_write("out", "i am a file")),
    C("probe-out-under-a-file", "probe", "--out", "{tmp}/f/out", mentions="--out", setup=_write("f", "i am a file")),
    C("probe-out-readonly-parent", "probe", "--out", "{tmp}/ro/out", mentions="--out", setup=_readonly_parent, as_user=True),
    C("probe-out-foreign-nonempty-folder", "probe", "--out", "{tmp}/out", mentions="--out", setup=_foreign_folder),
    C("theory-out-is-a-file", "theory", "--out", "{tmp}/out", mentions="--out", setup=_write("out", "i am a file")),
    C("theory-out-under-a-file", "theory", "--out", "{tmp}/f/out", mentions="--out", setup=_write("f", "i am a file")),
    C("sample-out-under-a-file", "sample", "--out", "{tmp}/f/out", mentions="--out", setup=_write("f", "i am a file")),
    C("sample-out-foreign-nonempty-folder", "sample", "--out", "{tmp}/out", mentions="--out", setup=_foreign_folder),
    C("train-out-is-a-file", "train", "--out", "{tmp}/out", mentions="--out", setup=_write("out", "i am a file")),
    C("evaluate-out-under-a-file", "evaluate", "--out", "{tmp}/f/out", mentions="--out", setup=_write("f", "i am a file")),
    # ---- theory ----------------------------------------------------------------------------------
    C("theory-dim-0", "theory", "--dim", "0", mentions="--dim"),
    C("theory-dim-negative", "theory", "--dim", "-1", mentions="--dim"),
    C("theory-dim-200000", "theory", "--dim", "200000", mentions="--dim"),
    C("theory-mean-length-vs-dim", "theory", "--mean", "1,2", "--dim", "3", mentions="--mean"),
    C("theory-mean-not-numbers", "theory", "--mean", "a,b", mentions="--mean"),
    C("theory-var-negative", "theory", "--var", "-1,1", mentions="--var"),
    C("theory-var-and-cov", "theory", "--var", "1,1", "--cov", "{tmp}/c.npy", mentions=("--var", "--cov"), setup=_npy("c.npy", np.eye(2))),
    C("theory-mixture-1", "theory", "--mixture", "1", mentions="--mixture"),
    C("theory-mixture-negative", "theory", "--mixture", "-2", mentions="--mixture"),
    C("theory-cov-missing-file", "theory", "--cov", "{tmp}/nope.npy", mentions="nope.npy"),
    C("theory-cov-not-psd", "theory", "--cov", "{tmp}/c.npy", mentions="--cov", setup=_npy("c.npy", np.array([[1.0, 2.0], [2.0, 1.0]]))),
    C("theory-cov-not-square", "theory", "--cov", "{tmp}/c.npy", mentions="--cov", setup=_npy("c.npy", np.ones((2, 3)))),
    C("theory-cov-garbage-file", "theory", "--cov", "{tmp}/c.npy", mentions="c.npy", setup=_write("c.npy", b"garbage" * 10)),
    C("theory-etsdm-without-train", "theory", "--etsdm", mentions=("--etsdm", "--train")),
    C("theory-samples-1", "theory", "--samples", "1", mentions="--samples"),
    C("theory-steps-0", "theory", "--train", "--steps", "0", mentions="--steps"),
    C("theory-schedule-foo", "theory", "--schedule", "foo", mentions="--schedule"),
    C("theory-dt-0", "theory", "--dt", "0", mentions="--dt"),
    C("theory-grid-beyond-T", "theory", "-t", "5000", mentions="--timesteps"),
    # ---- train / finetune ------------------------------------------------------------------------
    C("train-config-missing", "train", "--config", "{tmp}/nope.json", mentions="nope.json"),
    C("train-config-empty-object", "train", "--config", "{tmp}/empty.json", mentions="--config", setup=_write("empty.json", "{}")),
    C("train-config-garbage", "train", "--config", "{tmp}/g.json", mentions="g.json", setup=_write("g.json", "{{{")),
    C("train-config-not-given", "train", "--data", "digits", mentions="--config", base=False),
    C("train-steps-0", "train", "--steps", "0", mentions="--steps"),
    C("train-checkpoint-every-0", "train", "--checkpoint-every", "0", mentions="--checkpoint-every"),
    C("train-lr-nan", "train", "--lr", "nan", mentions="--lr"),
    C("train-lr-negative", "train", "--lr", "-1", mentions="--lr"),
    C("train-batch-size-0", "train", "--batch-size", "0", mentions="--batch-size"),
    C("train-ema-decay-2", "train", "--ema-decay", "2", mentions="--ema-decay"),
    C("train-grad-clip-negative", "train", "--grad-clip", "-1", mentions="--grad-clip"),
    C("train-warmup-negative", "train", "--warmup", "-5", mentions="--warmup"),
    C("train-mixed-precision-banana", "train", "--mixed-precision", "banana", mentions="--mixed-precision"),
    C("train-etsdm-n-0", "train", "--etsdm", "--n", "0", mentions="--n"),
    C("train-etsdm-t-tilde-beyond-T", "train", "--etsdm", "--t-tilde", "5000", mentions="--t-tilde"),
    C("train-scheduler-config-negative-T", "train", "--scheduler-config", "{tmp}/s.json", mentions="num_train_timesteps", setup=_write("s.json", json.dumps({"num_train_timesteps": -5}))),
    C("finetune-py-model", "finetune", "--model", "py:lsmod_ft:f", mentions="--model", setup=_py_module("lsmod_ft", "def f():\n    return lambda x, t: x\n")),
    C("finetune-missing-model", "finetune", "--model", "./nope", mentions="./nope"),
    C("finetune-steps-0", "finetune", "--steps", "0", mentions="--steps"),
    C("finetune-lr-nan", "finetune", "--lr", "nan", mentions="--lr"),
    C("finetune-ema-decay-2", "finetune", "--ema-decay", "2", mentions="--ema-decay"),
    C("finetune-mixed-precision-banana", "finetune", "--mixed-precision", "banana", mentions="--mixed-precision"),
    # ---- sample ----------------------------------------------------------------------------------
    C("sample-num-0", "sample", "--num", "0", mentions="--num"),
    C("sample-steps-0", "sample", "--steps", "0", mentions="--steps"),
    C("sample-steps-5000", "sample", "--steps", "5000", mentions="--steps"),
    C("sample-steps-negative", "sample", "--steps", "-3", mentions="--steps"),
    C("sample-batch-size-0", "sample", "--batch-size", "0", mentions="--batch-size"),
    C("sample-scheduler-foo", "sample", "--scheduler", "foo", mentions="--scheduler"),
    C("sample-device-banana", "sample", "--device", "banana", mentions="--device"),
    C("sample-model-missing", "sample", "--model", "./nope", mentions="./nope"),
    C("sample-model-not-given", "sample", "--num", "2", mentions="--model", base=False),
    # ---- evaluate --------------------------------------------------------------------------------
    C("evaluate-num-2", "evaluate", "--num", "2", mentions="--num"),
    C("evaluate-seeds-0", "evaluate", "--seeds", "0", mentions="--seeds"),
    C("evaluate-steps-not-ints", "evaluate", "--steps", "a,b", mentions="--steps"),
    C("evaluate-steps-0", "evaluate", "--steps", "0", mentions="--steps"),
    C("evaluate-steps-empty", "evaluate", "--steps", ",", mentions="--steps"),
    C("evaluate-scheduler-unknown-in-list", "evaluate", "--scheduler", "ddim,foo", mentions="--scheduler"),
    C("evaluate-baseline-other-sample-shape", "evaluate", "--baseline", "{tmp}/big", mentions="--baseline", setup=_pipeline_16px),
    C("evaluate-baseline-missing", "evaluate", "--baseline", "./nope", mentions="./nope"),
    C("evaluate-inception-weights-missing", "evaluate", "--inception-weights", "{tmp}/nope.pth", mentions="--inception-weights"),
    # ---- compare ---------------------------------------------------------------------------------
    C("compare-no-lipschitz-csv", "compare", "{tmp}/r", "--out", "{tmp}/c.png", mentions="lipschitz.csv", setup=_run_folder("r", None, GOOD_META)),
    C("compare-empty-lipschitz-csv", "compare", "{tmp}/r", "--out", "{tmp}/c.png", mentions="lipschitz.csv", setup=_run_folder("r", "", GOOD_META)),
    C("compare-csv-missing-K_mean", "compare", "{tmp}/r", "--out", "{tmp}/c.png", mentions="K_mean", setup=_run_folder("r", "t,method\n0,fd\n", GOOD_META)),
    C("compare-bad-run-json", "compare", "{tmp}/r", "--out", "{tmp}/c.png", mentions="run.json", setup=_run_folder("r", GOOD_CSV, "{broken")),
    C("compare-out-jpg", "compare", "{tmp}/r", "--out", "{tmp}/x.jpg", mentions="--out", setup=_run_folder("r", GOOD_CSV, GOOD_META)),
    C("compare-run-folder-missing", "compare", "{tmp}/nope", "--out", "{tmp}/c.png", mentions="nope"),
    C("compare-run-is-a-file", "compare", "{tmp}/f.csv", "--out", "{tmp}/c.png", mentions="f.csv", setup=_write("f.csv", GOOD_CSV)),
    C("compare-out-under-a-file", "compare", "{tmp}/r", "--out", "{tmp}/f/c.png", mentions="--out", setup=_chain(_run_folder("r", GOOD_CSV, GOOD_META), _write("f", "file"))),
    C("compare-no-runs", "compare", "--out", "{tmp}/c.png", mentions="runs"),
    # ---- noise processes, targets, data range, families (the "Trustworthy numbers" and families issues) ----
    C("probe-target-unknown", "probe", "--target", "noise", mentions="--target"),
    C("probe-plot-x-unknown", "probe", "--plot-x", "tau", mentions="--plot-x"),
    C("probe-data-range-empty", "probe", "--data-range", "1,1", mentions="--data-range"),
    C("probe-data-range-nan", "probe", "--data-range", "nan,1", mentions="--data-range"),
    C("probe-data-range-one-number", "probe", "--data-range", "1", mentions="--data-range"),
    C("probe-class-label-unconditional", "probe", "--class-label", "3", mentions="--class-label"),
    C("probe-guidance-unconditional", "probe", "--guidance-scale", "2", mentions="--guidance-scale"),
    C("probe-prompt-embeds-unconditional", "probe", "--prompt-embeds", "{tmp}/e.safetensors", mentions="--prompt-embeds", setup=_write("e.safetensors", b"x")),
    C("probe-model-arg-not-py", "probe", "--model-arg", "a=1", mentions="--model-arg"),
    C("probe-scheduler-unknown-class", "probe", "--scheduler-config", "{tmp}/s.json", mentions="BananaScheduler", setup=_write("s.json", json.dumps({"_class_name": "BananaScheduler"}))),
    C("probe-scheduler-flow-inverted", "probe", "--scheduler-config", "{tmp}/s.json", mentions="invert_sigmas", setup=_write("s.json", json.dumps({"_class_name": "FlowMatchEulerDiscreteScheduler", "invert_sigmas": True}))),
    C("probe-scheduler-edm-sigmas-swapped", "probe", "--scheduler-config", "{tmp}/s.json", mentions="sigma_min", setup=_write("s.json", json.dumps({"_class_name": "EDMEulerScheduler", "sigma_min": 80.0, "sigma_max": 0.002}))),
    C("probe-scheduler-ve-negative-sigma", "probe", "--scheduler-config", "{tmp}/s.json", mentions="sigma_min", setup=_write("s.json", json.dumps({"_class_name": "ScoreSdeVeScheduler", "sigma_min": -0.01}))),
    C("probe-cosine-data-model", "probe", "--data", "model", "--scheduler-config", "{tmp}/s.json", mentions="--data", setup=_write("s.json", json.dumps({"_class_name": "IPNDMScheduler"}))),
    C("sample-edm-ddpm", "sample", "--model", "{tmp}/edm", "--scheduler", "ddpm", mentions="edm", setup=_edm_folder),
    C("train-cosine-scheduler", "train", "--scheduler-config", "{tmp}/s.json", mentions="VP", setup=_write("s.json", json.dumps({"_class_name": "IPNDMScheduler"}))),
    C("finetune-edm-weighting", "finetune", "--model", "{tmp}/edm", "--weighting", "logit_normal", mentions="--weighting", setup=_edm_folder),
    # ---- paths the file system cannot hold, runs that would destroy what they read, special files ----
    C("probe-out-name-too-long", "probe", "--out", "{tmp}/" + "a" * 300, mentions="shorter path"),
    C("probe-model-name-too-long", "probe", "--model", "{tmp}/" + "b" * 300, mentions="shorter path"),
    C("probe-out-holds-its-model", "probe", "--model", "{tmp}/v/m", "--out", "{tmp}/v", "--overwrite", mentions="--out", setup=_copy_pipe("v/m")),
    C("sample-out-is-its-model", "sample", "--model", "{tmp}/v/m", "--out", "{tmp}/v/m", "--overwrite", mentions="--out", setup=_copy_pipe("v/m")),
    C("probe-data-fifo", "probe", "--data", "{tmp}/f.npy", mentions="--data", setup=_fifo("f.npy")),
    C("probe-data-random-bytes-npz", "probe", "--data", "{tmp}/r.npz", mentions="corrupt", setup=_write("r.npz", bytes(range(256)) * 2)),
    C("probe-data-range-beyond-float32", "probe", "--data-range=-1e308,1e308", mentions="--data-range"),
    C("compare-different-targets", "compare", "{tmp}/a", "{tmp}/b", "--out", "{tmp}/c.png", mentions="targets", setup=_chain(_run_folder("a", GOOD_CSV, GOOD_META), _run_folder("b", GOOD_CSV.replace("sigma\n", "sigma,target\n").replace("0.01\n", "0.01,score\n").replace("0.8\n", "0.8,score\n"), GOOD_META))),
    C("compare-out-inside-a-run", "compare", "{tmp}/a", "--out", "{tmp}/a/lipschitz.png", mentions="--out", setup=_run_folder("a", GOOD_CSV, GOOD_META)),
    # ---- the second hostile review (issues 23 and 26) ----------------------------------------------------------------
    C("probe-out-is-the-current-folder", "probe", "--out", ".", mentions=("--out", "current folder")),
    C("theory-out-is-the-current-folder", "theory", "--out", ".", mentions=("--out", "current folder")),
    C("probe-message-keeps-emoji-codes", "probe", "--data", "patches:abc:", mentions="patches:abc:"),
    C("probe-message-keeps-markup", "probe", "--data", "x[bold]y[/bold]:smile:", mentions="x[bold]y[/bold]:smile:"),
    C("probe-resume-of-a-finished-run", "probe", "--resume", "--out", "{tmp}/out", mentions=("--resume", "finished run"), setup=_run_folder("out", GOOD_CSV, json.dumps({"command": "probe"}))),
    C("evaluate-features-empty", "evaluate", "--features", "py:lsmod_feat_empty:f", mentions=("--features", "empty"), setup=_py_module("lsmod_feat_empty", PYNET + "def f():\n    return lambda x: torch.zeros(len(x), 0)\n")),
    C("evaluate-features-strings", "evaluate", "--features", "py:lsmod_feat_str:f", mentions="--features", setup=_py_module("lsmod_feat_str", "def f():\n    return lambda x: ['a'] * len(x)\n")),
    C("evaluate-features-complex", "evaluate", "--features", "py:lsmod_feat_cx:f", mentions="--features", setup=_py_module("lsmod_feat_cx", PYNET + "def f():\n    return lambda x: torch.ones(len(x), 3, dtype=torch.complex64)\n")),
    C("compare-K-not-a-number", "compare", "{tmp}/r", "--out", "{tmp}/c.png", mentions=("K_mean", "lipschitz.csv"), setup=_run_folder("r", GOOD_CSV.replace(",5,1,0.7", ",abc,1,0.7"), GOOD_META)),
    C("compare-K-all-nan", "compare", "{tmp}/r", "--out", "{tmp}/c.png", mentions="K_mean", setup=_run_folder("r", GOOD_CSV.replace(",5,1,0.7", ",nan,1,0.7").replace(",1,0.1,0.07", ",nan,0.1,0.07"), GOOD_META)),
    C("compare-T-not-whole", "compare", "{tmp}/r", "--out", "{tmp}/c.png", mentions=("run.json", "model.T"), setup=_run_folder("r", GOOD_CSV, json.dumps({"model": {"T": 2.5}}))),
    C("compare-T-a-word", "compare", "{tmp}/r", "--out", "{tmp}/c.png", mentions=("run.json", "model.T"), setup=_run_folder("r", GOOD_CSV, json.dumps({"model": {"T": "many"}}))),
    C("compare-etsdm-record-malformed", "compare", "{tmp}/r", "--out", "{tmp}/c.png", mentions=("run.json", "etsdm"), setup=_run_folder("r", GOOD_CSV, json.dumps({"model": {"T": 1000, "etsdm": {"t_tilde": "x"}}}))),
    C("compare-etsdm-record-a-list", "compare", "{tmp}/r", "--out", "{tmp}/c.png", mentions=("run.json", "etsdm"), setup=_run_folder("r", GOOD_CSV, json.dumps({"model": {"T": 1000, "etsdm": [100, 5]}}))),
    C("finetune-lora-rank-beyond-any-layer", "finetune", "--model", "{tmp}/sd", "--lora", "--lora-rank", "100000", mentions="--lora-rank", setup=_sd_text_pipeline),
    C("finetune-lora-targets-unknown", "finetune", "--model", "{tmp}/sd", "--lora", "--lora-targets", "bogus", mentions=("--lora-targets", "bogus"), setup=_sd_text_pipeline),
]
# fmt: on

assert len({c.id for c in CASES}) == len(CASES), "duplicate case ids"


def _out_path(argv: list[str], tmp: Path) -> Path:
    for flag in ("--out", "-o"):
        if flag in argv:
            return Path(argv[argv.index(flag) + 1])
    return tmp / "compare.png"  # compare's default, in the cwd (tmp)


def _prepare(case: Case, tmp: Path, pipe: Path, monkeypatch) -> tuple[list[str], Path]:
    if case.as_user and hasattr(os, "geteuid") and os.geteuid() == 0:
        import lipscope.io

        access = os.access

        def user_access(path, mode, **kw):  # a user's answer: no write to a folder without its write bit
            if mode & os.W_OK and Path(path).is_dir() and not Path(path).stat().st_mode & 0o200:
                return False
            return access(path, mode, **kw)

        monkeypatch.setattr(lipscope.io.os, "access", user_access)
    work = tmp / "w"
    work.mkdir()
    monkeypatch.chdir(work)  # relative paths (./nope, runs/…) and compare.png land here
    monkeypatch.syspath_prepend(str(work))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("COLUMNS", "200")
    if case.setup is not None:
        case.setup(work, pipe)
    argv = case.argv(work, pipe)
    return argv, _out_path(argv, work)


def _restore_perms(tmp: Path) -> None:
    for p in tmp.rglob("*"):
        if p.is_dir() and not p.is_symlink():
            p.chmod(0o755)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_refused(case: Case, tmp_path, pipeline_dir, capfd, monkeypatch, no_network):
    argv, out = _prepare(case, tmp_path, pipeline_dir, monkeypatch)
    for name in [m for m in sys.modules if m.startswith("lsmod_")]:
        monkeypatch.delitem(sys.modules, name)
    before = snapshot(out)
    capfd.readouterr()
    try:
        res = run_inprocess(argv, capfd, monkeypatch)
        assert_one_line_refusal(res, case.mentions)
        assert snapshot(out) == before, f"--out {out} changed: {before!r} → {snapshot(out)!r}"
    finally:
        _restore_perms(tmp_path)


# a few cases through the real console path: the same line, the same code
SUBPROCESS = [
    "probe-unknown-flag",
    "model-missing-path",
    "data-npy-nan",
    "theory-etsdm-without-train",
    "compare-out-jpg",
]


@pytest.mark.parametrize("case", [c for c in CASES if c.id in SUBPROCESS], ids=SUBPROCESS)
def test_bad_input_refused_console(case: Case, tmp_path, pipeline_dir, monkeypatch):
    argv, out = _prepare(case, tmp_path, pipeline_dir, monkeypatch)
    before = snapshot(out)
    res = run_subprocess(argv, cwd=tmp_path / "w")
    assert_one_line_refusal(res, case.mentions)
    assert snapshot(out) == before


def test_matrix_is_big_enough():
    assert len(CASES) >= 90
    assert {c.cmd for c in CASES} >= {"probe", "theory", "train", "finetune", "sample", "evaluate", "compare", "models"}
