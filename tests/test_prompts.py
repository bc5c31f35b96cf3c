"""Prompts through the pipelines' own tokenizers and text encoders, and the Flux family.

Independent references (neither imports lipscope): tests/reference_prompts.py calls each pipeline's encode_prompt as
its ``__call__`` does; tests/reference_families*.py and tests/reference_flux.py are per-sample loops written from the
pipelines' denoising calls. Folders are tiny random-weight pipelines saved with ``save_pretrained``
(tests/text_fixtures.py, tests/family_fixtures3.py)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import HANG_S
from family_fixtures import LATENT_SHAPE
from reference_prompts import encode_reference

from lipscope import rng
from lipscope.errors import InputError
from lipscope.families import resolve_conditioning
from lipscope.loading import load_model
from lipscope.probe import probe
from lipscope.prompts import conditioning_for, encode_prompts

U32 = 2.0**-24
GRID = [0, 10, 500]
PROMPTS = ["a photo of a cat", "a red car in the house"]


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    from family_fixtures3 import save_flux_embeds, save_flux_folder
    from text_fixtures import (
        save_flux_text_pipeline,
        save_pixart_text_pipeline,
        save_sd3_text_pipeline,
        save_sd_text_pipeline,
    )

    d = tmp_path_factory.mktemp("text")
    return {
        "sd": save_sd_text_pipeline(d / "sd"),
        "sdxl": save_sd_text_pipeline(d / "sdxl", xl=True),
        "sd3": save_sd3_text_pipeline(d / "sd3"),
        "sd3-no-t5": save_sd3_text_pipeline(d / "sd3-no-t5", with_t5=False),
        "pixart": save_pixart_text_pipeline(d / "pixart"),
        "flux": save_flux_text_pipeline(d / "flux"),
        "flux-schnell": save_flux_folder(d / "flux-schnell", guidance_embeds=False),
        "flux-dev": save_flux_folder(d / "flux-dev"),
        "embeds-flux": save_flux_embeds(d / "flux.safetensors"),
    }


def _latents(n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(5)
    return torch.randn((n, *LATENT_SHAPE), generator=g, dtype=torch.float64)


def _check(m, df, ref_fn, n: int) -> None:
    """lipscope's batched FD equals the per-sample reference within the float32 leaks inside diffusers (the
    schedulers' float32 ᾱ / σ, timestep embeddings): 64·u₃₂·(‖ε_a‖ + ‖ε_b‖)/Δτ, as tests/test_families.py."""
    K = df.attrs["K_samples"]
    x0, noise = _latents(n), rng.noise(0, n, LATENT_SHAPE, dtype=torch.float64)
    for j, k in enumerate(GRID):
        ref = ref_fn(k).numpy()
        kk = torch.tensor(float(k))
        xk = m.schedule.alpha(kk) * x0 + m.schedule.sigma(kk) * noise
        with torch.no_grad():
            scale = sum(torch.linalg.vector_norm(m(xk, float(t)).reshape(n, -1), dim=1) for t in (k, k + 1))
        tol = 64 * U32 * scale.numpy() * m.T
        assert np.all(np.abs(K[:, j] - ref) <= tol), (k, K[:, j], ref, tol)


@pytest.mark.parametrize(
    "kind,negative",
    [("sd", None), ("sd", "a dog"), ("sdxl", None), ("sdxl", "a dog"), ("sd3", None), ("sd3-no-t5", "blurry"),
     ("pixart", None), ("flux", None), ("flux", "blurry")],
)  # fmt: skip
def test_encode_prompts_is_the_pipelines_own_encode_prompt(text, kind, negative):
    enc = encode_prompts(str(text[kind]), PROMPTS, negative)
    ref = encode_reference(text[kind], PROMPTS, negative)
    assert set(enc.tensors) == set(ref), (sorted(enc.tensors), sorted(ref))
    for k, v in ref.items():
        assert torch.equal(enc.tensors[k], v), k
    assert enc.info["prompts"] == PROMPTS and enc.info["negative_prompt"] == negative
    assert enc.info["encoded_by"].endswith("Pipeline.encode_prompt")
    if kind == "sdxl" and negative is None:  # the pipeline's own zeros for an empty negative prompt
        assert not enc.tensors["negative_prompt_embeds"].any()


