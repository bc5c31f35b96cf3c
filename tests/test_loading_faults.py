"""Bad models, files, devices and configs fail with one InputError line; pickles never run untrusted."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from conftest import TINY
from diffusers import DDPMScheduler

from lipscope import load_model
from lipscope.errors import InputError, ModelOutputError
from lipscope.fwad import forward_ad_patches
from lipscope.loading import check_unet_config, read_json, read_scheduler_config
from lipscope.models import from_callable, from_unet, resolve_device
from lipscope.schedules import schedule_from_config

PICKLE_SUFFIXES = [".pt", ".bin", ".ckpt", ".pth"]


def _one_line(info: pytest.ExceptionInfo) -> str:
    msg = str(info.value)
    assert "\n" not in msg and "Traceback" not in msg, msg
    return msg


class _Payload:
    """Unpickling this creates ``marker``: proof that a pickle ran code."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _evil_bytes(marker: Path, protocol: int = 2) -> bytes:
    return pickle.dumps({"w": torch.zeros(2), "x": _Payload(marker)}, protocol=protocol)


def test_payload_is_live(tmp_path):
    """The control: the payload really touches its marker when unpickled, so 'marker absent' means 'never ran'."""
    marker = tmp_path / "ran"
    pickle.loads(_evil_bytes(marker))
    assert marker.exists()


@pytest.fixture()
def cfg_file(tmp_path, unet) -> Path:
    p = tmp_path / "c.json"
    p.write_text(json.dumps(dict(unet.config)))
    return p


# ---------------------------------------------------------------------------------------------
# 1. py: specs
# ---------------------------------------------------------------------------------------------

IMPORT_FAILURES = {
    "raises": ("raise RuntimeError('no GPU here')\n", "RuntimeError: no GPU here"),
    "syntax": ("def f(:\n    pass\n", "SyntaxError: "),
    "name": ("x = undefined_name_q\n", "NameError: name 'undefined_name_q' is not defined"),
    "exits": ("import sys\nsys.exit(3)\n", "SystemExit: 3"),
}


@pytest.mark.parametrize("kind", list(IMPORT_FAILURES))
def test_py_module_that_fails_on_import(tmp_path, monkeypatch, kind):
    src, expected = IMPORT_FAILURES[kind]
    mod = f"lf_bad_import_{kind}"
    (tmp_path / f"{mod}.py").write_text(src)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(InputError) as info:
        load_model(f"py:{mod}:factory")
    msg = _one_line(info)
    assert f"importing {mod} raised" in msg and expected in msg and "fix the module" in msg


