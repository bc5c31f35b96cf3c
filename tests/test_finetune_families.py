"""E-TSDM fine-tuning for every family: the loss against diffusers' own training recipes (tests/reference_training.py,
written from diffusers' example scripts), tiny SD / DiT / SD3 / Flux pipelines fine-tuned a few steps with and
without E-TSDM, full and LoRA, bit-exact resume, reload in lipscope and in stock diffusers, and the probe exactly
flat inside each sub-interval with its boundaries flagged.

Tolerance of the loss comparisons: both sides run the same network on x_t whose coefficients differ only by float32
rounding (lipscope: α, σ in float64 rounded once; diffusers: ``sqrt`` of float32 ``alphas_cumprod``, σ = t/1000 vs
the scheduler's float32 σ), a relative input change of a few ulp (≈ 1e-7); through a tiny network of Lipschitz
constant O(1) and a mean of squares that moves the loss by at most ~10 ulp relative. rtol 1e-5 (≈ 80 ulp) holds on
any CPU; a wrong target, map or time would move the loss by O(1).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import reference_training as rt
import torch
from conftest import HANG_S
from family_fixtures import save_dit_pipeline
from PIL import Image
from text_fixtures import (
    save_flux_text_pipeline,
    save_pixart_text_pipeline,
    save_sd3_text_pipeline,
    save_sd_text_pipeline,
)

from lipscope import load_model, probe
from lipscope.captions import read_captions
from lipscope.errors import InputError
from lipscope.etsdm import Etsdm, etsdm_of
from lipscope.objectives import diffusion_loss, flow_grid
from lipscope.prompts import conditioning_for, encode_prompts
from lipscope.runs import TrainOptions, run_training
from lipscope.training import TrainConfig

RTOL = 1e-5
ET = Etsdm(100.0, 5)


@pytest.fixture(scope="module")
def pipes(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pipes")
    out = {
        "sd": save_sd_text_pipeline(root / "sd"),
        "sd3": save_sd3_text_pipeline(root / "sd3"),
        "flux": save_flux_text_pipeline(root / "flux"),
        "dit": save_dit_pipeline(root / "dit"),
        "pixart": save_pixart_text_pipeline(root / "pixart"),
    }
    imgs = root / "imgs"
    imgs.mkdir()
    rs = np.random.default_rng(0)
    lines = []
    for i in range(6):
        Image.fromarray(rs.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(imgs / f"im{i}.png")
        lines.append(json.dumps({"file_name": f"im{i}.png", "text": ["a red cat", "a blue dog"][i % 2]}))
    (root / "caps.jsonl").write_text("\n".join(lines) + "\n")
    out["imgs"], out["caps"] = imgs, root / "caps.jsonl"
    return out


def _draws(shape, seed=0, t=(3.0, 57.0, 99.0, 450.0)):
    g = torch.Generator().manual_seed(seed)
    b = len(t)
    return torch.randn((b, *shape), generator=g), torch.randn((b, *shape), generator=g), torch.tensor(t)


# ---- one step's loss against diffusers' recipes ------------------------------------------------------------------


@pytest.mark.parametrize("etsdm", [None, ET])
def test_sd_loss_is_train_text_to_image_loss(pipes, etsdm):
    from diffusers import DDPMScheduler

    m = load_model(str(pipes["sd"]))
    x0, eps, t = _draws(m.sample_shape)
    emb = encode_prompts(str(pipes["sd"]), ["a red cat"] * 4).tensors["prompt_embeds"].clone()
    ours = diffusion_loss(m.net, x0, t, eps, m.schedule, m.prediction_type, etsdm, encoder_hidden_states=emb)
    sched = DDPMScheduler.from_config(m.scheduler_config)
    ref = rt.sd_loss(m.module, sched, x0, eps, t.long(), emb, etsdm=(100.0, 5) if etsdm else None)
    torch.testing.assert_close(ours, ref, rtol=RTOL, atol=0)
    if etsdm is not None:  # the map changes what the network sees below t̃ (t = 3, 57, 99 → 0, 40, 80)
        plain = diffusion_loss(m.net, x0, t, eps, m.schedule, m.prediction_type, None, encoder_hidden_states=emb)
        assert abs(float((plain - ours).detach())) > 1e-4


def test_dit_loss_is_the_epsilon_half(pipes):
    from diffusers import DDPMScheduler

    m = load_model(str(pipes["dit"]))
    x0, eps, t = _draws(m.sample_shape, seed=1)
    labels = torch.tensor([1, 2, 3, 0])
    ours = diffusion_loss(m.net, x0, t, eps, m.schedule, m.prediction_type, ET, class_labels=labels)
    ref = rt.dit_loss(m.module, DDPMScheduler.from_config(m.scheduler_config), x0, eps, t.long(), labels, (100.0, 5))
    torch.testing.assert_close(ours, ref, rtol=RTOL, atol=0)


@pytest.mark.parametrize("weighting", ["none", "sigma_sqrt"])
@pytest.mark.parametrize("etsdm", [None, ET])
def test_sd3_loss_is_train_dreambooth_sd3_loss(pipes, weighting, etsdm):
    from diffusers import FlowMatchEulerDiscreteScheduler

    m = load_model(str(pipes["sd3"]))
    grid = flow_grid(m.scheduler_config)
    u = torch.tensor([0.999, 0.98, 0.97, 0.4])  # near σ = 0 (below t̃ after the shift) and one mid-range
    t = grid[(u * len(grid)).long()]
    x0, eps, _ = _draws(m.sample_shape, seed=2)
    enc = {k: v.clone() for k, v in encode_prompts(str(pipes["sd3"]), ["a red cat"] * 4).tensors.items()}
    kw = {"encoder_hidden_states": enc["prompt_embeds"], "pooled_projections": enc["pooled_prompt_embeds"]}
    ours = diffusion_loss(m.net, x0, t, eps, m.schedule, m.prediction_type, etsdm, weighting=weighting, **kw)
    sched = FlowMatchEulerDiscreteScheduler.from_config(m.scheduler_config)
    ref = rt.sd3_loss(m.module, sched, x0, eps, u, enc["prompt_embeds"], enc["pooled_prompt_embeds"],
                      weighting_scheme=weighting, etsdm=(100.0, 5) if etsdm else None)  # fmt: skip
    torch.testing.assert_close(ours, ref, rtol=RTOL, atol=0)
    assert (t[:3] < 100).all()  # the map acts on these steps: σ·1000 after the shift


def test_flux_loss_is_train_dreambooth_flux_loss(pipes):
    from diffusers import FlowMatchEulerDiscreteScheduler

    m = load_model(str(pipes["flux"]))
    grid = flow_grid(m.scheduler_config)
    u = torch.tensor([0.999, 0.97, 0.5, 0.1])
    t = grid[(u * len(grid)).long()]
    x0, eps, _ = _draws(m.sample_shape, seed=3)
    enc = {k: v.clone() for k, v in encode_prompts(str(pipes["flux"]), ["a red cat"] * 4).tensors.items()}
    kw = {"encoder_hidden_states": enc["prompt_embeds"], "pooled_projections": enc["pooled_prompt_embeds"],
          "guidance": torch.full((4,), 3.5)}  # fmt: skip
    ours = diffusion_loss(m.net, x0, t, eps, m.schedule, m.prediction_type, ET, **kw)
    sched = FlowMatchEulerDiscreteScheduler.from_config(m.scheduler_config)
    ref = rt.flux_loss(m.module, sched, x0, eps, u, enc["prompt_embeds"], enc["pooled_prompt_embeds"], guidance=3.5,
                       etsdm=(100.0, 5))  # fmt: skip
    torch.testing.assert_close(ours, ref, rtol=RTOL, atol=0)


# ---- fine-tunes ----------------------------------------------------------------------------------------------------


def _finetune(pipes, fam, out, *, etsdm=True, lora=False, steps=3, stop_after=None, resume=False, **kw):
    cfg = TrainConfig(steps=steps, batch_size=2, warmup_steps=0, checkpoint_every=2, etsdm=etsdm, lora=lora, seed=3,
                      ema_decay=0.5, **kw)  # fmt: skip
    caps = str(pipes["caps"]) if fam != "dit" else None
    opts = TrainOptions(model=str(pipes[fam]), data=str(pipes["imgs"]), captions=caps, out=str(out), training=cfg,
                        resume=resume)  # fmt: skip
    if stop_after is not None:  # the Python loop's stop (what a killed run leaves)
        from lipscope.runs import train as rtrain

        orig = rtrain.train_loop
        rtrain.train_loop = lambda *a, **k: orig(*a, **{**k, "stop_after": stop_after})
        try:
            return run_training(opts)
        finally:
            rtrain.train_loop = orig
    return run_training(opts)


@pytest.mark.parametrize("fam", ["sd", "sd3", "flux", "dit", "pixart"])
def test_full_etsdm_finetune_reloads_with_its_map_and_is_flat_inside_sub_intervals(pipes, tmp_path, fam, monkeypatch):
    res = _finetune(pipes, fam, tmp_path / "run", caption_dropout=0.0 if fam == "dit" else 0.5)
    assert res["class"].startswith("ETSDM") and res["etsdm"]["t_tilde_steps"] == 100.0
    m = load_model(str(tmp_path / "run"))
    assert etsdm_of(m.module) == ET and m.etsdm == ET and m.latent is not None
    grid = np.arange(0.0, 110.0, 1.0)
    cond = conditioning_for(m, str(tmp_path / "run"))  # the empty prompt (DiT: the null class)
    # the network's own output is what f holds constant: a flow model's velocity (its ε = x_t + (1 − σ)·v moves
    # with the true σ even at a fixed output), ε for the others
    target = "velocity" if fam in ("sd3", "flux") else "eps"
    df = probe(
        m, str(pipes["imgs"]), timesteps=grid, dt=1.0, samples=2, batch_size=64, conditioning=cond, target=target
    )
    inside = df[~df["crosses_boundary"] & (df["t"] < 99)]
    assert (inside["K_mean"] == 0).all()  # f is constant inside each sub-interval: exactly zero, no tolerance
    crossing = df[df["crosses_boundary"]]
    assert sorted(crossing["t"]) == [19.0, 39.0, 59.0, 79.0, 99.0] and (crossing["K_mean"] > 0).all()
    if fam != "dit":
        assert json.loads((tmp_path / "run" / "train.json").read_text())["captions"]["distinct"] == 2
    # stock diffusers (lipscope.etsdm imported): the pipeline's denoiser is the E-TSDM class, and the call its
    # pipeline makes (timestep in the denoiser's own units: Flux σ, the others σ·1000 or the step) is fed f(t)
    from diffusers import DiffusionPipeline

    comp = "unet" if fam == "sd" else "transformer"
    den = getattr(DiffusionPipeline.from_pretrained(str(tmp_path / "run" / "pipeline")), comp)
    assert type(den).__name__ == type(m.module).__name__
    units = 1e-3 if fam == "flux" else 1.0
    t_in, f_in = torch.tensor([57.0 * units]), torch.tensor([40.0 * units])
    torch.testing.assert_close(den.condition(t_in), f_in, rtol=1e-6, atol=0)
    assert den.condition(torch.tensor([150.0 * units])) == torch.tensor([150.0 * units])
    # the mapped forward, called the way the family's pipeline calls it (positional or keyword timestep), is the
    # map-free forward at f(t): the family call with `unmapped` bypassed, at t = 57, equals it at c = 40
    x = torch.randn(1, *m.sample_shape, generator=torch.Generator().manual_seed(0))
    kw = cond.rows(torch.tensor([0]), m.device, m.dtype)[0]
    with torch.no_grad():
        at_f = m.net(x, torch.tensor([40.0]), **kw)
        monkeypatch.setattr(f"lipscope.families.{fam}.unmapped", lambda module: module)
        mapped = m.net(x, torch.tensor([57.0]), **kw)
    torch.testing.assert_close(mapped, at_f, rtol=0, atol=0)


def test_control_run_is_the_same_loop_without_the_map(pipes, tmp_path):
    ctl = _finetune(pipes, "sd", tmp_path / "ctl", etsdm=False)
    assert ctl["class"] == "UNet2DConditionModel" and "etsdm" not in ctl
    m = load_model(str(tmp_path / "ctl"))
    cond = conditioning_for(m, str(tmp_path / "ctl"))
    df = probe(
        m, str(pipes["imgs"]), timesteps=np.arange(0.0, 30.0), dt=1.0, samples=2, batch_size=64, conditioning=cond
    )
    assert (df["K_mean"] > 0).all() and not df["crosses_boundary"].any()


def test_saved_etsdm_pipeline_loads_in_stock_diffusers_with_one_import(pipes, tmp_path):
    _finetune(pipes, "sd", tmp_path / "run")
    code = (
        "import sys, torch\nfrom diffusers import StableDiffusionPipeline\n"
        "try:\n    StableDiffusionPipeline.from_pretrained(sys.argv[1])\n    print('LOADED-WITHOUT-IMPORT')\n"
        "except Exception as e:\n    print('refused:', type(e).__name__)\n"
        "import lipscope.etsdm\np = StableDiffusionPipeline.from_pretrained(sys.argv[1])\n"
        "u = p.unet\nprint(type(u).__name__, u.config.etsdm_t_tilde, u.config.etsdm_n)\n"
        "x = torch.randn(1, 4, 4, 4); e = torch.randn(1, 3, 16)\n"
        "a = u(x, torch.tensor([57]), e).sample; b = u.forward_condition(x, torch.tensor([40.0]), e).sample\n"
        "print('same', bool(torch.equal(a, b)))\n"
    )
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "run" / "pipeline")], capture_output=True, text=True)
    assert "LOADED-WITHOUT-IMPORT" not in r.stdout and "refused:" in r.stdout, r.stdout + r.stderr
    assert "ETSDMUNet2DConditionModel 100.0 5" in r.stdout and "same True" in r.stdout, r.stdout + r.stderr


@pytest.mark.parametrize("fam", ["sd", "sd3", "flux"])
def test_lora_etsdm_finetune_saves_for_load_lora_weights_and_refuses_stock_loading(pipes, tmp_path, fam):
    res = _finetune(pipes, fam, tmp_path / "run", lora=True)
    assert res["trained"] == "LoRA adapters"
    f = tmp_path / "run" / "lora" / "pytorch_lora_weights.safetensors"
    from safetensors import safe_open

    with safe_open(str(f), "pt") as h:
        meta = json.loads(h.metadata()["lora_adapter_metadata"])
        keys = list(h.keys())
    comp = "unet" if fam == "sd" else "transformer"
    assert all(k.startswith(f"{comp}.") for k in keys) and meta[f"{comp}.etsdm_n"] == 5
    assert meta[f"{comp}.etsdm_t_tilde"] == (0.1 if fam == "flux" else 100.0)  # the denoiser's own timestep units
    import diffusers

    pipe_cls = {"sd": "StableDiffusionPipeline", "sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}[fam]
    pipe = getattr(diffusers, pipe_cls).from_pretrained(str(pipes[fam]))
    with pytest.raises(TypeError, match="LoraConfig"):  # stock loading refuses instead of dropping the map
        pipe.load_lora_weights(str(f.parent))
    m = load_model(str(tmp_path / "run"))  # lipscope: base + adapter + map
    assert m.etsdm == ET and type(m.module).__name__.startswith("ETSDM") and m.module.peft_config


def test_lora_weights_move_only_the_adapters(pipes, tmp_path):
    base = load_model(str(pipes["sd"])).module.state_dict()
    _finetune(pipes, "sd", tmp_path / "run", lora=True, etsdm=False)
    m = load_model(str(tmp_path / "run"))
    sd = m.module.state_dict()
    lora_b = [v for k, v in sd.items() if "lora_B" in k]
    assert lora_b and any(v.abs().max() > 0 for v in lora_b)  # B starts at zero (peft's init): it was trained
    for k, v in base.items():
        k2 = k if k in sd else k.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        torch.testing.assert_close(sd[k2], v, rtol=0, atol=0)


@pytest.mark.parametrize("lora", [False, True])
def test_resume_is_bit_exact(pipes, tmp_path, lora):
    full = _finetune(pipes, "sd3", tmp_path / "full", lora=lora, steps=4)
    _finetune(pipes, "sd3", tmp_path / "cut", lora=lora, steps=4, stop_after=2)
    res = _finetune(pipes, "sd3", tmp_path / "cut", lora=lora, steps=4, resume=True)
    assert (tmp_path / "full" / "loss.csv").read_text() == (tmp_path / "cut" / "loss.csv").read_text()
    assert res["final_loss_mean_last_100"] == full["final_loss_mean_last_100"]
    a, b = load_model(str(tmp_path / "full")).module.state_dict(), load_model(str(tmp_path / "cut")).module.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_latents_are_encoded_once_and_reused_on_resume(pipes, tmp_path):
    _finetune(pipes, "sd", tmp_path / "run", steps=4, stop_after=2)
    lat = tmp_path / "run" / "latents.safetensors"
    stamp = lat.stat().st_mtime_ns
    res = _finetune(pipes, "sd", tmp_path / "run", steps=4, resume=True)
    assert lat.stat().st_mtime_ns == stamp and res["latents"]["cache"] == "reused"
    m = load_model(str(pipes["sd"]))
    from safetensors.torch import load_file

    from lipscope.data import load_data

    x = load_data(str(pipes["imgs"]), None, 3, m.latent.pixel_shape)
    torch.testing.assert_close(load_file(str(lat))["latents"], m.latent.encode(x), rtol=0, atol=0)


def test_refusals_are_one_line(pipes, tmp_path):
    with pytest.raises(InputError, match="no load_lora_weights"):
        _finetune(pipes, "dit", tmp_path / "a", lora=True)
    with pytest.raises(InputError, match="not text-conditioned"):
        run_training(TrainOptions(model=str(pipes["dit"]), data=str(pipes["imgs"]), captions=str(pipes["caps"]),
                                  out=str(tmp_path / "b"), training=TrainConfig(steps=1)))  # fmt: skip
    with pytest.raises(InputError, match="caption_dropout"):
        run_training(TrainOptions(model=str(pipes["dit"]), data=str(pipes["imgs"]), out=str(tmp_path / "c"),
                                  training=TrainConfig(steps=1, caption_dropout=0.1)))  # fmt: skip
    with pytest.raises(InputError, match="lora_targets"):
        _finetune(pipes, "sd", tmp_path / "d", lora=True, lora_targets=("no_such_layer",))


def test_captions_in_every_form_follow_the_image_order(tmp_path):
    imgs = tmp_path / "imgs"
    (imgs / "sub").mkdir(parents=True)
    for name in ("b.png", "a.png", "sub/c.png"):
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(imgs / name)
    want = ["cap a", "cap b", "cap c"]  # sorted paths: a.png, b.png, sub/c.png
    rows = (("sub/c.png", "cap c"), ("a.png", "cap a"), ("b.png", "cap b"))
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"file_name": f, "text": c}) + "\n" for f, c in rows))
    (tmp_path / "c.csv").write_text("file_name,caption\nb.png,cap b\nsub/c.png,cap c\na.png,cap a\n")
    for f, c in (("a", "cap a"), ("b", "cap b"), ("sub/c", "cap c")):
        (imgs / f"{f}.txt").write_text(c + "\n")
    for spec in (tmp_path / "c.jsonl", tmp_path / "c.csv", imgs):
        assert read_captions(spec, imgs) == want
    (tmp_path / "bad.csv").write_text("file_name,caption\na.png,x\n")
    with pytest.raises(InputError, match="no caption for b.png and 1 more"):
        read_captions(tmp_path / "bad.csv", imgs)
    (tmp_path / "extra.csv").write_text("file_name,caption\na.png,x\nb.png,y\nsub/c.png,z\nzz.png,w\n")
    with pytest.raises(InputError, match="zz.png is not an image"):
        read_captions(tmp_path / "extra.csv", imgs)


def test_cli_two_process_lora_etsdm_finetune_with_captions(pipes, tmp_path):
    """``accelerate launch --multi_gpu -m lipscope finetune --etsdm --lora …`` on CPU: torchrun starts two processes
    (gloo) and accelerate's DDP wraps the family call, so the gradients of both processes' batches are averaged."""
    import os
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           "-m", "lipscope", "finetune", "--etsdm", "--lora", "--lora-rank", "2", "--model", str(pipes["sd"]),
           "--data", str(pipes["imgs"]), "--captions", str(pipes["caps"]), "--caption-dropout", "0.3", "--steps", "2",
           "--batch-size", "2", "--grad-accum", "2", "--warmup", "0", "--out", str(tmp_path / "run"),
           "--no-progress"]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=HANG_S)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "model in" in r.stdout and "/lora" in r.stdout
    meta = json.loads((tmp_path / "run" / "train.json").read_text())
    assert meta["processes"] == 2 and meta["trained"] == "LoRA adapters" and meta["config"]["grad_accum"] == 2
    assert meta["config"]["lora_rank"] == 2 and meta["captions"]["dropout"] == 0.3
    # the learning rate per optimizer step is the single-process schedule (accelerate steps a prepared scheduler
    # once per process: the schedule is built for steps × processes)
    from diffusers.optimization import get_scheduler

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=meta["config"]["lr"])
    sched = get_scheduler("cosine", opt, num_warmup_steps=0, num_training_steps=2)
    want = []
    for _ in range(2):
        opt.step()
        sched.step()
        want.append(sched.get_last_lr()[0])
    lrs = np.loadtxt(tmp_path / "run" / "loss.csv", delimiter=",", skiprows=1)[:, 2]
    np.testing.assert_allclose(lrs, want, rtol=1e-5, atol=1e-12)  # loss.csv keeps 6 significant digits
    m = load_model(str(tmp_path / "run"))
    assert m.etsdm == ET and m.module.peft_config["default_0"].r == 2


def test_probe_and_evaluate_a_lora_etsdm_run_from_the_cli(pipes, tmp_path):
    """The issue's commands on a LoRA run: prompts are encoded by the base pipeline's text encoders, the condition-
    space probe pairs sub-interval starts, and evaluate pairs the run with its base model seed by seed."""
    from typer.testing import CliRunner

    from lipscope.cli import app

    _finetune(pipes, "sd", tmp_path / "run", lora=True)
    runner = CliRunner()
    args = ["probe", "--model", str(tmp_path / "run"), "--space", "condition", "--prompt", "a red cat", "--data",
            str(pipes["imgs"]), "--timesteps", "0,5,19,20,99,100", "--samples", "2",
            "--out", str(tmp_path / "p")]  # fmt: skip
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    import pandas as pd

    df = pd.read_csv(tmp_path / "p" / "lipschitz.csv")
    assert list(df["t_a"]) == [0, 20, 80, 100] and list(df["t_b"]) == [20, 40, 100, 101]
    meta = json.loads((tmp_path / "p" / "run.json").read_text())
    assert meta["model"]["etsdm"] == {"t_tilde": 100.0, "n": 5}
    args = ["evaluate", "--model", str(tmp_path / "run"), "--baseline", str(pipes["sd"]), "--prompt", "a red cat",
            "--data", str(pipes["imgs"]), "--scheduler", "ddim", "--steps", "2", "--num", "4", "--seeds", "2",
            "--out", str(tmp_path / "e")]  # fmt: skip
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    paired = pd.read_csv(tmp_path / "e" / "eval_paired.csv")
    assert set(paired["model"]) == {"model"} and (paired["n"] == 2).all()
    assert "not comparable" in json.loads((tmp_path / "e" / "run.json").read_text())["comparability"]


@pytest.mark.parametrize("fam", ["sd3", "flux"])
def test_stock_pipeline_call_feeds_the_transformer_f_of_sigma(pipes, tmp_path, fam, monkeypatch):
    """Drive the real StableDiffusion3Pipeline / FluxPipeline ``__call__`` on a saved E-TSDM run (30 steps reach
    σ < 0.1): the base transformer's forward receives f of exactly what the pipeline passes, in its units."""
    import diffusers

    _finetune(pipes, fam, tmp_path / "run")
    base = {"sd3": diffusers.SD3Transformer2DModel, "flux": diffusers.FluxTransformer2DModel}[fam]
    seen: list[torch.Tensor] = []
    orig = base.forward

    def spy(self, *args, **kwargs):
        seen.append(kwargs["timestep"].detach().clone())
        return orig(self, *args, **kwargs)

    monkeypatch.setattr(base, "forward", spy)
    pipe = diffusers.DiffusionPipeline.from_pretrained(str(tmp_path / "run" / "pipeline"))
    kw = {"guidance_scale": 1.0} if fam == "sd3" else {}
    pipe("a red cat", num_inference_steps=30, height=16, width=16, output_type="latent",
         generator=torch.Generator().manual_seed(0), **kw)  # fmt: skip
    passed = pipe.scheduler.timesteps.float() * (1e-3 if fam == "flux" else 1.0)  # what __call__ hands over
    got = torch.stack([s.reshape(-1)[0] for s in seen]).float()
    t_tilde = 0.1 if fam == "flux" else 100.0
    want = torch.where(passed < t_tilde, torch.floor(passed * 5 / t_tilde) * t_tilde / 5, passed)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    assert (passed < t_tilde).any() and (got != passed).any()  # the low-noise steps were mapped


