"""The step budget (lipscope.budget) against closed forms on Gaussian data and the samplers' own timesteps; the
training coverage (lipscope.coverage) against diffusers' compute_density_for_timestep_sampling."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

import lipscope
from lipscope.budget import build_scheduler, integrate, parse_samplers, step_boundaries
from lipscope.coverage import coverage, parse_train_timesteps, train_distribution
from lipscope.errors import InputError
from lipscope.schedules import default_grid, parse_grid
from lipscope.zoo import folder

T = 1000


# ---- closed forms: K(τ) = E‖∂ε*/∂τ‖/√D for x0 ~ N(0, s²I) (large D: ‖x_τ‖/√D = √v(τ)) ------------------------
# ε*(x, τ) = c(τ) x with c = σ/v, v = α²s² + σ² (the posterior mean of ε for Gaussian data), so K = |c'|·√v.


def vp_sigma(tau):
    """vp-linear (Song et al.): log ᾱ = −½(β₁−β₀)τ² − β₀τ; unit data (s = 1): v ≡ 1, ε* = σx, K = |σ'|."""
    return np.sqrt(-np.expm1(-0.5 * 19.9 * tau**2 - 0.1 * tau))


def vp_k(tau):
    lab = -0.5 * 19.9 * tau**2 - 0.1 * tau
    return np.exp(lab) * (19.9 * tau + 0.1) / (2 * vp_sigma(tau))


S = 0.5  # flow data scale: v = s²(1−τ)² + τ², c = τ/v


def flow_k(tau):
    v = S**2 * (1 - tau) ** 2 + tau**2
    dv = -2 * S**2 * (1 - tau) + 2 * tau
    return np.abs((v - tau * dv) / v**2) * np.sqrt(v)


def flow_f(tau):
    """∫ c'√v dτ = 2τ/√v − ∫ v^{-1/2} dτ, the last = ln(2√a√v + 2aτ + b)/√a for v = aτ² + bτ + s²."""
    a, b = S**2 + 1, -2 * S**2
    v = a * tau**2 + b * tau + S**2
    return 2 * tau / np.sqrt(v) - np.log(2 * np.sqrt(a) * np.sqrt(v) + 2 * a * tau + b) / np.sqrt(a)


def flow_exact(hi, lo):
    """∫_lo^hi |c'|√v dτ: c' changes sign at τ* = s/√(1+s²)."""
    root = S / math.sqrt(1 + S**2)
    out = []
    for h, low in zip(hi, lo, strict=True):
        cuts = [low, *([root] if low < root < h else []), h]
        out.append(sum(abs(flow_f(y) - flow_f(x)) for x, y in zip(cuts[:-1], cuts[1:], strict=True)))
    return np.array(out)


def _fd_table(t, k_point, sigma_chord=None):
    """A probe-like table: point values, except at t = 0 the forward FD over [0, 1] (what the probe measures)."""
    k = k_point(t / T)
    if sigma_chord is not None:
        k[0] = sigma_chord
    return pd.DataFrame({"t": t, "method": "fd-forward", "K_mean": k})


def test_vp_continuous_integral_matches_closed_form():
    a = np.array([998, 700, 300, 100, 30, 10, 3, 1, 998.0])
    b = np.array([700, 300, 100, 30, 10, 3, 1, 0, 0.0])
    exact = (vp_sigma(a / T) - vp_sigma(b / T)) * T  # ∫K dt in model steps (K per unit τ)
    errs = {}
    for grid in ("default", "all"):
        t = parse_grid(grid, T, T - 2)
        with np.errstate(divide="ignore"):
            df = _fd_table(t, vp_k, (vp_sigma(1 / T) - vp_sigma(0)) * T)
        r = integrate(df["t"].to_numpy(), df["K_mean"].to_numpy(), a, b)
        # the stated error covers the true error at every step
        assert np.all(np.abs(r["value"] - exact) <= r["err"] + 1e-12 * exact), (grid, r["value"] / exact - 1)
        errs[grid] = np.abs(r["value"] / exact - 1)
    # a finer grid is closer, and on every integer step the steps off t = 0 are within 1 %
    inner = b > 0
    assert np.all(errs["all"][inner] <= errs["default"][inner] + 1e-12)
    assert np.all(errs["all"][inner] < 1e-2)