def test_py_factory_that_raises(tmp_path, monkeypatch):
    (tmp_path / "lf_bad_factory.py").write_text(
        "def factory():\n    raise ValueError('weights missing\\nsecond line of detail')\n"
        "def needs_args(n):\n    return n\n"
        "def returns_int():\n    return 42\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(InputError) as info:
        load_model("py:lf_bad_factory:factory")
    msg = _one_line(info)
    assert "lf_bad_factory:factory() raised ValueError: weights missing" in msg and "second line" not in msg
    with pytest.raises(InputError, match=r"needs_args\(\) raised TypeError"):
        load_model("py:lf_bad_factory:needs_args")
    with pytest.raises(InputError, match="returned int; it must return an EpsModel"):
        load_model("py:lf_bad_factory:returns_int")


# ---------------------------------------------------------------------------------------------
# 2. weights files and folders
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("trust", [False, True], ids=["untrusted", "trusted"])
@pytest.mark.parametrize("suffix", PICKLE_SUFFIXES)
def test_random_bytes_are_not_a_checkpoint(tmp_path, cfg_file, suffix, trust):
    w = tmp_path / f"w{suffix}"
    w.write_bytes(os.urandom(4096).replace(b"\x80", b"\x81").replace(b"PK", b"QK"))
    with pytest.raises(InputError) as info:
        load_model(str(w), config=cfg_file, trust_pickle=trust)
    msg = _one_line(info)
    assert "not a PyTorch checkpoint (neither a zip archive nor a pickle)" in msg and "corrupt" in msg
    assert "unpickling" not in msg


@pytest.mark.parametrize(
    "damage",
    ["truncated-zip", "truncated-legacy", "bad-pickle", "empty", "foreign-zip"],
)
def test_damaged_checkpoint_with_trust_pickle_is_one_error(tmp_path, cfg_file, unet, damage):
    w = tmp_path / "w.pt"
    if damage == "truncated-zip":
        torch.save(unet.state_dict(), w)
        w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    elif damage == "truncated-legacy":
        torch.save(unet.state_dict(), w, _use_new_zipfile_serialization=False)
        w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    elif damage == "bad-pickle":
        w.write_bytes(b"\x80garbage" * 10)
    elif damage == "empty":
        w.write_bytes(b"")
    else:
        import zipfile

        with zipfile.ZipFile(w, "w") as z:
            z.writestr("hello.txt", "not a checkpoint")
    with pytest.raises(InputError) as info:
        load_model(str(w), config=cfg_file, trust_pickle=True)
    assert "corrupt" in _one_line(info)


@pytest.mark.parametrize("fmt", ["pickle-p2", "pickle-p4", "torch-zip", "torch-legacy"])
@pytest.mark.parametrize("suffix", PICKLE_SUFFIXES)
def test_malicious_pickle_is_refused_and_never_runs(tmp_path, cfg_file, suffix, fmt, recwarn):
    marker, w = tmp_path / "ran", tmp_path / f"w{suffix}"
    if fmt.startswith("pickle"):
        w.write_bytes(_evil_bytes(marker, protocol=int(fmt[-1])))
    else:
        torch.save({"x": _Payload(marker)}, w, _use_new_zipfile_serialization=fmt == "torch-zip")
    with pytest.raises(InputError) as info:
        load_model(str(w), config=cfg_file)
    msg = _one_line(info)
    assert "`trust_pickle`" in msg and "arbitrary code" in msg
    assert not marker.exists()
    assert not [w for w in recwarn if issubclass(w.category, UserWarning)]  # no second stderr line from torch


def test_malicious_pickle_disguised_as_safetensors(tmp_path, cfg_file):
    marker, w = tmp_path / "ran", tmp_path / "w.safetensors"
    w.write_bytes(_evil_bytes(marker))
    for trust in (False, True):
        with pytest.raises(InputError, match="not a readable safetensors file"):
            load_model(str(w), config=cfg_file, trust_pickle=trust)
    assert not marker.exists()


def test_malicious_pickle_as_config_json(tmp_path, unet):
    from safetensors.torch import save_file

    marker = tmp_path / "ran"
    save_file(unet.state_dict(), tmp_path / "w.safetensors")
    (tmp_path / "c.json").write_bytes(_evil_bytes(marker))
    with pytest.raises(InputError) as info:
        load_model(str(tmp_path / "w.safetensors"), config=tmp_path / "c.json", trust_pickle=True)
    assert "not valid JSON" in _one_line(info)
    # the same bytes as a pipeline folder's unet/config.json
    (tmp_path / "u").mkdir()
    (tmp_path / "u" / "config.json").write_bytes(_evil_bytes(marker))
    with pytest.raises(InputError, match="not valid JSON"):
        load_model(str(tmp_path / "u"))
    assert not marker.exists()


def test_malicious_pickle_as_scheduler_config(tmp_path, pipeline_dir):
    marker = tmp_path / "ran"
    bad = tmp_path / "scheduler_config.json"
    bad.write_bytes(_evil_bytes(marker))
    for src in (bad, tmp_path):  # the file, and a folder holding it
        with pytest.raises(InputError, match="scheduler config .* not valid JSON"):
            load_model(str(pipeline_dir), scheduler_config=src)
    # found by the search next to a unet folder
    u = tmp_path / "pipe"
    (u / "unet").mkdir(parents=True)
    for f in (pipeline_dir / "unet").iterdir():
        (u / "unet" / f.name).write_bytes(f.read_bytes())
    (u / "scheduler").mkdir()
    (u / "scheduler" / "scheduler_config.json").write_bytes(_evil_bytes(marker))
    with pytest.raises(InputError, match="not valid JSON"):
        load_model(str(u))
    assert not marker.exists()


def _bin_pipeline(root: Path, pipeline_dir: Path, sd_obj) -> Path:
    """A copy of the pipeline with its unet weights as diffusion_pytorch_model.bin only."""
    (root / "unet").mkdir(parents=True)
    (root / "unet" / "config.json").write_bytes((pipeline_dir / "unet" / "config.json").read_bytes())
    (root / "scheduler").mkdir()
    src = pipeline_dir / "scheduler" / "scheduler_config.json"
    (root / "scheduler" / "scheduler_config.json").write_bytes(src.read_bytes())
    torch.save(sd_obj, root / "unet" / "diffusion_pytorch_model.bin")
    return root


class _Benign:  # needs full unpickling, runs nothing
    pass


def test_malicious_bin_in_pipeline_folder_never_runs(tmp_path, pipeline_dir, unet):
    marker = tmp_path / "ran"
    p = _bin_pipeline(tmp_path / "p", pipeline_dir, {**unet.state_dict(), "x": _Payload(marker)})
    with pytest.raises(InputError) as info:
        load_model(str(p))
    assert "`trust_pickle`" in _one_line(info)
    assert not marker.exists()


def test_bin_only_folder_loads(tmp_path, pipeline_dir, unet):
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3.0, 700.0])
    m = load_model(str(_bin_pipeline(tmp_path / "ok", pipeline_dir, unet.state_dict())))
    with torch.no_grad():
        torch.testing.assert_close(m(x, t), unet(x, t).sample, rtol=0, atol=0)
    # a full pickle in a folder: refused by default, loaded with trust_pickle
    p = _bin_pipeline(tmp_path / "full", pipeline_dir, {"state_dict": unet.state_dict(), "extra": _Benign()})
    with pytest.raises(InputError, match="`trust_pickle`"):
        load_model(str(p))
    with torch.no_grad():
        torch.testing.assert_close(load_model(str(p), trust_pickle=True)(x, t), unet(x, t).sample, rtol=0, atol=0)
    # random bytes in a folder's .bin
    (tmp_path / "ok" / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"\x00" * 64)
    with pytest.raises(InputError, match="not a PyTorch checkpoint"):
        load_model(str(tmp_path / "ok"))


