"""Reading weight files safely: nothing is unpickled beyond tensors unless the user says ``trust_pickle``."""

from __future__ import annotations

import logging
import pickle
import warnings
import zipfile
from pathlib import Path

import torch
from torch import nn

from .errors import InputError
from .errors import short_error as _short

log = logging.getLogger("lipscope")


def read_state_dict(path: Path, trust_pickle: bool) -> dict[str, torch.Tensor]:
    """The tensors of a weights file: safetensors; a torch zip/pickle read with ``weights_only=True``, and fully
    unpickled (which can run code) only with ``trust_pickle``; an ``ema``/``state_dict``/``model`` entry or a
    pickled module is unwrapped. Anything else is refused in one line."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:  # SafetensorError is not exported under a stable name
            raise InputError(
                f"`model` {path}: not a readable safetensors file ({_short(e)}); the file may be corrupt"
            ) from e
    try:
        with path.open("rb") as f:
            is_pickle = f.read(1) == b"\x80"  # the PROTO opcode that opens every pickle of protocol ≥ 2
    except OSError as e:
        raise InputError(f"`model` {path} cannot be read ({_short(e)}); check its permissions") from e
    if not (is_pickle or zipfile.is_zipfile(path)):
        raise InputError(
            f"`model` {path}: not a PyTorch checkpoint (neither a zip archive nor a pickle); the file may be corrupt"
        )
    corrupt = f"`model` {path}: not a readable PyTorch checkpoint (%s); the file may be corrupt or truncated"
    try:
        with warnings.catch_warnings():  # torch's UserWarning on pickle protocols would be a second stderr line
            warnings.simplefilter("ignore", UserWarning)
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError, RuntimeError, EOFError, IndexError, BadZipFile, … for a bad file
        if not (isinstance(e, pickle.UnpicklingError) and "weights only load failed" in str(e).lower()):
            raise InputError(corrupt % _short(e)) from e
        if not trust_pickle:
            raise InputError(
                f"`model` {path}: this checkpoint holds more than tensors and needs full unpickling, which can run "
                "arbitrary code; pass `trust_pickle` only if you trust its source (or convert it to .safetensors)"
            ) from e
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=False)
        except Exception as e2:  # arbitrary code ran: anything can come out of it
            raise InputError(corrupt % _short(e2)) from e2
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    if isinstance(obj, dict):
        for key in ("ema", "ema_model", "state_dict", "model"):
            if key in obj and isinstance(obj[key], dict):
                log.info("using the %r entry of %s", key, path)
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise InputError(f"`model` {path}: checkpoint does not hold a state dict of tensors; save model.state_dict()")
    return obj
