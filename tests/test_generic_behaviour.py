"""The generic adapter's promises beyond agreement: what it cannot identify is refused in one line naming it (never
probed on a guess), the pipeline is run once per conditioning (capture once per run, not per probe call or grid
point), one condition is served to every row as a view, videos are encoded one at a time (tiled where one does
not fit), and the CLI takes a generic pipeline end to end."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from generic_fixtures import TINY, save_embeds, save_tiny
from safetensors.torch import save_file

from lipscope.errors import InputError
from lipscope.families import generic
from lipscope.families.inputs import Unidentified
from lipscope.loading import load_model
from lipscope.probe import probe


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    d = tmp_path_factory.mktemp("generic-behaviour")
    names = ("Lumina2Pipeline", "QwenImagePipeline", "WanPipeline")
    return {n: (save_tiny(n, d / n), save_embeds(n, d / f"{n}.safetensors")) for n in names}


def _model(folders, name: str, **kw):
    return load_model(str(folders[name][0]), model_args={**TINY[name].call_args, **kw})


def _one_line(e: pytest.ExceptionInfo, *words: str) -> None:
    msg = str(e.value)
    assert "\n" not in msg and all(w in msg for w in words), msg


def test_a_denoiser_fed_a_scaled_latent_is_refused_naming_the_latent(folders, tmp_path):
    """A k-diffusion scheduler scales the latent before the denoiser (scale_model_input): no input equals the
    sample the pipeline steps, so nothing is probed."""
    from diffusers import EulerDiscreteScheduler
    from family_fixtures import save_prompt_embeds, save_sd_pipeline

    folder, emb = save_sd_pipeline(tmp_path / "sd"), save_prompt_embeds(tmp_path / "e.safetensors")
    index = json.loads((folder / "model_index.json").read_text())
    cfg = {**EulerDiscreteScheduler(beta_schedule="scaled_linear").config, "_class_name": "EulerDiscreteScheduler"}
    m = generic.load(str(folder), "unet", cfg, "sd-euler", "cpu", "float32", index=index)
    with pytest.raises(InputError) as e:
        generic.conditioning(m, prompt_embeds=str(emb))
    _one_line(e, "cannot probe StableDiffusionPipeline generically", "no denoiser input equals the sample")


def test_guidance_the_pipeline_does_not_run_is_refused(folders, tmp_path):
    """Qwen-Image runs its true CFG only with negative embeddings: asked for guidance without them, it ran one
    branch and fed the scale to nothing."""
    from safetensors.torch import load_file

    t = {k: v for k, v in load_file(str(folders["QwenImagePipeline"][1])).items() if not k.startswith("negative")}
    save_file(t, str(tmp_path / "pos.safetensors"))
    m = _model(folders, "QwenImagePipeline")
    with pytest.raises(InputError) as e:
        generic.conditioning(m, prompt_embeds=str(tmp_path / "pos.safetensors"), guidance_scale=4.0)
    _one_line(e, "ran no unconditional branch")


def test_a_wrong_prediction_convention_is_caught_by_the_schedulers_own_step(folders):
    """verify_process on a real recording: lipscope's reading of a flow pipeline as a cosine (v) process disagrees
    with the scheduler's step, and says so."""
    from lipscope.families.capture import record
    from lipscope.processes import CosineProcess, FlowProcess

    m = _model(folders, "Lumina2Pipeline")
    pipe = m.net.pipe
    from safetensors.torch import load_file

    t = load_file(str(folders["Lumina2Pipeline"][1]))
    rec = record(pipe, pipe.transformer, {"num_inference_steps": 4, "output_type": "latent", **TINY["Lumina2Pipeline"]
                                          .call_args, **t, "guidance_scale": 4.0})  # fmt: skip
    ks = [s.sigma * 1000 for s in rec.steps]
    right = generic.verify_process(rec, pipe.scheduler, FlowProcess(), ks, generic.next_step(FlowProcess(), 1.0))
    assert right < 1e-5
    with pytest.raises(Unidentified, match="disagrees with lipscope's reading of the output as v_prediction"):
        generic.verify_process(rec, pipe.scheduler, CosineProcess(), ks, generic.next_step(CosineProcess(), 1.0))


