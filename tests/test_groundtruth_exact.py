"""The exact references of the ground-truth experiment against independent computations: the single-Gaussian ODE
closed form, a per-sample numpy loop for the mixture's ε*, score and posterior mean, scipy's multivariate normal for
the log-density, scipy's DOP853 on the probability-flow ODE written in another variable, and the known order of
ε*-driven DDIM."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp
from scipy.special import logsumexp
from scipy.stats import multivariate_normal

from lipscope.errors import InputError
from lipscope.exactode import pf_ode_endpoint
from lipscope.gaussian import GaussianMixture
from lipscope.mixtures import draw, exact_model, exact_refs, log_density, parse_density
from lipscope.odesolve import solve
from lipscope.processes import EDMProcess, FlowProcess, VEProcess
from lipscope.schedules import default_schedule
from lipscope.solvers import run, start_step, steps_for

FLOW_CFG = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 1.0}
PROCESSES = [(default_schedule(), 999.0), (FlowProcess(), 1000.0), (VEProcess(), 1999.0), (EDMProcess(), 999.0)]


def _gaussian(d: int = 6, seed: int = 0):
    g = np.random.default_rng(seed)
    mu = 0.5 * g.standard_normal(d)
    q = np.linalg.qr(g.standard_normal((d, d)))[0]
    lam = np.geomspace(1e-4, 1.0, d)  # one direction 100× thinner than σ_VP(0): the near-manifold regime
    return mu, q @ np.diag(lam) @ q.T


@pytest.mark.parametrize("process,k", PROCESSES, ids=lambda v: getattr(v, "kind", str(v)))
def test_single_gaussian_ode_endpoint_matches_closed_form(process, k):
    """x0 − μ = √λ/√(α_T²λ + σ_T²)·(x_T − α_T μ) along each eigenvector (DESIGN.md), written here in numpy."""
    mu, cov = _gaussian()
    x_t = np.random.default_rng(1).standard_normal((32, 6)) * 3
    kk = torch.tensor([k], dtype=torch.float64)
    a, s = float(process.alpha(kk)), float(process.sigma(kk))
    lam, u = np.linalg.eigh(cov)
    want = mu + (((x_t - a * mu) @ u) * np.sqrt(lam) / np.sqrt(a * a * lam + s * s)) @ u.T
    g = GaussianMixture.gaussian(torch.tensor(mu), torch.tensor(cov))
    got, info = pf_ode_endpoint(g, process, torch.tensor(x_t), k)
    rel = np.linalg.norm(got.numpy() - want, axis=1) / np.linalg.norm(want, axis=1)
    assert rel.max() < 1e-8, (rel.max(), info)
    assert info["rtol"] == 1e-10


def _numpy_refs(g: GaussianMixture, x: np.ndarray, a: float, s: float):
    """ε*, score and E[x0 | x] of one sample, with explicit covariance matrices and scipy's log-densities."""
    covs = [(u * lam) @ u.T for u, lam in zip(g.eigvecs.numpy(), g.eigvals.numpy(), strict=True)]
    logs, scores, means = [], [], []
    for w, mu, c in zip(g.weights.numpy(), g.means.numpy(), covs, strict=True):
        cov_t = a * a * c + s * s * np.eye(len(mu))
        logs.append(np.log(w) + multivariate_normal(a * mu, cov_t).logpdf(x))
        inv = np.linalg.inv(cov_t)
        scores.append(-inv @ (x - a * mu))
        means.append(mu + a * c @ inv @ (x - a * mu))
    r = np.exp(np.array(logs) - logsumexp(logs))
    score = sum(ri * si for ri, si in zip(r, scores, strict=True))
    return -s * score, score, sum(ri * mi for ri, mi in zip(r, means, strict=True))


@pytest.mark.parametrize("process,k", [(default_schedule(), 0.0), (default_schedule(), 37.5), (FlowProcess(), 1000.0),
                                       (FlowProcess(), 12.0), (VEProcess(), 700.0), (EDMProcess(), 3.0)])  # fmt: skip
