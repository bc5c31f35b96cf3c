"""Every loader path of load_model, prediction-type conversion and the timestep contract."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import TINY, tiny_unet
from diffusers import DDPMScheduler, UNet2DModel
from safetensors.torch import save_file

from lipscope import load_model
from lipscope.errors import InputError
from lipscope.models import from_unet
from lipscope.schedules import default_schedule
from lipscope.targets import to_epsilon


def _same_outputs(m, ref: UNet2DModel):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 1, 8, 8, generator=g)
    t = torch.tensor([0.0, 10.0, 500.0])
    with torch.no_grad():
        torch.testing.assert_close(m(x, t), ref(x, t).sample, rtol=0, atol=0)


def test_pipeline_folder(pipeline_dir, unet):
    m = load_model(str(pipeline_dir))
    assert m.sample_shape == (1, 8, 8) and m.T == 1000 and m.prediction_type == "epsilon"
    _same_outputs(m, unet)


def test_unet_folder_with_sibling_scheduler(pipeline_dir, unet, caplog):
    m = load_model(str(pipeline_dir / "unet"))
    assert "no scheduler config" not in caplog.text
    _same_outputs(m, unet)


def test_unet_folder_without_scheduler_warns(tmp_path, unet, caplog):
    unet.save_pretrained(tmp_path / "u")
    m = load_model(str(tmp_path / "u"))
    assert "DDPM default" in caplog.text and m.T == 1000


def test_scheduler_config_is_read(tmp_path, unet):
    unet.save_pretrained(tmp_path / "u")
    DDPMScheduler(num_train_timesteps=500, beta_schedule="squaredcos_cap_v2").save_pretrained(tmp_path / "u")
    m = load_model(str(tmp_path / "u"))
    assert m.T == 500
    ref = DDPMScheduler(num_train_timesteps=500, beta_schedule="squaredcos_cap_v2").alphas_cumprod.double()
    torch.testing.assert_close(m.schedule.alphas_cumprod, ref, rtol=500 * 2**-24, atol=0)


def test_safetensors_file_with_config(tmp_path, unet):
    save_file(unet.state_dict(), tmp_path / "w.safetensors")
    (tmp_path / "c.json").write_text(json.dumps(dict(unet.config)))
    m = load_model(str(tmp_path / "w.safetensors"), config=tmp_path / "c.json")
    _same_outputs(m, unet)


def test_bin_file_loads_weights_only(tmp_path, unet):
    torch.save(unet.state_dict(), tmp_path / "w.bin")
    (tmp_path / "c.json").write_text(json.dumps(dict(unet.config)))
    _same_outputs(load_model(str(tmp_path / "w.bin"), config=tmp_path / "c.json"), unet)


class _Pickled:  # an object torch.load(weights_only=True) refuses
    def __init__(self, sd):
        self.sd = sd


def test_full_pickle_needs_trust(tmp_path, unet):
    torch.save({"state_dict": unet.state_dict(), "extra": _Pickled(1)}, tmp_path / "w.pt")
    (tmp_path / "c.json").write_text(json.dumps(dict(unet.config)))
    with pytest.raises(InputError, match="`trust_pickle`"):
        load_model(str(tmp_path / "w.pt"), config=tmp_path / "c.json")
    _same_outputs(load_model(str(tmp_path / "w.pt"), config=tmp_path / "c.json", trust_pickle=True), unet)


def test_weights_file_needs_config(tmp_path, unet):
    save_file(unet.state_dict(), tmp_path / "w.safetensors")
    with pytest.raises(InputError, match="`config`"):
        load_model(str(tmp_path / "w.safetensors"))


def test_config_weights_mismatch(tmp_path, unet):
    save_file(unet.state_dict(), tmp_path / "w.safetensors")
    (tmp_path / "c.json").write_text(json.dumps({**dict(unet.config), "block_out_channels": [8, 8]}))
    with pytest.raises(InputError, match="does not match"):
        load_model(str(tmp_path / "w.safetensors"), config=tmp_path / "c.json")


@pytest.mark.parametrize("suffix", [".safetensors", ".bin"])
def test_corrupt_weights_file(tmp_path, unet, suffix):
    (tmp_path / f"w{suffix}").write_bytes(b"\x00garbage" * 10)
    (tmp_path / "c.json").write_text(json.dumps(dict(unet.config)))
    with pytest.raises(InputError, match="corrupt"):
        load_model(str(tmp_path / f"w{suffix}"), config=tmp_path / "c.json")


def test_corrupt_weights_in_folder(tmp_path, unet):
    unet.save_pretrained(tmp_path / "u")
    (tmp_path / "u" / "diffusion_pytorch_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(InputError):
        load_model(str(tmp_path / "u"))


def test_nonexistent_path():
    with pytest.raises(InputError, match="no such file"):
        load_model("./does/not/exist")


def test_folder_without_config(tmp_path):
    with pytest.raises(InputError, match="no config.json"):
        load_model(str(tmp_path))


def test_unknown_denoiser_class_refused_by_name(tmp_path):
    """A denoiser class no family wraps is refused naming it (UNet2DConditionModel is a family now:
    tests/test_families.py)."""
    (tmp_path / "u").mkdir()
    (tmp_path / "u" / "config.json").write_text(json.dumps({"_class_name": "UVit2DModel", "in_channels": 4}))
    with pytest.raises(InputError, match="UVit2DModel is not supported"):
        load_model(str(tmp_path / "u"))
    (tmp_path / "u" / "config.json").write_text(
        json.dumps({"_class_name": "UNet2DConditionModel", "in_channels": 4, "sample_size": 64})
    )
    with pytest.raises(InputError, match="could not load its UNet2DConditionModel"):  # recognised; no weights here
        load_model(str(tmp_path / "u"))


def _hf_cache(root: Path, repo: str, src: Path, flat: bool) -> None:
    """Lay out a Hugging Face hub cache by hand: models--org--name/{refs/main, snapshots/<rev>/...}."""
    rev = "0123456789abcdef0123456789abcdef01234567"
    base = root / f"models--{repo.replace('/', '--')}"
    snap = base / "snapshots" / rev
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(rev)
    if flat:  # google/ddpm-cifar10-32 style: config.json + scheduler_config.json at the root
        snap.mkdir(parents=True)
        for f in (src / "unet").iterdir():
            shutil.copy(f, snap / f.name)
        shutil.copy(src / "scheduler" / "scheduler_config.json", snap / "scheduler_config.json")
        shutil.copy(src / "model_index.json", snap / "model_index.json")
    else:
        shutil.copytree(src, snap)


@pytest.mark.parametrize("flat", [True, False], ids=["flat", "subfolders"])
def test_hub_id_from_offline_cache(tmp_path, monkeypatch, pipeline_dir, unet, flat, no_network):
    _hf_cache(tmp_path / "hub", "google/ddpm-cifar10-32", pipeline_dir, flat)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    m = load_model("google/ddpm-cifar10-32")
    assert m.name == "google/ddpm-cifar10-32" and m.T == 1000
    _same_outputs(m, unet)


def test_hub_id_not_cached_offline(tmp_path, monkeypatch, no_network):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(InputError, match="not in the Hugging Face cache"):
        load_model("google/ddpm-cifar10-32", offline=True)


def test_fractional_timesteps_reach_the_network_unrounded(unet):
    seen = []
    h = unet.time_proj.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].clone()))
    try:
        m = from_unet(unet)
        t = torch.tensor([0.25, 3.5, 999.0])
        m(torch.zeros(3, 1, 8, 8), t)
        m(torch.zeros(1, 1, 8, 8), 7.75)  # a Python float too (diffusers would truncate it to 7)
    finally:
        h.remove()
    assert seen[0].dtype.is_floating_point
    torch.testing.assert_close(seen[0], t, rtol=0, atol=0)
    assert float(seen[1][0]) == 7.75


def test_fourier_time_embedding():
    u = tiny_unet(time_embedding_type="fourier", flip_sin_to_cos=False)
    m = from_unet(u)
    out = m(torch.randn(2, 1, 8, 8), torch.tensor([1.5, 20.0]))
    assert out.shape == (2, 1, 8, 8) and torch.isfinite(out).all()


@pytest.mark.parametrize("pred", ["v_prediction", "sample"])
def test_prediction_types_convert_to_epsilon(pred):
    s = default_schedule()
    g = torch.Generator().manual_seed(0)
    x0, eps = (
        torch.randn(4, 1, 8, 8, generator=g, dtype=torch.float64),
        torch.randn(4, 1, 8, 8, generator=g, dtype=torch.float64),
    )
    t = torch.tensor([1.0, 50.5, 400.0, 999.0], dtype=torch.float64)
    a, sg = s.alpha(t).view(-1, 1, 1, 1), s.sigma(t).view(-1, 1, 1, 1)
    x = a * x0 + sg * eps
    out = a * eps - sg * x0 if pred == "v_prediction" else x0  # a perfect network's output
    torch.testing.assert_close(to_epsilon(out, x, pred, s.alpha(t), s.sigma(t)), eps, rtol=0, atol=1e-9)


def test_learned_variance_output_is_split():
    u = tiny_unet(out_channels=2)
    m = from_unet(u)
    assert m(torch.randn(2, 1, 8, 8), torch.tensor([1.0, 2.0])).shape == (2, 1, 8, 8)


def test_py_factory(tmp_path, monkeypatch):
    (tmp_path / "mynet.py").write_text(
        "import torch\n"
        "class Net(torch.nn.Module):\n"
        "    sample_shape = (1, 4, 4)\n"
        "    def forward(self, x, t):\n"
        "        return x * 0 + t.view(-1, 1, 1, 1) / 1000\n"
        "def factory():\n"
        "    return Net()\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    m = load_model("py:mynet:factory")
    assert m.sample_shape == (1, 4, 4)
    assert float(m(torch.zeros(1, 1, 4, 4), torch.tensor([500.0])).mean()) == pytest.approx(0.5)
    with pytest.raises(InputError, match="cannot import"):
        load_model("py:no_such_module_xyz:factory")
    with pytest.raises(InputError, match="no callable"):
        load_model("py:mynet:nope")


def test_tiny_config_is_what_the_tests_claim():
    assert TINY["block_out_channels"] == (4, 8) and TINY["norm_num_groups"] == 2


# ---------------------------------------------------------------------------------------------
# py: factories with --model-arg; rounding adapters; hub ids without network; pipeline classes
# ---------------------------------------------------------------------------------------------

FACTORY = (
    "import torch\n"
    "import lipscope\n"
    "def make(scale=1.0, name='x'):\n"
    "    net = lambda x, t: x * 0 + scale\n"
    "    return lipscope.from_callable(net, sample_shape=(1, 4, 4), name=name)\n"
)


def test_model_args_reach_the_factory(tmp_path, monkeypatch):
    (tmp_path / "lm_args.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    m = load_model("py:lm_args:make", model_args=["scale=2.5", "name=ema"])
    assert m.name == "ema" and float(m(torch.zeros(1, 1, 4, 4), 3.0).mean()) == 2.5
    m = load_model("py:lm_args:make", model_args={"scale": 0.5})  # a mapping from the Python API
    assert m.name == "x" and float(m(torch.zeros(1, 1, 4, 4), 3.0).mean()) == 0.5
    assert not m.rounds_timesteps
    with pytest.raises(InputError, match="unexpected keyword argument 'depth'.*`model_args`"):
        load_model("py:lm_args:make", model_args=["depth=3"])


def test_model_args_parse_json_values_else_strings():
    from lipscope.pyspec import parse_model_args

    got = parse_model_args(["a=1", "b=true", "c=null", "d=[1, 2]", "e=hello", "f=1e-3", "g=", "h=a=b", 'i="7"'])
    assert got == {"a": 1, "b": True, "c": None, "d": [1, 2], "e": "hello", "f": 1e-3, "g": "", "h": "a=b", "i": "7"}
    for bad in (["novalue"], ["=1"], ["1x=2"], ["a=1", "a=2"]):
        with pytest.raises(InputError, match="`model_args`"):
            parse_model_args(bad)


def test_model_args_only_for_py_specs(pipeline_dir):
    with pytest.raises(InputError, match="`model_args` are passed to a py: factory or a generic pipeline"):
        load_model(str(pipeline_dir), model_args=["scale=2"])


def test_model_args_are_recorded_and_mapped_to_the_flag():
    from dataclasses import asdict

    from lipscope.cli.common import render_error
    from lipscope.runs import ModelOptions

    assert asdict(ModelOptions(model="py:m:f", model_args=("scale=2", "name=x")))["model_args"] == ("scale=2", "name=x")
    assert render_error("`model_args` bad") == "--model-arg bad"


ROUNDING = (
    "import torch\n"
    "class Net(torch.nn.Module):\n"
    "    sample_shape = (1, 4, 4)\n"
    "    def __init__(self, cast):\n"
    "        super().__init__()\n"
    "        self.cast = cast\n"
    "    def forward(self, x, t):\n"
    "        t = {'long': t.long().float(), 'round': t.round(), 'none': t}[self.cast]\n"
    "        return x * 0 + torch.sin(t / 37).view(-1, 1, 1, 1)\n"
    "def make(cast='none'):\n"
    "    return Net(cast)\n"
)


@pytest.mark.parametrize("cast", ["long", "round"])
def test_rounding_adapter_is_detected_and_fractional_dt_refused(tmp_path, monkeypatch, caplog, cast):
    from lipscope.models import check_fractional_dt
    from lipscope.runs import model_info

    (tmp_path / "lm_round.py").write_text(ROUNDING)
    monkeypatch.syspath_prepend(str(tmp_path))
    m = load_model("py:lm_round:make", model_args=[f"cast={cast}"])
    assert m.rounds_timesteps and model_info(m)["rounds_timesteps"] is True
    assert "rounds t to whole steps" in caplog.text
    with pytest.raises(
        InputError, match=r"rounds t to whole steps: a fractional `dt` \(0.5\) gives K = 0 or double K; "
    ):
        check_fractional_dt(m, 0.5)
    check_fractional_dt(m, 1.0)  # an integer dt is measured as it is
    check_fractional_dt(m, 2, scheme="central", timesteps=[0, 5, 100])
    with pytest.raises(InputError, match="central `scheme`"):
        check_fractional_dt(m, 1, scheme="central")
    with pytest.raises(InputError, match="`method` jvp gives K = 0"):
        check_fractional_dt(m, 1, method="fd,jvp")
    with pytest.raises(InputError, match="fractional steps"):
        check_fractional_dt(m, 1, timesteps=[0, 2.5])


def test_smooth_networks_are_not_flagged(tmp_path, monkeypatch, unet):
    from lipscope.models import check_fractional_dt
    from lipscope.pyspec import detect_rounding

    (tmp_path / "lm_smooth.py").write_text(ROUNDING)
    monkeypatch.syspath_prepend(str(tmp_path))
    m = load_model("py:lm_smooth:make")
    assert not m.rounds_timesteps
    check_fractional_dt(m, 0.5, method="jvp", timesteps=[2.5])
    assert not detect_rounding(from_unet(unet))  # diffusers UNets take float t as it is


def _no_proxies(monkeypatch):
    import os

    for k in list(os.environ):
        if k.lower().endswith("_proxy"):
            monkeypatch.delenv(k)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)


def test_hub_id_without_network_fails_fast(tmp_path, monkeypatch, no_network):
    import threading
    import time

    _no_proxies(monkeypatch)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "empty"))
    release = threading.Event()
    seen = []

    def hang(addr, timeout=None, *a, **k):  # a connection that never answers (a firewall dropping packets)
        seen.append(addr)
        release.wait(30)
        raise OSError("dropped")

    monkeypatch.setattr("socket.create_connection", hang)
    t0 = time.perf_counter()
    try:
        with pytest.raises(InputError) as info:
            load_model("someone/some-model")
    finally:
        release.set()
    assert time.perf_counter() - t0 < 5
    msg = str(info.value)
    assert "\n" not in msg and "no network: cannot reach huggingface.co:443 (no answer within 3 s)" in msg, msg
    assert "not in the Hugging Face cache" in msg and seen == [("huggingface.co", 443)]


def test_hub_endpoint_is_read_from_hf_endpoint(tmp_path, monkeypatch, no_network):
    _no_proxies(monkeypatch)
    monkeypatch.setenv("HF_ENDPOINT", "http://hub.example:8080")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "empty"))
    seen = []

    def refuse(addr, timeout=None, *a, **k):
        seen.append(addr)
        raise ConnectionRefusedError(111, "Connection refused")

    monkeypatch.setattr("socket.create_connection", refuse)
    with pytest.raises(InputError, match=r"no network: cannot reach hub.example:8080 \(ConnectionRefusedError"):
        load_model("someone/some-model")
    assert seen == [("hub.example", 8080)]


def test_hub_id_without_network_uses_the_cache(tmp_path, monkeypatch, pipeline_dir, unet, caplog, no_network):
    _no_proxies(monkeypatch)
    _hf_cache(tmp_path / "hub", "google/ddpm-cifar10-32", pipeline_dir, flat=True)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr("socket.create_connection", lambda *a, **k: (_ for _ in ()).throw(OSError("unreachable")))
    m = load_model("google/ddpm-cifar10-32")
    assert "no network" in caplog.text and m.name == "google/ddpm-cifar10-32"
    _same_outputs(m, unet)


@pytest.mark.parametrize("spec", ["runs/my-typo", "./x", "a/b/c", "x"])
def test_missing_local_paths_are_not_hub_ids(tmp_path, monkeypatch, spec):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()  # runs/my-typo: ./runs exists, so this is a path with a typo
    monkeypatch.setattr("socket.create_connection", lambda *a, **k: pytest.fail("a path went to the hub"))
    with pytest.raises(InputError, match=f"`model` {spec}: no such file or folder"):
        load_model(spec)


def _pipeline_index(folder: Path, cls: str, **components) -> Path:
    folder.mkdir(parents=True)
    index = {"_class_name": cls, "scheduler": ["diffusers", "DDPMScheduler"], **components}
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


@pytest.mark.parametrize(
    ("cls", "components", "named"),
    [
        (
            "HunyuanDiTPipeline",
            {"transformer": ["diffusers", "HunyuanDiT2DModel"]},
            "transformer: HunyuanDiT2DModel",
        ),
        (
            "AuraFlowPipeline",
            {"transformer": ["diffusers", "AuraFlowTransformer2DModel"]},
            "transformer: AuraFlowTransformer2DModel",
        ),
        ("AudioPipeline", {"vqvae": ["diffusers", "AutoencoderKL"]}, "no unet or transformer component"),
    ],
)
def test_unsupported_pipeline_is_refused_by_class(tmp_path, cls, components, named):
    """Pipelines no family wraps go to the generic adapter (lipscope.families.generic), which names the pipeline and
    its denoiser when it cannot load them; no denoiser at all is refused up front."""
    folder = _pipeline_index(tmp_path / "dit", cls, **components)
    with pytest.raises(InputError) as info:
        load_model(str(folder))
    msg = str(info.value)
    assert f"is a {cls} ({named})" in msg, msg
    assert ("the generic adapter could not load it" if "transformer:" in named else "lipscope cannot probe") in msg
    assert "no config.json" not in msg and "\n" not in msg


def test_unsupported_pipeline_on_the_hub_is_refused_by_class(tmp_path, monkeypatch, no_network):
    rev = "0123456789abcdef0123456789abcdef01234567"
    base = tmp_path / "hub" / "models--fal--AuraFlow"
    _pipeline_index(
        base / "snapshots" / rev, "AuraFlowPipeline", transformer=["diffusers", "AuraFlowTransformer2DModel"]
    )
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text(rev)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(
        InputError,
        match=r"fal/AuraFlow is a AuraFlowPipeline \(transformer: AuraFlowTransformer2DModel\); the generic adapter",
    ):
        load_model("fal/AuraFlow", offline=True)


def test_probe_refuses_fractional_dt_on_a_rounding_adapter(tmp_path, monkeypatch):
    """A py: adapter that rounds t is detected at load and the probe refuses what it would get wrong (K = 0 and
    2·K at dt = 0.5, measured on lipscope 0.1) instead of reporting it."""
    (tmp_path / "rounding_adapter.py").write_text(
        "import torch\n"
        "class Net(torch.nn.Module):\n"
        "    sample_shape = (1, 8, 8)\n"
        "    def forward(self, x, t):\n"
        "        s = (t.round() / 1000.0).reshape(-1, 1, 1, 1)\n"
        "        return torch.tanh(x) * torch.sin(30 * s)\n"
        "def make():\n"
        "    return Net()\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    from lipscope.loading import load_model
    from lipscope.probe import probe

    m = load_model("py:rounding_adapter:make")
    assert m.rounds_timesteps
    with pytest.raises(InputError, match="fractional `dt`"):
        probe(m, "digits", timesteps="10,11", dt=0.5, samples=2)
    assert (probe(m, "digits", timesteps="10,11", dt=1.0, samples=2)["K_mean"] > 0).all()