def test_training_a_generic_pipeline_is_refused_in_one_line(folders, tmp_path):
    from lipscope.runs import TrainOptions, run_training

    opts = TrainOptions(model=str(folders["WanPipeline"][0]), data="digits", out=str(tmp_path / "ft"))
    with pytest.raises(InputError) as e:
        run_training(opts)
    _one_line(e, "`model` (a WanTransformer3DModel) is probed by the generic adapter", "need a hand-written family")
    assert not (tmp_path / "ft").exists()


def test_cfg_weights_are_the_pipelines_scale_exactly(folders):
    """A scale that is no multiple of 1/8 is still recognised in the fitted combination (w and 1 − w exactly)."""
    m = _model(folders, "WanPipeline")
    info = generic.conditioning(m, prompts=["a cat", "a dog"], guidance_scale=3.3).info
    w = 3.3
    assert info["combination_probed"] == f"({w:g}·R0[0] + {1 - w:g}·R1[0])", info["combination_probed"]


def test_an_unidentified_autoencoder_map_leaves_precomputed_latents(folders, monkeypatch):
    """The denoiser is still probed on latents in its own shape; pixel data is refused with the reason."""
    from lipscope.families import pipecodec

    def fail(*a, **k):
        raise Unidentified("the latents reach vae.decode through more than a permutation and an element-wise scaling")

    monkeypatch.setattr(generic, "identify_codec", fail)
    m = _model(folders, "Lumina2Pipeline")
    cond = generic.conditioning(m, prompt_embeds=str(folders["Lumina2Pipeline"][1]), guidance_scale=4.0)
    mm = dataclasses.replace(m, conditioning=cond)
    assert isinstance(mm.latent, pipecodec.UnidentifiedCodec)
    with pytest.raises(InputError) as e:
        probe(mm, "digits", timesteps=[10], samples=2)
    _one_line(e, "autoencoder map could not be identified (the latents reach vae.decode through more than")
    df = probe(mm, torch.randn(2, *mm.sample_shape).numpy(), timesteps=[10], samples=2)
    assert df.attrs["data_scaling"].source_kind == "latents" and (df["K_mean"] > 0).all()


def test_inputs_that_follow_no_affine_time_are_refused():
    from lipscope.families.capture import Call
    from lipscope.families.inputs import find_timestep

    calls = [Call(i, (torch.ones(1, 2),), {"t": torch.tensor([float(k) ** 2])}) for i, k in enumerate((1, 5, 9))]
    with pytest.raises(Unidentified, match="no denoiser input is constant within a step and affine"):
        find_timestep(calls, [1.0, 5.0, 9.0], ("args", 0), torch.float32)


def test_bad_call_arguments_and_embeddings_are_refused_by_name(folders, tmp_path):
    with pytest.raises(InputError) as e:
        _model(folders, "WanPipeline", no_such_size=3)
    _one_line(e, "`model_args` no_such_size", "WanPipeline")
    save_file({"prompt_embedz": torch.zeros(1, 3, 8)}, str(tmp_path / "bad.safetensors"))
    m = _model(folders, "Lumina2Pipeline")
    with pytest.raises(InputError) as e:
        generic.conditioning(m, prompt_embeds=str(tmp_path / "bad.safetensors"))
    _one_line(e, "`prompt_embeds`: prompt_embedz not Lumina2Pipeline arguments")
    with pytest.raises(InputError) as e:
        generic.conditioning(m, prompt_embeds=str(folders["Lumina2Pipeline"][1]), class_labels=[1])
    _one_line(e, "takes no class labels")


