"""Paired differences model − baseline (lipscope.evaluate.paired_differences) and the evaluate run / CLI with
``--features``: eval_paired.csv, the features record and the comparability note of run.json."""

from __future__ import annotations

import hashlib
import json
import math
import re

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from test_features import tiny_dinov2
from typer.testing import CliRunner

from lipscope.errors import InputError
from lipscope.evaluate import PAIRED_COLUMNS, paired_differences


def _table() -> pd.DataFrame:
    """model vs baseline, seeds 0–2 for ddim (rows shuffled: pairing is by seed), one seed for ddpm."""
    rows = []
    base = {0: 10.0, 1: 20.0, 2: 30.0}
    model = {0: 9.0, 1: 22.0, 2: 35.0}  # differences −1, +2, +5
    for name, vals in (("baseline", base), ("model", model)):
        for seed in (2, 0, 1) if name == "model" else (0, 1, 2):
            rows.append({"model": name, "scheduler": "ddim", "steps": 5, "seed": seed, "fd_digits": vals[seed]})
    rows.append({"model": "baseline", "scheduler": "ddpm", "steps": 5, "seed": 0, "fd_digits": 4.0})
    rows.append({"model": "model", "scheduler": "ddpm", "steps": 5, "seed": 0, "fd_digits": 3.0})
    df = pd.DataFrame(rows)
    df["fid"] = np.nan  # not computed: no fid rows
    df["fid_available"] = False
    return df


def test_paired_differences_by_hand():
    out = paired_differences(_table())
    assert list(out.columns) == PAIRED_COLUMNS
    assert set(out["metric"]) == {"fd_digits"}  # fid NaN everywhere: left out
    r = out[out["scheduler"] == "ddim"].iloc[0]
    # d = (−1, 2, 5): mean 2, std sqrt(((−3)² + 0² + 3²)/2) = 3, half-width t_{0.975, 2} · 3/√3
    half = stats.t.ppf(0.975, 2) * 3 / math.sqrt(3)
    assert (r["model"], r["baseline"], r["n"]) == ("model", "baseline", 3)
    assert r["diff_mean"] == pytest.approx(2.0) and r["diff_std"] == pytest.approx(3.0)
    assert r["ci_low"] == pytest.approx(2 - half) and r["ci_high"] == pytest.approx(2 + half)
    assert r["model_mean"] == pytest.approx(22.0) and r["baseline_mean"] == pytest.approx(20.0)
    assert r["frac_better"] == pytest.approx(1 / 3) and r["confidence"] == 0.95
    one = out[out["scheduler"] == "ddpm"].iloc[0]  # one seed: a difference, no spread, no interval
    assert one["n"] == 1 and one["diff_mean"] == pytest.approx(-1.0) and one["frac_better"] == 1.0
    assert math.isnan(one["diff_std"]) and math.isnan(one["ci_low"]) and math.isnan(one["ci_high"])
    r90 = paired_differences(_table(), confidence=0.9)
    assert r90.iloc[0]["ci_high"] - 2 == pytest.approx(stats.t.ppf(0.95, 2) * 3 / math.sqrt(3))


def test_paired_differences_pairs_by_seed_only():
    df = _table()
    df = df[~((df["model"] == "baseline") & (df["seed"] == 1))]  # baseline lacks seed 1: pairs are seeds 0 and 2
    r = paired_differences(df).iloc[0]
    assert r["n"] == 2 and r["diff_mean"] == pytest.approx(2.0) and r["diff_std"] == pytest.approx(math.sqrt(18))


def test_paired_differences_refusals():
    with pytest.raises(InputError, match="`baseline` 'other'"):
        paired_differences(_table(), baseline="other")
    with pytest.raises(InputError, match="`confidence`"):
        paired_differences(_table(), confidence=1.0)


def _opts(tmp_path, **kw):
    from lipscope.runs import EvaluateOptions

    base = dict(
        model="builtin:digits-etsdm",
        baseline=("builtin:digits-ddpm",),
        scheduler=("ddim",),
        steps=(2,),
        num=8,
        seeds=2,
        device="cpu",
        out=str(tmp_path / "e"),
    )
    return EvaluateOptions(**{**base, **kw})


def test_run_evaluate_writes_paired_table_and_features_record(tmp_path):
    from lipscope.runs import run_evaluate
    from lipscope.zoo import CLASSIFIER_ASSET

    res = run_evaluate(_opts(tmp_path))
    out = tmp_path / "e"
    paired = pd.read_csv(out / "eval_paired.csv")
    assert list(paired.columns) == PAIRED_COLUMNS
    assert len(paired) == 4 and set(paired["metric"]) == {"fd_pixel", "fd_digits", "kid_digits", "swd_pixel"}
    assert (paired["model"] == "model").all() and (paired["baseline"] == "baseline").all() and (paired["n"] == 2).all()
    ev = pd.read_csv(out / "eval.csv")  # the differences are those of eval.csv, seed by seed
    m, b = (ev[ev["model"] == k].set_index("seed")["fd_digits"] for k in ("model", "baseline"))
    row = paired[paired["metric"] == "fd_digits"].iloc[0]
    assert row["diff_mean"] == pytest.approx((m - b).mean())
    meta = json.loads((out / "run.json").read_text())
    sha = hashlib.sha256(CLASSIFIER_ASSET.read_bytes()).hexdigest()
    assert meta["features"] == {**meta["features"], "spec": "digits", "name": "digits", "dim": 64, "sha256": sha}
    assert "digits classifier" in meta["features"]["kind"]
    note = meta["comparability"]
    assert "8 samples per seed" in note and "not comparable to published FID/KID" in note
    assert res.paired is not None and len(res.paired) == 4