# ---------------------------------------------------------------------------------------------
# 3. devices
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "device,match",
    [
        ("mps", "`device` mps asked for but MPS is not available; use `device` cpu or auto"),
        ("meta", "`device` meta is not supported"),
        ("xla", "`device` xla "),
        ("banana", "`device` 'banana' not understood"),
        ("cuda:0:0", "not understood"),
        ("", "not understood"),
    ],
)
def test_unusable_device(monkeypatch, device, match):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(InputError) as info:
        resolve_device(device)
    assert match in _one_line(info)


def test_cuda_device_that_is_not_there(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(InputError, match="`device` cuda asked for but CUDA is not available"):
        resolve_device("cuda")
    with pytest.raises(InputError, match="CUDA is not available"):
        resolve_device(torch.device("cuda", 0))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(InputError, match=r"`device` cuda:7 asked for but this machine has 1 CUDA device\(s\)"):
        resolve_device("cuda:7")
    assert resolve_device("cuda:0") == torch.device("cuda", 0)


def test_usable_devices():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda", "mps")
    with pytest.raises(InputError, match="meta"):
        resolve_device(torch.device("meta"))
    with pytest.raises(InputError, match="`device`"):
        load_model("builtin:nothing", device="meta")


# ---------------------------------------------------------------------------------------------
# 4. what the network returns
# ---------------------------------------------------------------------------------------------


def _model(out_fn, prediction_type: str = "epsilon"):
    return from_callable(lambda x, t: out_fn(x), sample_shape=(1, 8, 8), prediction_type=prediction_type)


@pytest.mark.parametrize(
    "ret",
    [lambda x: (x,), lambda x: [x], lambda x: {"sample": x}, lambda x: 0.5, lambda x: None, lambda x: x.numpy()],
    ids=["tuple", "list", "dict", "scalar", "None", "ndarray"],
)
def test_output_that_is_not_a_tensor(ret):
    with pytest.raises(ModelOutputError) as info:
        _model(ret)(torch.zeros(2, 1, 8, 8), torch.tensor([1.0, 2.0]))
    assert "not a tensor" in _one_line(info) and "`model` must return" in str(info.value)


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction", "sample"])
def test_output_of_the_wrong_shape(pred):
    x, t = torch.zeros(2, 1, 8, 8), torch.tensor([1.0, 2.0])
    with pytest.raises(ModelOutputError) as info:
        _model(lambda x: x[:, :, :4, :4], pred)(x, t)
    assert "returned shape (B, 1, 4, 4) for input (B, 1, 8, 8)" in _one_line(info)
    with pytest.raises(ModelOutputError) as info:
        _model(lambda x: x.repeat(1, 3, 1, 1), pred)(x, t)
    assert str(info.value).startswith(
        "the network returned shape (B, 3, 8, 8) for input (B, 1, 8, 8); it must return ε (or v/x0) "
        "of the input's shape"
    )
    with pytest.raises(ModelOutputError, match=r"shape \(1, 1, 8, 8\) for input \(B, 1, 8, 8\)"):
        _model(lambda x: x[:1], pred)(x, t)


def test_output_dtypes_and_learned_variance():
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([1.0, 2.0])
    assert _model(lambda x: x.repeat(1, 2, 1, 1))(x, t).shape == x.shape  # learned variance: (B, 2C, …)
    out = _model(lambda x: x.double())(x, t)  # a float64 output from a float32 model is fine
    assert out.shape == x.shape and out.dtype == torch.float64
    with pytest.raises(ModelOutputError, match="returned a int64 tensor.*floating-point"):
        _model(lambda x: x.long())(x, t)
    with pytest.raises(ModelOutputError, match="bool"):
        _model(lambda x: x > 0)(x, t)


def test_output_check_keeps_forward_ad(unet):
    m = from_unet(unet)
    x, v = torch.randn(2, 1, 8, 8), torch.randn(2, 1, 8, 8)
    with forward_ad_patches(m.module):
        _, jvp = torch.func.jvp(lambda y: m(y, torch.tensor([5.0, 9.0])), (x,), (v,))
    assert jvp.shape == x.shape


# ---------------------------------------------------------------------------------------------
# 5. scheduler configs
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad,key",
    [
        ({"num_train_timesteps": 1}, "num_train_timesteps"),
        ({"num_train_timesteps": 0}, "num_train_timesteps"),
        ({"num_train_timesteps": 100.5}, "num_train_timesteps"),
        ({"num_train_timesteps": "1000"}, "num_train_timesteps"),
        ({"num_train_timesteps": True}, "num_train_timesteps"),
        ({"timesteps": 1}, "num_train_timesteps"),
        ({"beta_start": -0.1}, "beta_start"),
        ({"beta_start": float("nan")}, "beta_start"),
        ({"beta_end": 0.0}, "beta_end"),
        ({"beta_end": -0.02}, "beta_end"),
        ({"beta_end": 1.5}, "beta_end"),
        ({"beta_end": "0.02"}, "beta_end"),
        ({"beta_schedule": "banana"}, "beta_schedule"),
        ({"beta_schedule": 3}, "beta_schedule"),
        ({"trained_betas": [0.1, 1.5]}, "trained_betas"),
        ({"trained_betas": [0.0, 0.1]}, "trained_betas"),
        ({"trained_betas": [-0.1, 0.1]}, "trained_betas"),
        ({"trained_betas": "0.1"}, "trained_betas"),
        ({"trained_betas": [0.1]}, "trained_betas"),
        ({"trained_betas": [0.1, 0.2], "num_train_timesteps": 1000}, "trained_betas"),
        ({"prediction_type": "banana"}, "prediction_type"),
    ],
)
def test_bad_scheduler_config_names_the_key(bad, key):
    cfg = {"_class_name": "DDPMScheduler", **bad}
    with pytest.raises(InputError) as info:
        schedule_from_config(cfg)
    assert key in _one_line(info)


