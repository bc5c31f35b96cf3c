"""Gaussian closed form against a direct linear solve."""

from __future__ import annotations

import torch

from lipscope.gaussian import GaussianMixture, gaussian_eps_model


def test_eps_star_equals_direct_solve():
    g = torch.Generator().manual_seed(0)
    D = 6
    A = torch.randn(D, D, generator=g, dtype=torch.float64)
    cov = A @ A.T / D
    cov[0] = 0
    cov[:, 0] = 0  # one zero-variance direction, like the constant border pixels of digits
    mu = torch.randn(D, generator=g, dtype=torch.float64)
    gauss = GaussianMixture.gaussian(mu, cov)
    m = gaussian_eps_model(gauss)
    x = torch.randn(3, D, generator=g, dtype=torch.float64)
    t = torch.tensor([0.0, 10.5, 700.0], dtype=torch.float64)
    got = m(x, t)
    for i in range(3):
        a, s = m.schedule.alpha(t[i]), m.schedule.sigma(t[i])
        ref = s * torch.linalg.solve(a * a * cov + s * s * torch.eye(D, dtype=torch.float64), x[i] - a * mu)
        torch.testing.assert_close(got[i], ref, rtol=1e-10, atol=1e-12)


def test_etsdm_map_basics():
    from lipscope.etsdm import etsdm_map

    t = torch.tensor([0.0, 19.99, 20.0, 39.5, 99.999, 100.0, 100.5, 999.0], dtype=torch.float64)
    torch.testing.assert_close(etsdm_map(t), torch.tensor([0.0, 0, 20, 20, 80, 100, 100.5, 999], dtype=torch.float64))


# ---- Theorem 3.1 closed forms ---------------------------------------------------------------------

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from conftest import tiny_unet  # noqa: E402

from lipscope.errors import InputError  # noqa: E402
from lipscope.fwad import forward_ad_patches  # noqa: E402
from lipscope.gaussian import (  # noqa: E402
    closed_form_samples,
    dtau_exact_ms,
    fd_exact_ms,
    terms_exact_ms,
)
from lipscope.models import from_unet  # noqa: E402
from lipscope.probe import jvp_norms, probe  # noqa: E402
from lipscope.rng import noise as per_sample_noise  # noqa: E402
from lipscope.schedules import named_schedule  # noqa: E402

MIXTURES = {
    "diag": lambda: GaussianMixture.gaussian([1.0, -0.5, 0.0], [0.25, 2.0, 0.0]),
    "full": lambda: GaussianMixture.gaussian(
        torch.tensor([0.5, -1.0, 0.2, 0.3]),
        torch.tensor([[1.0, 0.3, 0, 0], [0.3, 0.5, 0.1, 0], [0, 0.1, 0.2, 0], [0, 0, 0, 0.01]]),
    ),
    "mixture": lambda: GaussianMixture.random(3, 4, seed=2),
}


def _log_density(g: GaussianMixture, x, a, s):
    """log q_τ(x) through torch.distributions (an independent reference for the score formulas)."""
    cov = g.eigvecs @ torch.diag_embed(g.eigvals) @ g.eigvecs.transpose(1, 2)
    comp = torch.distributions.MultivariateNormal(
        a * g.means, a * a * cov + s * s * torch.eye(g.D, dtype=torch.float64)
    )
    mix = torch.distributions.MixtureSameFamily(torch.distributions.Categorical(g.weights), comp)
    return mix.log_prob(x)


@pytest.mark.parametrize("kind", list(MIXTURES))
def test_score_and_its_tau_derivative_match_autograd_of_the_density(kind):
    g = MIXTURES[kind]()
    sched = named_schedule("cosine")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, g.D, generator=gen, dtype=torch.float64)
    for k in (0.0, 7.3, 420.0):
        kk = torch.tensor(k, dtype=torch.float64)

        def score_ref(kv):
            xr = x.clone().requires_grad_(True)
            lp = _log_density(g, xr, sched.alpha(kv), sched.sigma(kv)).sum()
            return torch.autograd.grad(lp, xr)[0]

        a, s = sched.alpha(kk).expand(5), sched.sigma(kk).expand(5)
        torch.testing.assert_close(g.score(x, a, s), score_ref(kk), rtol=1e-10, atol=1e-10)
        # ∂τ∇log q by a central difference of the autograd score (h = 1e-3 steps, inside one segment
        # of the interpolant except at integer k where we step right only): O(h²) or O(h) ≈ 1e-6 relative
        h = 1e-3
        if k == int(k):
            d_ref = (score_ref(kk + h) - score_ref(kk)) / (h / sched.T)
            tol = 1e-4
        else:
            d_ref = (score_ref(kk + h) - score_ref(kk - h)) / (2 * h / sched.T)
            tol = 1e-6
        da, ds = sched.dalpha_dtau(kk).expand(5), sched.dsigma_dtau(kk).expand(5)
        t1, t2 = g.theorem_terms(x, a, s, da, ds)
        torch.testing.assert_close(
            t1, (sched.alpha(kk) / sched.sigma(kk) * da[0]) * score_ref(kk), rtol=1e-10, atol=1e-10
        )
        torch.testing.assert_close(t2, -sched.sigma(kk) * d_ref, rtol=tol, atol=tol * d_ref.abs().max().item())