def test_flow_integral_matches_closed_form():
    t = default_grid(T, T - 1.0)
    t[0] = 0.0
    chord = abs(flow_f(1 / T) - flow_f(0.0)) * T  # the FD row at t = 0: |c(1/T)−c(0)|·… to first order
    df = _fd_table(t, flow_k, chord)
    df.loc[0, "K_mean"] = flow_exact([1 / T], [0.0])[0] * T
    sched = build_scheduler("flow-euler", {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0}, 10)
    bounds = np.clip(step_boundaries(sched, T), 0, T - 1)
    r = integrate(df["t"].to_numpy(), df["K_mean"].to_numpy(), bounds[:-1], bounds[1:])
    exact = flow_exact(bounds[:-1] / T, bounds[1:] / T) * T
    assert np.all(np.abs(r["value"] - exact) <= r["err"] + 1e-9 * exact)
    assert np.all(np.abs(r["value"] / exact - 1) < 0.05)


def test_step_budget_api_shares_and_csv_columns():
    t = default_grid(T, T - 2.0)
    df = _fd_table(t, vp_k, (vp_sigma(1 / T) - vp_sigma(0)) * T)
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(num_train_timesteps=T, timestep_spacing="trailing")
    tab = lipscope.step_budget(df, sched, 10)
    assert list(tab.columns[:5]) == ["sampler", "step", "t_from", "t_to", "budget"]
    assert {"share", "K_max", "budget_err", "covered", "largest"} <= set(tab.columns)
    assert tab["share"].sum() == pytest.approx(1.0, rel=1e-12)
    assert tab["t_from"].iloc[-1] == 99 and tab["t_to"].iloc[-1] == -1  # ᾱ = 1 one step below t = 0
    # the grid reaches 998 (a forward FD at 999 needs 1000): the first and the last step lie partly outside
    assert tab["covered"].tolist() == [False] + [True] * 8 + [False]
    assert tab["budget_err"].iloc[-1] >= df["K_mean"].iloc[0] / T  # all of the piece [−1, 0] (K(0)·1 step) is error
    assert tab["largest"].sum() >= 1 and tab.loc[tab["largest"], "budget"].iloc[0] == tab["budget"].max()
    with pytest.raises(InputError, match="`steps`"):
        lipscope.step_budget(df, sched, 0)


# ---- the boundaries are the pipelines' own timesteps ------------------------------------------------------------


