"""Precision guard (docs/probe.md, "Precision"): FD rows flag rounding noise; low-precision FD runs with
noise-limited rows are refused unless `allow_noise_limited`."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import HANG_S, tiny_unet

from lipscope.errors import InputError
from lipscope.models import from_unet
from lipscope.points import NOISE_LIMIT, noise_columns, unit_roundoff
from lipscope.probe import probe

NEAR_500 = "range:450:550:10"  # dt = 1: the two outputs differ by ~1e-3 of their norm


def _model(dtype: str):
    return from_unet(tiny_unet(), {"num_train_timesteps": 1000}, dtype=dtype)


@pytest.fixture(scope="module")
def float64_table():
    return probe(_model("float64"), "digits", timesteps=NEAR_500, samples=16, method="fd,jvp")


def test_unit_roundoff():
    assert unit_roundoff(torch.float32) == 2.0**-24 and unit_roundoff(torch.bfloat16) == 2.0**-8
    assert unit_roundoff(torch.float16) == 2.0**-11 and unit_roundoff(torch.float64) == 2.0**-53


def test_noise_columns_guard_zero_difference():
    K = np.array([[0.0, 0.0, 2.0], [0.0, 0.0, 2.0]])
    noise = np.array([[1e-3, 0.0, 0.1], [1e-3, 0.0, 0.3]])
    rel, limited = noise_columns(K, noise)
    assert np.isinf(rel[0]) and limited[0] and rel[1] == 0 and not limited[1]
    assert rel[2] == pytest.approx(0.1) and not limited[2]  # exactly at the limit: not flagged
    rel, limited = noise_columns(K, None)
    assert np.isnan(rel).all() and not limited.any()


def test_float64_never_flagged(float64_table):
    fd = float64_table[float64_table["method"] == "fd-forward"]
    assert not float64_table["fd_noise_limited"].any()
    assert (fd["fd_noise_rel"] < 1e-9).all()
    assert float64_table.attrs["fd_noise"]["method"] == "constant"


def test_bfloat16_fd_refused_and_flags_cover_the_error(float64_table):
    m = _model("bfloat16")
    with pytest.raises(InputError) as e:
        probe(m, "digits", timesteps=NEAR_500, samples=16)
    msg = str(e.value)
    assert msg.startswith("`dtype` bfloat16: ") and "`method` jvp" in msg and "`allow_noise_limited`" in msg
    assert "\n" not in msg

    df = probe(m, "digits", timesteps=NEAR_500, samples=16, allow_noise_limited=True)
    est = df.attrs["fd_noise"]
    assert est["method"] == "measured" and est["c"] > 0 and est["u"] == 2.0**-8
    ref = float64_table[float64_table["method"] == "fd-forward"].reset_index(drop=True)
    assert np.array_equal(df["t"], ref["t"])
    err = (df["K_mean"] / ref["K_mean"] - 1).abs()
    flagged = df["fd_noise_limited"].to_numpy()
    assert flagged.any()
    # fd_noise_rel bounds the relative error of K_mean (triangle inequality): no false negatives at the
    # guard's own limit, let alone at 20 %
    assert not ((err > 0.2) & ~flagged).any()
    assert not ((err > NOISE_LIMIT) & ~flagged).any()
    assert (err <= df["fd_noise_rel"] + 1e-12).all()
    fp = float(((err <= NOISE_LIMIT) & flagged).sum() / max(1, flagged.sum()))
    print(f"bfloat16 rows {len(df)}, flagged {flagged.sum()}, max err {err.max():.3f}, false-positive rate {fp:.2f}")


def test_low_precision_jvp_rows_not_flagged(float64_table):
    df = probe(_model("bfloat16"), "digits", timesteps=NEAR_500, samples=4, method="jvp")
    assert not df["fd_noise_limited"].any() and df["fd_noise_rel"].isna().all()
    assert (float64_table.loc[float64_table["method"] == "jvp", "fd_noise_rel"].isna()).all()


def test_float32_flags_but_never_refuses():
    """float32 runs are never refused for rounding noise; a tiny dt makes them noise-limited and flagged (at t = 3,
    where the float32 time input still resolves dt = 2e-5: below that resolution a run is refused,
    tests/test_fd_checks.py)."""
    df = probe(_model("float32"), "digits", timesteps="3", dt=2e-5, samples=4)
    assert df["fd_noise_limited"].all() and df.attrs["fd_noise"]["method"] == "measured"
    assert not df["fd_time_limited"].any() and not df["usable"].any()


def _cli(args):
    e = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "lipscope", *args], capture_output=True, text=True, env=e, timeout=HANG_S
    )


def test_cli_refuses_bfloat16_fd_in_one_line(tmp_path, pipeline_dir):
    base = ["probe", "--model", str(pipeline_dir), "--dtype", "bfloat16", "--samples", "4", "-t", "400,500"]
    r = _cli([*base, "--out", str(tmp_path / "fd")])
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and not ln.startswith("warning:")]
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr
    assert "--dtype bfloat16" in lines[0] and "--method jvp" in lines[0] and "--allow-noise-limited" in lines[0]
    assert not (tmp_path / "fd").exists()

    r = _cli([*base, "--method", "jvp", "--out", str(tmp_path / "jvp")])
    assert r.returncode == 0, r.stderr

    r = _cli([*base, "--allow-noise-limited", "--out", str(tmp_path / "kept")])
    assert r.returncode == 0, r.stderr
    assert "noise-limited" in r.stdout
    meta = json.loads((tmp_path / "kept" / "run.json").read_text())
    assert meta["fd_noise"]["method"] == "measured" and meta["fd_noise_limited_rows"] >= 1
