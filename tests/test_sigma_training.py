"""Training VE (score-SDE) and EDM models, and E-TSDM on their own time axis.

One step's loss against the papers' reference code (tests/reference_sigma_training.py: NVlabs/edm ``EDMLoss`` +
``EDMPrecond``, score_sde's ``get_sde_loss_fn``; lipscope not imported there), the time densities, fine-tunes that
resume bit-exact, the E-TSDM map on σ-fed denoisers (the class's forward, the probe inside and across sub-intervals,
stock diffusers sampling of the saved pipelines) and the refusal of a map written on another axis.

Tolerance of the loss comparisons: the reference runs in float64 (a float64 copy of the network), so its own rounding
is ~1e-16; lipscope's loss is float32: its inputs c_in·x and the time input are rounded once (≤ u₃₂ relative each),
the target F* = (σ/σ_d·x0 − σ_d·ε)/√(σ²+σ_d²) (EDM) or the residual σ·s + ε (VE) is formed without cancellation (a few
u₃₂), and the float32 forward of these tiny networks adds ≲ 1e-6 relative (measured); the mean of squares at most
doubles relative errors. rtol 1e-5 holds on any CPU; a wrong σ, weighting, target or map moves the loss by O(1).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json

import numpy as np
import pytest
import reference_sigma_training as rs
import torch
from process_fixtures import save_edm_folder, save_ve_pipeline
from reference_sigma_sampling import edm_pipeline_reference, ve_pc_reference

from lipscope import rng
from lipscope.errors import InputError
from lipscope.etsdm import Etsdm, etsdm_of
from lipscope.loading import load_model
from lipscope.objectives import EDM_P_MEAN, EDM_P_STD, diffusion_loss, draw_step
from lipscope.probe import probe
from lipscope.processes import etsdm_axis
from lipscope.runs import TrainOptions, run_training
from lipscope.sampling import sample
from lipscope.training import TrainConfig

RTOL = 1e-5
U32 = 2.0**-24


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    d = tmp_path_factory.mktemp("sigma-train")
    return {"ve": save_ve_pipeline(d / "ve", channels=3), "edm": save_edm_folder(d / "edm")}


def _sched_cfg(folder) -> dict:
    return json.loads((folder / "scheduler" / "scheduler_config.json").read_text())


def _batch(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand((4, *shape), generator=g) * 2 - 1, torch.randn((4, *shape), generator=g)


# ---- one step's loss against the papers' code ------------------------------------------------------------------


@pytest.mark.parametrize("etsdm", [None, Etsdm(100.0, 5), Etsdm(500.0, 2)])
@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
def test_edm_loss_is_nvlabs_edmloss(folders, pred, etsdm):
    cfg = dict(_sched_cfg(folders["edm"]), prediction_type=pred)
    m = load_model(str(folders["edm"]), scheduler_config=cfg)
    # σ = 0.0014 (below σ_min: k < 0, first sub-interval), 0.0082 (k ≈ 63), 0.43 (k ≈ 392), 6.0 (k ≈ 774); t̃ = 100:
    # f = 0, 60 (a small change of c_noise), k, k; t̃ = 500, n = 2: f = 0, 0, 250, k
    rnd = torch.tensor([-4.5, -3.0, 0.3, 2.5], dtype=torch.float64)
    sigma = torch.exp(EDM_P_MEAN + EDM_P_STD * rnd)
    t = m.schedule.step_of_sigma(sigma)
    x0, eps = _batch(m.sample_shape, 0)
    ours = diffusion_loss(m.net, x0, t, eps, m.schedule, m.prediction_type, etsdm)
    ref = rs.edm_loss(copy.deepcopy(m.module).double(), x0.double(), eps.double(), rnd, v_prediction=pred != "epsilon",
                      ramp=cfg, etsdm=None if etsdm is None else (etsdm.t_tilde, etsdm.n))  # fmt: skip
    torch.testing.assert_close(ours.double(), ref, rtol=RTOL, atol=0)
    if etsdm is not None:  # the map changes what the network sees, by more than the tolerance (×3 at t̃ = 100)
        plain = diffusion_loss(m.net, x0, t, eps, m.schedule, m.prediction_type, None).detach()
        assert abs(float(plain - ours.detach())) > 3 * RTOL * float(ours.detach())


@pytest.mark.parametrize("etsdm", [None, Etsdm(200.0, 5), Etsdm(1500.0, 3)])
def test_ve_loss_is_score_sde_loss(folders, etsdm):
    m = load_model(str(folders["ve"]))
    p = m.schedule
    # k = 0.04, 94, 1000, 1940: t̃ = 200 maps them to 0, 80, k, k; t̃ = 1500, n = 3 to 0, 0, 1000, k
    t_sde = torch.tensor([2e-5, 0.047, 0.5, 0.97], dtype=torch.float64)
    x0, eps = _batch(m.sample_shape, 1)
    x0 = (x0 + 1) / 2  # VE data in [0, 1]
    ours = diffusion_loss(m.net, x0, t_sde * p.T, eps, p, m.prediction_type, etsdm)
    mapped = None if etsdm is None else (etsdm.t_tilde, etsdm.n)
    ref = rs.ve_loss(copy.deepcopy(m.module).double(), x0.double(), eps.double(), t_sde, sigma_min=p.sigma_min,
                     sigma_max=p.sigma_max, T=p.T, etsdm=mapped)  # fmt: skip
    torch.testing.assert_close(ours.double(), ref, rtol=RTOL, atol=0)
    if etsdm is not None:
        plain = diffusion_loss(m.net, x0, t_sde * p.T, eps, p, m.prediction_type, None).detach()
        assert abs(float(plain - ours.detach())) > 3 * RTOL * float(ours.detach())


def test_time_densities(folders):
    """EDM: ln σ of 20 000 draws has mean −1.2 and std 1.2 (within 4 standard errors: 4·1.2/√n and 4·1.2/√(2n));
    VE: the SDE time k/T is uniform on [eps, 1] (mean ½ within 4·(1/√12)/√n, every draw inside)."""
    n = 20_000
    edm, ve = load_model(str(folders["edm"])).schedule, load_model(str(folders["ve"])).schedule
    b = draw_step(10, (1,), 0, n, edm, seed=4)
    log_sigma = torch.log(edm.sigma(b.t))
    assert abs(float(log_sigma.mean()) - EDM_P_MEAN) < 4 * EDM_P_STD / n**0.5
    assert abs(float(log_sigma.std()) - EDM_P_STD) < 4 * EDM_P_STD / (2 * n) ** 0.5
    u = draw_step(10, (1,), 0, n, ve, seed=4).t / ve.T
    assert float(u.min()) >= ve.sampling_eps and float(u.max()) <= 1
    assert abs(float(u.mean()) - 0.5) < 4 / 12**0.5 / n**0.5


def test_map_below_zero_and_the_axes_round_trip(folders):
    """k < 0 (an EDM σ below σ_min) is in the first sub-interval; fed → k → fed is the identity on every axis (float64,
    k = −3 … 1500); an axis that is not a VE or EDM one is refused."""
    from lipscope.etsdm import etsdm_map, fed_to_step, step_to_fed, with_etsdm
    from lipscope.processes import EDMProcess, VEProcess

    torch.testing.assert_close(etsdm_map(torch.tensor([-30.0, -0.5, 0.0, 19.9]), 100.0, 5), torch.zeros(4))
    k = torch.tensor([-3.0, 0.0, 57.3, 999.0, 1500.0], dtype=torch.float64)
    for p in (VEProcess(), EDMProcess(), EDMProcess(ramp="exponential"), EDMProcess(rho=3.0, sigma_max=10.0)):
        axis = etsdm_axis(p)
        torch.testing.assert_close(step_to_fed(k, axis), p.condition(k), rtol=1e-14, atol=0)  # what it is fed
        torch.testing.assert_close(fed_to_step(step_to_fed(k, axis), axis), k, rtol=1e-11, atol=1e-9)
    with pytest.raises(InputError, match="`axis`"):
        with_etsdm(load_model(str(folders["edm"])).module, 100.0, 5, axis={"process": "vp", "T": 1000})


# ---- fine-tunes ----------------------------------------------------------------------------------------------------


def _finetune(folder, out, *, steps=4, stop_after=None, resume=False, etsdm=True, t_tilde=None):
    cfg = TrainConfig(steps=steps, batch_size=4, warmup_steps=0, checkpoint_every=2, etsdm=etsdm, seed=3, lr=1e-3,
                      ema_decay=0.5, t_tilde=t_tilde)  # fmt: skip
    opts = TrainOptions(model=str(folder), data="digits", out=str(out), training=cfg, resume=resume)
    if stop_after is None:
        return run_training(opts)
    from lipscope.runs import train as rtrain

    with pytest.MonkeyPatch.context() as mp:  # the Python loop's stop (what a killed run leaves)
        mp.setattr(rtrain, "train_loop", functools.partial(rtrain.train_loop, stop_after=stop_after))
        return run_training(opts)


@pytest.fixture(scope="module")
def runs(folders, tmp_path_factory):
    """E-TSDM fine-tunes of both (4 steps, t̃ = 0.1·T): uninterrupted, and cut after 2 steps then resumed."""
    root = tmp_path_factory.mktemp("sigma-runs")
    out = {}
    for kind in ("ve", "edm"):
        out[kind] = root / f"{kind}-full"
        out[f"{kind}-result"] = _finetune(folders[kind], out[kind])
        _finetune(folders[kind], root / f"{kind}-cut", stop_after=2)
        out[f"{kind}-resumed"] = _finetune(folders[kind], root / f"{kind}-cut", resume=True)
        out[f"{kind}-cut"] = root / f"{kind}-cut"
    return out


@pytest.mark.parametrize("kind", ["ve", "edm"])
def test_finetune_is_finite_and_resumes_bit_exact(runs, kind):
    full, cut = runs[kind], runs[f"{kind}-cut"]
    res = runs[f"{kind}-result"]
    assert (full / "loss.csv").read_text() == (cut / "loss.csv").read_text()
    losses = np.loadtxt(full / "loss.csv", delimiter=",", skiprows=1)[:, 1]
    assert len(losses) == 4 and np.isfinite(losses).all() and (losses > 0).all()
    assert res["final_loss_mean_last_100"] == runs[f"{kind}-resumed"]["final_loss_mean_last_100"]
    a, b = load_model(str(full)).module.state_dict(), load_model(str(cut)).module.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rec = json.loads((full / "train.json").read_text())
    assert (
        rec["process"]["process"] == kind and ("score_sde" if kind == "ve" else "EDMLoss") in rec["loss"]["weighting"]
    )


@pytest.mark.parametrize("kind", ["ve", "edm"])
def test_etsdm_reloads_on_its_process_axis(runs, kind):
    m = load_model(str(runs[kind]))
    T = m.T
    assert etsdm_of(m.module) == Etsdm(0.1 * T, 5) and m.etsdm == Etsdm(0.1 * T, 5)
    assert dict(m.module.config.etsdm_axis) == etsdm_axis(m.schedule)
    # the mapped forward (fed what the pipeline feeds: σ for VE, c_noise = ¼ ln σ for EDM) = the map-free forward
    # at f(k): k = 57 → f = 40 (VE t̃ = 200: width 40; EDM t̃ = 100: width 20 → 40)
    fed = lambda k: m.schedule.condition(torch.tensor([float(k)], dtype=torch.float64)).float()  # noqa: E731
    x = torch.randn(1, *m.sample_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(m.module(x, fed(57)).sample, m.module.forward_condition(x, fed(40)).sample,
                                   rtol=0, atol=0)  # fmt: skip
        assert m.module.condition(fed(0.1 * T + 7)) == fed(0.1 * T + 7)  # identity above t̃


def test_etsdm_probe_ve_is_flat_inside_sub_intervals(runs):
    """VE's network output is the score, fed σ(f(k)) and x unscaled: exactly constant inside each sub-interval."""
    m = load_model(str(runs["ve"]))
    df = probe(m, "digits", timesteps=np.arange(0.0, 205.0, 1.0), dt=1.0, samples=2, target="score")
    inside = df[~df["crosses_boundary"] & (df["t"] < 199)]
    assert len(inside) == 195 and (inside["K_mean"] == 0).all()  # no tolerance: f is constant
    crossing = df[df["crosses_boundary"]]
    assert sorted(crossing["t"]) == [39.0, 79.0, 119.0, 159.0, 199.0] and (crossing["K_mean"] > 0).all()


