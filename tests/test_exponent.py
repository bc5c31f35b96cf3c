"""The exponent and onset (lipscope.exponent) against independent computations, and the exponent bands of
docs/theory.md on the closed forms of every process and data rank."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lipscope import rng
from lipscope.exponent import MIN_POINTS, fit_exponent, fit_range, onset, ratio_interval
from lipscope.gaussian import GaussianMixture, dtau_exact_ms, exponent_limit, rms_band
from lipscope.theory import make_distribution, make_process, theory_table

T = 1000


def test_exact_power_law_is_recovered_with_a_degenerate_interval():
    """K_i(τ) = a_i τ^p for every sample: the mean is ∝ τ^p, so p and every bootstrap slope equal p (to rounding)."""
    t = np.array([0.0, 2, 3, 5, 8, 13, 20, 21, 50, 400])
    a = np.linspace(0.5, 2.0, 7)[:, None]
    K = a * (np.maximum(t, 1.0) / T) ** -0.37  # t = 0 is outside the fit range
    e = fit_exponent(t, K, T, seed=3)
    assert e.reason is None and (e.t_lo, e.t_hi, e.points) == (2, 20, 6)
    assert abs(e.p + 0.37) < 1e-12 and abs(e.ci_low + 0.37) < 1e-12 and abs(e.ci_high + 0.37) < 1e-12
    pos = (t >= 2) & (t <= 20)
    slope, icpt = np.polyfit(np.log(t[pos] / T), np.log(K[:, pos].mean(0)), 1)  # an independent fit
    assert abs(e.intercept - icpt) < 1e-10


def test_bootstrap_interval_equals_a_loop_over_resamples():
    """The vectorised slopes over B resamples of the sample rows equal np.polyfit on each resample (same draws of
    stream BOOTSTRAP); the interval is their 2.5/97.5 % quantiles and reproducible from the seed."""
    g = np.random.default_rng(0)
    t = np.arange(1.0, 11.0)
    K = np.exp(g.normal(size=(40, 10))) * (t / T) ** -0.5
    e = fit_exponent(t, K, T, seed=7, boot=300)
    counts = rng.bootstrap_rng(7).multinomial(40, np.full(40, 1 / 40), size=300)
    slopes = [np.polyfit(np.log(t / T), np.log(np.repeat(K, c, axis=0).mean(0)), 1)[0] for c in counts]
    lo, hi = np.quantile(slopes, [0.025, 0.975])
    assert abs(e.ci_low - lo) < 1e-10 and abs(e.ci_high - hi) < 1e-10
    assert fit_exponent(t, K, T, seed=7, boot=300) == e
    assert e.ci_low < e.p < e.ci_high


def test_ratio_interval_equals_a_loop_and_the_delta_method():
    """The pooled ratio Σnum/Σden over resampled sample rows: equal to a loop over the same draws (np.repeat of the
    rows), and for n = 4000 near the delta method's normal interval R ± 1.96·SE, SE² = Var(num − R·den)/(n·mean(den)²):
    the bootstrap's percentile error at B = 2000 is ≈ 0.06 SE and its skew O(n^−½), so 0.25 SE holds with margin."""
    g = np.random.default_rng(1)
    den = np.exp(g.normal(size=(40, 3)))
    num = den * (0.3 + 0.2 * g.normal(size=(40, 3)))
    lo, hi = ratio_interval(num, den, seed=5)
    counts = rng.bootstrap_rng(5).multinomial(40, np.full(40, 1 / 40), size=2000)
    r = np.array([np.repeat(num, c, axis=0).sum(0) / np.repeat(den, c, axis=0).sum(0) for c in counts])
    assert np.allclose(lo, np.quantile(r, 0.025, axis=0), rtol=1e-12) and np.allclose(hi, np.quantile(r, 0.975, axis=0))
    n = 4000
    den = np.exp(g.normal(size=n))
    num = den * (0.3 + 0.2 * g.normal(size=n))
    R = num.sum() / den.sum()
    se = np.sqrt(np.var(num - R * den, ddof=1) / n) / den.mean()
    lo, hi = ratio_interval(num, den, seed=2)
    assert abs(lo - (R - 1.96 * se)) < 0.25 * se and abs(hi - (R + 1.96 * se)) < 0.25 * se
    nan_lo, _ = ratio_interval(np.zeros((5, 2)), np.zeros((5, 2)))
    assert np.all(np.isnan(nan_lo))  # Σ den = 0 in every resample: no interval


def test_na_with_the_reason():
    few = fit_exponent(np.array([0.0, 1, 2, 50, 100]), np.ones((4, 5)), T)
    assert math.isnan(few.p) and f"needs ≥ {MIN_POINTS}" in few.reason
    zero = fit_exponent(np.arange(0.0, 12), np.zeros((4, 12)), T)
    assert math.isnan(zero.p) and "K is 0 at 10 of 10 points" in zero.reason
    assert fit_range(np.array([0.0, 0.5, 1, 5, 6])).tolist() == [False, True, True, True, False]
    one = fit_exponent(np.arange(1.0, 6), np.ones((1, 5)), T)
    assert one.p == 0 and math.isnan(one.ci_low) and "one sample" in one.ci_reason


def test_onset():
    t = np.array([0.0, 1, 2, 3, 4, 100, 200, 300])
    k = np.array([50.0, 40, 31, 29, 40, 10, 11, 9])  # median above t̃ = 100 is 10: threshold 30
    assert onset(t, k, 100.0) == (2.0, 30.0, None)
    t0, thr, why = onset(t, np.array([20.0, 40, 31, 29, 40, 10, 11, 9]), 100.0)
    assert t0 is None and thr == 30.0 and "no singular range" in why
    assert onset(t[:5], k[:5], 100.0)[2].startswith("no grid point at t ≥ 100")


# ---- bands on the closed forms ----------------------------------------------------------------------------------

# (process, schedule, rank, floor, τ range of the fit, the t → 0 limit, its tolerance): the grid lies deep inside one
# regime; the tolerance is 10× the leading correction of docs/theory.md's expansion on that range
CASES = [
    # VP continuous: σ² = 0.1τ + 9.95τ²; corrections 199τ and σ²/λ (λ = 1)
    ("vp", "vp-linear", None, None, (1e-8, 1e-7), -0.5, 10 * 199 * 1e-7),
    ("vp", "vp-linear", 4, 1e-8, (1e-6, 1e-5), -1.0, 10 * 199 * 1e-5),
    # discrete VP: σ(0) = 1e-2 > 0; local exponent ≈ −½ k/(k + 1) at step k = τT
    ("vp", "linear", None, None, (1e-8, 1e-7), 0.0, 10 * 0.5 * 1e-4),
    ("vp", "linear", 4, 1e-8, (1e-8, 1e-7), 0.0, 10 * 1e-4),
    # flow: σ = τ; corrections 2σ (full rank), s²/σ² and σ²/λ (low rank)
    ("flow", "linear", None, None, (1e-6, 1e-5), 0.0, 10 * 2e-5),
    ("flow", "linear", 4, 1e-9, (1e-6, 1e-5), -1.0, 10 * 1e-6),
    # VE: σ = σ_min r^τ, σ(0) = 0.01 > 0; local exponent τ ln r (full), exactly 0 in the floor regime
    ("ve", "linear", None, None, (1e-6, 1e-5), 0.0, 10 * 1e-5 * math.log(134800)),
    # floor regime: ln r per floor direction, exactly flat; the r directions above the noise add r σ² ln²r/(D − r)
    ("ve", "linear", 4, 1e-8, (1e-6, 1e-5), 0.0, 10 * 4 * 1e-4 / 28 * 2 * 1e-5 * math.log(134800)),
    # EDM (Karras ρ = 7): local exponent (ρ − 1)·r(b − a)/a ≈ 22 τ near 0
    ("edm", "linear", None, None, (1e-6, 1e-5), 0.0, 10 * 22 * 1e-5),
    ("edm", "linear", 4, 1e-8, (1e-6, 1e-5), 0.0, 10 * 4 * 1e-5),
]


def _dist(rank, floor, dim=32):
    if rank is None:
        return make_distribution(dim=dim, var=[1.0] * dim)[0]
    return make_distribution(dim=dim, rank=rank, floor=floor, var=[1.0] * rank)[0]


@pytest.mark.parametrize("proc,sched,rank,floor,taus,limit,tol", CASES)
def test_band_tends_to_the_derived_limit_and_holds_the_fitted_slope(proc, sched, rank, floor, taus, limit, tol):
    p = make_process(proc, sched)
    g = _dist(rank, floor)
    t = np.geomspace(taus[0], taus[1], 8) * p.T
    fit, lo, hi = rms_band(g, p, t)
    # an independent least-squares fit of the exact RMS curve lies in the band
    slope = np.polyfit(np.log(t / p.T), 0.5 * np.log(dtau_exact_ms(g, p, t)), 1)[0]
    assert abs(slope - fit) < 1e-9 and lo - 1e-12 <= slope <= hi + 1e-12
    assert limit - tol <= lo and hi <= limit + tol, (lo, hi, limit, tol)
    p0, why = exponent_limit(p, g, t.min(), t.max())
    assert p0 == pytest.approx(limit, abs=1e-6), why


