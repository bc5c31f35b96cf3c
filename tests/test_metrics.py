"""Quality metrics against independent references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import linalg
from scipy.stats import wasserstein_distance

from lipscope.metrics import frechet_distance, sliced_wasserstein, wasserstein_1d
from lipscope.zoo import digits_features, load_digits_classifier, to_digits_space


def test_frechet_matches_scipy_sqrtm_formula():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((400, 5)) @ rng.standard_normal((5, 5))
    y = rng.standard_normal((300, 5)) * 0.7 + 0.3
    mu1, mu2 = x.mean(0), y.mean(0)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    ref = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real)
    assert frechet_distance(x, y) == pytest.approx(ref, rel=1e-8)
    assert abs(frechet_distance(x, x)) < 1e-9


def test_frechet_of_known_gaussians():
    # N(0, I) vs N(m, 4I) in D dims: |m|² + D(1 + 4 − 2·2) = |m|² + D
    rng = np.random.default_rng(1)
    x = rng.standard_normal((200_000, 3))
    y = 2 * rng.standard_normal((200_000, 3)) + np.array([1.0, 0, 0])
    assert frechet_distance(x, y) == pytest.approx(1.0 + 3.0, rel=0.02)  # sampling error ~1/√n


def test_wasserstein_1d_matches_scipy():
    rng = np.random.default_rng(2)
    a, b = rng.standard_normal((50, 4)), rng.standard_normal((70, 4)) + 0.5
    ref = [wasserstein_distance(a[:, j], b[:, j]) for j in range(4)]
    np.testing.assert_allclose(wasserstein_1d(a, b), ref, rtol=1e-12)


def test_sliced_wasserstein_brute_force():
    rng = np.random.default_rng(3)
    x, y = rng.standard_normal((60, 6)), rng.standard_normal((40, 6)) * 1.5
    d = np.random.default_rng(7).standard_normal((6, 16))
    d /= np.linalg.norm(d, axis=0)
    ref = np.mean([wasserstein_distance(x @ d[:, k], y @ d[:, k]) for k in range(16)])
    assert sliced_wasserstein(x, y, n_proj=16, seed=7) == pytest.approx(ref, rel=1e-12)


def test_shipped_digits_classifier_is_accurate_and_features_separate_data_from_noise():
    from sklearn.datasets import load_digits

    from lipscope.data import digits_array

    net = load_digits_classifier()
    x = torch.from_numpy(digits_array())
    with torch.no_grad():
        acc = (net(to_digits_space(x)).argmax(1).numpy() == load_digits().target).mean()
    assert acc > 0.9
    real = digits_features(x[:600], net)
    real2 = digits_features(x[600:1200], net)
    noise = digits_features(torch.rand(600, 1, 8, 8) * 2 - 1, net)
    assert frechet_distance(real, real2) < 0.1 * frechet_distance(real, noise)


def test_to_digits_space_resizes_and_greys():
    x = torch.zeros(2, 3, 32, 32)
    assert to_digits_space(x).shape == (2, 64)


def _mmd2_loops(x, y) -> float:
    """The unbiased MMD² of Bińkowski et al. (2018), eq. for KID, written as plain loops (independent reference)."""
    d, m, n = len(x[0]), len(x), len(y)

    def k(a, b):
        return (sum(ai * bi for ai, bi in zip(a, b, strict=True)) / d + 1.0) ** 3

    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return xx + yy - 2 * xy


def test_kid_matches_a_loop_reference_on_random_features():
    from lipscope.metrics import kid, mmd2_unbiased

    g = np.random.default_rng(3)
    x, y = g.normal(size=(9, 5)), g.normal(0.7, 1.3, size=(7, 5))
    ref = _mmd2_loops(x.tolist(), y.tolist())
    assert mmd2_unbiased(x, y) == pytest.approx(ref, rel=1e-12, abs=1e-12)
    # one subset holding every sample is the full estimate (MMD² does not depend on the order)
    mean, std = kid(x[:7], y, subsets=1, subset_size=7)
    assert mean == pytest.approx(_mmd2_loops(x[:7].tolist(), y.tolist()), rel=1e-12) and std == 0.0
    # subsets: the mean and population std of the per-subset loop references, same draws
    mean, std = kid(x, y, subsets=5, subset_size=4, seed=11)
    r = np.random.default_rng(11)
    vals = [_mmd2_loops(x[r.choice(9, 4, replace=False)].tolist(), y[r.choice(7, 4, replace=False)].tolist())
            for _ in range(5)]  # fmt: skip
    assert mean == pytest.approx(np.mean(vals), rel=1e-12) and std == pytest.approx(np.std(vals), rel=1e-9)


def test_kid_is_unbiased_where_frechet_is_not():
    """Two samples of one distribution: KID averages to 0 (unbiased) at small N; FD is positive for every draw."""
    from lipscope.metrics import frechet_distance, kid

    g = np.random.default_rng(0)
    kids, fds = [], []
    for _ in range(40):
        a, b = g.normal(size=(20, 4)), g.normal(size=(20, 4))
        kids.append(kid(a, b, subsets=1, subset_size=20)[0])
        fds.append(frechet_distance(a, b))
    se = np.std(kids) / np.sqrt(len(kids))
    assert abs(np.mean(kids)) < 4 * se and min(fds) > 0
    shifted = kid(g.normal(size=(20, 4)), g.normal(1.0, 1.0, size=(20, 4)), subsets=20, subset_size=15)[0]
    assert shifted > 10 * se
