"""JVP of ε for networks that predict v or x0: the conversion ε(out, x, α(t), σ(t)) is differentiated
in t too (α′, σ′ terms), so the JVP equals a fine central finite difference of the same ε."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lipscope import from_callable
from lipscope.probe import jvp_norms
from lipscope.rng import noise as per_sample_noise
from lipscope.schedules import default_schedule


def _net(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A smooth network output in t and x (float64): whatever it predicts, ε depends on t through it
    and, for v / x0, through α(t), σ(t)."""
    s = (t.to(x.dtype) / 1000.0).reshape(-1, *([1] * (x.ndim - 1)))
    return torch.tanh(0.7 * x + 0.3 * torch.sin(3.0 * s) * x.roll(1, -1)) + 0.2 * s


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction", "sample"])
def test_jvp_equals_fine_central_fd(pred):
    m = from_callable(_net, default_schedule(), sample_shape=(6,), prediction_type=pred, dtype="float64")
    n = 5
    x0 = torch.randn(n, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    noise = per_sample_noise(0, n, (6,), dtype=torch.float64)
    # mid-segment steps: log ᾱ is linear on [k, k+1), so α(t), σ(t) are smooth around k + 0.5
    grid = np.array([0.5, 3.5, 40.5, 700.5])
    jvp = jvp_norms(m, x0, noise, grid, batch_size=8).numpy()

    def fd(h: float) -> np.ndarray:
        out = np.zeros((n, len(grid)))
        for j, t in enumerate(grid):
            tt = torch.full((n,), t, dtype=torch.float64)
            a, s = m.schedule.alpha(tt)[:, None], m.schedule.sigma(tt)[:, None]
            x = a * x0 + s * noise  # x_t held fixed, as the JVP does
            d = (m(x, tt + h) - m(x, tt - h)) / (2 * h)
            out[:, j] = torch.linalg.vector_norm(d, dim=1).numpy() * m.T
        return out

    f1, f2 = fd(1e-3), fd(5e-4)
    # Richardson: the central FD error is ≈ c·h², so |FD(h/2) − exact| ≈ |FD(h) − FD(h/2)|/3; allow 2×
    # that plus float64 rounding of the difference quotient (≈ 1e-16·‖ε‖/h ≪ 1e-9 relative).
    tol = 2 * np.abs(f1 - f2) + 1e-9 * np.abs(f2)
    assert np.all(np.abs(jvp - f2) <= tol), np.max(np.abs(jvp - f2) / np.abs(f2))


def test_v_and_x0_jvp_include_the_schedule_terms():
    """Detaching t in the conversion (lipscope 0.1) drops α′·(…) and σ′·(…): for an x0-network that
    ignores t, ε = (x − α x̂0)/σ still moves with t, and the JVP must see it."""
    m = from_callable(
        lambda x, t: torch.tanh(x), default_schedule(), sample_shape=(4,), prediction_type="sample", dtype="float64"
    )
    x0 = torch.randn(3, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    noise = per_sample_noise(1, 3, (4,), dtype=torch.float64)
    jvp = jvp_norms(m, x0, noise, np.array([0.5, 50.5]), batch_size=4).numpy()
    assert (jvp > 1.0).all()
