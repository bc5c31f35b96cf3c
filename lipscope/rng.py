"""Named random streams: every random number lipscope draws comes from here.

One generator per (seed, stream, index), EDM-style, so results depend on the seed and on which item
is drawn, never on the batch size, the grid or the process count. Nothing in lipscope touches
torch's global generator without restoring it (:func:`isolated_torch_rng`).

The streams and their indices (the integer layout is kept from lipscope 0.1 so that published
numbers and the shipped models reproduce bit for bit):

========== ================================================ ==========================================
stream     what it draws                                    generator entropy
========== ================================================ ==========================================
DATA       which x0 items are used (a permutation)          numpy SeedSequence([seed, 0xDA7A])
NOISE      ε_i of probe sample i (shared across t)          SeedSequence([seed, i]),        i < 2**20
SAMPLER    initial x_T of sample i                          SeedSequence([seed, 2**20 + i])
SAMPLER    per-step noise of sample i (DDPM)                SeedSequence([seed, 2**21 + i])
TRAINING   batch of training step s on process p            SeedSequence([seed, 256·s + p])
BOOTSTRAP  resampled sample rows of an interval (exponent)  numpy SeedSequence([seed, 0xB007])
FRESH      block i of fresh x0 from a known density          SeedSequence([seed, 2**40 + i])
INIT       weights of a network built by lipscope           torch seed ``seed`` in an isolated RNG
========== ================================================ ==========================================

A probe and a training run never share a seed's streams within one run; the integer spaces of
NOISE and TRAINING overlap across runs, which is harmless (they draw different things).
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch

_DATA_TAG = 0xDA7A
_BOOTSTRAP_TAG = 0xB007
_SAMPLER_INIT = 1 << 20
_SAMPLER_STEP = 1 << 21
_TRAINING_SHIFT = 8  # up to 256 processes per training step
_FRESH = 1 << 40  # above every TRAINING index a run can reach (256·s + p < 2**40 for s < 2**32 steps)


class Stream(enum.Enum):
    """The named random streams (see the module docstring for their layout)."""

    DATA = "data"
    NOISE = "noise"
    SAMPLER_INIT = "sampler_init"
    SAMPLER_STEP = "sampler_step"
    TRAINING = "training"
    BOOTSTRAP = "bootstrap"
    FRESH = "fresh"


def _entropy_index(stream: Stream, index: int, process: int = 0) -> int:
    if index < 0:
        raise ValueError(f"stream index must be ≥ 0 (got {index})")
    if stream is Stream.NOISE:
        if index >= _SAMPLER_INIT:
            raise ValueError(f"noise stream index must be < {_SAMPLER_INIT} (got {index})")
        return index
    if stream is Stream.SAMPLER_INIT:
        return _SAMPLER_INIT + index
    if stream is Stream.SAMPLER_STEP:
        return _SAMPLER_STEP + index
    if stream is Stream.TRAINING:
        if not 0 <= process < (1 << _TRAINING_SHIFT):
            raise ValueError(f"training stream supports up to {1 << _TRAINING_SHIFT} processes (got {process})")
        return (index << _TRAINING_SHIFT) + process
    if stream is Stream.FRESH:
        return _FRESH + index
    raise ValueError(f"stream {stream} has no per-item generators; use data_rng")


def generator(
    seed: int, stream: Stream, index: int, *, process: int = 0, device: str | torch.device = "cpu"
) -> torch.Generator:
    """The torch generator of item ``index`` of ``stream`` under ``seed``."""
    state = np.random.SeedSequence([seed, _entropy_index(stream, index, process)]).generate_state(1, np.uint64)[0]
    g = torch.Generator(device=device)
    g.manual_seed(int(state) & ((1 << 63) - 1))
    return g


def normal(
    seed: int,
    stream: Stream,
    n: int,
    shape: tuple[int, ...],
    *,
    offset: int = 0,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Items offset..offset+n−1 of ``stream``, each N(0, I) of ``shape`` from its own generator.

    Drawn on the CPU in float32, or in float64 when ``dtype`` is float64.
    """
    dt = torch.float64 if dtype == torch.float64 else torch.float32
    return torch.stack([torch.randn(shape, generator=generator(seed, stream, offset + i), dtype=dt) for i in range(n)])


def data_rng(seed: int) -> np.random.Generator:
    """The numpy generator that picks which data items a run uses (stream DATA)."""
    return np.random.default_rng(np.random.SeedSequence([seed, _DATA_TAG]))


def bootstrap_rng(seed: int) -> np.random.Generator:
    """The numpy generator that resamples sample rows for a bootstrap interval (stream BOOTSTRAP)."""
    return np.random.default_rng(np.random.SeedSequence([seed, _BOOTSTRAP_TAG]))


def noise(seed: int, n: int, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """ε_i of probe samples 0..n−1 (stream NOISE): shared across timesteps (common random numbers)."""
    return normal(seed, Stream.NOISE, n, shape, dtype=dtype)


@contextmanager
def isolated_torch_rng(seed: int) -> Iterator[None]:
    """Seed torch's global generator for the block (weight init, dropout) and restore it afterwards."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield
