"""Sampling VE (score-SDE) and EDM models: lipscope's samplers against brute-force loops written from diffusers' own
pipeline and scheduler calls (tests/reference_sigma_sampling.py, which does not import lipscope), the ODE samplers on
Gaussian data against the closed-form solution, and `--data model`, `sample` and `evaluate` end to end."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from process_fixtures import save_edm_folder, save_ve_pipeline
from reference_sigma_sampling import (
    edm_pipeline_reference,
    pipeline_call_equals_reference,
    ve_ode_reference,
    ve_pc_reference,
)

from lipscope import rng
from lipscope.errors import InputError
from lipscope.gaussian import GaussianMixture, gaussian_eps_model
from lipscope.loading import load_model
from lipscope.processes import EDMProcess, VEProcess
from lipscope.sampling import sample
from lipscope.sigma_samplers import make_sigma_scheduler

U32 = 2.0**-24
STEPS = 6


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    d = tmp_path_factory.mktemp("sigma")
    return {"ve": save_ve_pipeline(d / "ve", channels=3), "edm": save_edm_folder(d / "edm")}


def test_reference_is_the_pipeline_call(folders):
    """ve_pc_reference is ScoreSdeVePipeline.__call__ itself: on the pipeline's own generator it gives its image to
    the bit (so the loop below is the pipeline's, with lipscope's seeds handed in)."""
    from diffusers import ScoreSdeVePipeline

    assert pipeline_call_equals_reference(ScoreSdeVePipeline.from_pretrained(folders["ve"]), seed=3, steps=4) == 0.0


def _ode_scheduler(kind, name, folder):
    from diffusers import EDMDPMSolverMultistepScheduler, EDMEulerScheduler

    cls = EDMEulerScheduler if name == "ddim" else EDMDPMSolverMultistepScheduler
    extra = {} if name == "ddim" else {"algorithm_type": "dpmsolver++", "solver_order": 2}
    if kind == "ve":  # the VE's σ range on the geometric (exponential) ramp its SDE time visits
        cfg = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
        return cls(sigma_min=cfg["sigma_min"], sigma_max=cfg["sigma_max"], sigma_schedule="exponential",
                   num_train_timesteps=cfg["num_train_timesteps"], **extra)  # fmt: skip
    return cls.from_pretrained(folder / "scheduler", **extra)  # the EDM model's own config


@pytest.mark.parametrize(("kind", "name"), [("ve", "pc"), ("ve", "ddim"), ("ve", "dpmsolver"), ("edm", "ddim"),
                                            ("edm", "dpmsolver")])  # fmt: skip
def test_samplers_match_diffusers_loops(folders, kind, name):
    """lipscope's batched sampler = the per-sample loop of diffusers' pipeline calls on the raw UNet, same initial
    noise and (PC) the same per-sample generator, float32 both.

    The two differ only in rounding: the network's σ input goes through lipscope's float32 model step k(σ) (σ moves
    by ≤ ln(σ_max/σ_min)·u₃₂ for VE, ≤ ρ·u₃₂ for EDM), and x̂0 is formed through ε (lipscope) or directly (the
    reference): a few u₃₂ of the state's magnitude per step. Allowed: 16·steps·u₃₂·max|x| (a few roundings per
    step, amplified at most ~2× by these tiny networks); measured ≤ 0.19 of it. A wrong σ, scaling or step is O(1)."""
    from diffusers import UNet2DModel

    folder = folders[kind]
    unet = UNet2DModel.from_pretrained(folder / "unet")
    model = dataclasses.replace(load_model(str(folder)), data_range=None)  # unclamped, to compare every value
    n = 2
    x = sample(model, n, scheduler=name, steps=STEPS, seed=0, batch_size=n)
    x_unit = rng.normal(0, rng.Stream.SAMPLER_INIT, n, tuple(model.sample_shape))
    for i in range(n):
        if name == "pc":
            from diffusers import ScoreSdeVeScheduler

            sched = ScoreSdeVeScheduler.from_pretrained(folder / "scheduler")
            g = rng.generator(0, rng.Stream.SAMPLER_STEP, i)
            ref = ve_pc_reference(unet, sched, x_unit[i : i + 1], g, STEPS)
        elif kind == "ve":
            ref = ve_ode_reference(unet, _ode_scheduler(kind, name, folder), x_unit[i : i + 1], STEPS)
        else:
            ref = edm_pipeline_reference(unet, _ode_scheduler(kind, name, folder), x_unit[i : i + 1], STEPS)
        diff, scale = (x[i] - ref[0]).abs().max().item(), ref.abs().max().item()
        assert diff <= 16 * STEPS * U32 * scale, (kind, name, i, diff, scale)


def test_pc_samples_do_not_depend_on_the_batch(folders):
    """The corrector runs on each sample alone: a sample drawn in a batch of 3 equals it drawn alone (to the
    float32 noise of batched network calls), while diffusers' batch-averaged step size would couple them."""
    model = dataclasses.replace(load_model(str(folders["ve"])), data_range=None)
    together = sample(model, 3, scheduler="pc", steps=4, seed=1, batch_size=3)
    alone = sample(model, 3, scheduler="pc", steps=4, seed=1, batch_size=1)
    scale = together.abs().max().item()
    assert (together - alone).abs().max().item() <= 64 * U32 * scale
    # what the batch-averaged corrector step (diffusers' step_correct on the whole batch) does to the same samples
    sched = make_sigma_scheduler("pc", model, 4)
    score = torch.randn(3, *model.sample_shape) * torch.tensor([1.0, 10.0, 100.0]).reshape(3, 1, 1, 1)
    x = torch.zeros(3, *model.sample_shape)
    batch = sched.step_correct(score, x, generator=torch.Generator().manual_seed(0)).prev_sample
    one = sched.step_correct(score[:1], x[:1], generator=torch.Generator().manual_seed(0)).prev_sample
    assert (batch[:1] - one).abs().max() > 1e-3 * one.abs().max()