def test_mixture_references_match_a_per_sample_numpy_loop(process, k):
    g = parse_density("gmm:3:5:rank=2:floor=1e-3:seed=2").mixture
    x = draw(g, 0, 7, 6) * 1.3
    got = exact_refs(g, process, x, torch.tensor(k))
    kk = torch.tensor([k], dtype=torch.float64)
    a, s = float(process.alpha(kk)), float(process.sigma(kk))
    for i in range(x.shape[0]):
        eps, score, x0 = _numpy_refs(g, x[i].numpy(), a, s)
        np.testing.assert_allclose(got["x0"][i].numpy(), x0, rtol=1e-9, atol=1e-12)
        if s > 0:
            np.testing.assert_allclose(got["eps"][i].numpy(), eps, rtol=1e-9, atol=1e-12)
            np.testing.assert_allclose(got["score"][i].numpy(), score, rtol=1e-9)
            assert torch.allclose(x[i], a * got["x0"][i] + s * got["eps"][i], rtol=1e-10, atol=1e-10)


def test_log_density_matches_scipy_multivariate_normal():
    g = parse_density("gmm:4:1x2x3:rank=3:floor=1e-3:seed=5").mixture
    x = draw(g, 3, 0, 20).reshape(20, -1)
    want = logsumexp([np.log(w) + multivariate_normal(mu, (u * lam) @ u.T).logpdf(x.numpy()) for w, mu, u, lam in
                      zip(g.weights.numpy(), g.means.numpy(), g.eigvecs.numpy(), g.eigvals.numpy(), strict=True)],
                     axis=0)  # fmt: skip
    np.testing.assert_allclose(log_density(g, x).numpy(), want, rtol=1e-11)


def test_mixture_ode_endpoint_matches_scipy_dop853_in_sigma_tilde():
    """The two-phase solve against scipy's DOP853 on dy/dσ̃ = ε*(y; 1, σ̃) from σ̃_T straight to 0, its field from
    the numpy loop above (another integrator, another variable, another field implementation)."""
    g = parse_density("gmm:3:4:seed=4:spread=1.5").mixture
    p, k = default_schedule(), 999.0
    x_t = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    kk = torch.tensor([k], dtype=torch.float64)
    a, s = float(p.alpha(kk)), float(p.sigma(kk))
    got, _ = pf_ode_endpoint(g, p, x_t, k)
    for i in range(3):
        sol = solve_ivp(lambda sig, y: _numpy_refs(g, y, 1.0, sig)[0], (s / a, 0.0), x_t[i].numpy() / a,
                        method="DOP853", rtol=1e-12, atol=1e-12)  # fmt: skip
        want = sol.y[:, -1]
        assert np.linalg.norm(got[i].numpy() - want) / np.linalg.norm(want) < 1e-8


def test_batched_solver_keeps_each_rows_tolerance():
    """Rows of very different stiffness: each meets its own tolerance (a shared step would be set by the stiffest)."""
    lam = torch.tensor([0.5, 5.0, 50.0], dtype=torch.float64)
    y0 = torch.stack([torch.ones(3, dtype=torch.float64), lam], 1)
    y, st = solve(lambda t, y: torch.stack([-y[:, 1] * y[:, 0], 0 * y[:, 1]], 1), y0, 0.0, 1.0, rtol=1e-10,
                  atol=1e-30)  # fmt: skip
    np.testing.assert_allclose(y[:, 0].numpy(), np.exp(-lam.numpy()), rtol=1e-8)
    assert st.steps[0] < st.steps[2]  # the slow row took fewer steps than the stiff one


