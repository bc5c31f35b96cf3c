"""The lipscope command end to end (real console script in a subprocess)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from conftest import CONTRACT, HANG_S
from test_models import _hf_cache


def run(args, env=None, cwd=None):
    e = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "lipscope", *args], capture_output=True, text=True, env=e, cwd=cwd, timeout=HANG_S
    )


def test_probe_default_builtin(tmp_path):
    out = tmp_path / "r"
    r = run(["probe", "--out", str(out), "--samples", "8", "--timesteps", "0,1,5,50,200,900"])
    assert r.returncode == 0, r.stderr
    df = pd.read_csv(out / "lipschitz.csv")
    assert set(CONTRACT) <= set(df.columns) and len(df) == 6
    meta = json.loads((out / "run.json").read_text())
    assert meta["seed"] == 0 and meta["model"]["config_hash"] and meta["forwards_per_s"] > 0
    assert meta["versions"]["torch"] and meta["device"] == "cpu" and meta["dtype"] == "float32"
    assert meta["model"]["name"] == "builtin:digits-ddpm"
    assert (out / "lipschitz.png").read_bytes()[:4] == b"\x89PNG"
    assert "singularity ratio" in r.stdout
    assert not list(out.glob(".*tmp"))


def test_probe_hub_id_from_cache_built_by_the_test(tmp_path, pipeline_dir, unet, float32_tolerance):
    """`--model google/ddpm-cifar10-32` resolved offline from an HF cache laid out by the test."""
    _hf_cache(tmp_path / "hub", "google/ddpm-cifar10-32", pipeline_dir, flat=True)
    out = tmp_path / "cifar"
    r = run(
        [
            "probe",
            "--model",
            "google/ddpm-cifar10-32",
            "--data",
            "digits",
            "--samples",
            "4",
            "--timesteps",
            "log:6",
            "--batch-size",
            "6",
            "--seed",
            "3",
            "--out",
            str(out),
        ],
        env={"HF_HUB_CACHE": str(tmp_path / "hub")},
    )
    assert r.returncode == 0, r.stderr
    df = pd.read_csv(out / "lipschitz.csv")
    assert (df["K_mean"] > 0).all()
    meta = json.loads((out / "run.json").read_text())
    assert meta["model"]["name"] == "google/ddpm-cifar10-32" and meta["batch_size_used"] == 6
    # same seed, different batch size → same numbers (float32 BLAS rounding only)
    r2 = run(
        [
            "probe",
            "--model",
            "google/ddpm-cifar10-32",
            "--data",
            "digits",
            "--samples",
            "4",
            "--timesteps",
            "log:6",
            "--batch-size",
            "auto",
            "--seed",
            "3",
            "--out",
            str(tmp_path / "c2"),
        ],
        env={"HF_HUB_CACHE": str(tmp_path / "hub")},
    )
    assert r2.returncode == 0, r2.stderr
    # bound: mean over samples of 4·(e_a + e_b)/Δτ + 2u·K, e the float32 − float64 error of the same weights
    # (pipeline_dir holds `unet`) at batch 1 and all-in-one (conftest._float32_tolerance)
    tol = float32_tolerance(unet, df, "digits", 4, 3).mean(0)
    np.testing.assert_array_less(np.abs(pd.read_csv(tmp_path / "c2" / "lipschitz.csv")["K_mean"] - df["K_mean"]), tol)


def _bad_inputs(tmp_path, pipeline_dir):
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "w.safetensors").write_bytes(b"junk")
    (tmp_path / "corrupt" / "c.json").write_text((pipeline_dir / "unet" / "config.json").read_text())
    cfg = json.loads((pipeline_dir / "unet" / "config.json").read_text())
    cfg["block_out_channels"] = [8, 16]
    (tmp_path / "mismatch.json").write_text(json.dumps(cfg))
    (tmp_path / "empty").mkdir()
    np.save(tmp_path / "rgb.npy", np.zeros((4, 3, 8, 8), dtype=np.uint8))
    (tmp_path / "nanmod.py").write_text(
        "import torch\nclass N(torch.nn.Module):\n    sample_shape=(1,8,8)\n"
        "    def forward(self, x, t):\n        return x*float('nan')\n"
        "def make():\n    return N()\n"
    )
    p = str(pipeline_dir)
    weights = str(pipeline_dir / "unet" / "diffusion_pytorch_model.safetensors")
    return {
        "nonexistent path": ["--model", "./nope/nothing"],
        "hub id not cached": ["--model", "someone/not-cached-model"],
        "corrupt weights": [
            "--model",
            str(tmp_path / "corrupt" / "w.safetensors"),
            "--config",
            str(tmp_path / "corrupt" / "c.json"),
        ],
        "config mismatch": ["--model", weights, "--config", str(tmp_path / "mismatch.json")],
        "wrong channels": ["--model", p, "--data", str(tmp_path / "rgb.npy")],
        "empty folder": ["--model", p, "--data", str(tmp_path / "empty")],
        "grid outside": ["--model", p, "--data", "digits", "--timesteps", "0,1000"],
        "dt <= 0": ["--model", p, "--data", "digits", "--dt", "0"],
        "nan output": ["--model", "py:nanmod:make", "--data", "digits"],
        "bad device": ["--model", p, "--device", "tpu9"],
        "bad batch": ["--model", p, "--data", "digits", "--batch-size", "lots"],
    }


@pytest.mark.parametrize(
    "case",
    [
        "nonexistent path",
        "hub id not cached",
        "corrupt weights",
        "config mismatch",
        "wrong channels",
        "empty folder",
        "grid outside",
        "dt <= 0",
        "nan output",
        "bad device",
        "bad batch",
    ],
)
def test_bad_input_exits_2_with_one_line(tmp_path, pipeline_dir, case):
    args = _bad_inputs(tmp_path, pipeline_dir)[case]
    out = tmp_path / "out"
    r = run(
        ["probe", "--samples", "2", "--out", str(out), *args],
        env={"HF_HUB_CACHE": str(tmp_path / "emptycache"), "PYTHONPATH": str(tmp_path)},
        cwd=tmp_path,
    )
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and not ln.startswith("warning:")]
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr
    assert "Traceback" not in r.stderr
    assert not out.exists()


def test_help_lists_probe():
    r = run(["--help"])
    assert r.returncode == 0 and "probe" in r.stdout


HEAVY = ("torch", "diffusers", "transformers", "pandas", "matplotlib")
WHICH_HEAVY = (
    "import runpy, sys\n"
    "sys.argv = ['lipscope', *sys.argv[1:]]\n"
    "try:\n    runpy.run_module('lipscope', run_name='__main__')\n"
    "except SystemExit as e:\n    code = e.code\n"
    f"print('HEAVY=' + ','.join(m for m in {HEAVY!r} if m in sys.modules), file=sys.stderr)\n"
)


@pytest.mark.parametrize(
    "args", [["--help"], ["probe", "--help"], ["evaluate", "--help"], ["probe", "--smaples", "8"], ["models"]]
)
def test_help_imports_no_torch(args):
    """--help, a mistyped flag and `lipscope models` answer without importing torch, diffusers, transformers,
    pandas or matplotlib (issue 25 item 6: they pay for typer and rich only). Counted by module, not by seconds,
    so it holds on a busy machine; the seconds are in docs/performance.md (benchmarks/bench_startup.py)."""
    e = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    r = subprocess.run(
        [sys.executable, "-c", WHICH_HEAVY, *args], capture_output=True, text=True, env=e, timeout=HANG_S
    )
    line = [ln for ln in r.stderr.splitlines() if ln.startswith("HEAVY=")]
    assert line, r.stderr[-2000:]
    assert line[-1] == "HEAVY=", f"{args} imported {line[-1]}"
    assert "Traceback" not in r.stderr


def test_documented_py_example_runs(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "own"
    r = run(
        [
            "probe",
            "--model",
            "py:examples.own_eps:make",
            "--data",
            "digits",
            "--samples",
            "4",
            "--timesteps",
            "0,10,100",
            "--out",
            str(out),
        ],
        cwd=root,
    )
    assert r.returncode == 0, r.stderr
    assert "no schedule" not in r.stderr  # the example carries its own schedule
    assert (pd.read_csv(out / "lipschitz.csv")["K_mean"] > 0).all()


def test_theory_command(tmp_path):
    out = tmp_path / "gauss"
    r = run(
        [
            "theory",
            "--dim",
            "2",
            "--mean",
            "1,-0.5",
            "--var",
            "0.25,2",
            "--samples",
            "64",
            "--out",
            str(out),
            "--train",
            "--steps",
            "200",
            "--etsdm",
        ]
    )
    assert r.returncode == 0, r.stderr
    df = pd.read_csv(out / "theory.csv")
    for col in (
        "t",
        "dt",
        "K_fd_exact_rms",
        "K_fd_mc",
        "K_fd_ci_low",
        "K_fd_ci_high",
        "dtau_exact_rms",
        "dtau_jvp",
        "term1_rms",
        "term2_rms",
        "K_fd_toy",
        "dtau_jvp_toy",
        "K_fd_toy_etsdm",
    ):
        assert col in df.columns
    meta = json.loads((out / "run.json").read_text())
    assert meta["max_rel_err_jvp_vs_closed_form"] < 1e-6
    assert (out / "theory.png").stat().st_size > 10_000
    r = run(
        [
            "theory",
            "--mixture",
            "3",
            "--dim",
            "4",
            "--schedule",
            "vp-cosine",
            "--samples",
            "32",
            "--out",
            str(tmp_path / "m"),
        ]
    )
    assert r.returncode == 0, r.stderr
    assert pd.read_csv(tmp_path / "m" / "theory.csv")["t"].min() >= 1  # σ(0) = 0 in continuous time


@pytest.mark.parametrize(
    "args",
    [
        ["--dim", "3", "--mean", "1,2"],
        ["--var", "1,-1"],
        ["--schedule", "nope"],
        ["--mixture", "1"],
        ["--etsdm"],
        ["--mean", "a,b"],
    ],
)
def test_theory_bad_input(tmp_path, args):
    r = run(["theory", "--out", str(tmp_path / "o"), *args])
    assert r.returncode == 2 and r.stderr.startswith("error:") and "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists()


def test_probe_method_jvp_through_a_unet_folder(tmp_path, pipeline_dir):
    out = tmp_path / "jvp"
    r = run(
        [
            "probe",
            "--model",
            str(pipeline_dir),
            "--data",
            "digits",
            "--method",
            "fd,jvp",
            "--samples",
            "3",
            "--timesteps",
            "0,10,500",
            "--out",
            str(out),
        ]
    )
    assert r.returncode == 0, r.stderr
    df = pd.read_csv(out / "lipschitz.csv")
    assert sorted(df["method"].unique()) == ["fd-forward", "jvp"] and len(df) == 6
    assert (df["K_mean"] > 0).all()


def test_finetune_sample_evaluate_compare(tmp_path, pipeline_dir):
    """The E-TSDM workflow end to end on a tiny UNet: retrofit, sample, evaluate, probe, compare."""
    ft = tmp_path / "ft"
    r = run(
        [
            "finetune",
            "--etsdm",
            "--model",
            str(pipeline_dir),
            "--data",
            "digits",
            "--steps",
            "4",
            "--batch-size",
            "4",
            "--checkpoint-every",
            "2",
            "--out",
            str(ft),
            "--no-progress",
        ]
    )
    assert r.returncode == 0, r.stderr
    assert json.loads((ft / "pipeline" / "unet" / "config.json").read_text())["etsdm_n"] == 5
    r = run(
        [
            "sample",
            "--model",
            str(ft),
            "--scheduler",
            "dpmsolver",
            "--steps",
            "5",
            "--num",
            "6",
            "--out",
            str(tmp_path / "s"),
        ]
    )
    assert r.returncode == 0, r.stderr
    assert np.load(tmp_path / "s" / "samples.npz")["x0"].shape == (6, 1, 8, 8)
    assert (tmp_path / "s" / "samples.png").read_bytes()[:4] == b"\x89PNG"
    r = run(
        [
            "evaluate",
            "--model",
            str(ft),
            "--baseline",
            str(pipeline_dir),
            "--steps",
            "2,4",
            "--num",
            "20",
            "--seeds",
            "2",
            "--out",
            str(tmp_path / "e"),
        ]
    )
    assert r.returncode == 0, r.stderr
    ev = pd.read_csv(tmp_path / "e" / "eval.csv")
    assert len(ev) == 2 * 2 * 2 * 2 and set(ev["model"]) == {"model", "baseline"}
    assert not ev["fid_available"].any() and ev["fd_digits"].gt(0).all()
    summ = pd.read_csv(tmp_path / "e" / "eval_summary.csv")
    assert {"fd_digits_mean", "fd_digits_std", "kid_digits_mean", "swd_pixel_mean"} <= set(summ.columns)
    assert dict(zip(summ["model"], summ["spec"], strict=False)) == dict(zip(ev["model"], ev["spec"], strict=False))
    assert ev["kid_digits"].notna().all() and ev["kid_digits_subset_std"].ge(0).all()
    assert json.loads((tmp_path / "e" / "run.json").read_text())["fid"].startswith("unavailable")
    for name, model in (("pb", str(pipeline_dir)), ("pe", str(ft))):
        r = run(
            [
                "probe",
                "--model",
                model,
                "--data",
                "digits",
                "--samples",
                "3",
                "--timesteps",
                "0,19,50,300",
                "--out",
                str(tmp_path / name),
            ]
        )
        assert r.returncode == 0, r.stderr
    r = run(
        [
            "probe",
            "--model",
            str(ft),
            "--data",
            "digits",
            "--samples",
            "3",
            "--space",
            "condition",
            "--timesteps",
            "0,19,50,300",
            "--out",
            str(tmp_path / "pc"),
        ]
    )
    assert r.returncode == 0, r.stderr
    assert list(pd.read_csv(tmp_path / "pc" / "lipschitz.csv")["t_a"]) == [0, 40, 300]
    r = run(
        ["compare", str(tmp_path / "pb"), str(tmp_path / "pe"), str(tmp_path / "pc"), "--out", str(tmp_path / "c.png")]
    )
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "c.png").stat().st_size > 10_000
    r = run(["sample", "--model", str(ft), "--scheduler", "euler", "--out", str(tmp_path / "bad")])
    assert r.returncode == 2 and r.stderr.startswith("error:") and not (tmp_path / "bad").exists()
