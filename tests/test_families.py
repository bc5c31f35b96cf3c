"""Conditional latent families (DiT, Stable Diffusion, SDXL) against per-sample loops written from the pipelines'
own denoising calls (tests/reference_families.py, which does not import lipscope): class labels, prompt
embeddings, SDXL's added conditions, classifier-free guidance, latent data through the autoencoder, JVP."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from family_fixtures import LATENT_SHAPE, save_dit_pipeline, save_prompt_embeds, save_sd_pipeline
from reference_families import dit_fd_reference, sd_fd_reference
from safetensors.torch import load_file

from lipscope import rng
from lipscope.errors import InputError
from lipscope.families import resolve_conditioning
from lipscope.loading import load_model
from lipscope.probe import probe

U32 = 2.0**-24
GRID = [0, 10, 500]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    d = tmp_path_factory.mktemp("families")
    return {
        "dit": save_dit_pipeline(d / "dit"),
        "sd": save_sd_pipeline(d / "sd"),
        "sd-v": save_sd_pipeline(d / "sd-v", prediction_type="v_prediction"),
        "sdxl": save_sd_pipeline(d / "sdxl", xl=True),
        "embeds": save_prompt_embeds(d / "embeds.safetensors"),
        "embeds-xl": save_prompt_embeds(d / "embeds-xl.safetensors", xl=True),
    }


def _latents(n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(5)
    return torch.randn((n, *LATENT_SHAPE), generator=g, dtype=torch.float64)


def _check(model, df, ref_fn, n: int) -> None:
    """lipscope's batched FD equals the reference per sample. The reference's DDIMScheduler computes ᾱ as a float32
    cumulative product (lipscope: float64), so x_k differs by ≤ ~1e-6 relative and K by at most
    64·u₃₂·(‖ε_a‖ + ‖ε_b‖)/Δτ (as in tests/test_latents.py)."""
    K = df.attrs["K_samples"]
    x0 = _latents(n)
    noise = rng.noise(0, n, LATENT_SHAPE, dtype=torch.float64)
    for j, k in enumerate(GRID):
        ref = ref_fn(k).numpy()
        xk = model.schedule.alpha(torch.tensor(float(k))) * x0 + model.schedule.sigma(torch.tensor(float(k))) * noise
        with torch.no_grad():
            m = df.attrs["model"]
            scale = sum(torch.linalg.vector_norm(m(xk, float(kk)).reshape(n, -1), dim=1) for kk in (k, k + 1))
        tol = 64 * U32 * scale.numpy() * model.T
        assert np.all(np.abs(K[:, j] - ref) <= tol), (k, K[:, j], ref, tol)


def _probe(model, cond, n=3, **kw):
    import dataclasses

    df = probe(model, _latents(n), timesteps=GRID, samples=n, data_range=None, conditioning=cond, **kw)
    df.attrs["model"] = dataclasses.replace(model, conditioning=cond) if cond is not None else model
    return df


@pytest.mark.parametrize("labels,w", [(None, None), ([1, 7], None), ([1, 7], 3.0)])
def test_dit_matches_pipeline_call(folders, labels, w):
    from diffusers import DiTPipeline

    pipe = DiTPipeline.from_pretrained(folders["dit"])
    m = load_model(str(folders["dit"]), dtype="float64")
    assert m.latent is not None and m.sample_shape == LATENT_SHAPE
    cond = resolve_conditioning(m, labels, None, w)
    df = _probe(m, cond)
    per_sample = [10, 10, 10] if labels is None else [labels[i % 2] for i in range(3)]  # null class 10 by default
    if labels is None:
        assert df.attrs["conditioning"]["conditioning"] == "unconditional (null class 10)"
    _check(m, df, lambda k: dit_fd_reference(pipe, _latents(3), rng.noise(0, 3, LATENT_SHAPE, torch.float64),
                                             per_sample, k, 1, w), 3)  # fmt: skip


@pytest.mark.parametrize("kind", ["sd", "sd-v", "sdxl"])
@pytest.mark.parametrize("w", [None, 3.0])
def test_sd_matches_pipeline_call(folders, kind, w):
    xl = kind == "sdxl"
    m = load_model(str(folders[kind]), dtype="float64")
    assert m.latent is not None
    path = folders["embeds-xl" if xl else "embeds"]
    cond = resolve_conditioning(m, None, str(path), w)
    df = _probe(m, cond)
    e = {k: v.double() for k, v in load_file(str(path)).items()}
    rows = torch.tensor([0, 1, 0])  # sample i gets prompt i mod 2
    added = neg_added = None
    if xl:
        from reference_families import sdxl_time_ids

        ids = sdxl_time_ids(16, 16, torch.float64).expand(3, 6)
        added = {"text_embeds": e["pooled_prompt_embeds"][rows], "time_ids": ids}
        neg_added = {"text_embeds": e["negative_pooled_prompt_embeds"][rows], "time_ids": ids}

    def ref(k):
        return sd_fd_reference(
            folders[kind], _latents(3), rng.noise(0, 3, LATENT_SHAPE, torch.float64), e["prompt_embeds"][rows],
            e["negative_prompt_embeds"][rows], k, 1, w, added, neg_added,
        )  # fmt: skip

    _check(m, df, ref, 3)


@pytest.mark.parametrize("kind", ["dit", "sdxl", "sd3"])
def test_jvp_through_conditional_families_with_cfg(request, folders, kind):
    """JVP of the guided ε through the transformer/UNet (math SDPA, GroupNorm patched, restored) equals central FD.
    Near t = 10.5 the float32 cast of the timestep inside diffusers' embeddings is ≤ 1e-6 of t, so the
    Richardson bound on FD(h = 0.02) vs FD(0.01) plus that cast (2·u₃₂·t/h relative) holds."""
    fs = request.getfixturevalue("folders2") if kind == "sd3" else folders
    m = load_model(str(fs[kind]), dtype="float64")
    embeds = {"sdxl": folders["embeds-xl"], "sd3": fs.get("embeds-sd3")}.get(kind)
    cond = resolve_conditioning(m, [3, 4] if kind == "dit" else None, str(embeds) if embeds else None, 2.0)
    assert_jvp_is_central_fd(m, cond)


def assert_jvp_is_central_fd(m, cond) -> None:
    """JVP at t = 10.5 equals central FD within the Richardson bound plus the float32 timestep cast."""
    x0, grid = _latents(2), [10.5]
    jvp = probe(m, x0, timesteps=grid, method="jvp", samples=2, data_range=None, conditioning=cond)
    f1, f2 = (
        probe(m, x0, timesteps=grid, dt=h, scheme="central", samples=2, data_range=None, conditioning=cond)
        for h in (0.02, 0.01)
    )
    k1, k2, kj = f1.attrs["K_samples"], f2.attrs["K_samples"], jvp.attrs["K_samples"]
    tol = 2 * np.abs(k1 - k2) + (2 * U32 * 10.5 / 0.01 + 1e-9) * np.abs(k2)
    assert np.all(np.abs(kj - k2) <= tol), np.max(np.abs(kj - k2) / k2)


def test_batch_size_independence_with_conditioning(folders):
    m = load_model(str(folders["dit"]), dtype="float64")
    cond = resolve_conditioning(m, [1, 2, 3], None, 4.0)
    a, b = (
        probe(m, _latents(5), timesteps=GRID, samples=5, data_range=None, conditioning=cond, batch_size=bs)
        for bs in (2, 16)
    )
    np.testing.assert_allclose(a.attrs["K_samples"], b.attrs["K_samples"], rtol=1e-10)


def test_image_data_is_encoded_and_model_samples_depend_on_the_conditioning(folders, tmp_path, monkeypatch):
    import dataclasses

    from lipscope.sampling import model_samples

    monkeypatch.setenv("LIPSCOPE_CACHE", str(tmp_path / "cache"))
    m = load_model(str(folders["dit"]))
    df = probe(m, "digits", timesteps="0,10", samples=2, conditioning=resolve_conditioning(m, [1], None, None))
    assert "encoded by the AutoencoderKL" in str(df.attrs["data_scaling"])
    a = model_samples(dataclasses.replace(m, conditioning=resolve_conditioning(m, [1], None, None)), 2, 0, tmp_path)
    b = model_samples(dataclasses.replace(m, conditioning=resolve_conditioning(m, [2], None, None)), 2, 0, tmp_path)
    assert not torch.equal(a, b) and len(list(tmp_path.glob("x0_model_*.npz"))) == 2


def test_conditioning_refusals(folders, tmp_path):
    dit = load_model(str(folders["dit"]))
    sd = load_model(str(folders["sd"]))
    cases = [
        (lambda: resolve_conditioning(dit, [10], None, None), "`class_labels` 10 is out of range"),
        (lambda: resolve_conditioning(dit, None, None, 3.0), "`guidance_scale` needs `class_labels`"),
        (lambda: resolve_conditioning(dit, None, str(folders["embeds"]), None), "is class-conditional"),
        (lambda: resolve_conditioning(sd, None, None, None), "give `prompt` or `prompt_embeds`"),
        (lambda: resolve_conditioning(sd, [1], None, None), "give `prompt` or `prompt_embeds`, not `class_labels`"),
        (lambda: resolve_conditioning(sd, None, str(tmp_path / "no.safetensors"), None), "no such file"),
        (lambda: resolve_conditioning(sd, None, str(folders["embeds"]), float("nan")), "finite"),
        (lambda: probe(sd, "digits", samples=2, timesteps="0"), "give `prompt` or `prompt_embeds`"),
    ]
    from safetensors.torch import save_file

    save_file({"prompt_embeds": torch.zeros(2, 5, 7)}, str(tmp_path / "wrong.safetensors"))
    cases.append((lambda: resolve_conditioning(sd, None, str(tmp_path / "wrong.safetensors"), None), "(P, tokens, 16)"))
    cases.append((lambda: resolve_conditioning(sd, None, str(tmp_path / "wrong.safetensors"), 2.0), "lacks"))
    unet = load_model("builtin:digits-ddpm")
    cases.append((lambda: resolve_conditioning(unet, [1], None, None), "is unconditional; leave out `class_labels`"))
    for call, words in cases:
        with pytest.raises(InputError, match=None) as e:
            call()
        assert words in str(e.value) and "\n" not in str(e.value), (words, str(e.value))


def test_cli_probe_dit_with_cfg_and_bad_label(folders, tmp_path):
    env = {"HF_HUB_OFFLINE": "1", "PATH": "", "COLUMNS": "200"}
    base = [sys.executable, "-m", "lipscope", "probe", "--model", str(folders["dit"]), "--data", "digits"]
    r = subprocess.run(
        [*base, "--class-label", "3", "--guidance-scale", "2", "--samples", "2", "--timesteps", "0,10",
         "--method", "fd,jvp", "--out", str(tmp_path / "r"), "--no-progress"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    meta = json.loads((tmp_path / "r" / "run.json").read_text())
    assert meta["conditioning"]["class_labels"] == [3] and meta["conditioning"]["guidance_scale"] == 2.0
    assert meta["model"]["space"]["space"] == "latent"
    r = subprocess.run([*base, "--class-label", "99", "--out", str(tmp_path / "bad")], capture_output=True,
                       text=True, env=env, timeout=300)  # fmt: skip
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "--class-label 99 is out of range" in r.stderr and not (tmp_path / "bad").exists()


def test_sample_a_conditional_latent_model(folders, tmp_path):
    from lipscope.runs import SampleOptions, run_sample

    opts = SampleOptions(model=str(folders["dit"]), steps=2, num=2, device="cpu", out=str(tmp_path / "s"))
    meta = run_sample(dataclasses.replace(opts, class_labels=(4,), guidance_scale=2.0))
    z = np.load(tmp_path / "s" / "samples.npz")
    assert z["x0"].shape == (2, *LATENT_SHAPE) and z["images"].shape == (2, 3, 16, 16)
    assert meta["conditioning"]["class_labels"] == [4] and meta["conditioning"]["guidance_scale"] == 2.0
    # no prompt: the empty prompt, which this folder (text encoders null) cannot encode
    with pytest.raises(InputError, match=r"empty prompt \(the unconditional default\) could not be encoded.*no text "):
        run_sample(SampleOptions(model=str(folders["sd"]), steps=2, num=2, device="cpu", out=str(tmp_path / "t")))


@pytest.fixture(scope="module")
def folders2(tmp_path_factory):
    from family_fixtures2 import save_embeds, save_pixart_folder, save_sd3_folder

    d = tmp_path_factory.mktemp("families2")
    return {
        "sd3": save_sd3_folder(d / "sd3", shift=3.0),
        "pixart": save_pixart_folder(d / "pixart"),
        "embeds-sd3": save_embeds(d / "sd3.safetensors", "sd3"),
        "embeds-pixart": save_embeds(d / "pixart.safetensors", "pixart"),
    }


@pytest.mark.parametrize("kind", ["sd3", "pixart"])
@pytest.mark.parametrize("w", [None, 3.0])
def test_sd3_and_pixart_match_pipeline_call(folders2, kind, w):
    from reference_families2 import pixart_fd_reference, sd3_fd_reference

    m = load_model(str(folders2[kind]), dtype="float64")
    assert m.latent is not None and m.schedule.kind == ("flow" if kind == "sd3" else "vp-discrete")
    path = str(folders2[f"embeds-{kind}"])
    df = _probe(m, resolve_conditioning(m, None, path, w))
    e = load_file(path)
    rows = torch.tensor([0, 1, 0])
    if kind == "sd3":
        e = {k: v.double() for k, v in e.items()}
        args = (e["prompt_embeds"], e["pooled_prompt_embeds"], e["negative_prompt_embeds"])
        args = (*args, e["negative_pooled_prompt_embeds"])
        fn = sd3_fd_reference
    else:
        args = (e["prompt_embeds"].double(), e["prompt_attention_mask"], e["negative_prompt_embeds"].double())
        args = (*args, e["negative_prompt_attention_mask"])
        fn = pixart_fd_reference
    args = tuple(a[rows] for a in args)
    noise = rng.noise(0, 3, LATENT_SHAPE, torch.float64)
    _check(m, df, lambda k: fn(folders2[kind], _latents(3), noise, *args, k, 1, guidance_scale=w), 3)


def test_dit_from_an_offline_hub_cache_under_its_real_id(folders, tmp_path, monkeypatch):
    """facebook/DiT-XL-2-256 laid out as a Hugging Face cache entry: the transformer, VAE and scheduler come through
    huggingface_hub's cache lookup (from_pretrained with subfolders), offline, and probe like the folder does."""
    import shutil

    rev = "0123456789abcdef0123456789abcdef01234567"
    base = tmp_path / "hub" / "models--facebook--DiT-XL-2-256"
    shutil.copytree(folders["dit"], base / "snapshots" / rev)
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text(rev)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub = load_model("facebook/DiT-XL-2-256", dtype="float64")
    local = load_model(str(folders["dit"]), dtype="float64")
    assert hub.name == "facebook/DiT-XL-2-256" and hub.latent is not None and hub.latent.kind == "AutoencoderKL"
    cond = resolve_conditioning(hub, [2], None, 1.5)
    a = probe(hub, "digits", timesteps="0,10", samples=2, conditioning=cond, batch_size=4)
    b = probe(local, "digits", timesteps="0,10", samples=2, conditioning=cond, batch_size=4)
    np.testing.assert_array_equal(a["K_mean"], b["K_mean"])


def test_pipelines_that_reuse_a_wrapped_denoiser_class_are_refused_by_name():
    """DeepFloyd IF and Kandinsky use UNet2DConditionModel with other inputs: never wrapped as SD; they go to the
    generic adapter, which records what their own call feeds (tests/test_generic.py runs IF stage I)."""
    from lipscope.families import pipeline_denoiser

    for cls in ("IFPipeline", "KandinskyV22Pipeline", "StableDiffusionUpscalePipeline"):
        fam, comp = pipeline_denoiser({"_class_name": cls, "unet": ["diffusers", "UNet2DConditionModel"]}, "x")
        assert (fam.name, comp) == ("generic", "unet")
    for cls in ("StableDiffusionPipeline", "StableDiffusionXLPipeline"):
        assert (
            pipeline_denoiser({"_class_name": cls, "unet": ["diffusers", "UNet2DConditionModel"]}, "x")[0].name == "sd"
        )