@pytest.mark.parametrize("process_cfg", [None, FLOW_CFG], ids=["vp-ddim", "flow-euler"])
def test_exact_field_ddim_error_falls_at_first_order(process_cfg):
    """DDIM (= Euler on dy/dσ̃; the flow Euler step) is first order: the ε*-driven sampler's error against the exact
    ODE endpoint halves when the NFE doubles (slope of log error against log NFE within 0.15 of −1 over 20..80)."""
    from lipscope.processes import process_from_config

    g = parse_density("gmm:3:1x2x2:seed=1").mixture
    process = default_schedule() if process_cfg is None else process_from_config(process_cfg)
    m = exact_model(g, process, process_cfg)
    x_t = torch.randn(64, 1, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    errs = []
    nfes = [20, 40, 80]
    for nfe in nfes:
        k = start_step("ddim", m, steps_for("ddim", nfe))
        ref, _ = pf_ode_endpoint(g, process, x_t, k)
        x0, calls = run(m, "ddim", nfe, x_t)
        assert calls == nfe
        errs.append(float((x0 - ref).reshape(64, -1).norm(dim=1).mean()))
    slope = np.polyfit(np.log(nfes), np.log(errs), 1)[0]
    assert abs(slope + 1) < 0.15, (slope, errs)


def test_exact_field_dpmsolver2_error_falls_at_second_order():
    """DPM-Solver++(2M) on VP (diffusers' multistep scheduler, fed ε*) is second order: its error against the exact
    ODE endpoint falls 4× per doubling of the NFE (slope of log error against log NFE within 0.25 of −2 over
    16..64; measured −1.99). Catches a sampler loop that feeds the wrong timestep or drops the multistep history."""
    g = parse_density("gmm:3:1x2x2:seed=1").mixture
    process = default_schedule()
    m = exact_model(g, process)
    x_t = torch.randn(64, 1, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    nfes, errs = [16, 32, 64], []
    for nfe in nfes:
        ref, _ = pf_ode_endpoint(g, process, x_t, start_step("dpmsolver++:2", m, nfe))
        x0, calls = run(m, "dpmsolver++:2", nfe, x_t)
        assert calls == nfe
        errs.append(float((x0 - ref).reshape(64, -1).norm(dim=1).mean()))
    slope = np.polyfit(np.log(nfes), np.log(errs), 1)[0]
    assert abs(slope + 2) < 0.25, (slope, errs)


@pytest.mark.parametrize(
    "spec,msg",
    [("gmm:0:4", "K (components)"), ("gmm:2", "gmm:K:SHAPE"), ("gmm:2:4:rank=9", "rank 9"),
     ("gmm:2:4:floor=0", "floor must be"), ("gmm:2:2x3", "CxHxW"), ("digits-gmm", "number of components"),
     ("digits-gmm:3:colour=2", "not understood"), ("nope", "not a known density"), ("x.npz", "no such file")],
)  # fmt: skip
def test_bad_density_specs_are_one_line(spec, msg):
    with pytest.raises(InputError, match=re.escape(msg)) as e:
        parse_density(spec)
    assert "\n" not in str(e.value)


def test_digits_mixture_is_fitted_seeded_and_hashed():
    a, b = parse_density("digits-gmm:3:seed=1"), parse_density("digits-gmm:3:seed=1")
    assert a.digest == b.digest and a.shape == (1, 8, 8)
    assert a.info["converged"] and a.info["digits_samples"] == 1797
    low = parse_density("digits-gmm:3:seed=1:rank=4:floor=1e-4").mixture
    assert torch.equal((low.eigvals > 1e-4).sum(1), torch.full((3,), 4))  # 4 kept, 60 at the floor
    assert float(a.mixture.eigvals.min()) >= 1e-2  # full rank: every variance at least the default floor


def test_network_error_is_the_squared_distance_to_eps_star_per_dimension():
    """A 'network' that is ε* + c (c known) has E‖εθ − ε*‖²/D = mean(c²) at every t, and ε* itself has 0."""
    from lipscope.groundtruth import eval_points, network_error
    from lipscope.models import from_callable

    g = parse_density("gmm:2:1x2x2:seed=0").mixture
    p = default_schedule()
    shift = torch.tensor([0.1, -0.2, 0.3, 0.0], dtype=torch.float64).reshape(1, 1, 2, 2)
    exact = exact_model(g, p)
    off = from_callable(lambda x, t: exact.net(x, t) + shift, p, sample_shape=(1, 2, 2), dtype="float64")
    x0, noise = eval_points(g, 0, 5)
    grid = np.array([0.0, 3.0, 500.0])
    np.testing.assert_allclose(
        network_error(off, g, grid, x0, noise, batch_size=4), float((shift**2).mean()), rtol=1e-9
    )
    assert np.abs(network_error(exact, g, grid, x0, noise)).max() < 1e-20
