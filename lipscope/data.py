"""x0 sources, all returned as float32 tensors (N, C, H, W) in the model's data range.

The range is declared, never guessed: ``data_range=(lo, hi)`` (default (−1, 1), diffusers' convention
for pixel-space UNets) or ``None``. Pixel codes are mapped linearly into [lo, hi] (0 → lo, top → hi);
float arrays are fed unchanged and must lie inside [lo, hi]; ``None`` feeds float arrays as they are
and refuses pixel codes (:mod:`lipscope.ranges`). :func:`load_data_with_scaling` also says which mapping it
applied.

Sources (``load_data(spec, …)``):
  * ``digits``: scikit-learn's 8×8 digits (0..16 → [lo, hi]), resized to the model, replicated to its channels;
  * a folder of images: resized (shorter side) and centre-cropped to the model's size, converted to
    L or RGB to match its channels, pixels 0..255 → [lo, hi];
  * ``.npy`` / ``.npz`` / ``.pt`` arrays, NCHW or NHWC: uint8 0..255 → [lo, hi]; float (and other
    integer) values kept as they are if inside [lo, hi], else refused;
  * ``hf:NAME[:split]``: a hub or local Hugging Face dataset (``pip install lipscope[hf]``);
  * ``patches[:SIZE[:SCALE]]``: RGB (or L) tiles of the photos bundled with scikit-learn (:mod:`lipscope.patches`).

Data sources are static: none calls a network (``model`` is the probe's: :func:`lipscope.sampling.model_samples`).

Which n samples are used is decided by ``seed`` alone (a seeded permutation from stream DATA of
:mod:`lipscope.rng`; sampling with replacement, with a notice, if the source has fewer than n).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import patches, rng
from .errors import InputError
from .ranges import DEFAULT_DATA_RANGE as DEFAULT_DATA_RANGE  # re-exported, with the names below
from .ranges import RANGE_TOL as RANGE_TOL
from .ranges import DataRange as DataRange
from .ranges import DataScaling as DataScaling
from .ranges import array_digest as array_digest
from .ranges import check_data_range as check_data_range
from .ranges import map_codes as map_codes
from .ranges import range_text as range_text
from .ranges import resolve_data_range as resolve_data_range
from .ranges import scale_array as scale_array

log = logging.getLogger("lipscope")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
ARRAY_SUFFIXES = (".npy", ".npz", ".pt", ".pth")


def choose_indices(available: int, n: int | None, seed: int) -> np.ndarray:
    """Which of ``available`` items to use for n samples (all of them for n=None): depends on
    (seed, available, n) only."""
    if available <= 0:
        raise InputError("the data source is empty; pass `data` with at least one sample")
    if n is None:
        return np.arange(available)
    gen = rng.data_rng(seed)
    if available >= n:
        return np.sort(gen.permutation(available)[:n])
    log.warning("data has %d samples but %d were asked for: sampling with replacement", available, n)
    return gen.integers(0, available, size=n)


# ---------------------------------------------------------------------------------------------
# conversion helpers
# ---------------------------------------------------------------------------------------------


def _match_channels(x: torch.Tensor, c: int, what: str) -> torch.Tensor:
    if x.shape[1] == c:
        return x
    if x.shape[1] == 1:
        return x.expand(-1, c, -1, -1).contiguous()
    raise InputError(f"{what} has {x.shape[1]} channels but the model takes {c}; pass data with {c} channels")


def to_nchw(a: np.ndarray, channels: int | None, what: str) -> np.ndarray:
    """Accept (N,C,H,W), (N,H,W,C) or (N,H,W); decide by which axis matches the channel count."""
    if a.ndim == 3:
        a = a[:, None]
    if a.ndim != 4:
        raise InputError(f"{what}: expected a 4-d array (N,C,H,W) or (N,H,W,C), got shape {a.shape}")
    c_first, c_last = a.shape[1], a.shape[3]
    cands = (channels,) if channels is not None else (1, 3, 4)
    if c_first in cands and c_last not in cands:
        return a
    if c_last in cands and c_first not in cands:
        return a.transpose(0, 3, 1, 2)
    if c_first in cands:  # ambiguous (e.g. 3×…×3): NCHW is diffusers' layout
        return a
    raise InputError(
        f"{what}: shape {a.shape} has no channel axis of size {channels if channels else '1/3'}; "
        f"the model takes {channels} channels"
    )


# ---------------------------------------------------------------------------------------------
# sources
# ---------------------------------------------------------------------------------------------


def digits_codes() -> np.ndarray:
    """scikit-learn's digits as (1797, 1, 8, 8) uint8 codes 0..16."""
    from sklearn.datasets import load_digits

    return load_digits().images.astype(np.uint8)[:, None]


def digits_array(data_range: tuple[float, float] = DEFAULT_DATA_RANGE) -> np.ndarray:
    """scikit-learn's digits as (1797, 1, 8, 8) float32, 0..16 mapped to ``data_range``."""
    return map_codes(digits_codes(), 16, data_range, "`data` digits", "digits")[0]


