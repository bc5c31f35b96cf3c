"""Optional speed paths for a run, each behind its own option and undone afterwards: TF32 matmuls/convolutions
on CUDA, channels-last weights, and ``torch.compile`` of the network call (``mode="reduce-overhead"`` uses
CUDA graphs where shapes are static).

None changes what is measured, only how fast and with which rounding: TF32 rounds matmul inputs to 10
mantissa bits. It is off unless asked for, cuDNN's TF32 convolutions included (torch enables those by
default); the FD noise estimate measures its constant c with the same settings. ``torch.compile`` has no
forward-mode AD through compiled graphs here, so it is for FD only. On CPU, TF32 is a no-op and
channels-last / compile run their CPU kernels; on CUDA all three are unmeasured until a GPU is lent to this
project (docs/performance.md).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from .errors import InputError
from .models import EpsModel

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")


@dataclass(frozen=True)
class Speed:
    """The speed options of a run (what run.json records)."""

    tf32: bool = False
    channels_last: bool = False
    compile: str | None = None  # a torch.compile mode, or None
    compile_backend: str = "inductor"  # "eager" / "aot_eager" exercise the same path without a compiler

    def check(self, methods: list[str]) -> None:
        if self.compile is not None and self.compile not in COMPILE_MODES:
            raise InputError(f"`compile` {self.compile!r} not known; use one of {', '.join(COMPILE_MODES)}")
        if self.compile is not None and "jvp" in methods:
            raise InputError("`compile` is for `method` fd: forward-mode AD does not run through compiled graphs")


@contextlib.contextmanager
def accelerated(model: EpsModel, speed: Speed) -> Iterator[EpsModel]:
    """``model`` under ``speed`` for the block; flags, memory formats and the uncompiled call come back after."""
    flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    module = model.module
    try:
        # both ways explicitly: cuDNN convolutions default to TF32 in torch, which a float32 probe must not get
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = speed.tf32
        if speed.channels_last:
            if module is None:
                raise InputError(f"`channels_last` converts the network's weights; {model.name} has no nn.Module")
            _memory_format(module, torch.channels_last)
        if speed.compile is not None:
            mode = speed.compile if speed.compile_backend == "inductor" else None  # modes are inductor's
            compiled: Any = torch.compile(model.net, mode=mode, backend=speed.compile_backend, dynamic=False)
            model = dataclasses.replace(model, net=compiled)
        yield model
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags
        if speed.channels_last and module is not None:
            _memory_format(module, torch.contiguous_format)


def _memory_format(module: torch.nn.Module, fmt: torch.memory_format) -> None:
    """4-D weights (convolutions) in ``fmt``, in place: what ``Module.to(memory_format=…)`` does."""
    with torch.no_grad():
        for p in module.parameters():
            if p.dim() == 4:
                p.data = p.data.contiguous(memory_format=fmt)
