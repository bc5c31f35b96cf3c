"""The generic adapter on 15 tiny pipelines (tests/generic_fixtures.py) against independent loops over each
pipeline's own denoising step (tests/reference_generic.py, no lipscope inside): the identification the registry
claims, the autoencoder map, K by FD per sample, and JVP against central FD — in float64, with CFG where the pipeline
has it, data through its autoencoder (videos for the video pipelines)."""

from __future__ import annotations

import dataclasses
import json

import diffusers
import numpy as np
import pytest
import torch
from generic_fixtures import TINY, save_embeds, save_tiny
from reference_generic import encode, flux2_unpack, k_dance, k_flow, k_if, k_vp_v
from safetensors.torch import load_file

from lipscope import rng
from lipscope.latents import latent_x0
from lipscope.loading import load_model
from lipscope.probe import probe
from lipscope.prompts import conditioning_for

U64, U32 = 2.0**-53, 2.0**-24
N = 2  # samples
VP = {"CogVideoXPipeline", "IFPipeline"}
CFG_PARAM = {"QwenImagePipeline": "true_cfg_scale", "HunyuanVideoPipeline": "true_cfg_scale"}


@pytest.fixture(scope="session")
def generic_folders(tmp_path_factory):
    d = tmp_path_factory.mktemp("generic")
    out = {}
    for name in TINY:
        out[name] = (save_tiny(name, d / name), save_embeds(name, d / f"{name}.safetensors"))
    return out


def _load(name: str, folders, guidance: float | None, **call):
    folder, embeds = folders[name]
    tiny = TINY[name]
    m = load_model(str(folder), dtype="float64", model_args={**tiny.call_args, **call})
    if name == "HiDreamImagePipeline":  # its pipeline scales any size to default_sample_size² latents (128²: slow)
        m.net.pipe.default_sample_size = 16
    cond = conditioning_for(m, str(folder), prompts=list(tiny.prompts) or None,
                            prompt_embeds=str(embeds) if embeds else None, guidance_scale=guidance)  # fmt: skip
    return dataclasses.replace(m, conditioning=cond)


def _reference_pipe(name: str, folders):
    folder = folders[name][0]
    index = json.loads((folder / "model_index.json").read_text())
    nulls = {k: None for k, v in index.items() if isinstance(v, list) and v[1] is None}
    pipe = getattr(diffusers, name).from_pretrained(folder, dtype=torch.float64, **nulls)
    if name == "HiDreamImagePipeline":
        pipe.default_sample_size = 16
    return pipe


def _conds(name: str, folders, guidance: float | None) -> list[dict]:
    """Each sample's ``__call__`` conditioning (sample i: condition i mod P), as the reference passes it."""
    tiny = TINY[name]
    base = dict(tiny.call_args)
    if guidance is not None or name in CFG_PARAM or tiny.guidance:
        base[CFG_PARAM.get(name, "guidance_scale")] = guidance if guidance is not None else 1.0
    if name == "Flux2Pipeline":  # guidance-distilled: the scale is an input, left at what the test asked
        base["guidance_scale"] = guidance
    embeds = folders[name][1]
    out = []
    for i in range(N):
        c = dict(base)
        if embeds is not None:
            t = {k: v.to(torch.float64) if v.is_floating_point() else v for k, v in load_file(str(embeds)).items()}
            lists = {k.split(".")[0] for k in t if "." in k}
            for k in lists:
                c[k] = [t[f"{k}.{i % 2}"]]
            for k, v in t.items():
                if "." not in k:
                    c[k] = v[:, i % 2 : i % 2 + 1] if k.endswith("llama3") else v[i % 2 : i % 2 + 1]
            if "negative_prompt_embeds" in t and name == "SanaPipeline":
                c["negative_prompt"] = None
        elif tiny.prompts:
            c["prompt"] = [tiny.prompts[i % len(tiny.prompts)]]
        out.append(c)
    return out


