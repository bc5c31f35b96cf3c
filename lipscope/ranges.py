"""The data range a model was trained on, and the mapping of data into it (used by :mod:`lipscope.data`).

The range is declared, never guessed: ``data_range=(lo, hi)`` or None. Pixel codes are mapped linearly into
[lo, hi] (:func:`map_codes`); float arrays are fed unchanged and must lie inside it, a refusal suggesting the
range their span fills (:func:`scale_array`, :func:`suggest_range`). :class:`DataScaling` records which mapping
was applied and what identifies the x0 a run read.
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .errors import InputError

log = logging.getLogger("lipscope")

DataRange = tuple[float, float] | None
DEFAULT_DATA_RANGE: tuple[float, float] = (-1.0, 1.0)  # diffusers' convention for pixel-space UNets
RANGE_TOL = 1e-3  # float arrays may overshoot the declared range by this fraction of its width


@dataclass(frozen=True)
class DataScaling:
    """The mapping applied to a data source, e.g. ``uint8 0..255 → [-1, 1]``, and what identifies the x0 read
    (``source``: the probe's sample cache file and its sha256, the hash of x0 as fed)."""

    source_kind: str  # digits, images, uint8 array, float32 array, model samples, tensor
    mapping: str
    source: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        return self.mapping


def check_data_range(data_range: object) -> DataRange:
    """``(lo, hi)`` with finite lo < hi, or None; returned as floats."""
    if data_range is None:
        return None
    try:
        lo, hi = (float(v) for v in data_range)  # type: ignore[attr-defined]
    except (TypeError, ValueError):
        raise InputError(f"`data_range` {data_range!r}: give two numbers lo,hi (e.g. -1,1 or 0,1) or none") from None
    if not (np.isfinite(lo) and np.isfinite(hi) and lo < hi):
        raise InputError(f"`data_range` {lo:g},{hi:g}: needs finite lo < hi (e.g. -1,1 or 0,1) or none")
    if max(abs(lo), abs(hi)) > 1e30:
        raise InputError(f"`data_range` {lo:g},{hi:g}: beyond what float32 data can hold; give the real range")
    return lo, hi


def resolve_data_range(data_range: object, default: DataRange) -> DataRange:
    """``"auto"`` → ``default`` (the model family's convention); anything else checked by :func:`check_data_range`."""
    if isinstance(data_range, str):
        if data_range.strip().lower() == "auto":
            return default
        if data_range.strip().lower() == "none":
            return None
        raise InputError(f"`data_range` {data_range!r}: give lo,hi (e.g. -1,1 or 0,1), auto or none")
    return check_data_range(data_range)


def range_text(r: tuple[float, float]) -> str:
    return f"[{r[0]:g}, {r[1]:g}]"


def array_digest(x: torch.Tensor | np.ndarray) -> str:
    """sha256 (first 16 hex) of an array's dtype, shape and bytes: which x0 a run fed."""
    a = np.ascontiguousarray(x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x)
    return hashlib.sha256(f"{a.dtype}|{a.shape}|".encode() + a.tobytes()).hexdigest()[:16]


def _outward(v: float, up: bool) -> float:
    """v rounded to 4 significant digits, away from the inside of a range (down for its low end, up for its high)."""
    if v == 0 or not math.isfinite(v):
        return v
    q = 10.0 ** (math.floor(math.log10(abs(v))) - 3)
    return (math.ceil(v / q) if up else math.floor(v / q)) * q


def suggest_range(lo: float, hi: float) -> str:
    """What to declare for data spanning [lo, hi]: the conventional range it fills, 8-bit pixels as uint8, else
    its own span (rounded outward to 4 digits)."""
    for cand in ((0.0, 1.0), (-1.0, 1.0)):
        tol = RANGE_TOL * (cand[1] - cand[0])
        if lo >= cand[0] - tol and hi <= cand[1] + tol:
            return f"if the model was trained on {range_text(cand)}, declare `data_range` {cand[0]:g},{cand[1]:g}"
    if lo >= 0 and hi <= 255 * (1 + RANGE_TOL) and hi > 1:
        return (
            "8-bit pixels stored as floats: save them as uint8 (mapped into the declared range), or declare "
            "`data_range` 0,255 if the model was trained on them as they are"
        )
    a, b = _outward(lo, False), _outward(hi, True)
    return f"if the model was trained on data in [{a:g}, {b:g}], declare `data_range` {a:g},{b:g}"


def map_codes(a: np.ndarray, top: int, data_range: DataRange, what: str, kind: str) -> tuple[np.ndarray, DataScaling]:
    """Integer codes 0..top → [lo, hi] linearly, as float32 (0 → lo and top → hi exactly; for
    (−1, 1) and top 255 this is x/127.5 − 1 bit for bit)."""
    codes = f"{ {'uint8 array': 'uint8', 'images': 'image pixels'}.get(kind, kind) } 0..{top}"
    if data_range is None:
        raise InputError(
            f"{what}: {codes} pixel codes need a range to be mapped to; "
            "declare the model's range with `data_range` (e.g. -1,1 or 0,1)"
        )
    lo, hi = data_range
    y = a.astype(np.float32) / (top / (hi - lo)) + lo
    y = np.clip(y, np.float32(lo), np.float32(hi))
    y[a == top] = hi
    return y.astype(np.float32, copy=False), DataScaling(kind, f"{codes} → {range_text(data_range)}")


def scale_array(
    a: np.ndarray, what: str, data_range: DataRange = DEFAULT_DATA_RANGE, whole: np.ndarray | None = None
) -> tuple[np.ndarray, DataScaling]:
    """uint8 → [lo, hi]; float (and other integer) values kept as they are if inside [lo, hi] (or
    with ``data_range=None``), else refused with a range suggested from their span. ``whole``: the array ``a`` was
    picked from (a file's samples), checked whole so the verdict does not depend on the seed. Returns the float32
    array and the mapping applied."""
    if a.dtype == np.uint8:
        return map_codes(a, 255, data_range, what, "uint8 array")
    if not np.issubdtype(a.dtype, np.floating) and not np.issubdtype(a.dtype, np.integer):
        raise InputError(f"{what}: dtype {a.dtype} not supported; use uint8 or float arrays")
    kind = f"{a.dtype} array"
    x = a.astype(np.float32)
    full = x if whole is None else whole
    if not np.all(np.isfinite(full)):
        raise InputError(f"{what} contains NaN/inf; clean the data first")
    a_lo, a_hi = float(np.min(full)), float(np.max(full))
    span = f"[{a_lo:.4g}, {a_hi:.4g}]"
    if data_range is None:
        return x, DataScaling(kind, f"{kind} kept as is (values in {span}; no range declared)")
    lo, hi = data_range
    tol = RANGE_TOL * (hi - lo)
    if a_lo >= lo - tol and a_hi <= hi + tol:
        note = ""
        mid, span_w = (lo + hi) / 2, a_hi - a_lo
        if span_w >= 0.25 * (hi - lo) and (a_lo >= mid - tol or a_hi <= mid + tol):  # e.g. [0, 1] data under [−1, 1]
            note = f"; one half only: if the model was trained on [{a_lo:.3g}, {a_hi:.3g}], declare that range"
            log.warning(
                "%s: values in %s fill one half of the data range %s; if the model was trained on that half, "
                "declare its range (data range %.3g,%.3g)",
                what,
                span,
                range_text(data_range),
                a_lo,
                a_hi,
            )
        return x, DataScaling(kind, f"{kind} kept as is (values in {span} ⊂ {range_text(data_range)}{note})")
    of = "the file" if whole is not None else "the array"
    raise InputError(
        f"{what}: values span {span} (all {full.shape[0]} samples of {of}), outside the declared data range "
        f"{range_text(data_range)}; {suggest_range(a_lo, a_hi)}, or `data_range` none to feed arrays as they are"
    )
