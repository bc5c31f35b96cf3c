"""Devices and dtypes by name: what ``--device`` and ``--dtype`` accept, checked against this machine."""

from __future__ import annotations

import torch

from .errors import InputError
from .shard import local_cuda_device

DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}


def machine_memory() -> int | None:
    """This machine's physical memory in bytes (None where the OS does not say)."""
    import os

    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` picks cuda, then mps, then cpu; an explicit device must exist on this machine."""
    if isinstance(device, str) and device == "auto":
        if torch.cuda.is_available():
            return torch.device(local_cuda_device())  # one GPU per launched process
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = device if isinstance(device, torch.device) else torch.device(device)
    except (RuntimeError, TypeError, ValueError) as e:
        raise InputError(f"`device` {device!r} not understood; use auto, cpu, cuda, cuda:N or mps") from e
    if dev.type == "cuda" and dev.index is None and torch.cuda.is_available():
        dev = torch.device(local_cuda_device())
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise InputError(f"`device` {device} asked for but CUDA is not available; use `device` cpu or auto")
        if dev.index is not None and dev.index >= n:
            raise InputError(
                f"`device` {device} asked for but this machine has {n} CUDA device(s) (cuda:0…cuda:{n - 1}); "
                "use `device` cuda, cpu or auto"
            )
    elif dev.type == "mps":
        if not _mps_available():
            raise InputError(f"`device` {device} asked for but MPS is not available; use `device` cpu or auto")
    elif dev.type != "cpu":
        raise InputError(f"`device` {device} is not supported; use auto, cpu, cuda, cuda:N or mps")
    return dev


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return mps is not None and bool(mps.is_available())


def resolve_dtype(dtype: str | torch.dtype = "float32") -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise InputError(f"`dtype` {dtype!r} not supported; use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]