@pytest.mark.parametrize("proc,sched,rank,floor,taus,limit,tol", CASES[::3] + CASES[1::4])
def test_measured_exponent_of_the_probe_matches_the_band(proc, sched, rank, floor, taus, limit, tol):
    """The JVP probe on ε* (Monte Carlo over 256 samples, isotropic data in the dominant directions, so the mean
    norm's exponent is the RMS's): its exponent lies in the band widened by twice its bootstrap half-width."""
    p = make_process(proc, sched)
    g = _dist(rank, floor)
    t = np.geomspace(taus[0], taus[1], 8) * p.T
    df = theory_table(g, p, t, dt=taus[0] * p.T / 10, samples=256)
    e, cf = df.attrs["exponent"]["jvp"], df.attrs["exponent"]["closed_form"]
    half = (e["ci_high"] - e["ci_low"]) / 2
    lo, hi = cf["band"]
    assert lo - 2 * half - 1e-9 <= e["p"] <= hi + 2 * half + 1e-9, (e, cf)


def test_low_rank_distribution_and_mixture():
    g = GaussianMixture.low_rank(6, [1.0, 0.5], 1e-3, mean=[1, 0, 0, 0, 0, 0])
    assert torch.allclose(g.eigvals[0], torch.tensor([1.0, 0.5, 1e-6, 1e-6, 1e-6, 1e-6], dtype=torch.float64))
    m = GaussianMixture.low_rank(6, [1.0, 0.5], 1e-3, k=3, seed=1)
    assert m.K == 3 and torch.allclose(m.weights.sum(), torch.tensor(1.0, dtype=torch.float64))
    x = m.sample(4000, seed=0)
    # each component's covariance has rank 2 + floor: the sample covariance has 2·3 = 6 directions at most, with
    # its smallest eigenvalues ≥ the floor's
    assert torch.linalg.eigvalsh(torch.cov(x.T)).min() > 0


def test_theory_command_every_process_with_rank_and_floor(tmp_path):
    import json
    import subprocess
    import sys

    import pandas as pd

    out = tmp_path / "flow"
    args = ["theory", "--process", "flow", "--rank", "4", "--dim", "16", "--floor", "1e-3", "--samples", "32"]
    r = subprocess.run([sys.executable, "-m", "lipscope", *args, "--out", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    meta = json.loads((out / "run.json").read_text())
    assert meta["process"]["process"] == "flow" and set(meta["exponent"]) == {"fd-forward", "jvp", "closed_form"}
    ex = meta["exponent"]["jvp"]
    assert ex["reason"] is None and ex["ci_low"] <= ex["p"] <= ex["ci_high"] and (ex["t_lo"], ex["t_hi"]) == (1, 10)
    lo, hi = meta["exponent"]["closed_form"]["band"]
    assert lo <= meta["exponent"]["closed_form"]["closed_form_rms"] <= hi
    df = pd.read_csv(out / "theory.csv")
    assert df["t"].min() == 1 and df["dtau_jvp_fit"].notna().sum() == 10  # σ(0) = 0: the grid starts at 1
    assert "exponent (jvp)" in r.stdout and "closed-form band" in r.stdout


@pytest.mark.parametrize(
    "args",
    [
        ["--rank", "4"],
        ["--floor", "1e-3"],
        ["--rank", "9", "--floor", "1e-3", "--dim", "4"],
        ["--rank", "2", "--floor", "1e-3", "--var", "1,2,3"],
        ["--process", "flow", "--sigma-min", "0.1"],
        ["--process", "ve", "--sigma-min", "10", "--sigma-max", "1"],
        ["--process", "edm", "--train"],
        ["--process", "nope"],
    ],
)
def test_theory_bad_process_or_rank_is_one_line(tmp_path, args):
    import subprocess
    import sys

    r = subprocess.run(
        [sys.executable, "-m", "lipscope", "theory", "--out", str(tmp_path / "o"), *args],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and r.stderr.startswith("error:") and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "o").exists()