def test_trained_betas_are_accepted():
    s = schedule_from_config({"trained_betas": [0.1, 0.2, 0.3], "num_train_timesteps": 3})
    assert s.T == 3


@pytest.mark.parametrize("exc", [RuntimeError, ZeroDivisionError, AssertionError, KeyError, IndexError])
def test_any_scheduler_construction_error_is_one_line(monkeypatch, exc):
    def boom(*a, **k):
        raise exc("deep inside diffusers\nmore")

    monkeypatch.setattr(DDPMScheduler, "from_config", boom)
    with pytest.raises(InputError) as info:
        schedule_from_config({"num_train_timesteps": 10})
    assert exc.__name__ in _one_line(info) and "scheduler config not understood" in str(info.value)


def test_scheduler_config_not_a_dict():
    with pytest.raises(InputError, match="JSON object"):
        schedule_from_config([1, 2])  # type: ignore[arg-type]


def test_bad_scheduler_config_through_load_model(pipeline_dir):
    with pytest.raises(InputError, match="num_train_timesteps"):
        load_model(str(pipeline_dir), scheduler_config={"num_train_timesteps": 1})


def test_scheduler_config_files(tmp_path):
    with pytest.raises(InputError, match="no scheduler_config.json in"):
        read_scheduler_config(tmp_path)  # a folder without one
    (tmp_path / "empty.json").write_text("  \n")
    with pytest.raises(InputError, match="is empty"):
        read_scheduler_config(tmp_path / "empty.json")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(InputError, match="must hold a JSON object, not a JSON list"):
        read_scheduler_config(tmp_path / "list.json")
    with pytest.raises(InputError, match="not found"):
        read_scheduler_config(tmp_path / "missing.json")
    with pytest.raises(InputError, match="cannot be read .*IsADirectoryError"):
        read_json(tmp_path, "model config")
    (tmp_path / "bin.json").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(InputError, match="not valid JSON"):
        read_scheduler_config(tmp_path / "bin.json")


