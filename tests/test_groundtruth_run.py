"""``lipscope groundtruth`` end to end at a tiny size: models trained a few steps by lipscope's loop (UNet and DiT)
give finite tables; a run killed in training and again in measuring continues with ``--resume`` to the same tables,
byte for byte, as an uninterrupted run; bad specs are one line, exit 2, nothing written; the benchmark runs."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from test_bad_inputs import assert_one_line_refusal, run_inprocess, snapshot

from lipscope.runs.groundtruth import GroundTruthOptions, run_groundtruth

ROOT = Path(__file__).resolve().parents[1]
TABLES = ("network_error.csv", "sampler_error.csv", "distribution.csv", "paired.csv", "bands.csv")


def tiny(out: Path, **kw) -> GroundTruthOptions:
    base = dict(data="gmm:2:1x4x4:seed=3", size="reduced", arch=("unet",), steps=4, finetune_steps=2, seeds=2,
                samples=6, eval_samples=4, samplers=("ddim",), nfe=(3,), timesteps="0,1,19,20,500", batch_size=8,
                checkpoint_every=2, eval_batch=4, rtol=1e-8, out=str(out))  # fmt: skip
    return GroundTruthOptions(**{**base, **kw})


def _finite(df: pd.DataFrame, skip: tuple[str, ...] = ()) -> None:
    num = df.select_dtypes("number").drop(columns=[c for c in skip if c in df], errors="ignore")
    assert np.isfinite(num.to_numpy()).all(), num.columns[~np.isfinite(num.to_numpy()).all(0)].tolist()


@pytest.mark.parametrize("process", ["vp", "flow"])
def test_models_trained_a_few_steps_give_finite_tables(tmp_path, process):
    meta = run_groundtruth(tiny(tmp_path / "gt", process=process, arch=("unet", "dit"), seeds=1,
                                samplers=("ddim", "dpmsolver++:2", "heun"), nfe=(3, 4)))  # fmt: skip
    out = tmp_path / "gt"
    samp, dist = pd.read_csv(out / "sampler_error.csv"), pd.read_csv(out / "distribution.csv")
    net = pd.read_csv(out / "network_error.csv")
    _finite(samp)
    _finite(dist, skip=("nfe",))  # the exact ODE's row has no NFE
    _finite(net.drop(columns=["K_net_ci_low", "K_net_ci_high", "K_exact_ci_low", "K_exact_ci_high"]))
    assert set(samp["variant"]) == {"eps*", "base", "etsdm", "control"} and set(samp["arch"]) == {
        "exact",
        "unet",
        "dit",
    }
    assert set(samp["nfe_actual"]) == {3, 4} and samp.loc[samp["sampler"] == "heun", "nfe_actual"].max() == 3
    # the ε*-driven sampler's error is the discretisation part of every model's row at the same sampler and NFE
    ex = samp[samp["variant"] == "eps*"].set_index(["sampler", "nfe"])["total_mean"]
    for _, r in samp[samp["variant"] != "eps*"].iterrows():
        assert r["disc_mean"] == ex.loc[(r["sampler"], r["nfe"])]
    # E-TSDM's network is fed f(t): 0 below t̃/n = 20, t itself at and above
    e = net[net["variant"] == "etsdm"]
    above = e[e["t"] >= 20]
    assert (e.loc[e["t"] < 20, "condition"] == 0).all() and (above["condition"] == above["t"]).all()
    assert meta["data"]["sha256_16"] and (out / "mixture.npz").is_file() and (out / "models" / "dit-etsdm-s0").is_dir()
    assert max(meta["exact_ode"]["max_rel_diff_vs_tighter"].values()) < 1e-6
    assert json.loads((out / "models" / "dit-etsdm-s0" / "config.json").read_text())["_class_name"].startswith("ETSDM")


class _Stop(KeyboardInterrupt):
    pass


def test_killed_run_resumes_training_and_measuring_to_the_same_tables(tmp_path, monkeypatch):
    import lipscope.runs.gt_eval as ge
    import lipscope.training as tr

    ref = run_groundtruth(tiny(tmp_path / "a"))
    real_save, real_err = tr.save_checkpoint, ge.network_error

    def save_then_stop(acc, ema, out, step, *a, **k):  # killed right after unet-base-s1's first checkpoint
        real_save(acc, ema, out, step, *a, **k)
        if out.name == "unet-base-s1" and step == 2:
            raise _Stop

    monkeypatch.setattr(tr, "save_checkpoint", save_then_stop)
    with pytest.raises(_Stop):
        run_groundtruth(tiny(tmp_path / "b"))
    part = tmp_path / ".b.partial"
    assert (part / "train" / "unet-base-s1" / "checkpoints" / "step-2").is_dir()
    assert not (tmp_path / "b").exists()
    monkeypatch.setattr(tr, "save_checkpoint", real_save)

    def stop_measuring(*a, **k):  # killed after the sampler outputs of seed 0, at its network error
        raise _Stop

    monkeypatch.setattr(ge, "network_error", stop_measuring)
    with pytest.raises(_Stop):
        run_groundtruth(tiny(tmp_path / "b", resume=True))
    assert any(part.glob("s_0_exact_*.npz")) and any(part.glob("unet_etsdm_s0_ddim_*.npz"))
    monkeypatch.setattr(ge, "network_error", real_err)
    meta = run_groundtruth(tiny(tmp_path / "b", resume=True))
    for name in TABLES:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    for unit in ("unet-base-s1", "unet-control-s1"):  # training continued bit-exact from the checkpoint
        a, b = (tmp_path / p / "models" / unit / "loss.csv" for p in ("a", "b"))
        assert a.read_bytes() == b.read_bytes()
    assert meta["items_computed_this_session"] < ref["items_computed_this_session"]
    assert not part.exists()  # the journal is gone once the run folder is written


def test_resume_with_other_options_is_refused(tmp_path, monkeypatch):
    import lipscope.runs.gt_eval as ge
    from lipscope.errors import InputError

    monkeypatch.setattr(ge, "network_error", lambda *a, **k: (_ for _ in ()).throw(_Stop()))
    with pytest.raises(_Stop):
        run_groundtruth(tiny(tmp_path / "c", seeds=1))
    with pytest.raises(InputError, match="other nfe"):
        run_groundtruth(tiny(tmp_path / "c", seeds=1, nfe=(4,), resume=True))


@pytest.mark.parametrize(
    "args,mentions",
    [
        (["--data", "gmm:0:4"], "--data"),
        (["--data", "gmm:2:4"], "square images"),
        (["--data", "gmm:2:1x5x5"], "H even"),
        (["--data", "digits-gmm:3:rank=x"], "rank"),
        (["--samplers", "rk4"], "--samplers"),
        (["--nfe", "0"], "--nfe"),
        (["--nfe", "2", "--samplers", "heun"], "Heun"),
        (["--process", "ve"], "--process"),
        (["--train", "etsdm"], "base"),
        (["--train", "base,etsdm,control", "--etsdm-from", "scratch"], "control"),
        (["--size", "huge"], "--size"),
        (["--arch", "resnet"], "--arch"),
        (["--rtol", "1"], "--rtol"),
    ],
)
def test_bad_specs_are_one_line_exit_2_nothing_written(tmp_path, capfd, monkeypatch, args, mentions):
    out = tmp_path / "gt"
    argv = ["groundtruth", "--data", "gmm:2:1x4x4", "--size", "reduced", "--out", str(out), *args]
    if "--data" in args:
        argv = argv[:1] + argv[3:]
    res = run_inprocess(argv, capfd, monkeypatch)
    assert_one_line_refusal(res, mentions)
    assert snapshot(out) is None and not (tmp_path / ".gt.partial").exists()


def test_bench_groundtruth_tiny(tmp_path, monkeypatch):
    out = tmp_path / "g.json"
    monkeypatch.setattr(sys, "argv", ["bench_groundtruth.py", "--tiny", "--json", str(out)])
    runpy.run_path(str(ROOT / "benchmarks" / "bench_groundtruth.py"), run_name="__main__")
    res = json.loads(out.read_text())
    assert res["ode_solve_s"] > 0 and res["sampler_step_s"] > 0 and res["ode_over_step"] > 0


def test_interrupted_run_message_names_no_other_command(tmp_path):
    """A killed ``groundtruth`` (any journaled run) is told its finished part is kept, not 'the probe's'."""
    from lipscope.cli.common import what_is_left
    from lipscope.journal import journal_dir

    out = tmp_path / "gt"
    journal_dir(out).mkdir(parents=True)
    (journal_dir(out) / "options.json").write_text("{}")
    msg = what_is_left(out)
    assert "probe" not in msg and str(out) in msg and "--resume" in msg
