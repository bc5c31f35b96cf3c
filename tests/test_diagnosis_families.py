"""The diagnosis on networks of every family and process (tiny random-weight folders, float64): the attribution's
parts sum to the full JVP per sample, its ``outside`` part is what the consumers leave (0 for ε-predicting networks,
the conversion's derivative for flow models), and fd-ode converges to jvp-ode, with CFG where the family has it."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from family_fixtures import LATENT_SHAPE, save_dit_pipeline, save_prompt_embeds, save_sd_pipeline

from lipscope import rng
from lipscope.attribution import consumers, embeddings, part_tangents
from lipscope.families import resolve_conditioning
from lipscope.fwad import forward_ad_patches, jvp
from lipscope.loading import load_model
from lipscope.probe import probe

U32, U64 = 2.0**-24, 2.0**-53


@pytest.fixture(scope="module")
def nets(tmp_path_factory, pipeline_dir):
    from family_fixtures2 import save_embeds, save_pixart_folder, save_sd3_folder
    from family_fixtures3 import save_flux_embeds, save_flux_folder
    from process_fixtures import save_edm_folder, save_flow_folder, save_ve_pipeline

    d = tmp_path_factory.mktemp("diag")
    return {  # name → (folder, class labels, prompt-embeddings file, guidance scale)
        "unet2d": (pipeline_dir, None, None, None),
        "ve": (save_ve_pipeline(d / "ve"), None, None, None),
        "edm": (save_edm_folder(d / "edm"), None, None, None),
        "flow-unet": (save_flow_folder(d / "flow"), None, None, None),
        "dit": (save_dit_pipeline(d / "dit"), [3, 4], None, 2.0),
        "sd": (save_sd_pipeline(d / "sd"), None, save_prompt_embeds(d / "e.safetensors"), 2.0),
        "sdxl": (save_sd_pipeline(d / "sdxl", xl=True), None, save_prompt_embeds(d / "x.safetensors", xl=True), 2.0),
        "sd3": (save_sd3_folder(d / "sd3"), None, save_embeds(d / "s3.safetensors", "sd3"), 2.0),
        "pixart": (save_pixart_folder(d / "pixart"), None, save_embeds(d / "p.safetensors", "pixart"), 2.0),
        "flux-dev": (save_flux_folder(d / "fd"), None, save_flux_embeds(d / "f.safetensors"), None),
        "flux-schnell": (save_flux_folder(d / "fs", guidance_embeds=False), None, d / "f.safetensors", 2.0),
    }


def _model(nets, name):
    folder, labels, embeds, w = nets[name]
    m = load_model(str(folder), dtype="float64")
    cond = resolve_conditioning(m, labels, str(embeds) if embeds else None, w)
    import dataclasses

    return dataclasses.replace(m, conditioning=cond) if cond is not None else m


def _x(m, n=2, seed=5):
    g = torch.Generator().manual_seed(seed)
    return (0.5 * torch.randn((n, *m.sample_shape), generator=g, dtype=torch.float64)).clamp(-1, 1)


EPS_PREDICTING = ("unet2d", "dit", "sd", "sdxl", "pixart")  # ε out, fed t: no path outside the consumers


@pytest.mark.parametrize("name", ["unet2d", "ve", "edm", "flow-unet", "dit", "sd", "sdxl", "sd3", "pixart",
                                  "flux-dev", "flux-schnell"])  # fmt: skip
@pytest.mark.parametrize("granularity", ["blocks", "layers"])
def test_parts_sum_to_the_full_jvp(nets, name, granularity):
    """Σ parts = ∂εθ/∂t per sample: the same forward-AD arithmetic split by the chain rule, so equal to the rounding
    of the sum (P + 1 terms of size ≤ max‖part‖): (P + 1)·64·u·Σ‖part‖ per sample, u = u₆₄ — but u₃₂ for Flux, whose
    rotary embedding (diffusers' apply_rotary_emb) computes q and k in float32 whatever the model's dtype."""
    m = _model(nets, name)
    cons = consumers(m, granularity)
    groups = [[c for c in cons if c.group == g] for g in dict.fromkeys(c.group for c in cons)]
    x, rows = _x(m), torch.tensor([0, 1])
    t = torch.tensor([3.5, 40.25], dtype=torch.float64)
    with forward_ad_patches(m.module):
        parts, seen = part_tangents(m, x, t, rows, groups, embeddings(m))
        _, full = jvp(m.name, lambda s: m(x, s, rows), (t,), (torch.ones_like(t),))
    assert len(groups) >= 2 and parts.shape[0] == len(groups) + 1
    total = parts.sum(0)
    err = torch.linalg.vector_norm((total - full).reshape(2, -1), dim=1)
    scale = torch.linalg.vector_norm(parts.reshape(parts.shape[0], 2, -1), dim=2).sum(0)
    u = U32 if name.startswith("flux") else U64
    assert torch.all(err <= (len(groups) + 1) * 64 * u * scale), (err, scale)
    assert torch.linalg.vector_norm(full) > 0 and seen  # the embedding's ∂e/∂t is recorded
    outside = torch.linalg.vector_norm(parts[-1].reshape(2, -1), dim=1)
    if name in EPS_PREDICTING:
        assert torch.all(outside <= 64 * u * scale), outside  # every consumer listed: nothing left outside
    if name in ("sd3", "flux-dev", "flux-schnell", "flow-unet"):
        # flow: ε = x + αu (α + σ = 1), so at a fixed network output u the t-path outside is α'(t)·u per unit τ,
        # −u per unit τ, −u/T per step; u is the network's own (guided) velocity
        import dataclasses

        u = dataclasses.replace(m, target="velocity")(x, t, rows)
        assert torch.allclose(parts[-1], -u / m.T, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", ["unet2d", "ve", "edm", "flow-unet", "dit", "sdxl", "sd3", "pixart", "flux-dev",
                                  "flux-schnell"])  # fmt: skip
def test_fd_ode_converges_to_jvp_ode(nets, name):
    """Central fd-ode at h and h/2 against jvp-ode (CFG where the family has it): |K(h/2) − K_jvp| ≤ 2|K(h) − K(h/2)|
    (second order: the error of K(h/2) is about ⅓ of that difference) plus diffusers' float32 cast of the timestep
    inside its embeddings, 2·u₃₂·t/h relative (as tests/test_families.py::assert_jvp_is_central_fd)."""
    m = _model(nets, name)
    x0, grid, t = _x(m), [10.5], 10.5
    kw = dict(timesteps=grid, samples=2, data_range=None)
    jv = probe(m, x0, method="jvp-ode", **kw)
    f1, f2 = (probe(m, x0, method="fd-ode", dt=h, scheme="central", **kw) for h in (0.02, 0.01))
    k1, k2, kj = f1.attrs["K_samples"], f2.attrs["K_samples"], jv.attrs["K_samples"]
    tol = 2 * np.abs(k1 - k2) + (2 * U32 * t / 0.01 + 1e-9) * np.abs(k2)
    assert np.all(np.abs(kj - k2) <= tol), (kj, k2, tol)
    for col in ("K_partial", "K_space"):  # the split agrees too
        a, b = jv[col].to_numpy(), f2[col].to_numpy()
        assert np.all(np.abs(a - b) <= 2 * np.abs(f1[col].to_numpy() - b) + (2 * U32 * t / 0.01 + 1e-9) * b)


def test_latent_data_feeds_the_diagnosis(nets):
    """A latent model's references and ODE rows run on its latents (the probe's x0)."""
    m = _model(nets, "sd")
    x0 = _x(m, 3)
    df = probe(m, x0, timesteps=[5.0, 50.0], method="jvp-ode", samples=3, data_range=None, reference="gaussian")
    assert set(df["method"]) == {"jvp-ode", "ref-gaussian"} and df.attrs["reference"]["D"] == int(np.prod(LATENT_SHAPE))
    assert (df["K_mean"] > 0).all()


def test_reference_data_of_a_latent_model_is_encoded(nets):
    """Image data for a latent model: the reference's data set is every digit through the pipeline's autoencoder,
    exactly as the probe encodes its x0 (LatentCodec.encode of the images in the data range)."""
    from lipscope.data import load_data
    from lipscope.optimal import reference_data

    m = _model(nets, "sd")
    pts = reference_data(m, "digits", (-1.0, 1.0))
    pix = load_data("digits", None, 0, m.latent.pixel_shape, (-1.0, 1.0))
    assert pts.shape == (1797, int(np.prod(LATENT_SHAPE)))
    assert torch.equal(pts, m.latent.encode(pix).float().reshape(1797, -1))


def test_noise_is_the_probe_noise(nets):
    """attribution_norms draws x_t from the probe's own noise stream: its total equals the probe's JVP row."""
    from lipscope.attribution import attribution_norms

    m = _model(nets, "dit")
    x0 = _x(m, 2)
    df = probe(m, x0, timesteps=[7.0], method="jvp", samples=2, data_range=None, attribute="blocks")
    vals, parts, _ = attribution_norms(m, x0, rng.noise(0, 2, LATENT_SHAPE, torch.float64), np.array([7.0]))
    att = df.attrs["attribution"]
    total = float(att.loc[att["part"] == "total", "K_part"].iloc[0])
    assert abs(total / df["K_mean"].iloc[0] - 1) < 1e-10
    assert np.allclose(vals[:, 0, 2 * len(parts)], df.attrs["K_samples"][:, 0], rtol=1e-10)
    shares = att.loc[att["kind"].isin(["part", "outside"]), "share"]
    assert abs(shares.sum() - 1) < 1e-10


def test_generic_pipeline_of_the_cosine_process(tmp_path):
    """main's generic adapter and v-diffusion process (DanceDiffusion, IPNDMScheduler, a 1-D audio UNet fed τ):
    jvp-ode's rows agree with central fd-ode as on the families (same bound), the summary's exponent and ODE sentence
    come out, and --attribute is refused before any work (where a generic network consumes t is not known)."""
    from generic_fixtures import TINY, save_tiny

    from lipscope.errors import InputError
    from lipscope.explain import explain
    from lipscope.prompts import conditioning_for

    name = "DanceDiffusionPipeline"
    folder = save_tiny(name, tmp_path / "dance")
    m = load_model(str(folder), dtype="float64", model_args=dict(TINY[name].call_args))
    m = dataclasses.replace(m, conditioning=conditioning_for(m, str(folder)))  # the capture: sample shape, time map
    assert m.schedule.kind == "cosine"
    x0, grid, t = _x(m), [10.5], 10.5
    kw = dict(timesteps=grid, samples=2, data_range=None)
    jv = probe(m, x0, method="jvp,jvp-ode", **kw)
    f1, f2 = (probe(m, x0, method="fd-ode", dt=h, scheme="central", **kw) for h in (0.02, 0.01))
    k1, k2 = f1.attrs["K_samples"], f2.attrs["K_samples"]
    kj = jv.attrs["K_samples"][:, 1:]
    tol = 2 * np.abs(k1 - k2) + (2 * U32 * t / 0.01 + 1e-9) * np.abs(k2)
    assert np.all(np.abs(kj - k2) <= tol) and np.all(kj > 0), (kj, k2, tol)
    d = explain(jv)
    assert any(s.startswith("jvp-ode: along the ODE at t = 10.5") for s in d["sentences"])
    assert d["sentences"][0].startswith("jvp: exponent n/a, because 1 grid points")
    with pytest.raises(InputError, match="`attribute`: where generic networks consume"):
        probe(m, x0, method="jvp", attribute="blocks", **kw)
