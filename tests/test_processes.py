"""Noise processes (VE, EDM, flow matching) against independent references written from diffusers' own
scheduler and pipeline calls (tests/reference_processes.py, which does not import lipscope), and the
Gaussian closed forms of Theorem 3.1 extended to those processes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from process_fixtures import save_edm_folder, save_flow_folder, save_ve_pipeline
from reference_processes import edm_fd_reference, flow_fd_reference, ve_fd_reference

from lipscope.errors import InputError
from lipscope.gaussian import GaussianMixture, closed_form_samples, gaussian_eps_model
from lipscope.loading import load_model
from lipscope.probe import probe
from lipscope.processes import EDMProcess, FlowProcess, VEProcess, process_from_config
from lipscope.schedules import Schedule, named_schedule

U32 = 2.0**-24


def _load_diffusers(folder):
    from diffusers import UNet2DModel
    from diffusers.schedulers import SchedulerMixin

    unet = UNet2DModel.from_pretrained(folder / "unet")
    cfg = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    import diffusers

    sched: SchedulerMixin = getattr(diffusers, cfg["_class_name"]).from_config(cfg)
    return unet, sched


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    d = tmp_path_factory.mktemp("processes")
    return {
        "ve": save_ve_pipeline(d / "ve"),
        "flow": save_flow_folder(d / "flow", shift=3.0),
        "edm": save_edm_folder(d / "edm"),
    }


def test_dispatch_by_class_name_and_refusals():
    assert isinstance(process_from_config({"_class_name": "ScoreSdeVeScheduler", "sigma_max": 50.0}), VEProcess)
    assert isinstance(process_from_config({"_class_name": "EDMEulerScheduler"}), EDMProcess)
    f = process_from_config({"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0})
    assert isinstance(f, FlowProcess) and f.shift == 3.0 and f.T == 1000
    assert (
        process_from_config({"_class_name": "FlowMatchEulerDiscreteScheduler", "use_dynamic_shifting": True}).shift
        is None
    )
    assert isinstance(process_from_config({"_class_name": "EulerDiscreteScheduler"}), Schedule)
    assert isinstance(process_from_config({"num_train_timesteps": 10}), Schedule)  # no class: DDPM-family, as before
    for cfg, words in (
        ({"_class_name": "BananaScheduler"}, "BananaScheduler is not a noise process"),
        ({"_class_name": "ScoreSdeVpScheduler"}, "ScoreSdeVpScheduler"),
        ({"_class_name": "EDMEulerScheduler", "sigma_schedule": "cosine"}, "sigma_schedule"),
        ({"_class_name": "ScoreSdeVeScheduler", "sigma_min": -1}, "sigma_min"),
        ({"_class_name": "FlowMatchEulerDiscreteScheduler", "invert_sigmas": True}, "invert_sigmas"),
    ):
        with pytest.raises(InputError, match=words):
            process_from_config(cfg)


PROCESSES = {
    "vp-discrete": named_schedule("linear"),
    "vp-cosine": named_schedule("vp-cosine"),
    "ve": VEProcess(sigma_min=0.01, sigma_max=50.0),
    "edm-karras": EDMProcess(),
    "edm-exponential": EDMProcess(ramp="exponential"),
    "flow": FlowProcess(),
}


@pytest.mark.parametrize("name", list(PROCESSES))
def test_derivatives_match_central_differences(name):
    """dα/dτ, dσ/dτ, dλ/dτ and d(native)/dτ against float64 central differences (h = 1e-4 steps, off the
    VP interpolation's integer knots): truncation O(h²) and rounding O(u/h) are both below 1e-7 relative."""
    p = PROCESSES[name]
    k = torch.tensor([3.3, 10.5, 250.25, 700.7], dtype=torch.float64)
    h = 1e-4
    for f, df in (
        (p.alpha, p.dalpha_dtau),
        (p.sigma, p.dsigma_dtau),
        (p.log_snr, p.dlog_snr_dtau),
        (p.native_time, p.dnative_dtau),
    ):
        fd = (f(k + h) - f(k - h)) / (2 * h / p.T)
        torch.testing.assert_close(df(k), fd, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("kind", ["ve", "flow", "edm"])
def test_fd_matches_diffusers_brute_force(folders, kind):
    """K per sample from lipscope's batched FD equals a per-sample loop written from diffusers' scheduler calls.

    Both run the network in float64; the only float32 steps are inside diffusers (the positional embedding
    casts its input to float32; the flow scheduler stores σ as float32): each rounds one input by ≤ u₃₂
    relative, so the two ε agree to a few u₃₂·‖ε‖ and K to 8·u₃₂·(‖ε_a‖ + ‖ε_b‖)/Δτ (factor 8: two roundings
    per point, amplified at most 2× by these tiny networks, measured ≤ 1.5)."""
    folder = folders[kind]
    unet, sched = _load_diffusers(folder)
    model = load_model(str(folder), dtype="float64")
    assert model.schedule.kind == kind
    n, T = 3, model.T
    gen = torch.Generator().manual_seed(1)
    x0 = torch.rand((n, *model.sample_shape), generator=gen, dtype=torch.float64) * 2 - 1
    grid = [0, 10, 500]
    df = probe(model, x0, timesteps=grid, dt=1.0, samples=n, data_range=None)
    K = df.attrs["K_samples"]
    from lipscope import rng

    noise = rng.noise(0, n, tuple(model.sample_shape), dtype=x0.dtype)
    ref_fn = {"ve": ve_fd_reference, "flow": flow_fd_reference, "edm": edm_fd_reference}[kind]
    for j, k in enumerate(grid):
        ref = ref_fn(unet, sched, x0, noise, k, 1).numpy()
        # ‖ε_a‖ + ‖ε_b‖ from lipscope's model (float64) at the same points
        x = model.schedule.alpha(torch.tensor(float(k))) * x0 + model.schedule.sigma(torch.tensor(float(k))) * noise
        with torch.no_grad():
            scale = sum(torch.linalg.vector_norm(model(x, float(kk)).reshape(n, -1), dim=1) for kk in (k, k + 1))
        tol = 8 * U32 * scale.numpy() * T
        assert np.all(np.abs(K[:, j] - ref) <= tol), (kind, k, K[:, j], ref, tol)
        assert np.all(np.abs(K[:, j] - ref) <= 1e-3 * ref)  # and the tolerance is far below K itself


def test_ve_is_fed_sigma_and_defaults_to_unit_range(folders):
    model = load_model(str(folders["ve"]))
    d = model.schedule.describe()
    assert d["process"] == "ve" and d["network_fed"] == "sigma(k)" and model.T == 2000
    assert model.schedule.default_data_range == (0.0, 1.0)
    df = probe(model, "digits", timesteps="0,10", samples=4)
    assert "[0, 1]" in str(df.attrs["data_scaling"]) and "the ve default" in str(df.attrs["data_scaling"])
    assert np.isfinite(df["K_mean"]).all() and (df["K_mean"] > 0).all()


def test_flow_shift_recorded_not_applied(folders):
    """The network is fed σ·T whatever the shift; the same folder with shift 1 gives the same table."""
    model = load_model(str(folders["flow"]))
    assert model.schedule.describe()["shift"] == 3.0
    cfg = dict(model.scheduler_config, shift=1.0)
    other = load_model(str(folders["flow"]), scheduler_config=cfg)
    a = probe(model, "digits", timesteps="0,5,900", samples=4)
    b = probe(other, "digits", timesteps="0,5,900", samples=4)
    np.testing.assert_array_equal(a["K_mean"], b["K_mean"])


GAUSS_PROCESSES = ["ve", "flow", "edm-karras"]


@pytest.mark.parametrize("name", GAUSS_PROCESSES)
def test_gaussian_closed_form_every_process(name):
    """Theorem 3.1 on N(μ, Σ) for VE, flow and EDM: JVP through ε* equals the closed-form ∂ε*/∂τ per sample
    (both float64: agreement to ~1e-12 relative), and FD converges to it."""
    p = PROCESSES[name]
    g = GaussianMixture.gaussian(torch.tensor([0.5, -0.25]), torch.tensor([0.3, 1.5]))
    model = gaussian_eps_model(g, p)
    grid = np.array([1.0, 10.0, 300.0])
    df = probe(model, g.sample(8, 0), timesteps=grid, method="jvp", samples=8, data_range=None)
    x0 = g.sample(8, 0)
    from lipscope import rng

    noise = rng.noise(0, 8, g.shape, dtype=x0.dtype)
    ref = closed_form_samples(g, p, x0, noise, grid)[0]
    np.testing.assert_allclose(df.attrs["K_samples"], ref, rtol=1e-9)
    fine = probe(model, x0, timesteps=grid, dt=1e-3, scheme="central", samples=8, data_range=None)
    np.testing.assert_allclose(fine.attrs["K_samples"], ref, rtol=1e-5)


def test_lambda_and_native_columns():
    """K_per_lambda = K·Δτ/|Δλ| (FD) and K/|dλ/dτ| (JVP); EDM's native time is σ."""
    g = GaussianMixture.gaussian(torch.tensor([0.0, 0.0]), torch.tensor([1.0, 1.0]))
    p = PROCESSES["edm-karras"]
    df = probe(
        gaussian_eps_model(g, p), g.sample(4, 0), timesteps=[10.0, 100.0], method="fd,jvp", samples=4, data_range=None
    )
    fd, jv = df[df.method == "fd-forward"], df[df.method == "jvp"]
    k = torch.tensor([10.0, 100.0], dtype=torch.float64)
    dlam = (p.log_snr(k + 1) - p.log_snr(k)).abs().numpy()
    np.testing.assert_allclose(fd["K_per_lambda"], fd["K_mean"] * (1 / p.T) / dlam, rtol=1e-12)
    np.testing.assert_allclose(jv["K_per_lambda"], jv["K_mean"] / p.dlog_snr_dtau(k).abs().numpy(), rtol=1e-12)
    np.testing.assert_allclose(jv["t_native"], p.sigma(k).numpy(), rtol=1e-12)
    np.testing.assert_allclose(jv["K_per_native"], jv["K_mean"] / p.dsigma_dtau(k).numpy(), rtol=1e-12)
    assert (df["K_per_lambda_ci_low"] <= df["K_per_lambda"]).all()


def test_training_and_sampling_refuse_other_processes(folders, tmp_path):
    """VP, flow, VE and EDM models sample and train (tests/test_sigma_*.py for VE and EDM); a process without a sampler
    or a loss (cosine v-diffusion, DanceDiffusion's IPNDMScheduler) is refused by its process, never read as DDPM."""
    from lipscope.runs import TrainOptions, run_training
    from lipscope.sampling import model_samples
    from lipscope.training import TrainConfig

    cosine = tmp_path / "ipndm.json"
    cosine.write_text(json.dumps({"_class_name": "IPNDMScheduler", "num_train_timesteps": 1000}))
    with pytest.raises(InputError, match="VP \\(DDPM-family\\), flow-matching, VE and EDM schedules.*cosine process"):
        run_training(TrainOptions(model=str(folders["flow"]), scheduler_config=str(cosine), out=str(tmp_path / "c")))
    with pytest.raises(InputError, match="sampling cosine models is not supported yet"):
        model_samples(load_model(str(folders["flow"]), scheduler_config=str(cosine)), 2, 0)
    cfg = TrainConfig(steps=1, batch_size=2, warmup_steps=0)
    res = run_training(TrainOptions(model=str(folders["flow"]), out=str(tmp_path / "flow"), training=cfg))
    assert res["prediction_type"] == "flow_prediction" and res["process"]["process"] == "flow"


def test_flow_sampling_matches_diffusers_euler_loop(folders):
    """Model samples of a flow model = the Euler loop of diffusers' FlowMatchEulerDiscreteScheduler (shift 3 from
    the folder's config) on the raw UNet, fed timestep t: same network calls, float32, so equal to 1e-5."""
    from lipscope.sampling import sample

    unet, sched = _load_diffusers(folders["flow"])
    model = load_model(str(folders["flow"]))
    x = sample(model, 2, steps=4, seed=0)
    rng_x = rng_init = None
    from lipscope import rng as lrng

    rng_init = lrng.normal(0, lrng.Stream.SAMPLER_INIT, 2, tuple(model.sample_shape))
    sched.set_timesteps(4)
    rng_x = rng_init.clone()
    with torch.no_grad():
        for t in sched.timesteps:
            v = unet(rng_x, t.expand(2)).sample
            rng_x = sched.step(v, t, rng_x).prev_sample
    torch.testing.assert_close(x, rng_x.clamp(-1, 1), rtol=1e-5, atol=1e-5)


def _smooth_net(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A smooth network output in t and x (float64), as in test_jvp_parameterisations."""
    s = (t.to(x.dtype) / 1000.0).reshape(-1, *([1] * (x.ndim - 1)))
    return torch.tanh(0.7 * x + 0.3 * torch.sin(3.0 * s) * x.roll(1, -1)) + 0.2 * s


@pytest.mark.parametrize("target", ["eps", "x0", "v", "score", "velocity"])
@pytest.mark.parametrize("kind", ["vp-v", "flow"])
def test_targets_jvp_equals_fine_central_fd(kind, target):
    """Each target, differentiated exactly (JVP through both conversions, output → ε → target, at the true t),
    equals a central FD of the same quantity in float64. Richardson: the central FD error is ≈ c·h², so
    |FD(h/2) − exact| ≈ |FD(h) − FD(h/2)|/3; allowed 2× that plus float64 rounding (≪ 1e-9 relative)."""
    from lipscope import from_callable
    from lipscope.schedules import default_schedule

    process, pred = (default_schedule(), "v_prediction") if kind == "vp-v" else (FlowProcess(), "flow_prediction")
    m = from_callable(_smooth_net, process, sample_shape=(6,), prediction_type=pred, dtype="float64")
    x0 = torch.randn(5, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    grid = np.array([3.5, 40.5, 700.5])  # mid-segment: VP's log ᾱ is linear on [k, k+1)
    jvp = probe(m, x0, timesteps=grid, method="jvp", samples=5, target=target, data_range=None)
    assert (jvp["target"] == target).all()
    f1, f2 = (
        probe(m, x0, timesteps=grid, dt=h, scheme="central", samples=5, target=target, data_range=None)
        for h in (2e-3, 1e-3)
    )
    k1, k2, kj = f1.attrs["K_samples"], f2.attrs["K_samples"], jvp.attrs["K_samples"]
    tol = 2 * np.abs(k1 - k2) + 1e-9 * np.abs(k2)
    assert np.all(np.abs(kj - k2) <= tol), np.max(np.abs(kj - k2) / k2)


def test_lambda_columns_undefined_at_infinite_log_snr(folders):
    """Flow's t = 0 has σ = 0, λ = +∞: K per unit λ is undefined there (empty in the csv), never 0."""
    df = probe(load_model(str(folders["flow"])), "digits", timesteps="0,5", samples=2, method="fd,jvp")
    at0 = df[df["t"] == 0]
    assert np.isinf(at0["lambda"]).all() and at0["K_per_lambda"].isna().all()
    assert df[df["t"] == 5]["K_per_lambda"].notna().all()