def test_etsdm_and_control_lora_runs_start_from_the_same_adapters(pipes):
    """The paired comparison is fair: the E-TSDM retrofit draws no random numbers, so the LoRA A matrices drawn
    from the seed are the same with and without --etsdm."""
    from lipscope import rng
    from lipscope.training import _prepare_denoiser

    weights = []
    for etsdm in (False, True):
        m = load_model(str(pipes["sd"]))
        cfg = TrainConfig(steps=1, etsdm=etsdm, lora=True, seed=5)
        with rng.isolated_torch_rng(cfg.seed):
            den, _ = _prepare_denoiser(m, cfg, 100.0)
        weights.append({k: v for k, v in den.state_dict().items() if "lora_A" in k})
    assert weights[0] and weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_more_refusals(pipes, tmp_path):
    with pytest.raises(InputError, match="for flow-matching models") as e:
        _finetune(pipes, "sd", tmp_path / "a", weighting="logit_normal")
    assert "\n" not in str(e.value)
    _finetune(pipes, "sd", tmp_path / "lora", lora=True)
    with pytest.raises(InputError, match="holds a LoRA adapter") as e:
        run_training(TrainOptions(model=str(tmp_path / "lora"), data=str(pipes["imgs"]), out=str(tmp_path / "b"),
                                  training=TrainConfig(steps=1)))  # fmt: skip
    assert "\n" not in str(e.value)
    from lipscope.etsdm import with_etsdm

    et = with_etsdm(load_model(str(pipes["sd"])).module, 100.0, 5)
    with pytest.raises(InputError, match="already carries the E-TSDM map"):
        with_etsdm(et, 50.0, 5)
    assert with_etsdm(et, 100.0, 5) is et


def test_lora_without_peft_is_one_line(pipes, tmp_path, monkeypatch):
    monkeypatch.setattr("lipscope.lora.peft_available", lambda: False)  # (hiding peft itself breaks diffusers)
    with pytest.raises(InputError, match=r"pip install 'lipscope\[lora\]'") as e:
        _finetune(pipes, "sd", tmp_path / "a", lora=True)
    assert "\n" not in str(e.value)
