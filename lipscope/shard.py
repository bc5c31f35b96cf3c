"""Work split between processes: ``torchrun`` / ``accelerate launch`` start N copies of a command, each
computes its share of the items, and every process gathers the whole result (accelerate's
``PartialState.split_between_processes`` and ``gather_object``); the main process alone writes.

Items are split in whole blocks (one block = one batch at the resolved batch size), contiguous per process, so
with a fixed batch size every network call holds exactly the items it holds in a one-process run and the
table is identical. One process (no ``WORLD_SIZE`` > 1 in the environment): every function is a no-op.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator
from typing import Any

import torch


def world_size() -> int:
    """Processes in this run (the launcher's ``WORLD_SIZE``; 1 when started directly)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


@functools.cache
def state() -> Any:
    """accelerate's ``PartialState`` when launched with several processes (gloo on CPU, nccl on CUDA), else None."""
    if world_size() == 1:
        return None
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def rank() -> int:
    s = state()
    return 0 if s is None else int(s.process_index)


def is_main() -> bool:
    return rank() == 0


def local_cuda_device() -> str:
    """``cuda:LOCAL_RANK`` for this process (one GPU per process), ``cuda`` alone when not launched."""
    s = state()
    return "cuda" if s is None else f"cuda:{int(s.local_process_index)}"


def split(items: torch.Tensor, block: int) -> torch.Tensor:
    """This process's share of ``items``: whole blocks of ``block`` items, contiguous, in order."""
    s = state()
    if s is None:
        return items
    blocks = list(torch.split(items, max(1, block)))
    with s.split_between_processes(blocks) as mine:
        return torch.cat(mine) if mine else items[:0]


def gather(obj: Any) -> list[Any]:
    """Every process's ``obj``, in process order, on every process (``[obj]`` with one process)."""
    if state() is None:
        return [obj]
    from accelerate.utils import gather_object

    return list(gather_object([obj]))


def broadcast(obj: Any) -> Any:
    """The main process's ``obj``, on every process (``obj`` itself with one process)."""
    if state() is None:
        return obj
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([obj if is_main() else None], from_process=0)[0]


def barrier() -> None:
    s = state()
    if s is not None:
        s.wait_for_everyone()


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """The main process runs the block first (e.g. to fill a cache), the others after it."""
    s = state()
    if s is None:
        yield
        return
    with s.main_process_first():
        yield
