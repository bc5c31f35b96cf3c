"""schedules.py against diffusers' own alphas_cumprod and against finite differences."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from lipscope.errors import InputError
from lipscope.schedules import default_grid, default_schedule, parse_grid, schedule_from_config

CONFIGS = [
    {"beta_schedule": "linear"},
    {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
    {"beta_schedule": "squaredcos_cap_v2"},
    {"beta_schedule": "sigmoid"},
    {"trained_betas": np.linspace(1e-4, 0.02, 1000).tolist()},
    {"beta_schedule": "linear", "num_train_timesteps": 250},
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c.get("beta_schedule", "trained_betas"))
def test_alphas_cumprod_match_diffusers(cfg):
    ref = DDPMScheduler(**cfg).alphas_cumprod.double()
    s = schedule_from_config(cfg)
    T = s.T
    assert T == ref.numel()
    k = torch.arange(T, dtype=torch.float64)
    # diffusers takes the running product in float32: its error after k factors is ≤ k·2⁻²⁴ relative.
    rtol = (k + 1) * 2.0**-24 + 1e-12
    got = s.alpha(k) ** 2
    assert torch.all((got - ref).abs() <= rtol * ref)
    # σ² + α² = 1 to float64 precision, and σ uses expm1 (accurate at k = 0: σ₀² = β₀)
    assert torch.allclose(s.sigma(k) ** 2 + s.alpha(k) ** 2, torch.ones(T, dtype=torch.float64), atol=1e-14)
    beta0 = float(DDPMScheduler(**cfg).betas[0].double())
    assert s.sigma(torch.tensor(0.0)) ** 2 == pytest.approx(beta0, rel=1e-12)


def test_interpolation_is_linear_in_log_alpha_bar():
    s = default_schedule()
    lab = s.log_alpha_bar
    k = torch.tensor([0.0, 0.5, 10.25, 998.5, 999.0], dtype=torch.float64)
    expect = torch.stack(
        [lab[0], (lab[0] + lab[1]) / 2, 0.75 * lab[10] + 0.25 * lab[11], (lab[998] + lab[999]) / 2, lab[999]]
    )
    assert torch.allclose(s.log_alpha_bar_at(k), expect, rtol=0, atol=1e-15)


@pytest.mark.parametrize("cfg", CONFIGS[:4], ids=lambda c: c.get("beta_schedule"))
def test_derivatives_match_finite_differences(cfg):
    s = schedule_from_config(cfg)
    # inside a segment the interpolant is smooth: central FD with h = 1e-4 steps has error O(h²)·α''' ≪ 1e-7
    k = torch.tensor([0.3, 1.5, 7.5, 100.5, 500.5, 900.5], dtype=torch.float64)
    h = 1e-4
    fd_a = (s.alpha(k + h) - s.alpha(k - h)) / (2 * h / s.T)
    fd_s = (s.sigma(k + h) - s.sigma(k - h)) / (2 * h / s.T)
    torch.testing.assert_close(s.dalpha_dtau(k), fd_a, rtol=1e-7, atol=0)
    torch.testing.assert_close(s.dsigma_dtau(k), fd_s, rtol=1e-7, atol=0)


def test_derivative_is_right_sided_at_integers():
    s = default_schedule()
    k = torch.tensor([5.0], dtype=torch.float64)
    right = (s.alpha(k + 1e-6) - s.alpha(k)) / (1e-6 / s.T)
    torch.testing.assert_close(s.dalpha_dtau(k), right, rtol=1e-5, atol=0)


def test_old_timesteps_key_is_understood():
    s = schedule_from_config({"_class_name": "GaussianDDPMScheduler", "timesteps": 1000, "beta_schedule": "linear"})
    assert s.T == 1000


def test_default_grid():
    g = default_grid(1000)
    assert np.array_equal(g[:20], np.arange(20))
    assert g[-1] == 999 and 55 <= len(g) <= 66
    assert np.all(np.diff(g) > 0)


@pytest.mark.parametrize(
    "spec,expect",
    [
        ("all", np.arange(1000)),
        ("linear:5", np.array([0, 250, 500, 749, 999])),
        ("range:0:10:2.5", np.array([0, 2.5, 5, 7.5])),
        ("3,1,2.5,1", np.array([1, 2.5, 3])),
    ],
)
def test_parse_grid(spec, expect):
    np.testing.assert_array_equal(parse_grid(spec, 1000), expect)


def test_parse_log_grid_is_unique_and_in_range():
    g = parse_grid("log:64", 1000)
    assert g[0] == 0 and g[1] == 1 and g[-1] == 999 and len(np.unique(g)) == len(g)


@pytest.mark.parametrize("spec", ["1000", "-1,3", "linear:0", "range:0:10:0", "bogus", "log:x", ","])
def test_bad_grids(spec):
    with pytest.raises(InputError):
        parse_grid(spec, 1000)


@pytest.mark.parametrize("name", ["vp-linear", "vp-cosine", "cosine", "scaled_linear"])
def test_named_schedules_derivatives(name):
    from lipscope.schedules import named_schedule

    s = named_schedule(name)
    k = torch.tensor([0.5, 3.3, 250.5, 900.5], dtype=torch.float64)
    h = 1e-4  # smooth inside a segment (discrete) or everywhere (continuous): FD error O(h²)
    fd_a = (s.alpha(k + h) - s.alpha(k - h)) / (2 * h / s.T)
    torch.testing.assert_close(s.dalpha_dtau(k), fd_a, rtol=1e-7, atol=0)
    assert float(s.alpha(torch.tensor(0.0))) == pytest.approx(1.0, abs=1e-3)


def test_continuous_schedule_closed_form():
    from lipscope.schedules import named_schedule

    s = named_schedule("vp-linear")
    tau = 0.37
    expect = np.exp(-0.25 * tau**2 * (20 - 0.1) - 0.5 * tau * 0.1)  # Song et al. 2021, α(τ)
    assert float(s.alpha(torch.tensor(tau * 1000))) == pytest.approx(expect, rel=1e-14)
    assert float(s.sigma(torch.tensor(0.0))) == 0.0
    with pytest.raises(InputError):
        named_schedule("nope")


def test_log_grid_starts_at_zero():
    g = parse_grid("log:8", 1000)
    assert g[0] == 0 and len(g) == 8 and g[-1] == 999
    assert list(parse_grid("log:1", 1000)) == [0]
