"""Natural-image patches: tiles cut from the two photographs bundled in scikit-learn's wheel.

``sklearn.datasets.load_sample_images()`` ships ``china.jpg`` and ``flower.jpg`` (427×640 RGB), so this
source needs no download. Tiles are cut on a deterministic grid (row-major, ``china`` first), optionally
after downsampling the photo by an integer factor with PIL's box filter (block means), so that small
tiles still hold structure. Non-overlapping tiles (stride = size), both photos:

  * ``patches``      32×32 tiles of the 427×640 photos: 13·20·2 = 520;
  * ``patches:16``   16×16 tiles of the 427×640 photos: 26·40·2 = 2080;
  * ``patches:16:2`` 16×16 tiles of the photos box-downsampled 2× (213×320): 13·20·2 = 520;
  * ``patches:8:4``  8×8 tiles of the photos downsampled 4× (106×160): 13·20·2 = 520.

Data specs: ``patches`` (32×32 tiles), ``patches:SIZE``, ``patches:SIZE:SCALE``.

Licence (scikit-learn's ``datasets/images/README.txt``, quoted as shipped)::

    Image: china.jpg
    Released under a creative commons license. [1]
    Attribution: Some rights reserved by danielbuechele [2]
    Retrieved 21st August, 2011 from [3] by Robert Layton

    [1] https://creativecommons.org/licenses/by/2.0/
    [2] https://www.flickr.com/photos/danielbuechele/
    [3] https://www.flickr.com/photos/danielbuechele/6061409035/sizes/z/in/photostream/

    Image: flower.jpg
    Released under a creative commons license. [1]
    Attribution: Some rights reserved by danielbuechele [2]
    Retrieved 21st August, 2011 from [3] by Robert Layton

    [1] https://creativecommons.org/licenses/by/2.0/
    [2] https://www.flickr.com/photos/vultilion/
    [3] https://www.flickr.com/photos/vultilion/6056698931/sizes/z/in/photostream/

(The README credits danielbuechele for ``flower.jpg`` too, while its links point to the Flickr user
vultilion.)
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np

from . import rng
from .errors import InputError

PHOTOS = ("china", "flower")
DEFAULT_SIZE = 32
SPEC_HELP = "use patches, patches:SIZE or patches:SIZE:SCALE (e.g. patches:16:2)"


@lru_cache(maxsize=16)
def photo(name: str, scale: int = 1, grey: bool = False) -> np.ndarray:
    """One bundled photo as read-only uint8 (H, W, 3), or (H, W) when ``grey`` (PIL's ``L``), box-downsampled
    by ``scale`` (the photo is first cropped at the bottom/right to a multiple of ``scale``)."""
    from PIL import Image
    from sklearn.datasets import load_sample_image

    img = Image.fromarray(np.asarray(load_sample_image(f"{name}.jpg"), dtype=np.uint8))
    if grey:
        img = img.convert("L")
    if scale > 1:
        w, h = img.width // scale, img.height // scale
        img = img.crop((0, 0, w * scale, h * scale)).resize((w, h), Image.Resampling.BOX)
    a = np.array(img, dtype=np.uint8)
    a.flags.writeable = False
    return a


def _whole(value: object, name: str, fix: str) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < 1:
        raise InputError(f"`{name}` {value!r}: must be a whole number ≥ 1; {fix}")
    return int(value)


def _misfit(size: int, scale: int, size_name: str, scale_name: str) -> str | None:
    """Why ``size`` tiles do not fit the photos downsampled by ``scale`` (None when they fit)."""
    h, w = photo(PHOTOS[0]).shape[:2]
    side = min(h, w) // scale
    if size <= side:
        return None
    fixes = ([f"{size_name} ≤ {side}"] if side >= 1 else []) + (
        [f"{scale_name} ≤ {min(h, w) // size}"] if scale > 1 and size <= min(h, w) else []
    )
    fix = " or ".join(fixes) or f"{scale_name} 1 and {size_name} ≤ {min(h, w)}"
    return (
        f"{size_name} {size} does not fit the photos ({h // scale}×{w // scale} after {scale_name} {scale}); use {fix}"
    )


def grid_shape(size: int, stride: int, scale: int = 1) -> tuple[int, int]:
    """(rows, cols) of the tile grid on one photo (both photos are 427×640 before ``scale``)."""
    h, w = photo(PHOTOS[0], scale).shape[:2]
    return (h - size) // stride + 1, (w - size) // stride + 1


def natural_patches(
    size: int = DEFAULT_SIZE,
    n: int | None = None,
    seed: int = 0,
    stride: int | None = None,
    images: Sequence[str] = PHOTOS,
    scale: int = 1,
    grey: bool = False,
) -> np.ndarray:
    """uint8 (N, 3, size, size) RGB tiles ((N, 1, size, size) with ``grey``) of the bundled photos.

    The grid starts at the top-left corner, steps by ``stride`` (default ``size``: non-overlapping)
    and is read row-major, photo after photo in the order of ``images``; each photo is first
    box-downsampled by ``scale``. With ``n``, a subset of n tiles chosen by ``seed`` from stream DATA
    of :mod:`lipscope.rng` (sorted, as ``lipscope.data.choose_indices`` picks items).
    """
    size = _whole(size, "size", "give the tile side in pixels, e.g. 32")
    scale = _whole(scale, "scale", "give an integer downsampling factor, e.g. 1 or 2")
    stride = size if stride is None else _whole(stride, "stride", "give the grid step in pixels, e.g. the size")
    if isinstance(images, str) or not images or any(name not in PHOTOS for name in images):
        raise InputError(f"`images` {images!r}: give a non-empty list of photo names among {', '.join(PHOTOS)}")
    why = _misfit(size, scale, "`size`", "`scale`")
    if why:
        raise InputError(why)
    rows, cols = grid_shape(size, stride, scale)
    tiles: list[np.ndarray] = []
    for name in images:
        a = photo(name, scale, grey)
        a = a[:, :, None] if a.ndim == 2 else a
        tiles.extend(
            a[i * stride : i * stride + size, j * stride : j * stride + size].transpose(2, 0, 1)
            for i in range(rows)
            for j in range(cols)
        )
    out = np.stack(tiles)
    if n is None:
        return out
    if isinstance(n, (bool, np.bool_)) or not isinstance(n, (int, np.integer)) or not 1 <= n <= len(out):
        raise InputError(f"`n` {n!r}: must be a whole number in 1..{len(out)} (the tiles on this grid), or None")
    return out[np.sort(rng.data_rng(seed).permutation(len(out))[:n])]


def parse_spec(spec: str) -> tuple[int, int]:
    """``patches[:SIZE[:SCALE]]`` → (size, scale); a bad spec raises :class:`InputError` naming `data`."""
    parts = spec.split(":")
    if parts[0] != "patches" or len(parts) > 3:
        raise InputError(f"`data` {spec!r}: not a patches spec; {SPEC_HELP}")
    values = [DEFAULT_SIZE, 1]
    for k, text in enumerate(parts[1:]):
        if not (text.isascii() and text.isdigit()) or int(text) < 1:
            what = ("SIZE", "SCALE")[k]
            raise InputError(f"`data` {spec}: {what} {text!r} must be a whole number ≥ 1; {SPEC_HELP}")
        values[k] = int(text)
    size, scale = values
    why = _misfit(size, scale, "SIZE", "SCALE")
    if why:
        raise InputError(f"`data` {spec}: {why}")
    return size, scale


def patches_from_spec(spec: str, grey: bool = False) -> np.ndarray:
    """Every tile of ``patches[:SIZE[:SCALE]]`` (non-overlapping grid, both photos), uint8 (N, C, SIZE, SIZE)."""
    size, scale = parse_spec(spec)
    return natural_patches(size, scale=scale, grey=grey)