@pytest.mark.parametrize("kind", list(MIXTURES))
@pytest.mark.parametrize("sched_name", ["linear", "cosine", "vp-linear", "vp-cosine"])
def test_jvp_on_eps_star_matches_closed_form(kind, sched_name):
    """float64 everywhere: forward AD and the closed form agree to ≤ 1e-6 relative at every grid t."""
    g = MIXTURES[kind]()
    sched = named_schedule(sched_name)
    model = gaussian_eps_model(g, sched)
    grid = np.array([0.0, 1.0, 2.5, 10.0, 99.0, 100.5, 500.0, 998.0]) + (1.0 if sched_name.startswith("vp") else 0.0)
    x0 = g.sample(6, seed=1)
    noise = per_sample_noise(3, 6, (g.D,), dtype=torch.float64)
    got = jvp_norms(model, x0, noise, grid).numpy()
    ref = closed_form_samples(g, sched, x0, noise, grid)[0]
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=0)


def test_fd_on_eps_star_converges_with_order_two_central_one_forward():
    g = MIXTURES["full"]()
    sched = named_schedule("vp-linear")  # smooth in t, so the orders are the textbook ones
    model = gaussian_eps_model(g, sched)
    x0 = g.sample(4, seed=0)
    noise = per_sample_noise(0, 4, (g.D,), dtype=torch.float64)
    t = 30.0
    exact_vec = None
    errs = {"central": [], "forward": []}
    a, s = sched.alpha(torch.tensor(t)), sched.sigma(torch.tensor(t))
    x = a * x0 + s * noise
    exact_vec = g.deps_dtau(
        x,
        a.expand(4),
        s.expand(4),
        sched.dalpha_dtau(torch.tensor(t)).expand(4),
        sched.dsigma_dtau(torch.tensor(t)).expand(4),
    )
    for h in (2.0, 1.0, 0.5, 0.25):
        for scheme, (lo, hi) in {"central": (t - h / 2, t + h / 2), "forward": (t, t + h)}.items():
            fd = (model(x, torch.full((4,), hi)) - model(x, torch.full((4,), lo))) / (h / sched.T)
            errs[scheme].append(float((fd - exact_vec).norm() / exact_vec.norm()))
    rc = np.log2(np.array(errs["central"][:-1]) / np.array(errs["central"][1:]))
    rf = np.log2(np.array(errs["forward"][:-1]) / np.array(errs["forward"][1:]))
    assert np.all(np.abs(rc - 2) < 0.1), rc  # error ∝ Δt²
    assert np.all(np.abs(rf - 1) < 0.1), rf  # error ∝ Δt
    assert errs["central"][-1] < 1e-4


def test_exact_moments_against_monte_carlo():
    """E‖Δε*‖² and E‖∂ε*/∂τ‖² closed forms: the 99.9% CI of a 20 000-sample MC mean covers them,
    and the probe's E‖·‖ sits below the exact RMS (Jensen) within its CI."""
    g = MIXTURES["full"]()
    sched = named_schedule("linear")
    n = 20_000
    x0, noise = (
        g.sample(n, seed=5),
        torch.randn(n, g.D, generator=torch.Generator().manual_seed(6), dtype=torch.float64),
    )
    z = 3.29  # two-sided 99.9% normal quantile: the 8 checks below all hold with prob. ≥ 99.2%
    for t, dt in ((0.0, 1.0), (5.0, 2.5), (120.0, 1.0), (700.0, 10.0)):
        a, s = sched.alpha(torch.tensor(t)), sched.sigma(torch.tensor(t))
        x = a * x0 + s * noise
        kt = torch.full((n,), t, dtype=torch.float64)
        d = eps_sq = (gaussian_eps_model(g, sched)(x, kt + dt) - gaussian_eps_model(g, sched)(x, kt)).pow(2).sum(1)
        exact = fd_exact_ms(g, sched, [t], [t], [t + dt])[0]
        assert abs(d.mean().item() - exact) < z * d.std().item() / np.sqrt(n), (t, d.mean().item(), exact)
        dd = closed_form_samples(g, sched, x0, noise, [t])[0][:, 0] ** 2
        exact_d = dtau_exact_ms(g, sched, [t])[0]
        assert abs(dd.mean() - exact_d) < z * dd.std() / np.sqrt(n), (t, dd.mean(), exact_d)
        del eps_sq
    df = probe(gaussian_eps_model(g, sched), g.sample(400, seed=1), timesteps=[0.0, 50.0], samples=400)
    rms = np.sqrt(fd_exact_ms(g, sched, df["t"], df["t_a"], df["t_b"])) / (1.0 / 1000)
    assert np.all(df["K_ci_low"] <= rms)


