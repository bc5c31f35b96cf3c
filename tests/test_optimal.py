"""The optimal denoisers (lipscope.optimal) against a per-sample numpy loop written from the formulas (their
t-derivatives from the analytic chain rule, not AD) and against lipscope.gaussian's closed forms."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lipscope import rng
from lipscope.errors import InputError
from lipscope.gaussian import GaussianMixture
from lipscope.models import from_callable
from lipscope.optimal import empirical_eps, fit_gaussian, reference_norms, references
from lipscope.probe import probe
from lipscope.schedules import default_schedule

SCHED = default_schedule()


def _numpy_empirical(points: np.ndarray, x: np.ndarray, a, s, da, ds) -> tuple[np.ndarray, np.ndarray]:
    """ε* and ∂ε*/∂τ of one query from the formula (DESIGN.md), float64, one point at a time:
    ℓᵢ = −‖x − αxᵢ‖²/2σ², ℓᵢ' = α'⟨x − αxᵢ, xᵢ⟩/σ² + ‖x − αxᵢ‖²σ'/σ³, w = softmax ℓ, m = Σwᵢxᵢ,
    m' = Σ wᵢ(ℓᵢ' − Σⱼwⱼℓⱼ')xᵢ, ε* = (x − αm)/σ, ε*' = −(α'm + αm')/σ − σ'(x − αm)/σ²."""
    logit, dlogit = [], []
    for p in points:
        r = x - a * p
        logit.append(-(r @ r) / (2 * s * s))
        dlogit.append(da * (r @ p) / (s * s) + (r @ r) * ds / s**3)
    logit, dlogit = np.array(logit), np.array(dlogit)
    w = np.exp(logit - logit.max())
    w /= w.sum()
    m = sum(wi * p for wi, p in zip(w, points, strict=True))
    mean_dl = float(w @ dlogit)
    dm = sum(wi * (dl - mean_dl) * p for wi, dl, p in zip(w, dlogit, points, strict=True))
    eps = (x - a * m) / s
    return eps, -(da * m + a * dm) / s - ds * (x - a * m) / (s * s)


@pytest.mark.parametrize("chunk", [1, 7, None])
def test_empirical_eps_and_its_derivative_equal_the_numpy_loop(chunk):
    """Equal to float64 rounding: ‖x‖² − 2α⟨x, xᵢ⟩ + α²‖xᵢ‖² cancels to σ²‖ε‖² near a data point, losing
    ‖x‖²/(σ²‖ε‖²) ≲ 1e4 of relative precision in the logits at σ = 0.01: tolerance 1e4 · 1e3 · u₆₄ on ε* and its
    derivative (the derivative's terms are up to 1e3 × its size at t = 0)."""
    g = np.random.default_rng(0)
    points = g.normal(size=(40, 6))
    x0 = points[[3, 17]] + 0.05 * g.normal(size=(2, 6))
    noise = g.normal(size=(2, 6))
    for t in (0.0, 3.5, 120.0, 800.0):
        k = torch.full((2,), t, dtype=torch.float64)
        a, s, da, ds = SCHED.alpha(k), SCHED.sigma(k), SCHED.dalpha_dtau(k), SCHED.dsigma_dtau(k)
        x = (a[:, None] * torch.tensor(x0) + s[:, None] * torch.tensor(noise)).numpy()
        pts = torch.tensor(points)
        eps = empirical_eps(pts, torch.tensor(x), a, s, chunk)
        xs = torch.tensor(x)

        def f(tt, xs=xs, pts=pts):
            return empirical_eps(pts, xs, SCHED.alpha(tt), SCHED.sigma(tt), chunk)

        deps = torch.func.jvp(f, (k,), (torch.ones_like(k),))[1] * SCHED.T
        for r in range(2):
            e_ref, d_ref = _numpy_empirical(points, x[r], *(float(v[r]) for v in (a, s, da, ds)))
            tol = 1e7 * 2.0**-53
            assert np.linalg.norm(eps[r].numpy() - e_ref) <= tol * np.linalg.norm(e_ref)
            assert np.linalg.norm(deps[r].numpy() - d_ref) <= tol * np.linalg.norm(d_ref), t


