"""Gaussian closed form against a direct linear solve."""

from __future__ import annotations

import torch

from lipscope.theory import GaussianMixture, gaussian_eps_model


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