# ---------------------------------------------------------------------------------------------
# 6. UNet configs for training, 7. what can be fine-tuned
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cfg,match",
    [
        ({}, "lacks in_channels/sample_size"),
        ({"in_channels": 1}, "lacks in_channels/sample_size"),
        ({"sample_size": 8}, "lacks in_channels/sample_size"),
        ({**TINY, "_class_name": "UNet2DConditionModel"}, "UNet2DConditionModel is not supported"),
        ({**TINY, "_class_name": "AutoencoderKL"}, "AutoencoderKL is not supported"),
        ({**TINY, "in_channels": 0}, "in_channels must be a positive integer"),
        ({**TINY, "in_channels": "3"}, "in_channels must be a positive integer"),
        ({**TINY, "in_channels": True}, "in_channels must be a positive integer"),
        ({**TINY, "sample_size": [8]}, "sample_size must be"),
        ({**TINY, "sample_size": "8"}, "sample_size must be"),
        ({**TINY, "sample_size": [8, -8]}, "sample_size must be"),
        ([1, 2], "must be a JSON object"),
    ],
)
def test_check_unet_config_refuses(cfg, match):
    with pytest.raises(InputError) as info:
        check_unet_config(cfg, "`config` c.json")  # type: ignore[arg-type]
    msg = _one_line(info)
    assert match in msg and msg.startswith("`config` c.json: ")


