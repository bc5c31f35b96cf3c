"""x0 sources: scaling, layouts, channel/size matching and refusals."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import HANG_S
from PIL import Image

from lipscope.data import DataScaling, choose_indices, digits_array, load_data, load_data_with_scaling
from lipscope.errors import InputError
from lipscope.processes import VEProcess


def test_digits_scaling_and_resize():
    a = digits_array()
    assert a.shape == (1797, 1, 8, 8) and a.min() == -1 and a.max() == 1
    x = load_data("digits", 5, 0, (3, 32, 32))
    assert x.shape == (5, 3, 32, 32) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    torch.testing.assert_close(x[:, 0], x[:, 2])


def test_selection_depends_on_seed_only():
    np.testing.assert_array_equal(choose_indices(100, 10, 3), choose_indices(100, 10, 3))
    assert not np.array_equal(choose_indices(100, 10, 3), choose_indices(100, 10, 4))
    assert len(set(choose_indices(100, 100, 0))) == 100


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_uint8_arrays(tmp_path, layout):
    a = np.random.default_rng(0).integers(0, 256, size=(6, 3, 4, 4), dtype=np.uint8)
    a[0, 0, 0, 0], a[0, 0, 0, 1] = 0, 255
    arr = a if layout == "nchw" else a.transpose(0, 2, 3, 1)
    np.save(tmp_path / "x.npy", arr)
    x = load_data(str(tmp_path / "x.npy"), 6, 0, (3, 4, 4))
    ref = torch.from_numpy(a.astype(np.float32) / 127.5 - 1)
    # all 6 used: the set of rows equals the reference rows
    assert sorted(map(tuple, x.reshape(6, -1).tolist())) == sorted(map(tuple, ref.reshape(6, -1).tolist()))


def test_float_arrays_scaling(tmp_path):
    """Float arrays inside the declared range are fed as they are, whatever the container."""
    a01 = np.random.default_rng(0).random((4, 1, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "a.npz", x0=a01 * 2 - 1)
    x = load_data(str(tmp_path / "a.npz"), 4, 0, (1, 8, 8))
    torch.save(torch.from_numpy(a01 * 2 - 1), tmp_path / "b.pt")
    y = load_data(str(tmp_path / "b.pt"), 4, 0, (1, 8, 8))
    torch.testing.assert_close(x, y, rtol=0, atol=0)
    torch.testing.assert_close(torch.sort(x.flatten())[0], torch.sort(torch.from_numpy(a01 * 2 - 1).flatten())[0])
    np.save(tmp_path / "c.npy", a01 * 255)
    with pytest.raises(InputError, match="outside the declared data range"):
        load_data(str(tmp_path / "c.npy"), 4, 0, (1, 8, 8))


def test_wrong_channels_refused(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((4, 3, 8, 8), dtype=np.uint8))
    with pytest.raises(InputError, match="channel"):
        load_data(str(tmp_path / "x.npy"), 4, 0, (1, 8, 8))


def test_wrong_size_refused(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((4, 1, 16, 16), dtype=np.uint8))
    with pytest.raises(InputError, match="resize"):
        load_data(str(tmp_path / "x.npy"), 4, 0, (1, 8, 8))


def test_image_folder(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    x = load_data(str(tmp_path), 5, 0, (3, 8, 8))
    assert x.shape == (5, 3, 8, 8) and x.min() >= -1 and x.max() <= 1
    g = load_data(str(tmp_path), 2, 0, (1, 8, 8))
    assert g.shape == (2, 1, 8, 8)


def test_empty_folder_refused(tmp_path):
    with pytest.raises(InputError, match="no images"):
        load_data(str(tmp_path), 4, 0, (1, 8, 8))


def test_missing_path_and_unknown_type(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        load_data(str(tmp_path / "nope.npy"), 4, 0, (1, 8, 8))
    (tmp_path / "x.txt").write_text("1")
    with pytest.raises(InputError, match="unknown file type"):
        load_data(str(tmp_path / "x.txt"), 4, 0, (1, 8, 8))


def test_hf_needs_extra_or_loads(monkeypatch):
    import importlib.util

    if importlib.util.find_spec("datasets") is None:
        with pytest.raises(InputError, match=r"lipscope\[hf\]"):
            load_data("hf:cifar10", 4, 0, (3, 32, 32))
    else:
        with pytest.raises(InputError):
            load_data("hf:/no/such/dataset/here", 4, 0, (3, 32, 32))


class _Scale(torch.nn.Module):
    """ε(x, t) = w·x: a network with weights to hash."""

    def __init__(self, w: float):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(w))

    def forward(self, x, t):
        return self.w * x


def test_model_samples_are_cached(tmp_path):
    from lipscope import from_callable
    from lipscope.sampling import model_samples

    m = from_callable(_Scale(0.5), sample_shape=(1, 4, 4))
    a = model_samples(m, 3, 0, cache_dir=tmp_path)
    files = list(tmp_path.glob("x0_model_*.npz"))
    assert len(files) == 1 and a.shape == (3, 1, 4, 4) and torch.isfinite(a).all()
    b = model_samples(m, 3, 0, cache_dir=tmp_path)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_sample_cache_is_keyed_by_weights_not_config(tmp_path):
    """Two models with the same config but different weights (base vs control) never share samples."""
    from lipscope import from_callable
    from lipscope.sampling import model_samples

    lin = [_Scale(0.5), _Scale(-0.5)]
    a, b = (model_samples(from_callable(m, sample_shape=(1, 4, 4)), 3, 0, cache_dir=tmp_path) for m in lin)
    assert len(list(tmp_path.glob("x0_model_*.npz"))) == 2 and not torch.equal(a, b)


def test_data_sources_never_call_a_network():
    """`model` is resolved by the probe (lipscope.sampling), not by the static data sources."""
    with pytest.raises(InputError, match="only the probe"):
        load_data("model", 3, 0, (1, 4, 4))


# ---------------------------------------------------------------------------------------------
# data_range: declared, never guessed
# ---------------------------------------------------------------------------------------------


def _a01(n: int = 4) -> np.ndarray:
    a = np.random.default_rng(1).random((n, 1, 8, 8)).astype(np.float32)
    a[0, 0, 0, :2] = 0.0, 1.0
    return a


def test_float01_with_range_0_1_fed_bit_exact(tmp_path):
    a = _a01()
    np.save(tmp_path / "x.npy", a)
    x, how = load_data_with_scaling(str(tmp_path / "x.npy"), None, 0, (1, 8, 8), data_range=(0, 1))
    assert x.dtype == torch.float32 and np.array_equal(x.numpy(), a)
    assert how == DataScaling("float32 array", "float32 array kept as is (values in [0, 1] ⊂ [0, 1])")


def test_float01_with_default_range_is_no_longer_remapped(tmp_path, caplog):
    """Behaviour change: a [0, 1] float array used to be mapped to 2x − 1 silently. It lies inside the
    default range (−1, 1), so it is now fed unchanged, and the description says which span it had and that it
    fills one half of the declared range (with a warning: a [0, 1]-trained model needs `data_range` 0,1)."""
    a = _a01()
    np.save(tmp_path / "x.npy", a)
    with caplog.at_level("WARNING", logger="lipscope"):
        x, how = load_data_with_scaling(str(tmp_path / "x.npy"), None, 0, (1, 8, 8))
    assert np.array_equal(x.numpy(), a)
    assert how.mapping == (
        "float32 array kept as is (values in [0, 1] ⊂ [-1, 1]; one half only: if the model was trained on [0, 1], "
        "declare that range)"
    )
    assert "fill one half of the data range [-1, 1]" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="lipscope"):
        load_data_with_scaling(2 * a - 1, None, 0, (1, 8, 8))  # the whole range: no warning
    assert "one half" not in caplog.text
    assert np.array_equal(load_data(a, None, 0, (1, 8, 8)).numpy(), a)  # in-memory arrays alike


def test_float_0_255_refused_with_the_fix(tmp_path):
    np.save(tmp_path / "x.npy", _a01() * 255)
    for rng_ in ((-1.0, 1.0), (0.0, 1.0)):
        with pytest.raises(InputError) as e:
            load_data(str(tmp_path / "x.npy"), 4, 0, (1, 8, 8), data_range=rng_)
        msg = str(e.value)
        assert "\n" not in msg and "values span [0, 255]" in msg
        assert f"declared data range [{rng_[0]:g}, {rng_[1]:g}]" in msg
        assert "save them as uint8" in msg and "`data_range` 0,255" in msg and "none to feed arrays as they are" in msg
    # slightly outside (within 1e-3 of the width) is still accepted, unchanged
    b = _a01() * 2 - 1
    b[0, 0, 0, 0] = -1.0015
    assert np.array_equal(load_data(b, None, 0, (1, 8, 8)).numpy(), b)


@pytest.mark.parametrize("rng_", [(-1.0, 1.0), (0.0, 1.0), (-0.5, 2.0), (0.1, 0.7), (-3.3, 1.7)])
def test_uint8_mapped_to_declared_range_exactly(rng_):
    lo, hi = rng_
    a = np.arange(256, dtype=np.uint8).reshape(4, 1, 8, 8)
    x, how = load_data_with_scaling(a, None, 0, (1, 8, 8), data_range=rng_)
    v = x.flatten().numpy()
    assert v[0] == np.float32(lo) and v[255] == np.float32(hi)
    assert v.min() >= np.float32(lo) and v.max() <= np.float32(hi) and np.all(np.diff(v) > 0)
    np.testing.assert_allclose(v, lo + np.arange(256) / 255 * (hi - lo), rtol=0, atol=1e-6 * (hi - lo + abs(lo)))
    assert how == DataScaling("uint8 array", f"uint8 0..255 → [{lo:g}, {hi:g}]")
    if rng_ == (-1.0, 1.0):  # the default keeps the historical x/127.5 − 1, bit for bit
        assert np.array_equal(v, np.arange(256, dtype=np.float32) / 127.5 - 1.0)


def test_digits_mapped_to_declared_range():
    x, how = load_data_with_scaling("digits", None, 0, (1, 8, 8), data_range=(0, 1))
    assert x.min() == 0 and x.max() == 1 and how.mapping == "digits 0..16 → [0, 1]"
    np.testing.assert_array_equal(x.numpy(), (digits_array() + 1) / 2)
    # the default is the range the built-ins were trained on: digits_array(), bit for bit
    np.testing.assert_array_equal(load_data("digits", None, 0, (1, 8, 8)).numpy(), digits_array())
    r = load_data("digits", 6, 0, (3, 32, 32), data_range=(0.0, 1.0))  # resized: clamped to the range
    assert r.min() >= 0 and r.max() <= 1


def test_images_mapped_to_declared_range(tmp_path):
    px = np.zeros((8, 8), dtype=np.uint8)
    px[:4] = 255
    Image.fromarray(px).save(tmp_path / "0.png")
    x, how = load_data_with_scaling(str(tmp_path), 1, 0, (1, 8, 8), data_range=(0, 1))
    assert sorted(x.unique().tolist()) == [0.0, 1.0] and how == DataScaling("images", "image pixels 0..255 → [0, 1]")
    assert sorted(load_data(str(tmp_path), 1, 0, (1, 8, 8)).unique().tolist()) == [-1.0, 1.0]


def test_range_none_feeds_floats_as_they_are_and_refuses_pixels(tmp_path):
    a = _a01() * 255
    np.save(tmp_path / "x.npy", a)
    x, how = load_data_with_scaling(str(tmp_path / "x.npy"), None, 0, (1, 8, 8), data_range=None)
    assert np.array_equal(x.numpy(), a) and how.mapping.endswith("(values in [0, 255]; no range declared)")
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(tmp_path / "0.png")
    for spec in (str(tmp_path), "digits", np.zeros((2, 1, 8, 8), dtype=np.uint8)):
        with pytest.raises(InputError, match="need a range") as e:
            load_data(spec, 2, 0, (1, 8, 8), data_range=None)
        assert "`data_range`" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("bad", [(1.0, 0.0), (0.0, 0.0), (0.0, float("inf")), (0.0,), "0,1"])
def test_bad_data_range_refused(bad):
    with pytest.raises(InputError, match="`data_range`"):
        load_data("digits", 2, 0, (1, 8, 8), data_range=bad)


def test_probe_reports_the_scaling_and_checks_tensors():
    from lipscope import from_callable, probe

    m = from_callable(_Scale(0.5), sample_shape=(1, 8, 8))
    a = torch.from_numpy(_a01(2))
    df = probe(m, a, timesteps=[0, 1], samples=2, batch_size=4)
    assert df.attrs["data_scaling"].mapping == (
        "float32 array kept as is (values in [0, 1] ⊂ [-1, 1]; one half only: if the model was trained on [0, 1], "
        "declare that range) (data range -1,1: the vp-discrete default)"
    )
    with pytest.raises(InputError, match="outside the declared data range"):
        probe(m, a * 255, timesteps=[0, 1], samples=2, batch_size=4)
    df = probe(m, a * 255, timesteps=[0, 1], samples=2, batch_size=4, data_range=None)
    assert df.attrs["data_scaling"].mapping.endswith("no range declared)")


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "lipscope", *args], capture_output=True, text=True, env=env, timeout=HANG_S
    )


def test_cli_records_data_range_and_scaling(tmp_path, pipeline_dir):
    np.save(tmp_path / "x01.npy", _a01())
    base = ["probe", "--model", str(pipeline_dir), "--samples", "2", "-t", "0,1", "--no-progress"]
    r = _cli(*base, "--data", str(tmp_path / "x01.npy"), "--data-range", "0,1", "--out", str(tmp_path / "a"))
    assert r.returncode == 0 and "data range" not in r.stderr and "error:" not in r.stderr, r.stderr
    meta = json.loads((tmp_path / "a" / "run.json").read_text())
    assert meta["data_range"] == [0.0, 1.0] and meta["options"]["data_range"] == [0.0, 1.0]
    assert len(meta["data_scaling"].pop("source")["x0_sha256"]) == 16  # which x0 were fed
    assert meta["data_scaling"] == {
        "source_kind": "float32 array",
        "mapping": "float32 array kept as is (values in [0, 1] ⊂ [0, 1])",
    }
    assert "float32 array kept as is" in r.stdout
    r = _cli(*base, "--data", "digits", "--out", str(tmp_path / "b"))
    assert r.returncode == 0, r.stderr
    meta = json.loads((tmp_path / "b" / "run.json").read_text())
    assert meta["data_range"] == [-1.0, 1.0] and meta["options"]["data_range"] == "auto"
    assert meta["data_scaling"]["mapping"] == "digits 0..16 → [-1, 1] (data range -1,1: the vp-discrete default)"
    r = _cli(*base, "--data", str(tmp_path / "x01.npy"), "--data-range", "none", "--out", str(tmp_path / "c"))
    assert r.returncode == 0 and json.loads((tmp_path / "c" / "run.json").read_text())["data_range"] is None
    np.save(tmp_path / "x255.npy", _a01() * 255)
    for extra in (["--data", str(tmp_path / "x255.npy")], ["--data-range", "1,0"], ["--data-range", "a,b"]):
        r = _cli(*base, *extra, "--out", str(tmp_path / "d"))
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert "--data-range" in r.stderr and not (tmp_path / "d" / "run.json").exists()


# ---------------------------------------------------------------------------------------------
# issue 24: the sample cache named in run.json; range refusals suggest from the data's own span
# ---------------------------------------------------------------------------------------------


def _sha256(path) -> str:
    import hashlib

    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_probe_names_the_sample_cache_it_read(tmp_path):
    """`data` model: run.json said x0 came from the model but not which cache file (path, hash) the run read."""
    from lipscope import from_callable, probe

    m = from_callable(_Scale(0.5), sample_shape=(1, 4, 4))
    first = probe(m, "model", timesteps=[1], samples=3, cache_dir=str(tmp_path)).attrs["data_scaling"].source
    (cache,) = tmp_path.glob("x0_model_*.npz")
    assert first["cache_file"] == str(cache) and first["cache"] == "written"
    assert first["cache_sha256"] == _sha256(cache)
    again = probe(m, "model", timesteps=[1], samples=3, cache_dir=str(tmp_path)).attrs["data_scaling"].source
    assert again["cache"] == "read" and again["cache_sha256"] == first["cache_sha256"]
    assert again["x0_sha256"] == first["x0_sha256"]  # the very x0, hashed as fed
    plain = probe(from_callable(lambda x, t: 0.5 * x, sample_shape=(1, 4, 4)), "model", timesteps=[1], samples=3)
    assert plain.attrs["data_scaling"].source["cache"].startswith("not cached")
    digits = probe(m, "digits", timesteps=[1], samples=3).attrs["data_scaling"].source
    assert len(digits["x0_sha256"]) == 16
    ve = from_callable(_Scale(0.5), VEProcess(steps=100, sigma_min=0.01, sigma_max=5.0), sample_shape=(1, 4, 4))
    src = probe(ve, "model", timesteps=[1], samples=2, data_range=(-1, 1)).attrs["data_scaling"].source
    assert src["sampler"] == "Euler in sigma, 50 steps"  # the sampler that drew them, not DDIM
    assert first["sampler"] == "DDIM, 50 steps, eta 0"


def test_cli_run_json_records_the_sample_cache(tmp_path, pipeline_dir, monkeypatch):
    from typer.testing import CliRunner

    from lipscope.cli import app

    monkeypatch.setenv("LIPSCOPE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    args = ["probe", "--model", str(pipeline_dir), "--data", "model", "-t", "5", "--samples", "2", "--out", str(out)]
    r = CliRunner().invoke(app, [*args, "--no-progress"])
    assert r.exit_code == 0, r.output
    src = json.loads((out / "run.json").read_text())["data_scaling"]["source"]
    assert src["cache"] == "written" and _sha256(src["cache_file"]) == src["cache_sha256"]
    assert src["cache_file"].startswith(str(tmp_path / "cache"))


@pytest.mark.parametrize(
    ("scale", "shift", "suggest"),
    [(1.0, 0.0, "`data_range` 0,1"), (255.0, 0.0, "`data_range` 0,255"), (2.5, -1.25, "`data_range` -1.25,1.25")],
)
def test_range_refusal_suggests_from_the_span(tmp_path, scale, shift, suggest):
    """The refusal always suggested `data_range` 0,1, whatever the data; it now suggests the data's own span."""
    np.save(tmp_path / "x.npy", _a01() * scale + shift)
    rng_ = (0.25, 0.75) if scale == 1.0 else (-1.0, 1.0)
    with pytest.raises(InputError) as e:
        load_data(str(tmp_path / "x.npy"), 2, 0, (1, 8, 8), data_range=rng_)
    msg = str(e.value)
    assert suggest in msg and "all 4 samples of the file" in msg, msg
    assert ("save them as uint8" in msg) == (scale == 255.0)


def test_range_is_checked_on_the_whole_file(tmp_path):
    """The check saw only the samples the seed picked: a file with one sample out of range passed or failed by
    seed. Now the whole file decides, whatever the seed."""
    a = _a01(8) * 2 - 1
    a[5, 0, 0, :2] = -3.0, 3.0  # one sample spans [-3, 3]
    np.save(tmp_path / "x.npy", a)
    picked = [s for s in range(40) if 5 not in choose_indices(8, 2, s)]
    with pytest.raises(InputError, match=r"values span \[-3, 3\] \(all 8 samples of the file\).*`data_range` -3,3"):
        load_data(str(tmp_path / "x.npy"), 2, picked[0], (1, 8, 8))
