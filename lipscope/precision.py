"""The probe's network arithmetic at a chosen precision, with a measured accuracy guard.

``precision`` bf16/fp16/fp32/fp64 casts the network's weights for the run (autocast has no forward-mode AD
for convolutions on CPU in torch 2.13, so weights are cast; the norms and K are reduced in float64 either way).
Before that, a few samples (:func:`guard_samples`: evenly spaced, at every grid point) are measured at a
reference precision (float32 for bf16/fp16, float64 for fp32), and every row of the table gets
``K_rel_err_est``, the relative error of those samples' mean K (the table's K_mean is such a mean). The
weights are restored exactly afterwards.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import pandas as pd
import torch

from .errors import InputError, ModelOutputError
from .models import EpsModel

PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp64": torch.float64}
REFERENCE = {"bf16": torch.float32, "fp16": torch.float32, "fp32": torch.float64, "fp64": None}
log = logging.getLogger("lipscope")

DEFAULT_TOLERANCE = 0.02  # K_rel_err_est above this is reported, with the fix


def check_precision(precision: str | None, model: EpsModel) -> None:
    if precision is None:
        return
    if precision not in PRECISIONS:
        raise InputError(f"`precision` {precision!r} not known; use one of {', '.join(PRECISIONS)}")
    if model.module is None:
        raise InputError(
            f"`precision` casts the network's weights; {model.name} has no nn.Module to cast: use `dtype` instead"
        )


def guard_samples(n: int) -> np.ndarray:
    """The samples measured twice: ⌈n/16⌉ of them (2 to 8), evenly spaced over 0..n−1."""
    k = min(n, max(2, min(8, math.ceil(n / 16))))
    return np.unique(np.linspace(0, n - 1, k).round().astype(int))


@contextlib.contextmanager
def cast(model: EpsModel, dtype: torch.dtype, precision: str | None = None) -> Iterator[EpsModel]:
    """``model`` with its weights in ``dtype`` for the block; the original weights are put back exactly. With
    ``precision`` (the option that asked for ``dtype``), NaN/inf outputs in the block are reported as its overflow."""
    if dtype == model.dtype:
        yield model
        return
    module = model.module
    assert module is not None
    tensors = [*module.parameters(), *module.buffers()]  # non-persistent buffers too (state_dict skips them)
    saved = [t.detach().to("cpu", copy=True) for t in tensors]
    module.to(dtype)
    try:
        yield dataclasses.replace(model, dtype=dtype)
    except ModelOutputError as e:
        if precision is None or "NaN/inf" not in str(e):
            raise
        what = str(e).split("; not averaged")[0].split(". Check")[0]
        other = "`precision` fp32" if dtype == torch.bfloat16 else "`precision` bf16 (float32's range) or fp32"
        raise ModelOutputError(
            f"`precision` {precision}: {what}: beyond {str(dtype).removeprefix('torch.')}'s range (largest "
            f"{torch.finfo(dtype).max:g}), the network overflows in it; use {other}"
        ) from e
    finally:
        with torch.no_grad():  # each tensor back to its own dtype and values (mixed-dtype modules stay mixed)
            for t, v in zip([*module.parameters(), *module.buffers()], saved, strict=True):
                t.data = v.to(t.device)


def rel_err(K: np.ndarray, K_ref: np.ndarray) -> np.ndarray:
    """Per grid point, the relative error of the guard samples' mean K: |Σ K − Σ K_ref| / Σ K_ref (both (k, G);
    the table's K_mean is such a mean; 0/0 counts as 0)."""
    a, b = K.sum(axis=0), K_ref.sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.abs(a - b) / np.abs(b)
    return np.where(a == b, 0.0, np.where(np.isfinite(r), r, np.inf))


def sample_rel_err(K: np.ndarray, K_ref: np.ndarray) -> float:
    """The largest per-sample relative error |K − K_ref| / K_ref over the guard samples and grid points."""
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.where(K == K_ref, 0.0, np.abs(K - K_ref) / np.abs(K_ref))
    return float(np.nanmax(np.where(np.isfinite(r), r, np.inf)))


def report(
    name: str, precision, ref, guard: np.ndarray, tables: list[pd.DataFrame], tol: float, per_sample: float
) -> dict[str, Any]:
    """What run.json records about the accuracy guard; a warning, with the fix, above ``tol``."""
    df = pd.concat(tables, ignore_index=True)
    worst = int(np.nanargmax(df["K_rel_err_est"].to_numpy()))
    err = float(df["K_rel_err_est"].iloc[worst])
    if not err <= tol:
        log.warning(
            "%s: K at %s is off by up to %.3g%% against %s (t = %g, %s; %d guard samples); use a higher `precision`",
            name, precision, 100 * err, str(ref).removeprefix("torch."), df["t"].iloc[worst],
            df["method"].iloc[worst], len(guard),
        )  # fmt: skip
    return {
        "precision": precision,
        "reference": str(ref).removeprefix("torch."),
        "guard_samples": guard.tolist(),
        "max_K_rel_err_est": err,  # of a row's mean K
        "max_sample_rel_err": per_sample,  # of one sample's K
        "tolerance": tol,
        "within_tolerance": bool(err <= tol),
    }
