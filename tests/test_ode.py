"""jvp-ode and fd-ode (lipscope.ode) against the closed-form total derivative of ε* along the exact probability-flow
ODE of a Gaussian, in every process; their rows and columns; refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lipscope import rng
from lipscope.errors import InputError
from lipscope.gaussian import GaussianMixture, gaussian_eps_model, ode_samples
from lipscope.probe import probe
from lipscope.processes import CosineProcess
from lipscope.targets import ode_velocity
from lipscope.theory import make_process

U64 = 2.0**-53
COV = torch.tensor([[0.3, 0.1, 0.0], [0.1, 1.5, 0.2], [0.0, 0.2, 0.01]], dtype=torch.float64)
G = GaussianMixture.gaussian(torch.tensor([0.5, -0.25, 1.0]), COV)
GRID = [0.5, 3.3, 50.5, 700.25]
PROCESSES = [
    ("vp", "linear"),
    ("vp", "vp-cosine"),
    ("ve", "linear"),
    ("edm", "linear"),
    ("flow", "linear"),
    ("cosine", None),  # v-diffusion (DanceDiffusion's IPNDMScheduler), a process of lipscope.processes only
]


def _process(proc, sched):
    return CosineProcess(steps=1000) if proc == "cosine" else make_process(proc, sched)


def _tolerance(p, grid) -> float:
    """Float64 rounding of both sides: the closed form divides by c = α²λ + σ² and squares it; relative error of a
    few hundred u₆₄ times the spread of c over the eigen-directions at each t (its condition number)."""
    lam = G.eigvals[0]
    k = torch.as_tensor(grid, dtype=torch.float64)[:, None]
    c = p.alpha(k) ** 2 * lam + p.sigma(k) ** 2
    return 512 * U64 * float((c.max(1).values / c.min(1).values).max())


@pytest.mark.parametrize("proc,sched", PROCESSES)
def test_jvp_ode_equals_the_closed_form_along_the_exact_ode(proc, sched):
    p = _process(proc, sched)
    m = gaussian_eps_model(G, p)
    x0 = G.sample(6, 1)
    df = probe(m, x0, timesteps=GRID, method="jvp,jvp-ode", samples=6, data_range=None)
    ref = ode_samples(G, p, x0, rng.noise(0, 6, (3,), dtype=torch.float64), GRID)  # total, partial, space
    K = df.attrs["K_samples"]
    tol = _tolerance(p, GRID)
    assert list(df["method"].unique()) == ["jvp", "jvp-ode"]
    assert np.all(np.abs(K[:, 4:] / ref[0] - 1) <= tol), np.abs(K[:, 4:] / ref[0] - 1).max()
    assert np.all(np.abs(K[:, :4] / ref[1] - 1) <= tol)  # the jvp rows: the first JVP of jvp-ode
    row = df[df["method"] == "jvp-ode"]
    assert np.allclose(row["K_partial"], ref[1].mean(0), rtol=tol, atol=0)
    assert np.allclose(row["K_space"], ref[2].mean(0), rtol=tol, atol=0)
    tot_v, part_v = _vectors(p, x0, GRID)
    share = (part_v * tot_v).sum((0, 2)) / (tot_v * tot_v).sum((0, 2))
    assert np.allclose(row["t_share"], share, rtol=1e-8, atol=1e-12)


def _vectors(p, x0, grid):
    """(total, partial) vectors (n, G, D) in the eigenbasis from the ODE's solution (gaussian.ode_samples' formulas,
    written out here for the share)."""
    m, lam, U = G.eigvecs[0].T @ G.means[0], G.eigvals[0], G.eigvecs[0]
    noise = rng.noise(0, x0.shape[0], (3,), dtype=torch.float64)
    tot, part = [], []
    for t in grid:
        k = torch.tensor(float(t), dtype=torch.float64)
        a, s, da, ds = p.alpha(k), p.sigma(k), p.dalpha_dtau(k), p.dsigma_dtau(k)
        c, dc = a * a * lam + s * s, 2 * a * da * lam + 2 * s * ds
        z = (a * x0 + s * noise) @ U - a * m
        tot.append((ds / c - s * dc / (2 * c * c)) * z)
        part.append((ds / c - s * dc / (c * c)) * z - (s * da / c) * m)
    return torch.stack(tot, 1).numpy(), torch.stack(part, 1).numpy()


@pytest.mark.parametrize("proc,sched", PROCESSES)
def test_fd_ode_converges_to_the_closed_form(proc, sched):
    """Central fd-ode with h and h/2 (steps): second order, so |K(h/2) − truth| ≤ |K(h) − K(h/2)| (the Richardson
    bound, error(h/2) ≈ ⅓|K(h) − K(h/2)|) plus float64 rounding of a difference over Δτ = h/T."""
    p = _process(proc, sched)
    m = gaussian_eps_model(G, p)
    x0 = G.sample(4, 2)
    noise = rng.noise(0, 4, (3,), dtype=torch.float64)
    ref = ode_samples(G, p, x0, noise, GRID)[0]
    ks = [
        probe(m, x0, timesteps=GRID, method="fd-ode", dt=h, scheme="central", samples=4, data_range=None)
        for h in (2e-3, 1e-3)
    ]
    k1, k2 = (d.attrs["K_samples"] for d in ks)
    eps_norm = np.sqrt(3.0) * 10  # ‖ε*‖ ≲ 10·√D at these points: rounding of the difference is ~u₆₄‖ε‖/Δτ
    tol = np.abs(k1 - k2) + 64 * U64 * eps_norm * p.T / 1e-3
    assert np.all(np.abs(k2 - ref) <= tol), np.max(np.abs(k2 - ref) / tol)


def test_ode_velocity_is_the_derivative_of_the_noising_path():
    """dx/dτ at fixed (x0, ε) along x = αx0 + σε equals the ODE velocity when ε is the true noise of x."""
    p = make_process("vp", "vp-linear")
    x0, eps = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    k = torch.tensor([10.5, 100.25, 400.0, 7.0, 999.0], dtype=torch.float64)
    a, s, da, ds = p.alpha(k), p.sigma(k), p.dalpha_dtau(k), p.dsigma_dtau(k)
    x = a[:, None] * x0 + s[:, None] * eps
    assert torch.allclose(ode_velocity(x, eps, a, s, da, ds), da[:, None] * x0 + ds[:, None] * eps, rtol=1e-12)


def test_fd_ode_partial_is_the_fd_row_and_table_columns(pipeline_dir):
    from lipscope.loading import load_model

    m = load_model(str(pipeline_dir), dtype="float64")
    x0 = torch.randn(3, *m.sample_shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)
    df = probe(m, x0, timesteps=[0, 5, 50], method="fd,fd-ode", samples=3, data_range=None)
    fd, ode = df[df["method"] == "fd-forward"], df[df["method"] == "fd-ode"]
    assert np.allclose(ode["K_partial"].to_numpy(), fd["K_mean"].to_numpy(), rtol=1e-10)
    assert {"K_partial", "K_space", "t_share"} <= set(df.columns) and fd["K_space"].isna().all()
    assert (ode["fd_noise_rel"] >= 0).all() and df.attrs["ode_items"] == 3 * 3 * 3


def test_refusals():
    m = gaussian_eps_model(G, make_process("vp", "linear"))
    with pytest.raises(InputError, match="`method` 'jvp-od' not known"):
        probe(m, G.sample(2), method="jvp-od", samples=2, data_range=None)
    with pytest.raises(InputError, match="`space` condition measures forward differences between conditions"):
        probe(m, G.sample(2), method="fd-ode", space="condition", samples=2, data_range=None)


def test_precision_guard_covers_the_ode_rows_and_not_the_references(unet):
    """With `precision` the guard re-measures every network row (ODE rows included) at the reference precision;
    the optimal denoisers do not depend on the network's arithmetic: no estimate (NaN)."""
    from lipscope.models import from_unet

    m = from_unet(unet, {"num_train_timesteps": 1000})
    df = probe(m, "digits", timesteps=[1, 50], method="fd,jvp-ode", samples=4, precision="fp32", reference="gaussian")
    net = df[~df["method"].str.startswith("ref-")]
    assert net["K_rel_err_est"].notna().all() and (net["K_rel_err_est"] >= 0).all()  # each row against fp64
    assert df[df["method"] == "ref-gaussian"]["K_rel_err_est"].isna().all()
