"""x0 sources: scaling, layouts, channel/size matching and refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from lipscope.data import choose_indices, digits_array, load_data
from lipscope.errors import InputError


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
    a01 = np.random.default_rng(0).random((4, 1, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "a.npz", x0=a01)
    x = load_data(str(tmp_path / "a.npz"), 4, 0, (1, 8, 8))
    assert x.min() >= -1 and x.max() <= 1 and x.min() < -0.5
    torch.save(torch.from_numpy(a01 * 2 - 1), tmp_path / "b.pt")
    y = load_data(str(tmp_path / "b.pt"), 4, 0, (1, 8, 8))
    torch.testing.assert_close(torch.sort(x.flatten())[0], torch.sort(y.flatten())[0], rtol=0, atol=1e-6)
    np.save(tmp_path / "c.npy", a01 * 255)
    with pytest.raises(InputError, match="scale them"):
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