def test_theorem_terms_exact_ms_against_samples():
    g = MIXTURES["diag"]()
    sched = named_schedule("linear")
    n = 20_000
    x0, noise = (
        g.sample(n, seed=2),
        torch.randn(n, g.D, generator=torch.Generator().manual_seed(3), dtype=torch.float64),
    )
    grid = [0.0, 40.0, 600.0]
    cf = closed_form_samples(g, sched, x0, noise, grid)
    e1, e2 = terms_exact_ms(g, sched, grid)
    for r, e in ((1, e1), (2, e2)):
        sq = cf[r] ** 2
        assert np.all(np.abs(sq.mean(0) - e) < 3.29 * sq.std(0) / np.sqrt(n))


# ---- JVP through real UNets ---------------------------------------------------------------------


def test_jvp_through_tiny_unet_with_attention_matches_central_fd():
    """Tolerance 5e-3 relative: diffusers builds the sinusoidal embedding in float32, so t carries
    an absolute rounding of ≈ 2⁻²⁴·t ≤ 6e-5 at t ≤ 1000; with h = 0.02 that is ≤ 3e-3 of the FD
    quotient, and the O(h²) truncation (embedding frequencies ≤ 1 rad/step) adds ≈ 7e-5."""
    u = tiny_unet(seed=4)
    m = from_unet(u, {"num_train_timesteps": 1000}, dtype="float64")
    x0 = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    noise = per_sample_noise(0, 3, (1, 8, 8), dtype=torch.float64)
    grid = np.array([0.0, 3.0, 50.0, 700.0])
    got = jvp_norms(m, x0, noise, grid, batch_size=5).numpy()
    h = 0.02
    ref = np.zeros_like(got)
    for j, t in enumerate(grid):
        a, s = m.schedule.alpha(torch.tensor(t)), m.schedule.sigma(torch.tensor(t))
        x = (a * x0 + s * noise).double()
        with torch.no_grad():
            d = (m(x, torch.full((3,), t + h)) - m(x, torch.full((3,), t - h))) / (2 * h / 1000)
        ref[:, j] = d.reshape(3, -1).norm(dim=1).numpy()
    np.testing.assert_allclose(got, ref, rtol=5e-3)


def test_forward_ad_patches_restore_the_model_bit_exact():
    from diffusers.models.attention_processor import Attention

    u = tiny_unet(seed=5)
    m = from_unet(u, {"num_train_timesteps": 1000})
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([1.0, 500.0])
    with torch.no_grad():
        before = m(x, t)
    procs = {id(mod): mod.processor for mod in u.modules() if isinstance(mod, Attention)}
    dicts = {id(mod): dict(vars(mod)) for mod in u.modules()}
    sd = {k: v.clone() for k, v in u.state_dict().items()}
    with forward_ad_patches(u):
        # processors are kept (their own maths), only the SDPA kernel is the math one
        assert {id(mod): mod.processor for mod in u.modules() if isinstance(mod, Attention)} == procs
        assert torch.backends.cuda.math_sdp_enabled() and not torch.backends.cuda.flash_sdp_enabled()
        torch.func.jvp(lambda s: m(x, s), (t,), (torch.ones_like(t),))
    assert torch.backends.cuda.flash_sdp_enabled()  # the SDPA backend choice is restored too
    assert {id(mod): mod.processor for mod in u.modules() if isinstance(mod, Attention)} == procs
    for mod in u.modules():
        assert vars(mod).keys() == dicts[id(mod)].keys() and "forward" not in vars(mod)
    for k, v in u.state_dict().items():
        assert torch.equal(v, sd[k])
    with torch.no_grad():
        assert torch.equal(m(x, t), before)


def test_jvp_unet_float32_runs_and_is_batch_independent(float32_tolerance):
    m = from_unet(tiny_unet(seed=6), {"num_train_timesteps": 1000})
    a = probe(m, "digits", timesteps="0,10,900", samples=4, method="jvp", batch_size=2)
    b = probe(m, "digits", timesteps="0,10,900", samples=4, method="jvp", batch_size=12)
    # float32 rounding only: per sample 4·T·‖∂ε₃₂/∂t − ∂ε₆₄/∂t‖, measured at these two batchings against a
    # float64 copy (conftest._float32_tolerance); no cancellation here, so tol is a few 1e-6 of K
    tol = float32_tolerance(m.module, a, "digits", 4, 0, batch_sizes=(2, 12))
    np.testing.assert_array_less(np.abs(a.attrs["K_samples"] - b.attrs["K_samples"]), tol)
    np.testing.assert_array_less(np.abs(a["K_mean"] - b["K_mean"]), tol.mean(0))
    assert (a["method"] == "jvp").all() and (a["dt"] == 0).all() and (a["K_mean"] > 0).all()


def test_learned_time_embedding_is_refused_for_jvp():
    u = tiny_unet(time_embedding_type="learned", num_train_timesteps=1000)
    m = from_unet(u, {"num_train_timesteps": 1000})
    with pytest.raises(InputError, match="`method` fd"):
        probe(m, "digits", timesteps="5", samples=2, method="jvp")


def test_integer_cast_is_caught():
    from lipscope import from_callable

    m = from_callable(lambda x, t: x * t.long().view(-1, 1, 1, 1).to(x.dtype), sample_shape=(1, 8, 8))
    with pytest.raises(InputError, match="`method` fd"):
        probe(m, "digits", timesteps="5", samples=2, method="jvp")