def test_boundaries_are_the_pipelines_timesteps():
    from diffusers import DDIMScheduler, DDPMPipeline, DPMSolverMultistepScheduler, HeunDiscreteScheduler

    pipe = DDPMPipeline.from_pretrained(folder("digits-ddpm"))
    cfg = dict(pipe.scheduler.config)
    for name, cls, extra in [
        ("ddim", DDIMScheduler, {}),
        ("dpmsolver++", DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++"}),
        ("heun", HeunDiscreteScheduler, {}),
        ("default", type(pipe.scheduler), {}),
    ]:
        mine = step_boundaries(build_scheduler(name, cfg, 10), T)
        ref = cls.from_config(pipe.scheduler.config, **extra)  # as diffusers' docs swap a pipeline's scheduler
        ref.set_timesteps(10)
        ts = ref.timesteps.double().numpy()
        if name == "heun":
            ts = np.r_[ts[0], ts[1::2]]  # Heun visits each t twice
        np.testing.assert_array_equal(mine[:-1], ts)
        assert len(mine) == 11 and mine[-1] == -1.0  # every sampler here ends at clean data
    ref = DPMSolverMultistepScheduler.from_config(cfg, final_sigmas_type="sigma_min")
    ref.set_timesteps(10)
    mine = step_boundaries(build_scheduler("dpmsolver++", {**cfg, "final_sigmas_type": "sigma_min"}, 10), T)
    assert float(ref.sigmas[-1]) > 0 and mine[-1] == pytest.approx(0.0, abs=1e-9)  # σ_min = σ at t = 0


def test_flow_boundaries_are_sigmas_times_t():
    from diffusers import FlowMatchEulerDiscreteScheduler

    ref = FlowMatchEulerDiscreteScheduler(shift=3.0)
    ref.set_timesteps(28)
    cfg = {"_class_name": "FlowMatchEulerDiscreteScheduler", **ref.config}
    mine = step_boundaries(build_scheduler("default", cfg, 28), T)
    np.testing.assert_allclose(mine, ref.sigmas.double().numpy() * T, rtol=1e-6)


@pytest.mark.parametrize(
    "spec,match",
    [("banana:10", "ddim, ddpm, dpmsolver\\+\\+"), ("ddim:0", "≥ 1"), ("ddim:-3", "≥ 1"), ("ddim", "NAME:STEPS"),
     ("ddim:x", "whole number")],
)  # fmt: skip
def test_bad_sampler_specs(spec, match):
    with pytest.raises(InputError, match=match):
        parse_samplers(spec)


# ---- coverage -------------------------------------------------------------------------------------------------


def _drawn(weighting: str, n: int, flow_cfg: dict | None, **kw) -> np.ndarray:
    """t as diffusers' training scripts draw it (train_dreambooth_sd3.py for flow; ⌊u·T⌋ for VP)."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.training_utils import compute_density_for_timestep_sampling

    g = torch.Generator().manual_seed(0)
    u = compute_density_for_timestep_sampling(weighting, n, generator=g, **kw)
    idx = (u * T).long().clamp(max=T - 1)
    if flow_cfg is None:
        return idx.double().numpy()
    return FlowMatchEulerDiscreteScheduler.from_config(flow_cfg).timesteps[idx].double().numpy()


@pytest.mark.parametrize(
    "spec,weighting,kw,flow",
    [
        ("uniform", "none", {}, False),
        ("logit-normal:0,1", "logit_normal", {"logit_mean": 0.0, "logit_std": 1.0}, False),
        ("logit-normal:0.5,0.7", "logit_normal", {"logit_mean": 0.5, "logit_std": 0.7}, True),
        ("mode:1.29", "mode", {"mode_scale": 1.29}, True),
        ("uniform", "none", {}, True),
    ],
)
def test_coverage_matches_diffusers_sampling(spec, weighting, kw, flow):
    cfg = {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0} if flow else {}
    dist = train_distribution(parse_train_timesteps(spec), T, flow, cfg)
    assert dist.sum() == pytest.approx(1.0, abs=1e-9)
    n = 200_000
    drawn = _drawn(weighting, n, {k: v for k, v in cfg.items() if k != "_class_name"} if flow else None, **kw)
    for onset in (5.0, 50.0, 200.0, 600.0):
        p = coverage(dist, onset)["mass_below_onset"]
        emp = float((drawn <= onset).mean())
        # binomial: 5 standard errors (plus the mode quadrature's 2⁻²⁰ per bin edge)
        assert abs(emp - p) <= 5 * math.sqrt(max(p * (1 - p), 1 / n) / n) + 1e-5, (onset, emp, p)


def test_coverage_uniform_exact_and_per_step():
    dist = train_distribution({"kind": "uniform"}, T, False, {})
    steps = pd.DataFrame({"t_from": [900.0, 99.0], "t_to": [99.0, -1.0]})
    cov = coverage(dist, 49.0, steps)
    assert cov["mass_below_onset"] == pytest.approx(50 / T, rel=1e-12)
    assert cov["step_mass"] == pytest.approx([801 / T, 100 / T], rel=1e-12)
    assert coverage(dist, None)["mass_below_onset"] is None


def test_coverage_from_a_file(tmp_path):
    p = tmp_path / "t.npy"
    np.save(p, np.array([0, 0, 3, 10, 500]))
    dist = train_distribution(parse_train_timesteps(str(p)), T, False, {})
    assert coverage(dist, 3.0)["mass_below_onset"] == pytest.approx(0.6)


@pytest.mark.parametrize(
    "spec,match",
    [("logit-normal:0", "numbers"), ("logit-normal:0,-1", "std > 0"), ("shift:0", "numbers"), ("gauss", "not known"),
     ("nope.npy", "no such file")],
)  # fmt: skip
def test_bad_train_timesteps(spec, match):
    with pytest.raises(InputError, match=match):
        parse_train_timesteps(spec)


# ---- the probe end to end -------------------------------------------------------------------------------------


def test_probe_writes_steps_and_coverage(tmp_path, pipeline_dir):
    import json

    from test_cli import run

    out = tmp_path / "r"
    grid = "0,1,2,5,10,50,100,300,600,900"
    r = run(["probe", "--model", str(pipeline_dir), "--data", "digits", "-n", "3", "--timesteps", grid, "--out",
             str(out), "--sampler", "ddim:10,dpmsolver++:20", "--train-timesteps", "uniform"])  # fmt: skip
    assert r.returncode == 0, r.stderr
    steps = pd.read_csv(out / "steps.csv")
    meta = json.loads((out / "run.json").read_text())
    assert list(steps.columns[:5]) == ["sampler", "step", "t_from", "t_to", "budget"]
    from diffusers import DDIMScheduler

    ref = DDIMScheduler.from_config(json.loads((pipeline_dir / "scheduler" / "scheduler_config.json").read_text()))
    ref.set_timesteps(10)
    d = steps[steps["sampler"] == "ddim:10"]
    np.testing.assert_array_equal(d["t_from"], ref.timesteps.numpy())
    # the summary line names the largest step with the numbers steps.csv holds
    big = d.loc[d["budget"].idxmax()]
    assert f"carries {100 * big['share']:.0f} % of the budget" in " ".join(r.stdout.split())
    sb = meta["summary"]["step_budget"]["ddim:10"]
    assert sb["largest_share"] == pytest.approx(d["share"].max(), rel=1e-8)  # steps.csv: 9 digits
    assert sb["steps"] == 10
    # uncovered steps are named in a warning
    assert "outside the probed grid" in r.stderr and "ddim:10 step 10" in " ".join(r.stderr.split())
    cov = meta["summary"]["coverage"]
    onset = meta["summary"]["onset"]
    if onset is not None:
        assert cov["mass_below_onset"] == pytest.approx((math.floor(onset) + 1) / 1000, rel=1e-9)
    assert d["train_mass"].sum() == pytest.approx(901 / 1000, rel=1e-8)  # the steps cover t ≤ 900: 901 of 1000 steps
    assert (out / "train_timesteps.csv").exists()


@pytest.mark.parametrize(
    "args,mentions",
    [
        (["--sampler", "banana:10"], ("--sampler", "dpmsolver++")),
        (["--sampler", "ddim:0"], ("--sampler", "≥ 1")),
        (["--train-timesteps", "gauss"], ("--train-timesteps", "logit-normal")),
    ],
)
def test_probe_bad_sampler_one_line(args, mentions, tmp_path, capfd, monkeypatch):
    from test_bad_inputs import assert_one_line_refusal, run_inprocess

    out = tmp_path / "o"
    res = run_inprocess(["probe", "-n", "2", "--timesteps", "0,1", "--out", str(out), "--no-progress", *args],
                        capfd, monkeypatch)  # fmt: skip
    assert_one_line_refusal(res, mentions)
    assert not out.exists()


def test_finetune_records_its_draws_and_probe_uses_them(tmp_path, pipeline_dir, monkeypatch):
    """timesteps.npy holds exactly the t the loop drew (recorded through draw_step here), and a probe of that run
    takes its coverage from them unless told otherwise."""
    import lipscope.training as training
    from lipscope.runs import ProbeOptions, TrainOptions, run_probe, run_training
    from lipscope.training import TrainConfig

    seen: list[np.ndarray] = []
    real = training.draw_step

    def spy(*a, **kw):
        b = real(*a, **kw)
        seen.append(b.t.numpy().copy())
        return b

    monkeypatch.setattr(training, "draw_step", spy)
    cfg = TrainConfig(steps=3, batch_size=4, grad_accum=2, warmup_steps=0, checkpoint_every=3)
    run_training(TrainOptions(model=str(pipeline_dir), data="digits", out=str(tmp_path / "ft"), training=cfg))
    drawn = np.load(tmp_path / "ft" / "timesteps.npy")
    np.testing.assert_array_equal(drawn, np.concatenate(seen))
    assert drawn.shape == (3 * 2 * 4,)
    res = run_probe(ProbeOptions(model=str(tmp_path / "ft" / "pipeline"), data="digits", samples=2,
                                 timesteps="0,1,10,100,500", out=str(tmp_path / "p"), device="cpu"))  # fmt: skip
    cov = res.summary["coverage"]
    assert cov["spec"] == str(tmp_path / "ft" / "timesteps.npy")
    if cov["onset"] is not None:
        assert cov["mass_below_onset"] == pytest.approx(float((drawn <= cov["onset"]).mean()), rel=1e-12)
