"""Feature spaces (lipscope.features): tiny random transformers models saved by the test, checked against an
explicit transformers call on images preprocessed by hand; weight hashes; py: factories; refusals."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from lipscope.errors import InputError
from lipscope.features import FeatureSpace, load_features

transformers = pytest.importorskip("transformers")

EPS32 = float(torch.finfo(torch.float32).eps)
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
CLIP = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
TINY_VIT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=16)


@contextlib.contextmanager
def _quiet():
    """No save/load progress bars or reports while building the fixtures (restored after)."""
    tlog = transformers.utils.logging
    verbosity, bar = tlog.get_verbosity(), tlog.is_progress_bar_enabled()
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()
    try:
        yield
    finally:
        tlog.set_verbosity(verbosity)
        if bar:
            tlog.enable_progress_bar()


def tiny_dinov2(folder: Path, seed: int = 0) -> Path:
    """A random Dinov2Model (hidden 32, 2 layers, patch 4, image 16) saved with save_pretrained."""
    torch.manual_seed(seed)
    model = transformers.Dinov2Model(transformers.Dinov2Config(patch_size=4, **TINY_VIT)).eval()
    with _quiet():
        model.save_pretrained(folder)
    return folder


def tiny_clip(folder: Path, projection: bool = False, seed: int = 1) -> Path:
    torch.manual_seed(seed)
    cfg = transformers.CLIPVisionConfig(patch_size=4, projection_dim=24, **TINY_VIT)
    cls = transformers.CLIPVisionModelWithProjection if projection else transformers.CLIPVisionModel
    with _quiet():
        cls(cfg).eval().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def dinov2_dir(tmp_path_factory) -> Path:
    return tiny_dinov2(tmp_path_factory.mktemp("dinov2"))


def _images(n=5, c=1, h=8, w=8, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, c, h, w, generator=g) * 2 - 1


def _by_hand(x: torch.Tensor, resize: tuple[int, int], crop: tuple[int, int] | None, mean, std, dtype) -> torch.Tensor:
    """The preprocessing written out: [−1, 1] → [0, 1], grey → RGB, bicubic antialiased resize, clamp, centre crop,
    (x − mean)/std."""
    y = ((x.to(dtype) + 1) / 2).repeat(1, 3 // x.shape[1], 1, 1)
    y = F.interpolate(y, size=resize, mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
    if crop is not None:
        top, left = (resize[0] - crop[0]) // 2, (resize[1] - crop[1]) // 2
        y = y[:, :, top : top + crop[0], left : left + crop[1]]
    return (y - torch.tensor(mean, dtype=dtype).view(1, 3, 1, 1)) / torch.tensor(std, dtype=dtype).view(1, 3, 1, 1)


def _check_against_reference(space: FeatureSpace, folder: Path, cls, out_field: str, x, resize, crop, mean, std):
    """Features equal to an explicit transformers call on the hand-preprocessed tensor.

    Tolerance: the reference is run in float32 and in float64 (the same weights, cast); e = max |ref32 − ref64| is
    the measured float32 rounding of this network on these inputs. Our float32 evaluation batches and orders its
    sums differently, so it is allowed 2e around the float64 value, i.e. |ours − ref32| ≤ 3e, plus a floor of
    16 float32 ulps of the feature scale for the case where e happens to be tiny."""
    model = cls.from_pretrained(str(folder), local_files_only=True).eval()
    with torch.no_grad():
        ref32 = getattr(model(pixel_values=_by_hand(x, resize, crop, mean, std, torch.float32)), out_field)
        m64 = model.double()
        ref64 = getattr(m64(pixel_values=_by_hand(x, resize, crop, mean, std, torch.float64)), out_field)
    ref32, ref64 = ref32.double().numpy(), ref64.numpy()
    ours = space(x)
    assert ours.dtype == np.float64 and ours.shape == ref32.shape == (len(x), space.dimension)
    e = np.abs(ref32 - ref64).max()
    tol = 3 * e + 16 * EPS32 * np.abs(ref64).max()
    assert np.abs(ours - ref32).max() <= tol, (np.abs(ours - ref32).max(), tol)


def test_dinov2_default_preprocessing(dinov2_dir):
    space = load_features(str(dinov2_dir))
    assert space.name == "dinov2" and space.dimension == 32 and "pooler_output" in space.kind
    assert space.sha256 == hashlib.sha256((dinov2_dir / "model.safetensors").read_bytes()).hexdigest()
    x = _images()  # grey 8×8 → RGB 16×16 (config.image_size), ImageNet mean/std
    _check_against_reference(space, dinov2_dir, transformers.Dinov2Model, "pooler_output", x, (16, 16), None, *IMAGENET)


def test_dinov2_with_its_image_processor(tmp_path):
    """preprocessor_config.json: short side to 20 then a 16×16 centre crop, on non-square RGB images."""
    folder = tiny_dinov2(tmp_path / "d")
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    p = transformers.BitImageProcessor(
        size={"shortest_edge": 20}, crop_size={"height": 16, "width": 16}, image_mean=list(mean), image_std=list(std)
    )
    p.save_pretrained(folder)
    space = load_features(str(folder))
    assert "shortest edge 20" in space.preprocessing
    x = _images(n=3, c=3, h=8, w=12, seed=1)  # 8×12 → 20×30 → crop rows 2:18, columns 7:23
    _check_against_reference(space, folder, transformers.Dinov2Model, "pooler_output", x, (20, 30), (16, 16), mean, std)


@pytest.mark.parametrize("projection", [False, True], ids=["CLIPVisionModel", "CLIPVisionModelWithProjection"])
def test_clip_vision(tmp_path, projection):
    folder = tiny_clip(tmp_path / "clip", projection=projection)
    space = load_features(str(folder))
    cls = transformers.CLIPVisionModelWithProjection if projection else transformers.CLIPVisionModel
    field = "image_embeds" if projection else "pooler_output"
    assert space.name == "clip" and field in space.kind and space.dimension == (24 if projection else 32)
    assert space.sha256 == hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    _check_against_reference(space, folder, cls, field, _images(seed=2), (16, 16), None, *CLIP)


def test_pickled_weights_need_trust_pickle(tmp_path, dinov2_dir):
    folder = tmp_path / "pt"
    model = transformers.Dinov2Model.from_pretrained(str(dinov2_dir), local_files_only=True).eval()
    model.config.save_pretrained(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    with pytest.raises(InputError, match="trust_pickle") as e:
        load_features(str(folder))
    assert "\n" not in str(e.value)
    space = load_features(str(folder), trust_pickle=True)
    assert space.sha256 == hashlib.sha256((folder / "pytorch_model.bin").read_bytes()).hexdigest()
    x = _images()
    np.testing.assert_array_equal(space(x), load_features(str(dinov2_dir))(x))


def test_digits_space():
    from lipscope.zoo import CLASSIFIER_ASSET, digits_features

    space = load_features("digits")
    assert (space.name, space.dimension) == ("digits", 64)
    assert space.sha256 == hashlib.sha256(CLASSIFIER_ASSET.read_bytes()).hexdigest()
    x = _images(n=4)
    np.testing.assert_array_equal(space(x), digits_features(x))


FACTORY = """
import torch