def test_run_evaluate_without_baseline_in_dinov2_space(tmp_path):
    from lipscope.runs import run_evaluate

    folder = tiny_dinov2(tmp_path / "dinov2")
    res = run_evaluate(_opts(tmp_path, baseline=(), features=str(folder), seeds=1, num=4))
    out = tmp_path / "e"
    assert not (out / "eval_paired.csv").exists() and res.paired is None
    ev = pd.read_csv(out / "eval.csv")
    assert {"fd_dinov2", "kid_dinov2", "kid_dinov2_subset_std"} <= set(ev.columns) and "fd_digits" not in ev.columns
    feats = json.loads((out / "run.json").read_text())["features"]
    assert (feats["name"], feats["dim"], feats["spec"]) == ("dinov2", 32, str(folder))


def _cli(args):
    from lipscope.cli import app

    return CliRunner().invoke(app, args, env={"COLUMNS": "200"})


def test_cli_features_flag(tmp_path):
    folder, out = tiny_dinov2(tmp_path / "dinov2"), tmp_path / "e"
    args = [
        "evaluate",
        "-m",
        "builtin:digits-etsdm",
        "-b",
        "builtin:digits-ddpm",
        "--scheduler",
        "ddim",
        "--steps",
        "2",
    ]
    r = _cli([*args, "--num", "4", "--seeds", "2", "--device", "cpu", "--features", str(folder), "--out", str(out)])
    assert r.exit_code == 0, r.output
    # the summary's headers are two lines each ("FD" over "dinov2"), so the table reads at 80 columns
    assert re.search(r"FD +KID +FD.*\n.*dinov2 +dinov2 +pixel", r.stdout), r.stdout
    assert "paired by seed" in r.stdout and "kid_dinov2" in r.stdout
    assert "note: FD/KID here use dinov2 features" in r.stdout
    assert set(pd.read_csv(out / "eval_paired.csv")["metric"]) == {"fd_pixel", "fd_dinov2", "kid_dinov2", "swd_pixel"}
    assert json.loads((out / "run.json").read_text())["features"]["name"] == "dinov2"


def test_cli_bad_features_one_line_exit_2(tmp_path):
    out = tmp_path / "e"
    r = _cli(["evaluate", "-m", "builtin:digits-etsdm", "--features", "inception", "--num", "3", "--out", str(out)])
    assert r.exit_code == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --features 'inception'") and "py:module:factory" in lines[0]
    assert not out.exists()


def test_progress_counts_every_sampling_step(monkeypatch):
    """Issue 25 item 7: sample's progress advances once per model step and batch, `steps` in all, without changing
    a sample; evaluate's one bar has the total of every (model, scheduler, steps, seed) and names the one under way."""
    import contextlib

    import torch

    import lipscope.evaluate as ev
    from lipscope.data import load_data
    from lipscope.loading import load_model
    from lipscope.sampling import sample

    m = load_model("builtin:digits-ddpm", device="cpu")
    seen: list[float] = []
    x = sample(m, 5, scheduler="ddim", steps=3, batch_size=2, progress=seen.append)
    assert len(seen) == 3 * 3 and math.isclose(sum(seen), 3.0)  # 3 batches × 3 steps, each a third of a step
    assert torch.equal(x, sample(m, 5, scheduler="ddim", steps=3, batch_size=2))
    bars: list[tuple[int, list]] = []

    @contextlib.contextmanager
    def recording_bar(enabled, total, label):
        done: list = []
        bars.append((total, done))
        yield lambda k, info=None: done.append((k, info))

    monkeypatch.setattr(ev, "progress_bar", recording_bar)
    ref = load_data("digits", 12, 0, (1, 8, 8))
    ev.evaluate_models({"model": m}, ref, schedulers=["ddim"], steps=[1, 2], num=3, seeds=[0, 1], progress=True)
    ((total, done),) = bars
    assert total == 2 * (1 + 2) and math.isclose(sum(k for k, _ in done), total)
    assert [i for _, i in done][-1] == "model ddim 2 steps seed 1"


@pytest.mark.parametrize(("n", "side", "want"), [(16, 8, 37 * 14), (64, 8, 73 * 8), (4, 300, 603)])
def test_samples_png_is_large_enough_to_see(n, side, want):
    """Issue 25 item 11: 16 digits (8×8) were a 148 px image; a grid is enlarged by whole pixels (nearest) until
    its longer side is at least 512 px, and never shrunk (a grid of 300 px images keeps its size)."""
    import io

    import torch
    from PIL import Image

    from lipscope.sampling import image_grid, png_bytes

    grid = image_grid(torch.zeros(n, 1, side, side))
    img = Image.open(io.BytesIO(png_bytes(grid)))
    assert img.size == (want, want) and max(img.size) >= 512