def load_array(path: Path) -> np.ndarray:
    """An array file (.npy, .npz, .pt/.pth tensor), never unpickled; a FIFO or device is refused, not read."""
    if not path.is_file():
        raise InputError(f"`data` {path} is not a regular file; pass an array file (numpy.save / torch.save)")
    with path.open("rb") as f:
        head = f.read(6)
    try:
        if path.suffix == ".npy":
            return np.load(path, allow_pickle=False)
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                keys = list(z.keys())
                key = next((k for k in ("x0", "images", "samples") if k in keys), None)
                if key is None and len(keys) == 1:
                    key = keys[0]
                if key is None:
                    raise InputError(f"`data` {path}: npz holds {keys}; name the array x0 (or save a single array)")
                return z[key]
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
        if isinstance(obj, dict):
            obj = next((obj[k] for k in ("x0", "images", "samples") if k in obj), None)
        if not isinstance(obj, torch.Tensor):
            raise InputError(f"`data` {path}: expected a tensor (or a dict with key x0)")
        return obj.numpy()
    except InputError:
        raise
    except Exception as e:
        first = str(e).splitlines()[0] if str(e).strip() else type(e).__name__
        npy_or_zip = head.startswith((b"\x93NUMPY", b"PK"))  # .npy magic, zip (.npz, torch.save)
        pickled = head[:1] == b"\x80" or (npy_or_zip and "pickle" in first.lower())
        if pickled or "weights only" in first.lower():
            raise InputError(
                f"`data` {path} holds pickled Python objects, which lipscope never loads; "
                "save a numeric array instead (numpy.save of a float or uint8 array)"
            ) from e
        raise InputError(
            f"`data` {path}: could not read the array ({type(e).__name__}); the file may be corrupt: "
            "re-save it with numpy.save / numpy.savez / torch.save of a tensor"
        ) from e


def _image_to_array(img, c: int, hw: tuple[int, ...]) -> np.ndarray:
    from PIL import Image, ImageOps

    mode = {1: "L", 3: "RGB"}.get(c)
    if mode is None:
        raise InputError(f"image data can feed 1- or 3-channel models, this one takes {c}")
    img = ImageOps.exif_transpose(img).convert(mode)
    img = ImageOps.fit(img, (hw[1], hw[0]), method=Image.Resampling.BICUBIC, centering=(0.5, 0.5))
    a = np.asarray(img, dtype=np.uint8)
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


def _image_folder(path: Path, n: int | None, seed: int, c: int, hw: tuple[int, ...]) -> np.ndarray:
    """uint8 (n, C, H, W)."""
    from PIL import Image, UnidentifiedImageError

    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise InputError(
            f"`data` {path}: no images ({', '.join(IMAGE_SUFFIXES)}) found in the folder; "
            "point `data` at a folder of images or at an array file"
        )
    idx = choose_indices(len(files), n, seed)
    out = []
    for i in idx:
        try:
            with Image.open(files[i]) as img:
                out.append(_image_to_array(img, c, hw))
        except (UnidentifiedImageError, OSError) as e:
            raise InputError(f"`data`: cannot read image {files[i]} ({e.__class__.__name__}); remove or fix it") from e
    return np.stack(out)


def _hf_dataset(name: str, split: str, n: int | None, seed: int, c: int, hw: tuple[int, ...]) -> np.ndarray:
    """uint8 (n, C, H, W)."""
    try:
        import datasets
    except ImportError as e:
        raise InputError("`data` hf:… needs the datasets package: pip install 'lipscope[hf]'") from e
    try:
        p = Path(name)
        if p.is_dir() and ((p / "dataset_info.json").exists() or (p / "state.json").exists()):
            ds = datasets.load_from_disk(str(p))
            if isinstance(ds, datasets.DatasetDict):
                ds = ds[split]
        else:
            ds = datasets.load_dataset(name, split=split)
    except Exception as e:
        raise InputError(
            f"`data` hf:{name}:{split}: could not load the dataset ({str(e).splitlines()[0][:200]})"
        ) from e
    col = next((k for k, f in ds.features.items() if isinstance(f, datasets.Image)), None)
    col = col or next((k for k in ("img", "image", "pixel_values") if k in ds.column_names), None)
    if col is None:
        raise InputError(f"`data` hf:{name}: no image column among {ds.column_names}")
    idx = choose_indices(len(ds), n, seed)
    imgs = [_image_to_array(ds[int(i)][col], c, hw) for i in idx]
    return np.stack(imgs)


def load_data(
    spec: str | np.ndarray | torch.Tensor,
    n: int | None,
    seed: int = 0,
    sample_shape: tuple[int, ...] | None = None,
    data_range: DataRange = DEFAULT_DATA_RANGE,
) -> torch.Tensor:
    """Load n x0 samples (every sample for n=None) as float32 (n, C, H, W) in ``data_range``,
    matched to ``sample_shape`` (C, H, W). :func:`load_data_with_scaling` also returns the mapping."""
    return load_data_with_scaling(spec, n, seed, sample_shape, data_range)[0]


