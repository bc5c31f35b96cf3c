"""Latent pipelines (LDMPipeline with a KL or VQ autoencoder): image data is encoded, never fed as latents;
K matches a per-sample loop written from diffusers' own pipeline/scheduler calls (tests/reference_processes.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from process_fixtures import LDM_IMAGE_SHAPE, LDM_LATENT_SHAPE, LDM_SCALING_FACTORS, save_ldm_pipeline
from reference_processes import ldm_encode, ldm_fd_reference

from lipscope import rng
from lipscope.loading import load_model
from lipscope.probe import probe
from lipscope.runs import ProbeOptions, run_probe

U32 = 2.0**-24


@pytest.fixture(scope="module", params=["kl", "vq"])
def ldm(request, tmp_path_factory):
    return request.param, save_ldm_pipeline(tmp_path_factory.mktemp("ldm") / request.param, vae=request.param)


def _images(n: int) -> torch.Tensor:
    """Pixels in [−1, 1], float32-exact (so float32 and float64 paths start from the same numbers)."""
    g = torch.Generator().manual_seed(3)
    return (torch.rand((n, *LDM_IMAGE_SHAPE), generator=g) * 2 - 1).double()


def test_loads_autoencoder_and_records_space(ldm):
    kind, folder = ldm
    m = load_model(str(folder))
    assert m.latent is not None and m.sample_shape == LDM_LATENT_SHAPE
    d = m.latent.describe()
    assert d["space"] == "latent" and d["scaling_factor"] == LDM_SCALING_FACTORS[kind]
    assert d["autoencoder"] == {"kl": "AutoencoderKL", "vq": "VQModel"}[kind]


def test_encoding_matches_diffusers(ldm):
    from diffusers import LDMPipeline

    kind, folder = ldm
    pipe = LDMPipeline.from_pretrained(folder)
    x = _images(4)
    m = load_model(str(folder), dtype="float64")
    assert m.latent is not None
    torch.testing.assert_close(m.latent.encode(x), ldm_encode(pipe.vqvae.double(), x), rtol=1e-12, atol=1e-12)


def test_fd_matches_diffusers_brute_force(ldm):
    """K per sample equals the reference loop (encode, DDIM add_noise, unet) in float64.

    The reference's DDIMScheduler computes ᾱ as a float32 cumulative product, lipscope in float64: x_k then
    differs by ≤ ~1e-6 relative (float32 cumprod over ≤ 500 steps), so ε differs by that times the network's
    gain, and K by 64·u₃₂·(‖ε_a‖ + ‖ε_b‖)/Δτ at most (measured ratio below 0.2 of that)."""
    from diffusers import LDMPipeline

    kind, folder = ldm
    pipe = LDMPipeline.from_pretrained(folder)
    m = load_model(str(folder), dtype="float64")
    n, grid = 3, [0, 10, 500]
    x = _images(n)
    df = probe(m, x, timesteps=grid, samples=n)
    assert "encoded by the" in str(df.attrs["data_scaling"])
    K = df.attrs["K_samples"]
    noise = rng.noise(0, n, LDM_LATENT_SHAPE, dtype=torch.float64)
    z = m.latent.encode(x) if m.latent is not None else None
    for j, k in enumerate(grid):
        ref = ldm_fd_reference(pipe, x, noise, k, 1).numpy()
        xk = m.schedule.alpha(torch.tensor(float(k))) * z + m.schedule.sigma(torch.tensor(float(k))) * noise
        with torch.no_grad():
            scale = sum(torch.linalg.vector_norm(m(xk, float(kk)).reshape(n, -1), dim=1) for kk in (k, k + 1))
        tol = 64 * U32 * scale.numpy() * m.T
        assert np.all(np.abs(K[:, j] - ref) <= tol), (kind, k, K[:, j], ref, tol)


def test_pixel_data_never_fed_as_latents(ldm, tmp_path):
    """digits (1×8×8) become 3×16×16 pixels, are encoded, and give the same table as precomputed latents."""
    kind, folder = ldm
    m = load_model(str(folder))
    a = probe(m, "digits", timesteps="0,10", samples=4, batch_size=8)
    assert "digits 0..16 → [-1, 1]" in str(a.attrs["data_scaling"])
    from lipscope.data import load_data_with_scaling

    pix, _ = load_data_with_scaling("digits", 4, 0, LDM_IMAGE_SHAPE, (-1.0, 1.0))
    assert m.latent is not None
    np.save(tmp_path / "lat.npy", m.latent.encode(pix).numpy())
    b = probe(m, str(tmp_path / "lat.npy"), timesteps="0,10", samples=4, batch_size=8)
    assert "precomputed latents" in str(b.attrs["data_scaling"])
    np.testing.assert_array_equal(a["K_mean"], b["K_mean"])


def test_model_samples_are_unclamped_latents_and_run_json_says_latent(ldm, tmp_path, monkeypatch):
    kind, folder = ldm
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    res = run_probe(ProbeOptions(model=str(folder), data="model", samples=4, timesteps="0,10", out=str(tmp_path / "r")))
    meta = json.loads((tmp_path / "r" / "run.json").read_text())
    assert meta["model"]["space"]["space"] == "latent" and meta["model"]["process"]["process"] == "vp-discrete"
    from lipscope.sampling import model_samples

    x0 = model_samples(res.model, 4, 0)
    assert x0.shape[1:] == LDM_LATENT_SHAPE
    # random-weight latents are not confined to [−1, 1]: a clamp would show as values exactly at ±1
    assert x0.abs().max() > 1 and not bool((x0.abs() == 1).any())


def test_sample_decodes_latents_and_training_trains_on_cached_latents(ldm, tmp_path):
    from lipscope.data import load_data
    from lipscope.runs import SampleOptions, TrainOptions, run_sample, run_training
    from lipscope.training import TrainConfig

    kind, folder = ldm
    meta = run_sample(SampleOptions(model=str(folder), steps=2, num=2, device="cpu", out=str(tmp_path / "s")))
    z = np.load(tmp_path / "s" / "samples.npz")
    assert z["x0"].shape == (2, *LDM_LATENT_SHAPE) and z["images"].shape == (2, *LDM_IMAGE_SHAPE)
    assert meta["space"]["space"] == "latent" and np.abs(z["images"]).max() <= 1
    # an LDM fine-tunes on its latents: encoded once by its autoencoder (AutoencoderKL mean / VQModel's
    # pre-quantisation latents), cached in the run folder, the pipeline saved whole with the new UNet
    cfg = TrainConfig(steps=2, batch_size=2, warmup_steps=0, etsdm=True)
    res = run_training(TrainOptions(model=str(folder), data="digits", out=str(tmp_path / "t"), training=cfg))
    m = load_model(str(tmp_path / "t"))
    assert res["latents"]["cache"] == "written" and m.latent is not None and m.etsdm is not None
    from safetensors.torch import load_file

    x = load_data("digits", None, 0, m.latent.pixel_shape)
    cached = load_file(str(tmp_path / "t" / "latents.safetensors"))["latents"]
    assert cached.shape == (len(x), *LDM_LATENT_SHAPE)
    torch.testing.assert_close(cached, load_model(str(folder)).latent.encode(x), rtol=0, atol=0)