def test_pc_follows_the_process_of_a_model_built_in_python():
    """A VE process built in Python has no ScoreSdeVeScheduler config: PC takes σ range, T and eps from the process
    (not the class defaults, σ_max = 1348); snr and correct_steps from a config that has them."""
    g = GaussianMixture.gaussian(torch.zeros(2), torch.ones(2))
    m = gaussian_eps_model(g, VEProcess(steps=1000, sigma_min=0.01, sigma_max=50.0, sampling_eps=1e-3))
    s = make_sigma_scheduler("pc", m, 10)
    assert (s.config.sigma_max, s.config.num_train_timesteps, s.config.sampling_eps) == (50.0, 1000, 1e-3)
    assert s.init_noise_sigma == 50.0 and abs(float(s.sigmas[0]) - 50.0) < 1e-4
    m2 = dataclasses.replace(m, scheduler_config={"_class_name": "ScoreSdeVeScheduler", "snr": 0.2, "correct_steps": 2})
    assert make_sigma_scheduler("pc", m2, 10).config.correct_steps == 2


GAUSS = {
    "ve": VEProcess(sigma_min=0.01, sigma_max=50.0),
    "edm-karras": EDMProcess(),
    "edm-exponential": EDMProcess(ramp="exponential"),
}


@pytest.mark.parametrize(("name", "order"), [("ddim", 1), ("dpmsolver", 2)])
@pytest.mark.parametrize("process", list(GAUSS))
def test_ode_samplers_converge_to_the_gaussian_closed_form(process, name, order):
    """On x0 ~ N(μ, diag(s²)) the probability-flow ODE (α = 1) is solved in closed form: x(σ) − μ =
    √(s²+σ²)/√(s²+σ_T²)·(x_T − μ). The samplers integrate it from σ_T = σ_max to σ_min and end with the exact
    denoiser x̂0 = μ + s²/(s²+σ_min²)·(x − μ) (the last step, to σ = 0), so their exact endpoint is
    μ + s²/(√(s²+σ_min²)√(s²+σ_T²))·(x_T − μ). Driven by the closed-form ε*, the error must shrink at the
    solver's order p (×2^p per doubling of steps, within 15 %) and equal its Richardson estimate
    |x_N − x_2N|/(2^p − 1) within 25 %; float32 rounding inside the schedulers (~1e-6) is far below the errors
    (≥ 1e-4 at these step counts)."""
    mu, var = torch.tensor([0.5, -0.25, 0.0]), torch.tensor([0.3, 1.5, 0.05])
    g = GaussianMixture.gaussian(mu, var)
    model = gaussian_eps_model(g, GAUSS[process])
    n = 4
    x_unit = rng.normal(0, rng.Stream.SAMPLER_INIT, n, g.shape).double()
    errs, xs = [], []
    for steps in (64, 128):
        sched = make_sigma_scheduler(name, model, steps)
        s_t, s_min = float(sched.sigmas[0]), float(sched.sigmas[-2])
        x_t = x_unit * float(sched.init_noise_sigma)
        exact = mu + var / torch.sqrt((var + s_min**2) * (var + s_t**2)) * (x_t - mu)
        xs.append(sample(model, n, scheduler=name, steps=steps, seed=0).double())
        errs.append((xs[-1] - exact).abs().max().item())
    ratio, richardson = errs[0] / errs[1], (xs[0] - xs[1]).abs().max().item() / (2**order - 1)
    assert abs(ratio / 2**order - 1) <= 0.15, (errs, ratio)
    assert abs(errs[1] / richardson - 1) <= 0.25, (errs, richardson)