def test_reference_rows_equal_the_loop_and_the_gaussian_closed_form():
    """ref-empirical per sample equals the numpy loop's ‖∂ε*/∂τ‖ (tolerance as above); ref-gaussian equals
    lipscope.gaussian's Theorem 3.1 closed form for the ML Gaussian of the same data (full covariance; both float64,
    through different formulas: 1e-9)."""
    g = np.random.default_rng(1)
    data = (np.tanh(g.normal(size=(30, 5)) @ g.normal(size=(5, 5)))).astype(np.float32)
    net = from_callable(lambda x, t: 0 * x, SCHED, sample_shape=(5,), name="zero", dtype="float64")
    grid = np.array([0.0, 9.0, 250.0])
    x0, noise = torch.tensor(data[[2, 5, 11, 29]], dtype=torch.float64), rng.noise(0, 4, (5,), dtype=torch.float64)
    refs, info = references(net, ["empirical", "gaussian"], data, None, x0, noise, grid)
    mix = GaussianMixture.fit(torch.tensor(data, dtype=torch.float64))
    for j, t in enumerate(grid):
        k = torch.tensor([t], dtype=torch.float64)
        a, s, da, ds = (float(f(k)) for f in (SCHED.alpha, SCHED.sigma, SCHED.dalpha_dtau, SCHED.dsigma_dtau))
        x = a * x0.numpy() + s * noise.numpy()
        emp = [np.linalg.norm(_numpy_empirical(data.astype(np.float64), x[i], a, s, da, ds)[1]) for i in range(4)]
        assert np.allclose(refs["ref-empirical"][:, j], emp, rtol=1e7 * 2.0**-53), (t, refs["ref-empirical"][:, j], emp)
        kk = torch.full((4,), t, dtype=torch.float64)
        d = mix.deps_dtau(
            torch.tensor(x), SCHED.alpha(kk), SCHED.sigma(kk), SCHED.dalpha_dtau(kk), SCHED.dsigma_dtau(kk)
        )
        assert np.allclose(refs["ref-gaussian"][:, j], d.norm(dim=1).numpy() * 1.0, rtol=1e-9)
    assert info["N"] == 30 and info["D"] == 5 and info["gaussian"] == {"rank": 5, "floor": 0.0, "full": True}


def test_probe_reference_rows_use_the_whole_data_set_and_the_probes_points():
    """On a pixel model the data set is every digit (1797), mapped to the data range as the probe's x0 are, and
    the rows sit on the probe's x_t: they equal a direct call with the probe's samples and noise."""
    from lipscope.data import load_data

    net = from_callable(lambda x, t: 0 * x, SCHED, sample_shape=(1, 8, 8), name="zero")
    df = probe(net, "digits", timesteps=[0.0, 10.0], method="jvp", samples=3, reference="empirical")
    x0 = load_data("digits", 3, 0, (1, 8, 8))
    refs, info = references(
        net, ["empirical"], "digits", (-1.0, 1.0), x0, rng.noise(0, 3, (1, 8, 8)), np.array([0.0, 10.0])
    )
    assert info["N"] == 1797 and df.attrs["reference"]["N"] == 1797
    assert np.array_equal(df.attrs["K_samples"][:, 2:], refs["ref-empirical"])
    assert list(df["method"].unique()) == ["jvp", "ref-empirical"]