@pytest.mark.parametrize("kind", ["sd", "sdxl", "sd3", "pixart"])
def test_probe_with_prompts_and_cfg_matches_the_pipeline_loop(text, kind):
    from reference_families import sd_fd_reference, sdxl_time_ids
    from reference_families2 import pixart_fd_reference, sd3_fd_reference

    m = load_model(str(text[kind]), dtype="float64")
    cond = conditioning_for(m, str(text[kind]), prompts=PROMPTS, guidance_scale=3.0)
    assert cond is not None and cond.info["prompts"] == PROMPTS and cond.guidance_scale == 3.0
    df = probe(m, _latents(3), timesteps=GRID, samples=3, data_range=None, conditioning=cond)
    e = encode_reference(text[kind], PROMPTS)
    rows = torch.tensor([0, 1, 0])  # sample i gets prompt i mod 2
    d = {k: (v.double() if v.is_floating_point() else v)[rows] for k, v in e.items()}
    noise = rng.noise(0, 3, LATENT_SHAPE, torch.float64)
    if kind in ("sd", "sdxl"):
        added = neg = None
        if kind == "sdxl":
            ids = sdxl_time_ids(16, 16, torch.float64).expand(3, 6)
            added = {"text_embeds": d["pooled_prompt_embeds"], "time_ids": ids}
            neg = {"text_embeds": d["negative_pooled_prompt_embeds"], "time_ids": ids}

        def ref(k):
            return sd_fd_reference(text[kind], _latents(3), noise, d["prompt_embeds"], d["negative_prompt_embeds"],
                                   k, 1, 3.0, added, neg)  # fmt: skip
    elif kind == "sd3":
        args = [d[k] for k in ("prompt_embeds", "pooled_prompt_embeds", "negative_prompt_embeds")]
        args.append(d["negative_pooled_prompt_embeds"])

        def ref(k):
            return sd3_fd_reference(text[kind], _latents(3), noise, *args, k, 1, guidance_scale=3.0)
    else:
        args = [d[k] for k in ("prompt_embeds", "prompt_attention_mask", "negative_prompt_embeds")]
        args.append(d["negative_prompt_attention_mask"])

        def ref(k):
            return pixart_fd_reference(text[kind], _latents(3), noise, *args, k, 1, guidance_scale=3.0)

    _check(dataclasses.replace(m, conditioning=cond), df, ref, 3)


@pytest.mark.parametrize("kind,w", [("flux-dev", None), ("flux-dev", 1.0), ("flux-schnell", 2.0)])
def test_flux_matches_the_pipeline_loop(text, kind, w):
    """Flux (packed 2×2 latent tokens, image ids, σ fed as timestep/1000): guidance-distilled dev is fed the
    guidance value (default 3.5, no CFG branch); schnell's guidance_scale is true CFG on the negative embeddings."""
    from reference_flux import flux_fd_reference
    from safetensors.torch import load_file

    m = load_model(str(text[kind]), dtype="float64")
    assert m.sample_shape == LATENT_SHAPE and m.latent is not None and m.latent.shift_factor == 0.125
    assert m.schedule.kind == "flow" and m.schedule.describe()["shift"] == "dynamic"
    cond = resolve_conditioning(m, None, str(text["embeds-flux"]), w)
    df = probe(m, _latents(3), timesteps=GRID, samples=3, data_range=None, conditioning=cond)
    e = {k: v.double()[torch.tensor([0, 1, 0])] for k, v in load_file(str(text["embeds-flux"])).items()}
    noise = rng.noise(0, 3, LATENT_SHAPE, torch.float64)
    dev = kind == "flux-dev"
    if dev:
        assert df.attrs["conditioning"]["embedded_guidance"] == (3.5 if w is None else w)

    def ref(k):
        return flux_fd_reference(text[kind], _latents(3), noise, k, 1, e,
                                 guidance_scale=3.5 if w is None else w, true_cfg_scale=None if dev else w)  # fmt: skip

    _check(dataclasses.replace(m, conditioning=cond), df, ref, 3)


def test_jvp_through_flux_with_prompts(text):
    """∂ε/∂t by forward AD through the Flux transformer (rope, packed tokens, guidance embedding) equals the central
    difference, within the Richardson bound and the float32 timestep cast inside diffusers (as test_families)."""
    m = load_model(str(text["flux"]), dtype="float64")
    cond = conditioning_for(m, str(text["flux"]), prompts=PROMPTS)
    assert cond is not None and cond.info["embedded_guidance"] == 3.5 and cond.uncond is None
    from test_families import assert_jvp_is_central_fd

    assert_jvp_is_central_fd(m, cond)