def test_check_unet_config_accepts():
    check_unet_config(dict(TINY), "`config` c.json")
    check_unet_config({**TINY, "sample_size": [8, 16], "_class_name": "UNet2DModel"}, "x")
    check_unet_config({**TINY, "_class_name": "ETSDMUNet2DModel"}, "x")


def test_weights_file_with_bad_config_is_refused_before_loading(tmp_path, unet):
    marker, w = tmp_path / "ran", tmp_path / "w.pt"
    w.write_bytes(_evil_bytes(marker))
    (tmp_path / "c.json").write_text("{}")
    with pytest.raises(InputError, match=r"`config` .*c\.json: config lacks in_channels/sample_size"):
        load_model(str(w), config=tmp_path / "c.json", trust_pickle=True)
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------
# networks that fail on float t
# ---------------------------------------------------------------------------------------------

FLOAT_T_NETS = {
    "table": "self.table = torch.linspace(0, 1, 1000)\n",
    "embedding": "self.table = torch.nn.Embedding(1000, 1)\n",
}


def _float_t_module(tmp_path: Path, monkeypatch, mod: str, kind: str, shape: bool) -> None:
    (tmp_path / f"{mod}.py").write_text(
        "import torch\n"
        "class Net(torch.nn.Module):\n"
        + ("    sample_shape = (1, 4, 4)\n" if shape else "")
        + "    def __init__(self):\n"
        "        super().__init__()\n"
        f"        {FLOAT_T_NETS[kind]}"
        "    def forward(self, x, t):\n"
        "        return x * 0 + self.table(t).view(-1, 1, 1, 1) if callable(self.table) "
        "else x * 0 + self.table[t].view(-1, 1, 1, 1)\n"
        "def make():\n"
        "    return Net()\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))


@pytest.mark.parametrize("kind", list(FLOAT_T_NETS))
def test_network_that_fails_on_float_t_is_one_line_at_load(tmp_path, monkeypatch, kind):
    _float_t_module(tmp_path, monkeypatch, f"lf_float_t_{kind}", kind, shape=True)
    with pytest.raises(InputError) as info:
        load_model(f"py:lf_float_t_{kind}:make")
    msg = _one_line(info)
    assert "the network fails on float timesteps (" in msg and "lipscope feeds float t (B,) in model steps" in msg
    assert "cast inside your adapter" in msg and ("IndexError" in msg if kind == "table" else "RuntimeError" in msg)


def test_network_that_fails_on_float_t_is_one_line_when_called(tmp_path, monkeypatch):
    _float_t_module(tmp_path, monkeypatch, "lf_float_t_late", "table", shape=False)  # no shape: not probed at load
    m = load_model("py:lf_float_t_late:make")
    with pytest.raises(InputError) as info:
        m(torch.zeros(2, 1, 4, 4), torch.tensor([3.0, 4.5]))
    assert "fails on float timesteps (IndexError: " in _one_line(info)


def test_network_that_fails_on_any_t_keeps_its_own_error():
    """Not blamed on float t (it fails on integer t too): one line that carries the network's own error."""

    def broken(x, t):
        raise IndexError("list index out of range")

    m = from_callable(broken, sample_shape=(1, 4, 4))
    with pytest.raises(InputError) as e:
        m(torch.zeros(1, 1, 4, 4), torch.tensor([3.0]))
    msg = str(e.value)
    assert "the network raised IndexError: list index out of range" in msg and "float" not in msg
    assert isinstance(e.value.__cause__, IndexError) and "\n" not in msg