def load_data_with_scaling(
    spec: str | np.ndarray | torch.Tensor,
    n: int | None,
    seed: int = 0,
    sample_shape: tuple[int, ...] | None = None,
    data_range: DataRange = DEFAULT_DATA_RANGE,
) -> tuple[torch.Tensor, DataScaling]:
    """:func:`load_data`, and the :class:`DataScaling` it applied (for run records)."""
    if n is not None and n < 1:
        raise InputError(f"the number of samples must be ≥ 1 (got {n})")
    data_range = check_data_range(data_range)
    c, hw = (sample_shape[0], tuple(sample_shape[1:])) if sample_shape else (None, None)
    if isinstance(spec, (np.ndarray, torch.Tensor)):
        a = spec.detach().cpu().numpy() if isinstance(spec, torch.Tensor) else spec
        a = to_nchw(np.asarray(a), c, "data array")
        y, how = scale_array(a, "data array", data_range)
        x = torch.from_numpy(y[choose_indices(a.shape[0], n, seed)])
        return _finish(x, c, hw, "data array", resize=False, clamp=data_range), how
    spec = str(spec)
    if spec == "model":
        raise InputError(
            "`data` model draws x0 from the model itself: only the probe can do that; "
            "for training or evaluation pass real data (digits, a folder or an array file)"
        )
    if spec == "digits":
        a = digits_codes()
        y, how = map_codes(a[choose_indices(a.shape[0], n, seed)], 16, data_range, "`data` digits", "digits")
        return _finish(torch.from_numpy(y), c, hw, "digits", resize=True, clamp=data_range), how
    if spec == "patches" or spec.startswith("patches:"):
        a = patches.patches_from_spec(spec, grey=c == 1)  # greyed like image folders (PIL's L) for 1-channel models
        y, how = map_codes(a[choose_indices(a.shape[0], n, seed)], 255, data_range, f"`data` {spec}", "images")
        return _finish(torch.from_numpy(y), c, hw, f"`data` {spec}", resize=True, clamp=data_range), how
    if spec.startswith("hf:"):
        if c is None or hw is None:  # both come from sample_shape
            raise InputError("`data` hf:… needs a model with a known sample size")
        _need_range(data_range, spec)
        parts = spec[3:].split(":")
        name, split = parts[0], (parts[1] if len(parts) > 1 else "train")
        y, how = map_codes(_hf_dataset(name, split, n, seed, c, hw), 255, data_range, f"`data` {spec}", "images")
        return torch.from_numpy(y), how
    path = Path(spec).expanduser()
    if not path.exists():
        raise InputError(
            f"`data` {spec}: no such file or folder; "
            "use digits, patches, model, hf:NAME, an image folder or an array file"
        )
    if path.is_dir():
        if c is None or hw is None:  # both come from sample_shape
            raise InputError(f"`data` {spec}: image folders need a model with a known sample size")
        _need_range(data_range, spec)
        y, how = map_codes(_image_folder(path, n, seed, c, hw), 255, data_range, f"`data` {spec}", "images")
        return torch.from_numpy(y), how
    if path.suffix.lower() not in ARRAY_SUFFIXES:
        raise InputError(f"`data` {spec}: unknown file type; use {'/'.join(ARRAY_SUFFIXES)} or an image folder")
    a = to_nchw(load_array(path), c, f"`data` {spec}")
    if a.shape[0] == 0:
        raise InputError(f"`data` {spec}: the array holds no samples; pass an array with at least one sample")
    y, how = scale_array(a[choose_indices(a.shape[0], n, seed)], f"`data` {spec}", data_range, whole=a)
    return _finish(torch.from_numpy(y), c, hw, f"`data` {spec}", resize=False, clamp=data_range), how


def _need_range(data_range: DataRange, spec: str) -> None:
    if data_range is None:  # refuse before reading any image
        raise InputError(
            f"`data` {spec}: images need a range to map their pixels to; "
            "declare the model's range with `data_range` (e.g. -1,1 or 0,1)"
        )


def _finish(x: torch.Tensor, c: int | None, hw, what: str, resize: bool, clamp: DataRange) -> torch.Tensor:
    x = x.float().contiguous()
    if c is not None:
        x = _match_channels(x, c, what)
    if hw is not None and tuple(x.shape[-2:]) != tuple(hw):
        if not resize:
            raise InputError(
                f"{what}: samples are {tuple(x.shape[-2:])} but the model takes {tuple(hw)}; resize the data"
            )
        x = F.interpolate(x, size=hw, mode="bilinear", antialias=True, align_corners=False)
        x = x if clamp is None else x.clamp(*clamp)
    return x
