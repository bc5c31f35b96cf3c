"""E-TSDM: the map, the UNet that carries it, save/load, stock-diffusers sampling, the training
loop (resume bit-exact, two processes through accelerate) and the condition-space probe."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import TINY, tiny_unet

from lipscope import load_model, probe
from lipscope.errors import InputError
from lipscope.etsdm import Etsdm, etsdm_boundaries, etsdm_map, with_etsdm
from lipscope.models import from_unet
from lipscope.schedules import DEFAULT_SCHEDULER_CONFIG
from lipscope.training import TrainConfig, save_pipeline, train_loop


def test_map_edge_cases():
    t = torch.tensor([0.0, 19.999, 20.0, 20.5, 99.999, 100.0, 100.25, 999.0], dtype=torch.float64)
    expect = torch.tensor([0.0, 0.0, 20.0, 20.0, 80.0, 100.0, 100.25, 999.0], dtype=torch.float64)
    torch.testing.assert_close(etsdm_map(t), expect, rtol=0, atol=0)
    # n not dividing t̃: boundaries at the (fractional) multiples of t̃/n, the same formula
    torch.testing.assert_close(
        etsdm_map(torch.tensor([0.0, 33.3, 33.4, 66.7, 99.9]), 100.0, 3),
        torch.tensor([0.0, 0.0, 100 / 3, 200 / 3, 200 / 3]),
    )
    assert etsdm_boundaries(100, 4) == [0, 25, 50, 75, 100]
    for bad in ((0.0, 5), (100.0, 0), (100.0, 2.5)):
        with pytest.raises(InputError):
            etsdm_map(torch.zeros(1), *bad)


def test_retrofit_feeds_the_map():
    base = tiny_unet(seed=1)
    et = with_etsdm(base)
    x = torch.randn(3, 1, 8, 8)
    t = torch.tensor([5.0, 57.0, 300.0])
    with torch.no_grad():
        torch.testing.assert_close(et(x, t).sample, base(x, torch.tensor([0.0, 40.0, 300.0])).sample, rtol=0, atol=0)
    m = from_unet(et, DEFAULT_SCHEDULER_CONFIG)
    assert m.etsdm == Etsdm(t_tilde=100.0, n=5)
    with torch.no_grad():
        torch.testing.assert_close(m(x, t), et(x, t).sample, rtol=0, atol=0)


@pytest.fixture(scope="module")
def etsdm_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("etsdm") / "pipeline"
    save_pipeline(with_etsdm(tiny_unet(seed=2), 100.0, 5), DEFAULT_SCHEDULER_CONFIG, d)
    return d


def test_save_load_same_outputs(etsdm_dir):
    ref = with_etsdm(tiny_unet(seed=2), 100.0, 5).eval()
    m = load_model(str(etsdm_dir))
    assert m.etsdm == Etsdm(t_tilde=100.0, n=5)
    x, t = torch.randn(4, 1, 8, 8), torch.tensor([0.0, 33.0, 99.5, 640.0])
    with torch.no_grad():
        torch.testing.assert_close(m(x, t), ref(x, t).sample, rtol=0, atol=0)
    assert json.loads((etsdm_dir / "model_index.json").read_text())["unet"] == ["lipscope.etsdm", "ETSDMUNet2DModel"]
    m2 = load_model(str(etsdm_dir.parent))  # a run folder resolves to its pipeline/
    assert m2.etsdm is not None


def test_stock_diffusers_ddim_sampling_equals_lipscope(etsdm_dir):
    """The documented one-liner: import lipscope.etsdm, then DDIMPipeline.from_pretrained(path)."""
    from diffusers import DDIMPipeline, DDIMScheduler
    from diffusers.utils.torch_utils import randn_tensor

    import lipscope.etsdm  # noqa: F401

    pipe = DDIMPipeline.from_pretrained(str(etsdm_dir))
    assert type(pipe.unet).__name__ == "ETSDMUNet2DModel"
    img = pipe(
        batch_size=2,
        generator=torch.Generator().manual_seed(0),
        num_inference_steps=40,
        eta=0.0,
        output_type="np",
        return_dict=False,
    )[0]
    # the same loop with lipscope's EpsModel (map applied by lipscope, not by the UNet's forward)
    m = load_model(str(etsdm_dir))
    sched = DDIMScheduler.from_config(pipe.scheduler.config)
    sched.set_timesteps(40)  # steps 975, 950, …, 25, 0: below 100 they fall off the E-TSDM starts
    x = randn_tensor((2, 1, 8, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(m(x, torch.full((2,), float(t))), t, x, eta=0.0).prev_sample
    ours = ((x / 2 + 0.5).clamp(0, 1)).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(img, ours, rtol=0, atol=1e-6)
    # and the map matters: the same weights without it sample something else
    plain = tiny_unet(seed=2)
    x = randn_tensor((2, 1, 8, 8), generator=torch.Generator().manual_seed(0))
    sched.set_timesteps(40)  # steps 975, 950, …, 25, 0: below 100 they fall off the E-TSDM starts
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(plain(x, t).sample, t, x, eta=0.0).prev_sample
    assert np.abs(((x / 2 + 0.5).clamp(0, 1)).permute(0, 2, 3, 1).numpy() - img).max() > 1e-3


def test_plain_diffusers_does_not_drop_the_map_silently(etsdm_dir):
    code = (
        "import sys\nfrom diffusers import DDPMPipeline, UNet2DModel\n"
        "from diffusers.utils import logging\nlogging.set_verbosity_warning()\n"
        f"UNet2DModel.from_pretrained({str(etsdm_dir / 'unet')!r})\n"
        "try:\n"
        f"    DDPMPipeline.from_pretrained({str(etsdm_dir)!r})\n"
        "except ValueError as e:\n    print('REFUSED', e)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "etsdm_t_tilde" in r.stderr and "will be ignored" in r.stderr  # plain UNet2DModel warns
    assert "REFUSED" in r.stdout and "lipscope.etsdm" in r.stdout  # the pipeline refuses without lipscope


def _tiny_data(n=64):
    from lipscope.data import load_data

    return load_data("digits", n, 0, (1, 8, 8))


def _cfg(**kw):
    base = dict(steps=6, batch_size=8, lr=1e-3, warmup_steps=2, checkpoint_every=3, ema_decay=0.9, seed=3)
    return TrainConfig(**{**base, **kw})


@pytest.mark.parametrize("etsdm", [False, True])
def test_resume_equals_uninterrupted(tmp_path, etsdm):
    data = _tiny_data()
    full = train_loop(tiny_unet(seed=7), DEFAULT_SCHEDULER_CONFIG, data, _cfg(etsdm=etsdm), tmp_path / "a")
    assert full["steps"] == 6 and full["final_loss_mean_last_100"] > 0
    part = train_loop(
        tiny_unet(seed=7), DEFAULT_SCHEDULER_CONFIG, data, _cfg(etsdm=etsdm), tmp_path / "b", stop_after=3
    )
    assert part == {"stopped_at": 3, "steps": 6} and not (tmp_path / "b" / "pipeline").exists()
    train_loop(tiny_unet(seed=99), DEFAULT_SCHEDULER_CONFIG, data, _cfg(etsdm=etsdm), tmp_path / "b", resume=True)
    la = (tmp_path / "a" / "loss.csv").read_text()
    lb = (tmp_path / "b" / "loss.csv").read_text()
    assert la == lb and len(la.splitlines()) == 7  # same losses, printed to 9 significant digits
    ma, mb = load_model(str(tmp_path / "a")), load_model(str(tmp_path / "b"))
    for (k, va), vb in zip(ma.module.state_dict().items(), mb.module.state_dict().values(), strict=True):
        assert torch.equal(va, vb), k
    assert (ma.etsdm is not None) == etsdm
    assert json.loads((tmp_path / "a" / "train.json").read_text())["config"]["etsdm"] == etsdm


def test_training_refusals(tmp_path):
    data = _tiny_data()  # (`resume` with no checkpoint starts at step 0: tests/test_training_faults.py)
    train_loop(tiny_unet(), DEFAULT_SCHEDULER_CONFIG, data, _cfg(steps=1), tmp_path / "y")
    with pytest.raises(InputError, match="already holds a run"):
        train_loop(tiny_unet(), DEFAULT_SCHEDULER_CONFIG, data, _cfg(steps=1), tmp_path / "y")


def test_training_lowers_the_loss(tmp_path):
    res = train_loop(
        tiny_unet(),
        DEFAULT_SCHEDULER_CONFIG,
        _tiny_data(256),
        _cfg(steps=60, batch_size=32, checkpoint_every=100, lr=3e-3),
        tmp_path / "z",
    )
    losses = np.loadtxt(tmp_path / "z" / "loss.csv", delimiter=",", skiprows=1)[:, 1]
    assert losses[-10:].mean() < 0.8 * losses[:10].mean() and res["final_loss_mean_last_100"] > 0


@pytest.mark.slow
def test_two_process_accelerate_run(tmp_path):
    """Two CPU processes through accelerate (gloo): torchrun starts them and accelerate's
    Accelerator picks up the distributed environment (on GPUs: accelerate launch --multi_gpu)."""
    import socket

    cfg = {"_class_name": "UNet2DModel", **{k: list(v) if isinstance(v, tuple) else v for k, v in TINY.items()}}
    (tmp_path / "tiny.json").write_text(json.dumps(cfg))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(port),
        "-m",
        "lipscope",
        "train",
        "--config",
        str(tmp_path / "tiny.json"),
        "--steps",
        "4",
        "--batch-size",
        "4",
        "--checkpoint-every",
        "2",
        "--out",
        str(tmp_path / "run"),
        "--no-progress",
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    meta = json.loads((tmp_path / "run" / "train.json").read_text())
    assert meta["processes"] == 2
    assert load_model(str(tmp_path / "run")).sample_shape == (1, 8, 8)


def test_probe_marks_boundaries_and_condition_space(etsdm_dir):
    m = load_model(str(etsdm_dir))
    df = probe(m, "digits", samples=3, timesteps="0,5,19,20,39,99,100,300")
    # inside a sub-interval the network sees one condition: K = 0 exactly; 19→20 and 99→100 cross
    inside = df[~df["crosses_boundary"] & (df["t"] < 100)]
    assert (inside["K_mean"] == 0).all() and list(inside["t"]) == [0, 5, 20]
    assert df.set_index("t").loc[[19.0, 39.0, 99.0], "crosses_boundary"].all()
    assert (df.set_index("t").loc[[19.0, 39.0, 99.0, 100.0, 300.0], "K_mean"] > 0).all()
    c = probe(m, "digits", samples=3, timesteps="0,5,19,20,39,99,100,300", space="condition")
    assert list(c["t_a"]) == [0, 20, 80, 100, 300] and list(c["t_b"]) == [20, 40, 100, 101, 301]
    assert (c["method"] == "fd-condition").all() and (c["K_mean"] > 0).all()
    plain = from_unet(tiny_unet(seed=2), DEFAULT_SCHEDULER_CONFIG)
    cp = probe(plain, "digits", samples=3, timesteps="0,5", space="condition")
    tp = probe(plain, "digits", samples=3, timesteps="0,5")
    np.testing.assert_allclose(cp["K_mean"], tp["K_mean"], rtol=1e-6)  # plain model: same as time space
    assert not tp["crosses_boundary"].any()


def test_train_from_config_is_reproducible_and_leaves_global_rng_alone(tmp_path):
    """Two identical `train` runs give identical weights: the initial UNet is drawn from the seed in an
    isolated RNG (torch's global generator is untouched)."""
    from safetensors.torch import load_file

    from lipscope.runs import TrainOptions, run_training
    from lipscope.training import TrainConfig

    cfg = tmp_path / "unet.json"
    cfg.write_text(
        json.dumps(
            {"_class_name": "UNet2DModel", **{k: list(v) if isinstance(v, tuple) else v for k, v in TINY.items()}}
        )
    )
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    outs = []
    for name in ("a", "b"):
        opts = TrainOptions(
            config=str(cfg),
            data="digits",
            out=str(tmp_path / name),
            training=TrainConfig(steps=2, batch_size=4, seed=5, checkpoint_every=2),
        )
        run_training(opts)
        outs.append(load_file(str(tmp_path / name / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors")))
    assert torch.equal(before, torch.random.get_rng_state())
    assert outs[0].keys() == outs[1].keys() and all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0])