def _pixels(m, name: str, tmp_path):
    """Image data (digits) for image pipelines, a random video array for video ones, tensors for audio."""
    codec = m.latent
    if codec is None:
        g = torch.Generator().manual_seed(3)
        x = torch.rand((N, *m.sample_shape), generator=g, dtype=torch.float64) * 2 - 1
        return x, x
    if codec.is_video:
        g = np.random.default_rng(4)
        path = tmp_path / "videos.npy"
        np.save(path, (g.random((3, *codec.pixel_shape)) * 2 - 1).astype(np.float32))
        return str(path), codec.load_pixels(str(path), N, 0, (-1.0, 1.0))[0]
    return "digits", codec.load_pixels("digits", N, 0, (-1.0, 1.0))[0]


def _points(name: str) -> list[tuple[float, float]]:
    """Pairs of model steps (k, k′): whole steps for VP (and CogView4's unshifted time, which it truncates to whole
    steps; its σ is read back); for flow σ = j/1024 (exact in float32, as the pipelines' σ and timestep tensors are),
    k = 1000·σ."""
    if name in VP or name == "CogView4Pipeline":
        return [(10, 11), (600, 601)]
    return [(1000 * j / 1024, 1000 * (j + 1) / 1024) for j in (10, 600)]


def _tolerance(m, x0, noise, ka: float, kb: float, fp32_sample: bool, out_dtype: str) -> np.ndarray:
    """Per-sample bound on |K − K_ref|: float64 rounding of both ε (64·u₆₄·(‖ε_a‖+‖ε_b‖)/Δτ); where the pipeline
    keeps its latents in float32 (the sample it hands the denoiser and the scheduler), the change of ε under that
    rounding of x, measured (2·(e_a + e_b)/Δτ); where it hands its scheduler a float32 output (``.float()``), that
    rounding: the reference's ε = a·out + c·x has |a|·‖out‖ ≤ ‖ε‖ + ‖x‖ (flow: a = 1 − σ, v: a = α), so
    2·u₃₂·(‖ε_a‖ + ‖ε_b‖ + 2‖x‖)/Δτ."""
    p = m.schedule
    k = torch.tensor([float(ka)] * x0.shape[0], dtype=torch.float64)
    x = p.alpha(k).view(-1, *[1] * (x0.ndim - 1)) * x0 + p.sigma(k).view(-1, *[1] * (x0.ndim - 1)) * noise
    dtau = (kb - ka) / m.T
    with torch.no_grad():
        ea, eb = m(x, float(ka)), m(x, float(kb))
        norm = (ea.flatten(1).norm(dim=1) + eb.flatten(1).norm(dim=1)).numpy()
        tol = 64 * U64 * norm / dtau
        if fp32_sample:
            x32 = x.float().double()
            e = (m(x32, float(ka)) - ea).flatten(1).norm(dim=1) + (m(x32, float(kb)) - eb).flatten(1).norm(dim=1)
            tol = tol + 2 * e.numpy() / dtau
    if out_dtype == "float32":  # the pipeline hands its scheduler a float32 output: ε within u₃₂(‖ε‖ + ‖x‖) per point
        xn = x.flatten(1).norm(dim=1).numpy()
        tol = tol + 2 * U32 * (norm + 2 * xn) / dtau
    return tol


def _assert_jvp_is_central_fd(m, x0, k: float) -> None:
    """JVP equals central FD within the Richardson bound plus diffusers' float32 timestep embeddings (2·u₃₂·t/h)."""
    jvp = probe(m, x0, timesteps=[k], method="jvp", samples=N, data_range=None).attrs["K_samples"]
    f1, f2 = (probe(m, x0, timesteps=[k], dt=h, scheme="central", samples=N, data_range=None).attrs["K_samples"]
              for h in (0.02, 0.01))  # fmt: skip
    tol = 2 * np.abs(f1 - f2) + (2 * U32 * k / 0.01 + 1e-9) * np.abs(f2)
    assert np.all(np.abs(jvp - f2) <= tol), (jvp, f2, tol)


CASES = [(n, "guided") for n in TINY] + [(n, "conditional") for n in ("WanPipeline", "QwenImagePipeline",
                                                                      "HiDreamImagePipeline")]  # fmt: skip