def test_low_rank_plus_floor_gaussian():
    """Above ``full_max`` the fit keeps the top r directions and the mean remaining variance as the floor (PPCA):
    against numpy's eigendecomposition of the sample covariance (data of exact rank r plus isotropic noise, so the
    randomised SVD's top r are the top r eigenpairs to ~1e-10), and its ε* against gaussian.py's closed form with
    the covariance U diag(λ) Uᵀ + s²(I − UUᵀ) written out."""
    g = np.random.default_rng(2)
    n, d, r = 400, 24, 3
    basis = np.linalg.qr(g.normal(size=(d, r)))[0]
    data = (g.normal(size=(n, r)) * [3.0, 2.0, 1.5]) @ basis.T + 0.1 * g.normal(size=(n, d)) + 0.3
    pts = torch.tensor(data, dtype=torch.float32)
    fit = fit_gaussian(pts, seed=0, full_max=10, rank=r)
    x64 = pts.double().numpy()
    cov = np.cov(x64.T, bias=True)
    lam = np.linalg.eigvalsh(cov)[::-1]
    assert np.allclose(fit.vals.numpy(), lam[:r], rtol=1e-5)
    assert fit.floor == pytest.approx(lam[r:].sum() / (d - r), rel=1e-5)
    u = fit.vecs
    full = u @ torch.diag(fit.vals) @ u.T + fit.floor * (torch.eye(d, dtype=torch.float64) - u @ u.T)
    mix = GaussianMixture.gaussian(fit.mean, full)
    x = torch.tensor(data[:5] + g.normal(size=(5, d)) * 0.2)
    for t in (1.0, 60.0):
        k = torch.full((5,), t, dtype=torch.float64)
        a, s = SCHED.alpha(k), SCHED.sigma(k)
        assert torch.allclose(fit.eps(x, a, s), mix.eps_star(x, a, s), rtol=1e-9, atol=1e-12)


def test_chunked_reference_equals_one_chunk_at_scale():
    """N = 20 000 points of D = 256 through 2 441-point chunks (the default for D = 16 384 is 1 024 points of 128 MiB):
    the running log-sum-exp equals the one-chunk result to float64 rounding."""
    g = torch.Generator().manual_seed(3)
    pts = torch.randn(20000, 256, generator=g)
    x0, noise = pts[:3].double() + 0.1, torch.randn(3, 256, generator=g, dtype=torch.float64)
    grid = np.array([0.0, 30.0])
    one = reference_norms(SCHED, lambda x, a, s: empirical_eps(pts, x, a, s, 20000), x0, noise, grid)
    many = reference_norms(SCHED, lambda x, a, s: empirical_eps(pts, x, a, s, 2441), x0, noise, grid)
    assert np.allclose(many, one, rtol=1e-10)


def test_reference_refusals(monkeypatch):
    net = from_callable(lambda x, t: 0 * x, SCHED, sample_shape=(5,), name="zero", dtype="float64")
    with pytest.raises(InputError, match="`reference` 'optimal' not known"):
        probe(net, np.zeros((4, 5), np.float32), method="jvp", samples=4, reference="optimal", data_range=None)
    with pytest.raises(InputError, match="`reference` needs the data set itself"):
        probe(net, "model", method="jvp", samples=2, reference="empirical", data_range=None)
    import lipscope.optimal as opt

    monkeypatch.setattr(opt, "machine_memory", lambda: 100)  # 80 bytes of data > half of it
    with pytest.raises(InputError, match=r"`reference`: the data set \(4 × 5 float32 = .* GiB\) needs over half"):
        probe(net, torch.zeros(4, 5), timesteps=[1.0], method="jvp", samples=4, reference="gaussian", data_range=None)
    pix = from_callable(lambda x, t: 0 * x, SCHED, sample_shape=(1, 8, 8), name="zero")
    with pytest.raises(InputError, match=r"samples are \(4, 4\) but the model takes \(8, 8\)"):
        references(pix, ["empirical"], np.zeros((7, 1, 4, 4), np.float32), None, torch.zeros(2, 1, 8, 8),
                   torch.zeros(2, 1, 8, 8), np.array([1.0]))  # fmt: skip