def test_etsdm_probe_edm_inside_is_the_preconditioning_alone(runs):
    """EDM feeds the network c_in(σ)·x and c_noise(σ(f(k))), and combines x̂0 = c_skip x + c_out F at the true σ, as
    its pipelines do: inside a sub-interval only that analytic σ-dependence is left. The probe there equals a
    per-sample loop written from EDMEulerScheduler's precondition_* with the UNet's time input held at
    precondition_noise(σ(f(k))) (float64 both; tolerance as tests/test_processes.py's: 8·u₃₂·(‖ε_a‖+‖ε_b‖)·T, the
    positional embedding's float32 cast), and K jumps at every boundary, above twice the largest K inside."""
    from diffusers import EDMEulerScheduler
    from reference_processes import edm_sigma

    m = load_model(str(runs["edm"]), dtype="float64")
    sched = EDMEulerScheduler.from_pretrained(runs["edm"] / "pipeline" / "scheduler")
    unet = copy.deepcopy(m.module).double()
    n, T, grid = 2, m.T, [3, 25, 47, 19, 39, 99]
    x0 = torch.rand((n, *m.sample_shape), generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 2 - 1
    df = probe(m, x0, timesteps=grid, dt=1.0, samples=n, data_range=None)
    K = df.set_index("t")
    noise = rng.noise(0, n, tuple(m.sample_shape), dtype=torch.float64)
    for k in (3, 25, 47):
        ref, scale = [], []
        for i in range(n):
            x = x0[i : i + 1] + edm_sigma(sched, k) * noise[i : i + 1]
            eps = []
            for kk in (k, k + 1):
                s, s_fed = edm_sigma(sched, kk), edm_sigma(sched, 20 * (kk // 20))
                with torch.no_grad():
                    out = unet(sched.precondition_inputs(x, s), sched.precondition_noise(s_fed.reshape(1))).sample
                eps.append((x - sched.precondition_outputs(x, out, s)) / s)
            ref.append(float(torch.linalg.vector_norm(eps[1] - eps[0]) * T))
            scale.append(float(sum(torch.linalg.vector_norm(e) for e in eps)))
        got = df.attrs["K_samples"][:, sorted(grid).index(k)]
        assert np.all(np.abs(got - np.array(ref)) <= 8 * U32 * np.array(scale) * T), (k, got, ref)
    assert (
        not K.loc[[3.0, 25.0, 47.0], "crosses_boundary"].any() and K.loc[[19.0, 39.0, 99.0], "crosses_boundary"].all()
    )
    # the network's own jump adds to it at each boundary (this random UNet barely feeds on c_noise: measured 4.3×)
    assert K.loc[[19.0, 39.0, 99.0], "K_mean"].min() > 2 * K.loc[[3.0, 25.0, 47.0], "K_mean"].max()


@pytest.mark.parametrize("kind", ["ve", "edm"])
def test_stock_diffusers_samples_the_saved_etsdm_pipeline_as_lipscope_does(runs, kind):
    """The saved pipeline in stock diffusers (after ``import lipscope.etsdm``): ScoreSdeVePipeline's loop (VE) or the
    EDM pipelines' loop (EDM) on its E-TSDM UNet, whose forward maps the σ / c_noise it is fed, equals lipscope's
    sampler (which maps k itself); tolerance as in tests/test_sigma_sampling.py."""
    from diffusers import DiffusionPipeline

    import lipscope.etsdm  # noqa: F401

    pipe = DiffusionPipeline.from_pretrained(str(runs[kind] / "pipeline"))
    assert type(pipe.unet).__name__ == "ETSDMUNet2DModel"
    assert type(pipe).__name__ == ("ScoreSdeVePipeline" if kind == "ve" else "DDPMPipeline")
    m = dataclasses.replace(load_model(str(runs[kind])), data_range=None)
    steps, name = 5, "pc" if kind == "ve" else "ddim"
    x = sample(m, 1, scheduler=name, steps=steps, seed=0)
    x_unit = rng.normal(0, rng.Stream.SAMPLER_INIT, 1, tuple(m.sample_shape))
    if kind == "ve":
        ref = ve_pc_reference(pipe.unet, pipe.scheduler, x_unit, rng.generator(0, rng.Stream.SAMPLER_STEP, 0), steps)
    else:
        ref = edm_pipeline_reference(pipe.unet, pipe.scheduler, x_unit, steps)
    assert (x - ref).abs().max().item() <= 16 * steps * U32 * ref.abs().max().item()


def test_a_map_on_another_axis_is_refused(runs, folders):
    """An E-TSDM VE denoiser read with another σ range (or an EDM scheduler) would be mapped on a different axis by
    lipscope than by its own forward: refused in one line."""
    cfg = dict(_sched_cfg(folders["ve"]), sigma_max=80.0)
    with pytest.raises(InputError, match="its E-TSDM map is written on a ve axis"):
        load_model(str(runs["ve"]), scheduler_config=cfg)
    with pytest.raises(InputError, match="needs the edm axis"):
        load_model(str(runs["ve"]), scheduler_config=_sched_cfg(folders["edm"]))


def test_train_from_config_writes_a_score_sde_pipeline(folders, tmp_path):
    opts = TrainOptions(config=str(folders["ve"] / "unet" / "config.json"), data="digits", out=str(tmp_path / "r"),
                        scheduler_config=str(folders["ve"] / "scheduler" / "scheduler_config.json"),
                        training=TrainConfig(steps=1, batch_size=2, warmup_steps=0))  # fmt: skip
    res = run_training(opts)
    assert res["process"]["process"] == "ve" and np.isfinite(res["final_loss_mean_last_100"])
    index = json.loads((tmp_path / "r" / "pipeline" / "model_index.json").read_text())
    assert index["_class_name"] == "ScoreSdeVePipeline" and load_model(str(tmp_path / "r")).schedule.kind == "ve"


@pytest.mark.parametrize("lora", [False, True])
def test_sdxl_edm_finetune_with_etsdm_full_and_lora(tmp_path, lora):
    """Playground v2.5's layout (SDXL + ``EDMDPMSolverMultistepScheduler``) fine-tunes with the EDM loss, full or
    LoRA, under E-TSDM; the map's EDM axis survives the save (the UNet's config, or the LoRA's metadata) and the
    reloaded class maps the c_noise its pipeline feeds."""
    from diffusers import EDMDPMSolverMultistepScheduler
    from text_fixtures import save_sd_text_pipeline

    folder = save_sd_text_pipeline(tmp_path / "sdxl", xl=True)
    EDMDPMSolverMultistepScheduler().save_pretrained(folder / "scheduler")
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(
        json.dumps({**index, "scheduler": ["diffusers", "EDMDPMSolverMultistepScheduler"]})
    )
    cfg = TrainConfig(steps=2, batch_size=2, warmup_steps=0, etsdm=True, lora=lora, seed=1)
    res = run_training(TrainOptions(model=str(folder), data="digits", out=str(tmp_path / "run"), training=cfg))
    assert np.isfinite(res["final_loss_mean_last_100"]) and "EDMLoss" in res["loss"]["weighting"]
    m = load_model(str(tmp_path / "run"))
    assert m.etsdm == Etsdm(100.0, 5) and dict(m.module.config.etsdm_axis) == etsdm_axis(m.schedule)
    c57, c40 = (m.schedule.condition(torch.tensor([k], dtype=torch.float64)).float() for k in (57.0, 40.0))
    torch.testing.assert_close(m.module.condition(c57), c40, rtol=0, atol=0)
