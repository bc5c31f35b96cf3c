"""Natural-image patches (lipscope.patches) and the `patches[:SIZE[:SCALE]]` data spec."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_sample_images

from lipscope.data import choose_indices, load_data, load_data_with_scaling
from lipscope.errors import InputError
from lipscope.patches import grid_shape, natural_patches, parse_spec


@pytest.fixture(scope="module")
def photos() -> dict[str, np.ndarray]:
    """The bundled photos by name, read by scikit-learn itself (the independent reference)."""
    bunch = load_sample_images()
    return {Path(f).stem: img for f, img in zip(bunch.filenames, bunch.images, strict=True)}


def test_default_grid_shape_dtype_and_count(photos):
    assert {k: v.shape for k, v in photos.items()} == {"china": (427, 640, 3), "flower": (427, 640, 3)}
    a = natural_patches()
    assert a.shape == (13 * 20 * 2, 3, 32, 32) == (520, 3, 32, 32) and a.dtype == np.uint8
    assert grid_shape(32, 32) == (13, 20) and grid_shape(16, 16) == (26, 40) and grid_shape(16, 16, 2) == (13, 20)
    assert natural_patches(16).shape == (2080, 3, 16, 16)
    assert natural_patches(16, scale=2).shape == (520, 3, 16, 16)
    assert natural_patches(32, stride=16).shape == (2 * 25 * 39, 3, 32, 32)
    assert natural_patches(images=("flower",)).shape == (260, 3, 32, 32)
    assert parse_spec("patches") == (32, 1) and parse_spec("patches:16") == (16, 1)
    assert parse_spec("patches:16:2") == (16, 2)


@pytest.mark.parametrize("k,i,j", [(0, 0, 0), (0, 5, 17), (1, 0, 19), (1, 12, 0), (1, 12, 19)])
def test_tile_equals_independent_slice(photos, k, i, j):
    ref = photos[("china", "flower")[k]][32 * i : 32 * i + 32, 32 * j : 32 * j + 32]  # (32, 32, 3)
    np.testing.assert_array_equal(natural_patches()[k * 260 + i * 20 + j], np.moveaxis(ref, -1, 0))
    # overlapping grid (stride 16): 25 rows × 39 columns per photo
    ref16 = photos[("china", "flower")[k]][16 * i : 16 * i + 32, 16 * j : 16 * j + 32]
    np.testing.assert_array_equal(natural_patches(stride=16)[k * 975 + i * 39 + j], np.moveaxis(ref16, -1, 0))


def test_downsampled_tiles_are_box_means(photos):
    a = natural_patches(16, scale=2)
    for k, name in enumerate(("china", "flower")):
        small = np.asarray(Image.fromarray(photos[name][:426, :640]).resize((320, 213), Image.Resampling.BOX))
        assert small.shape == (213, 320, 3)
        for i, j in [(0, 0), (7, 11), (12, 19)]:
            ref = small[16 * i : 16 * i + 16, 16 * j : 16 * j + 16]
            np.testing.assert_array_equal(a[k * 260 + i * 20 + j], np.moveaxis(ref, -1, 0))
        # and PIL's box filter is the 2×2 block mean, up to rounding
        means = photos[name][:426].astype(np.float64).reshape(213, 2, 320, 2, 3).mean(axis=(1, 3))
        assert np.abs(small - means).max() <= 1.0
    assert not np.array_equal(a, natural_patches(16)[:520])


def test_subset_deterministic_and_seeded_like_data():
    full = natural_patches()
    a = natural_patches(n=12, seed=3)
    np.testing.assert_array_equal(a, natural_patches(n=12, seed=3))
    np.testing.assert_array_equal(a, full[choose_indices(520, 12, 3)])  # the convention of every data source
    b = natural_patches(n=12, seed=4)
    assert a.shape == b.shape == (12, 3, 32, 32) and not np.array_equal(a, b)
    assert len({t.tobytes() for t in a}) == 12  # a subset: no repeats
    assert natural_patches(n=520, seed=9).shape == full.shape


def test_load_data_maps_codes_exactly():
    x, how = load_data_with_scaling("patches", 10, 5, (3, 32, 32))
    codes = natural_patches(n=10, seed=5)
    assert x.shape == (10, 3, 32, 32) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1 and how.source_kind == "images" and "0..255 → [-1, 1]" in str(how)
    torch.testing.assert_close(x.double(), torch.from_numpy(codes / 255.0 * 2 - 1), rtol=0, atol=1e-6)
    np.testing.assert_array_equal(x.numpy(), codes.astype(np.float32) / np.float32(127.5) - 1)  # bit for bit
    assert (x.numpy() == -1).sum() == (codes == 0).sum() and (x.numpy() == 1).sum() == (codes == 255).sum()
    y = load_data("patches", 10, 5, (3, 32, 32), data_range=(0.0, 1.0))
    torch.testing.assert_close(y.double(), torch.from_numpy(codes / 255.0), rtol=0, atol=1e-6)


def test_load_data_scaled_spec_and_resize():
    x = load_data("patches:16:2", 6, 1, (3, 16, 16))
    np.testing.assert_array_equal(x.numpy(), natural_patches(16, 6, 1, scale=2).astype(np.float32) / 127.5 - 1)
    small = load_data("patches", 6, 1, (3, 8, 8))  # resized to the model like digits
    assert small.shape == (6, 3, 8, 8) and small.min() >= -1 and small.max() <= 1
    torch.testing.assert_close(
        small.mean(dim=(2, 3)), load_data("patches", 6, 1, (3, 32, 32)).mean(dim=(2, 3)), atol=0.05, rtol=0
    )


def test_one_channel_model_gets_grey_tiles(photos):
    x = load_data("patches", 520, 0, (1, 32, 32))
    assert x.shape == (520, 1, 32, 32)
    grey = np.asarray(Image.fromarray(photos["flower"]).convert("L"))  # PIL's L, as image folders are greyed
    ref = grey[32 * 3 : 32 * 4, 32 * 7 : 32 * 8].astype(np.float32) / 127.5 - 1
    np.testing.assert_array_equal(x[260 + 3 * 20 + 7, 0].numpy(), ref)
    assert load_data("patches", 3, 0, (1, 8, 8)).shape == (3, 1, 8, 8)
    with pytest.raises(InputError, match="channels"):
        load_data("patches", 3, 0, (4, 32, 32))


@pytest.mark.parametrize(
    "spec,needle",
    [
        ("patches:0", "SIZE '0'"),
        ("patches:abc", "SIZE 'abc'"),
        ("patches:", "SIZE ''"),
        ("patches:16:0", "SCALE '0'"),
        ("patches:428", "SIZE ≤ 427"),
        ("patches:32:20", "SIZE ≤ 21 or SCALE ≤ 13"),
        ("patches:1:2:3", "patches:SIZE:SCALE"),
    ],
)
def test_bad_specs_refused_in_one_line(spec, needle):
    with pytest.raises(InputError) as e:
        load_data(spec, 4, 0, (3, 32, 32))
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("`data` ") and needle in msg


@pytest.mark.parametrize(
    "kwargs,name",
    [
        ({"size": 0}, "`size`"),
        ({"size": 2.5}, "`size`"),
        ({"size": 428}, "`size`"),
        ({"scale": 0}, "`scale`"),
        ({"stride": -1}, "`stride`"),
        ({"images": ("china", "lena")}, "`images`"),
        ({"n": 521}, "`n`"),
        ({"n": 0}, "`n`"),
    ],
)
def test_bad_arguments_name_the_parameter(kwargs, name):
    with pytest.raises(InputError) as e:
        natural_patches(**kwargs)
    assert "\n" not in str(e.value) and str(e.value).startswith(name)


def test_unknown_spec_lists_patches():
    with pytest.raises(InputError, match="use digits, patches, model"):
        load_data("patchez", 4, 0, (3, 32, 32))


def test_patch_statistics_are_not_trivial():
    a = natural_patches().astype(np.float64)
    # A flat or constant data set would give 0 for each of these; JPEG noise alone stays at a few codes.
    # Natural photos span a good part of the 8-bit range (> 1/8 of it), their tiles differ in brightness
    # (> 1/16 of the range between tile means) and hold texture (mean within-tile std > 1/4 of the global std).
    total = a.std()
    assert total > 255 / 8
    assert a.mean(axis=(1, 2, 3)).std() > 255 / 16
    assert a.std(axis=(1, 2, 3)).mean() > total / 4
    assert len({t.tobytes() for t in natural_patches()}) == 520  # no two tiles equal
    assert not np.array_equal(a[:260], a[260:])  # the two photos differ
    rgb = a.mean(axis=(0, 2, 3))
    assert rgb.max() - rgb.min() > 1  # colour, not grey replicated