def test_the_pipeline_runs_once_per_conditioning_and_conditions_are_views(folders, monkeypatch):
    """One capture (the recorded call and the four decode-map runs), then no pipeline call however many probes,
    methods and grid points; one condition reaches every row as a broadcast view (stride 0: nothing copied)."""
    import functools

    import diffusers

    calls = []
    orig = diffusers.Lumina2Pipeline.__call__

    @functools.wraps(orig)
    def counted(self, **kw):
        calls.append(1)
        return orig(self, **kw)

    monkeypatch.setattr(diffusers.Lumina2Pipeline, "__call__", counted)
    m = _model(folders, "Lumina2Pipeline")
    from safetensors.torch import load_file

    t = {k: v[:1] for k, v in load_file(str(folders["Lumina2Pipeline"][1])).items()}  # one condition
    cond = generic.conditioning(m, prompt_embeds=t)
    assert len(calls) == 5
    mm = dataclasses.replace(m, conditioning=cond)
    x0 = torch.randn((3, *mm.sample_shape))
    probe(mm, x0, timesteps=[10, 20, 500], method="fd,jvp", samples=3, data_range=None)
    probe(mm, x0, timesteps=[30], samples=3, data_range=None)
    assert len(calls) == 5
    tpl = cond.call.templates[0]
    inputs = tpl.inputs(torch.zeros(4, *mm.sample_shape), torch.full((4,), 10.0), torch.zeros(4, dtype=torch.long),
                        torch.float32)  # fmt: skip
    for path in tpl.batched:
        v = inputs[path[0]][path[1]]
        assert v.shape[0] == 4 and v.stride(0) == 0, path


def test_videos_are_encoded_one_at_a_time_and_tiled_where_one_does_not_fit(folders, monkeypatch):
    m = _model(folders, "WanPipeline")
    cond = generic.conditioning(m, prompts=["a cat"])
    codec = dataclasses.replace(m, conditioning=cond).latent
    assert codec.is_video and codec.pixel_shape == (3, 9, 16, 16)
    seen, tiled = [], []
    orig = codec.vae.encode

    def encode(x, *a, **k):
        seen.append(x.shape[0])
        if len(seen) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return orig(x, *a, **k)

    monkeypatch.setattr(codec.vae, "encode", encode)
    monkeypatch.setattr(codec.vae, "enable_tiling", lambda *a, **k: tiled.append(1))
    z = codec.encode(torch.zeros(2, *codec.pixel_shape))
    assert z.shape == (2, *cond.space.sample_shape) and seen == [1, 1, 1] and tiled == [1]


def test_cli_probes_a_video_pipeline_from_prompts(folders, tmp_path):
    folder = folders["WanPipeline"][0]
    videos = tmp_path / "v.npy"
    np.save(videos, np.random.default_rng(0).uniform(-1, 1, (2, 3, 9, 16, 16)).astype(np.float32))
    args = [f"--model-arg={k}={v}" for k, v in TINY["WanPipeline"].call_args.items()]
    base = [sys.executable, "-m", "lipscope", "probe", "--model", str(folder), *args, "--no-progress"]
    env = {"HF_HUB_OFFLINE": "1", "PATH": "", "COLUMNS": "200", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([*base, "--prompt", "a red car", "--guidance-scale", "5", "--data", str(videos), "--samples",
                        "2", "--timesteps", "10", "--method", "fd,jvp", "--out", str(tmp_path / "r")],
                       capture_output=True, text=True, env=env, timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stderr
    meta = json.loads((tmp_path / "r" / "run.json").read_text())
    c = meta["conditioning"]
    assert c["pipeline"] == "WanPipeline" and c["combination_probed"] == "(5·R0[0] + -4·R1[0])"
    assert meta["model"]["space"]["autoencoder"] == "AutoencoderKLWan"
    r = subprocess.run([*base, "--class-label", "3", "--out", str(tmp_path / "bad")], capture_output=True, text=True,
                       env=env, timeout=600)  # fmt: skip
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "takes no class labels" in r.stderr and not (tmp_path / "bad").exists()