def test_flux_samples_on_the_pipelines_shifted_sigmas(text):
    """Dynamic shift: lipscope's sampler visits exactly the σ FluxPipeline.__call__ sets (calculate_shift on the
    packed token count, retrieve_timesteps with σ from 1 to 1/steps)."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

    from lipscope.sampling import flow_scheduler, sample

    m = load_model(str(text["flux"]))
    cfg = m.scheduler_config
    theirs = FlowMatchEulerDiscreteScheduler.from_config(cfg)
    mu = calculate_shift(4, cfg["base_image_seq_len"], cfg["max_image_seq_len"], cfg["base_shift"], cfg["max_shift"])
    retrieve_timesteps(theirs, 4, "cpu", sigmas=np.linspace(1.0, 1 / 4, 4), mu=mu)
    ours = flow_scheduler("ddim", m, 4)
    assert torch.equal(ours.sigmas, theirs.sigmas) and torch.equal(ours.timesteps, theirs.timesteps)
    cond = conditioning_for(m, str(text["flux"]), prompts=PROMPTS)
    x = sample(dataclasses.replace(m, conditioning=cond), 2, steps=2)
    assert x.shape == (2, *LATENT_SHAPE) and torch.isfinite(x).all()


def test_the_empty_prompt_is_the_default_and_a_hub_cache_entry_encodes_offline(text, tmp_path, monkeypatch):
    """No prompt: the empty prompt, encoded by the pipeline (recorded as such); the folder laid out as a
    Hugging Face cache entry under its real id loads and encodes offline, through the hub code path."""
    from test_models import _hf_cache

    _hf_cache(tmp_path / "hub", "runwayml/stable-diffusion-v1-5", text["sd"], flat=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    m = load_model("runwayml/stable-diffusion-v1-5")
    cond = conditioning_for(m, "runwayml/stable-diffusion-v1-5")
    assert cond is not None and cond.info["conditioning"].startswith("the empty prompt (no text")
    ref = encode_reference(text["sd"], [""])
    assert torch.equal(cond.cond["encoder_hidden_states"], ref["prompt_embeds"])
    df = probe(m, "digits", timesteps="0,10", samples=2, conditioning=cond)
    assert np.isfinite(df["K_mean"]).all()


def test_cli_probe_with_prompts_and_a_prompt_file(text, tmp_path):
    env = {"HF_HUB_OFFLINE": "1", "PATH": "", "COLUMNS": "200"}
    (tmp_path / "p.txt").write_text("a blue house\n\n  a green dog  \n")
    r = subprocess.run(
        [sys.executable, "-m", "lipscope", "probe", "--model", str(text["sdxl"]), "--data", "digits",
         "--prompt", PROMPTS[0], "--prompt-file", str(tmp_path / "p.txt"), "--negative-prompt", "blurry",
         "--guidance-scale", "5", "--samples", "3", "--timesteps", "0,10", "--method", "fd,jvp",
         "--out", str(tmp_path / "r"), "--no-progress"],
        capture_output=True, text=True, env=env, timeout=HANG_S,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    meta = json.loads((tmp_path / "r" / "run.json").read_text())
    c = meta["conditioning"]
    assert c["prompts"] == [PROMPTS[0], "a blue house", "a green dog"] and c["negative_prompt"] == "blurry"
    assert c["guidance_scale"] == 5.0 and c["encoded_by"] == "StableDiffusionXLPipeline.encode_prompt"
    assert meta["options"]["prompt"] == [PROMPTS[0]] and meta["options"]["prompt_file"] == str(tmp_path / "p.txt")


def test_prompt_refusals_are_one_line(text, tmp_path, capfd, monkeypatch):
    from family_fixtures import save_dit_pipeline
    from safetensors.torch import save_file
    from test_bad_inputs import run_inprocess

    dit = save_dit_pipeline(tmp_path / "dit")
    (tmp_path / "empty.txt").write_text("\n \n")
    save_file({"prompt_embeds": torch.zeros(2, 5, 7)}, str(tmp_path / "w.safetensors"))
    base = ["probe", "--data", "digits", "--samples", "2", "--timesteps", "0", "--no-progress"]
    cases = [
        (["--model", "builtin:digits-ddpm", "--prompt", "a cat"], "is unconditional; leave out --prompt"),
        (["--model", str(dit), "--prompt", "a cat"], "is class-conditional: give --class-label"),
        (["--model", str(text["sd"]), "--prompt", "a", "--prompt-embeds", str(text["embeds-flux"])],
         "give --prompt or --prompt-embeds, not both"),
        (["--model", str(text["sd"]), "--prompt-file", str(tmp_path / "empty.txt")], "holds no prompts"),
        (["--model", str(text["sd"]), "--prompt-file", str(tmp_path / "none.txt")], "no such file"),
        (["--model", str(text["flux-dev"]), "--prompt", "a cat"], "has no text encoder"),
        (["--model", str(text["sd"]), "--class-label", "3"], "not --class-label"),
        (["--model", str(text["sd"]), "--prompt-embeds", str(tmp_path / "w.safetensors")], "takes (P, tokens, 16)"),
    ]  # fmt: skip
    monkeypatch.setenv("COLUMNS", "300")
    for i, (args, words) in enumerate(cases):
        out = tmp_path / f"r{i}"
        r = run_inprocess([*base, *args, "--out", str(out)], capfd, monkeypatch)
        assert r.code == 2 and len(r.stderr.strip().splitlines()) == 1, (args, r.stderr, r.exc)
        assert words in r.stderr and not out.exists(), (words, r.stderr)
    # transformers missing: one line naming the extra
    # peft requires transformers: an environment without transformers has no peft either
    code = "import sys; sys.modules['transformers'] = sys.modules['peft'] = None; from lipscope.cli import main; main()"
    env = {"HF_HUB_OFFLINE": "1", "PATH": "", "COLUMNS": "300"}
    r = subprocess.run([sys.executable, "-c", code, "probe", "--model", str(text["sd"]), "--prompt", "a cat",
                        "--out", str(tmp_path / "t")], capture_output=True, text=True, env=env,
                       timeout=HANG_S)  # fmt: skip
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "pip install 'lipscope[text]'" in r.stderr


def test_sample_and_evaluate_text_conditioned_latent_models(text, tmp_path):
    from lipscope.runs import EvaluateOptions, SampleOptions, run_evaluate, run_sample

    meta = run_sample(SampleOptions(model=str(text["flux"]), prompt=(PROMPTS[0],), steps=2, num=2, device="cpu",
                                    out=str(tmp_path / "s")))  # fmt: skip
    z = np.load(tmp_path / "s" / "samples.npz")
    assert z["x0"].shape == (2, *LATENT_SHAPE) and z["images"].shape == (2, 3, 16, 16)
    assert meta["conditioning"]["prompts"] == [PROMPTS[0]]
    res = run_evaluate(
        EvaluateOptions(model=str(text["sd"]), baseline=(str(text["sd3"]),), prompt=tuple(PROMPTS), guidance_scale=2.0,
                        scheduler=("ddim",), steps=(2,), num=3, seeds=1, device="cpu", out=str(tmp_path / "e"))
    )  # fmt: skip
    assert len(res.table) == 2 and np.isfinite(res.table["fd_pixel"]).all()
    assert res.meta["space"]["model"]["space"] == "latent"
    assert res.meta["conditioning"]["baseline"]["encoded_by"] == "StableDiffusion3Pipeline.encode_prompt"


def test_half_precision_weights_are_probed_in_float32(text, tmp_path):
    """A pipeline saved in float16 (as hub fp16 variants are) loads in the probe's float32: same weights, upcast."""
    from diffusers import DiffusionPipeline
    from safetensors.torch import load_file

    pipe = DiffusionPipeline.from_pretrained(text["sd"]).to(torch.float16)
    pipe.save_pretrained(tmp_path / "fp16")
    m = load_model(str(tmp_path / "fp16"))
    assert m.dtype == torch.float32 and next(m.module.parameters()).dtype == torch.float32
    saved = load_file(str(next((tmp_path / "fp16" / "unet").glob("*.safetensors"))))
    assert {v.dtype for v in saved.values()} == {torch.float16}
    for n, a in m.module.state_dict().items():
        assert torch.equal(a, saved[n].float()), n
    cond = conditioning_for(m, str(tmp_path / "fp16"), prompts=PROMPTS)
    df = probe(m, "digits", timesteps="0,10", samples=2, conditioning=cond)
    assert np.isfinite(df["K_mean"]).all()
    with pytest.raises(InputError, match="not both"):
        conditioning_for(m, str(tmp_path / "fp16"), prompts=PROMPTS, prompt_embeds="x.safetensors")