def test_model_data_sample_and_evaluate(folders, tmp_path):
    """`--data model`, `sample` and `evaluate` for VE and EDM models; VE samples live in [0, 1] (the pipeline's
    range) and are shown as images in [−1, 1]; a sampler the process lacks is refused in one line before any work."""
    from lipscope.probe import probe
    from lipscope.runs import EvaluateOptions, SampleOptions, run_evaluate, run_sample

    ve1 = save_ve_pipeline(tmp_path / "ve1")  # 1 channel, as the digits features take
    for spec in (str(ve1), str(folders["edm"])):
        m = load_model(spec)
        df = probe(m, "model", timesteps="0,10", samples=3)
        assert np.isfinite(df["K_mean"]).all() and (df["K_mean"] > 0).all()
    meta = run_sample(SampleOptions(model=str(ve1), scheduler="pc", steps=3, num=4, device="cpu",
                                    out=str(tmp_path / "s")))  # fmt: skip
    with np.load(tmp_path / "s" / "samples.npz") as z:
        x0 = z["x0"]
    assert (
        meta["options"]["scheduler"] == "pc"
        and x0.min() >= 0
        and x0.max() <= 1
        and (tmp_path / "s" / "samples.png").is_file()
    )
    res = run_evaluate(EvaluateOptions(model=str(folders["edm"]), baseline=(str(ve1),), scheduler=("ddim", "dpmsolver"),
                                       steps=(2,), num=6, seeds=1, device="cpu", out=str(tmp_path / "e")))  # fmt: skip
    assert len(res.table) == 4 and np.isfinite(res.table["fd_pixel"]).all()
    with pytest.raises(InputError, match="`scheduler` pc: this edm model samples with ddim, dpmsolver"):
        run_evaluate(EvaluateOptions(model=str(folders["edm"]), scheduler=("ddim", "pc"), steps=(2,), num=6, seeds=1,
                                     device="cpu", out=str(tmp_path / "e2")))  # fmt: skip
    assert not (tmp_path / "e2" / "eval.csv").exists()
    with pytest.raises(InputError, match="`scheduler` ddpm: this ve model samples with pc, ddim"):
        sample(load_model(str(ve1)), 2, scheduler="ddpm", steps=2)


@pytest.mark.parametrize("name", ["ddim", "dpmsolver"])
def test_sdxl_with_an_edm_scheduler_samples_as_its_pipeline(tmp_path, name):
    """Playground v2.5's layout: ``StableDiffusionXLPipeline`` with ``EDMDPMSolverMultistepScheduler`` (its config:
    the class defaults) or ``EDMEulerScheduler``. lipscope's sampler with a prompt and CFG w = 3 equals the pipeline's
    own ``__call__`` (``output_type="latent"``) from the same initial latents. Tolerance as above, times the guidance's
    amplification of each branch's rounding, |1 − w| + |w| = 5 (measured ≤ 0.11 of it)."""
    from diffusers import EDMDPMSolverMultistepScheduler, EDMEulerScheduler, StableDiffusionXLPipeline
    from text_fixtures import save_sd_text_pipeline

    from lipscope.prompts import conditioning_for

    folder = save_sd_text_pipeline(tmp_path / "sdxl", xl=True)
    cls = EDMEulerScheduler if name == "ddim" else EDMDPMSolverMultistepScheduler
    cls().save_pretrained(folder / "scheduler")
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "scheduler": ["diffusers", cls.__name__]}))
    m = load_model(str(folder))
    assert m.schedule.kind == "edm"
    prompt = "a photo of a cat"
    cond = conditioning_for(m, str(folder), prompts=[prompt], guidance_scale=3.0)
    x = sample(dataclasses.replace(m, conditioning=cond), 1, scheduler=name, steps=STEPS, seed=0)
    x_unit = rng.normal(0, rng.Stream.SAMPLER_INIT, 1, tuple(m.sample_shape))
    pipe = StableDiffusionXLPipeline.from_pretrained(folder)
    assert type(pipe.scheduler) is cls
    with torch.no_grad():
        ref = pipe(prompt=prompt, num_inference_steps=STEPS, guidance_scale=3.0, latents=x_unit.clone(),
                   output_type="latent").images  # fmt: skip
    diff, scale = (x - ref).abs().max().item(), ref.abs().max().item()
    assert diff <= (abs(1 - 3.0) + 3.0) * 16 * STEPS * U32 * scale, (diff, scale)