class Toy:
    name = "Toy Space"
    dimension = 5

    def __call__(self, x):
        return x.reshape(len(x), -1)[:, :5] * 2


def make():
    return Toy()


def rows_wrong():
    return lambda x: torch.zeros(len(x) + 1, 3)


def nan():
    return lambda x: torch.full((len(x), 3), float("nan"))


def not_callable():
    return 3


def boom():
    raise RuntimeError("no weights here")
"""


@pytest.fixture()
def factory_module(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "lipscope_test_featmod.py"
    path.write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    return path


def test_py_factory(factory_module):
    space = load_features("py:lipscope_test_featmod:make")
    assert (space.name, space.dimension) == ("toy_space", 5)
    assert space.sha256 == hashlib.sha256(factory_module.read_bytes()).hexdigest()
    x = _images(n=3)
    np.testing.assert_array_equal(space(x), x.reshape(3, -1)[:, :5].double().numpy() * 2)


@pytest.mark.parametrize(
    "factory, match",
    [("rows_wrong", "one row per image"), ("nan", "NaN")],
)
def test_py_factory_bad_output(factory_module, factory, match):
    space = load_features(f"py:lipscope_test_featmod:{factory}")
    with pytest.raises(InputError, match=match):
        space(_images(n=3))


@pytest.mark.parametrize(
    "spec, match",
    [
        ("nope", "digits, a local folder"),
        ("Digits", "not a feature space"),
        ("py:", "py:package.module:factory"),
        ("py:lipscope_test_nonexistent_mod:f", "cannot import"),
        ("py:lipscope_test_featmod:missing", "no callable missing"),
        ("py:lipscope_test_featmod:not_callable", "returned int"),
        ("py:lipscope_test_featmod:boom", "no weights here"),
        ("{tmp}/file.txt", "is a file"),
        ("{tmp}/empty", "no config.json"),
        ("{tmp}/noweights", "no weight files"),
        ("{tmp}/badconfig", "transformers cannot load it"),
    ],
)
def test_bad_specs_one_line(factory_module, tmp_path, spec, match):
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "empty").mkdir()
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text("{}")
    (tmp_path / "badconfig").mkdir()
    (tmp_path / "badconfig" / "config.json").write_text('{"model_type": "no-such-model"}')
    (tmp_path / "badconfig" / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(InputError, match=match) as e:
        load_features(spec.replace("{tmp}", str(tmp_path)))
    assert "\n" not in str(e.value) and str(e.value).startswith("`features`")


def test_evaluate_in_a_transformers_space(tmp_path, dinov2_dir):
    """evaluate_models with DINOv2 features: columns named by the space; the reference features computed once."""
    from lipscope.evaluate import evaluate_models, summarize_eval
    from lipscope.loading import load_model

    space = load_features(str(dinov2_dir))
    calls = []
    counting = dataclasses.replace(space, fn=lambda x: (calls.append(len(x)), space.fn(x))[1])
    ref = _images(n=12, seed=3)
    m = load_model("builtin:digits-ddpm")
    df = evaluate_models({"model": m}, ref, schedulers=["ddim"], steps=[2], num=6, seeds=[0, 1], features=counting)
    assert calls == [12, 6, 6]
    assert {"fd_dinov2", "kid_dinov2", "kid_dinov2_subset_std", "fd_pixel", "swd_pixel"} <= set(df.columns)
    assert "fd_digits" not in df.columns and df["fd_dinov2"].gt(0).all()
    summ = summarize_eval(df)
    assert {"fd_dinov2_mean", "kid_dinov2_std", "fid_mean"} <= set(summ.columns)
    assert isinstance(summ, pd.DataFrame) and len(summ) == 1