@pytest.mark.parametrize(("name", "mode"), CASES)
def test_pipeline_matches_its_own_denoising_step(name, mode, generic_folders, tmp_path):
    """FD K per sample equals the pipeline's own step, with CFG (or, "conditional", no guidance asked: the
    conditional branch, against the pipeline run with its CFG scale at 1); data through the autoencoder; JVP."""
    tiny = TINY[name]
    w = (tiny.guidance if name != "Flux2Pipeline" else 3.5) if mode == "guided" else None
    m = _load(name, generic_folders, w)
    info = m.conditioning.info
    from lipscope.families.registry import TESTED

    assert info["pipeline"] == name and info["denoiser"] == TESTED[name].denoiser
    assert TESTED[name].time.split(":")[0] == info["timestep_fed"] or name == "CogView4Pipeline", info["timestep_fed"]
    assert (m.latent is None) == (TESTED[name].autoencoder is None)
    assert info["process_check_rel_diff"] < 1e-3 and info["replay_rel_diff"] < 2.5e-4
    ref = _reference_pipe(name, generic_folders)
    data, pixels = _pixels(m, name, tmp_path)
    if m.latent is not None:  # the identified map into the denoiser's space against the pipeline's own path
        x0, _ = latent_x0(m.latent, data, N, 0, (-1.0, 1.0), m.sample_shape)
        with torch.no_grad():
            x0_ref = encode(name, ref, pixels.to(torch.float64).reshape(N, *m.latent.pixel_shape))
        scale = x0_ref.flatten(1).norm(dim=1)
        assert torch.all((x0.double() - x0_ref.reshape(x0.shape)).flatten(1).norm(dim=1) <= 1e-6 * scale)
    else:
        x0 = data
    x0 = x0.double()
    noise = rng.noise(0, N, tuple(x0.shape[1:]), dtype=torch.float64)
    conds = _conds(name, generic_folders, w)
    fp32, out_dtype = info["sample_dtype"] == "float32", info["model_output_dtype"]
    for ka, kb in _points(name):
        fed_ref = (ka, kb)  # the timestep the pipeline feeds at these points (CogView4: its whole-step t)
        with torch.no_grad():
            if name in VP and name == "IFPipeline":
                emb = [ref.encode_prompt([c["prompt"][0]], do_classifier_free_guidance=True, num_images_per_prompt=1,
                                         device="cpu", clean_caption=False) for c in conds]  # fmt: skip
                got_ref = k_if(ref, x0, noise, [(e[0], e[1]) for e in emb], (int(ka), int(kb)), w)
            elif name in VP:
                got_ref = k_vp_v(ref, x0, noise, conds, (int(ka), int(kb)))
            elif name == "DanceDiffusionPipeline":
                got_ref = k_dance(ref, x0, noise, (ka / 1000, kb / 1000))  # per unit t = k/T: lipscope's τ
            else:
                side = int(round(x0.shape[1] ** 0.5))
                unpack = (lambda v, s=side: flux2_unpack(v, s, s)) if name == "Flux2Pipeline" else None
                pts = (ka / 1000, kb / 1000)
                got_ref, (ka, kb) = k_flow(ref, x0, noise, conds, pts, unpack, name == "CogView4Pipeline")
        df = probe(m, x0, timesteps=[ka], dt=kb - ka, samples=N, data_range=None)
        got = df.attrs["K_samples"][:, 0]
        tol = _tolerance(m, x0, noise, ka, kb, fp32, out_dtype)
        if name == "CogView4Pipeline":  # its fed time is fitted (a linear-fractional map of σ): add that fit's error
            time = m.conditioning.call.templates[0].time
            fed = [float(time.fed(torch.tensor(k, dtype=torch.float64))) for k in (ka, kb)]
            delta = abs(fed[0] - fed_ref[0]) + abs(fed[1] - fed_ref[1])
            tol = tol + 2 * got_ref.numpy() * delta / abs(fed_ref[1] - fed_ref[0])
        rel = np.abs(got - got_ref.numpy()) / got_ref.numpy()
        print(f"{name} k={ka:.4g}: K={got} ref={got_ref.numpy()} rel={rel} tol_rel={tol / got_ref.numpy()}")
        assert np.all(np.abs(got - got_ref.numpy()) <= tol), (name, ka, got, got_ref, tol)
    if mode == "guided":
        _assert_jvp_is_central_fd(m, x0, 300.5 if name in VP else 1000 * 300 / 1024)
