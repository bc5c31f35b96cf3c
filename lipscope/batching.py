"""The batched runner: items packed into network batches, auto batch size, OOM back-off, progress.

Estimators describe their work as ``compute(idx) -> float64 (m,)`` over item indices; the runner
decides how many items go into one call, retries a batch after an out-of-memory error with half the
size, and on CPU searches the fastest batch size on real work (:class:`AutoBatch`).
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from . import shard
from .errors import InputError, ModelOutputError
from .journal import Journal
from .models import EpsModel

log = logging.getLogger("lipscope")

CPU_AUTO_CANDIDATES = (8, 16, 32, 64, 128)
CUDA_AUTO_CANDIDATES = (64, 128, 256, 512, 1024, 2048, 4096, 8192)  # grown until throughput falls or memory ends
SEARCH_SHARE = 0.25  # the search never takes more than this share of a run's forwards


@dataclass
class RunStats:
    forwards: int = 0
    seconds: float = 0.0
    batch_size: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def forwards_per_s(self) -> float:
        return self.forwards / self.seconds if self.seconds > 0 else float("nan")


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


class AutoBatch:
    """Batch size search for ``auto``, on real work (nothing is computed twice).

    Tries the candidates in increasing order, one timed batch each after one warm-up batch, stops once
    throughput falls 5 % under the best seen, then keeps the best. On CPU throughput peaks at small batches
    (measured on 2 cores: the CIFAR-10 DDPM UNet at 16, a tiny UNet at ≥ 128); on CUDA the candidates grow to
    8192 and an out-of-memory error ends the search at the largest batch that fit. The search stops early
    once it has used ``SEARCH_SHARE`` of the run's forwards (short runs do not pay for it), and the chosen size
    is remembered per model, device, dtype and threads in the user cache (:func:`remember`), so later runs
    start with it.
    """

    def __init__(
        self, candidates: tuple[int, ...], total: int, per_item: int = 2, known: int | None = None,
        warm_each: bool = False,
    ) -> None:  # fmt: skip
        self.cands = [c for c in candidates if c <= per_item * total] or [max(2, per_item * total)]
        self.complete = len(self.cands) == len(candidates)  # a short run's search is not worth remembering
        self.i, self.warm, self.warm_each = 0, False, warm_each  # warm_each: a compiled network, new size = compile
        self.rates: dict[int, float] = {}
        self.best: int | None = known
        self.budget, self.spent = SEARCH_SHARE * per_item * total, 0
        self.searched = False  # a search that ran to its end: remembered

    def size(self) -> int:
        return self.best if self.best is not None else self.cands[self.i]

    def record(self, size: int, forwards: int, seconds: float) -> None:
        if self.best is not None:
            return
        self.spent += forwards
        if not self.warm:
            self.warm = True
            return
        self.rates[size] = forwards / max(seconds, 1e-9)
        top = max(self.rates, key=self.rates.__getitem__)
        self.i += 1
        self.warm = not self.warm_each
        if self.rates[size] < 0.95 * self.rates[top] or self.i >= len(self.cands):
            self.best, self.searched = top, self.complete and len(self.rates) >= 2
        elif self.spent >= self.budget:
            self.best = top  # out of budget: the best so far, not remembered

    def out_of_memory(self, size: int) -> int:
        """The size to go on with after an out-of-memory error at ``size``: the fastest that ran if any (the
        search ends there), else half of it; the search ends either way and nothing is remembered."""
        fitted = [s for s in self.rates if s < size]
        self.best = max(fitted, key=self.rates.__getitem__) if fitted else max(2, (size // 2) - (size // 2) % 2)
        self.searched = False
        return self.best


def _compiled(model: EpsModel) -> bool:
    return hasattr(model.net, "_torchdynamo_orig_callable")  # torch.compile's wrapper (lipscope.speed)


def _batch_key(model: EpsModel, per_item: int) -> str:
    """What the fastest batch depends on: network (configs, name, sample shape, conditioning and its token
    count, CFG), device, dtype, threads, FD or JVP, compiled or not, memory format."""
    dev = model.device
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu{torch.get_num_threads()}"
    c = model.conditioning
    cond = "" if c is None else f"{c.digest()}|{'cfg' if c.guidance_scale is not None else ''}"
    convs = [p for p in model.module.parameters() if p.dim() == 4] if model.module is not None else []
    layout = "cl" if convs and convs[0].is_contiguous(memory_format=torch.channels_last) else ""
    shape = tuple(model.sample_shape or ())
    return (
        f"{model.config_hash}|{model.name}|{shape}|{cond}|{name}|{model.dtype}|{per_item}|{_compiled(model)}|{layout}"
    )


def remembered(model: EpsModel, per_item: int) -> int | None:
    """The batch size an earlier search chose for this model, device, dtype and threads (user cache)."""
    import json

    from .io import user_cache_dir

    try:
        v = json.loads((user_cache_dir() / "batch_sizes.json").read_text()).get(_batch_key(model, per_item))
    except (OSError, ValueError, AttributeError):
        return None
    return v if isinstance(v, int) and v >= 2 else None


def remember(model: EpsModel, per_item: int, size: int) -> None:
    import json

    from .io import atomic_write_bytes, user_cache_dir

    path = user_cache_dir() / "batch_sizes.json"
    try:
        known = json.loads(path.read_text()) if path.is_file() else {}
        known = known if isinstance(known, dict) else {}
        known[_batch_key(model, per_item)] = int(size)
        atomic_write_bytes(path, json.dumps(known, indent=1).encode())
    except (OSError, ValueError, InputError) as e:  # a cache that cannot be written is not worth failing for
        log.info("could not remember the batch size (%s)", e)


def resolve_batch_size(batch_size: int | str, model: EpsModel, total: int) -> int:
    """Forwards per batch (even, so pairs stay together). ``auto``: the first candidate of :class:`AutoBatch`."""
    if batch_size == "auto":
        bs = (CUDA_AUTO_CANDIDATES if model.device.type == "cuda" else CPU_AUTO_CANDIDATES)[0]
    else:
        try:
            bs = int(batch_size)
        except (TypeError, ValueError) as e:
            raise InputError(f"`batch_size` {batch_size!r}: use a positive integer or auto") from e
        if bs < 2:
            raise InputError(f"`batch_size` {bs}: must be ≥ 2 (each FD pair takes two forwards)")
    bs = min(bs, 2 * total)
    return max(2, bs - bs % 2)


@contextmanager
def progress_bar(enabled: bool, total: int, label: str) -> Iterator:
    if not enabled:
        yield lambda k: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(
        TextColumn("{task.description}", markup=False),  # a model name is printed as it is (no markup, no emoji)
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        transient=True,
    ) as p:
        task = p.add_task(label, total=total)
        yield lambda k: p.advance(task, k)


def check_finite(outs: list[torch.Tensor], t_lo: torch.Tensor, t_hi: torch.Tensor, what: str) -> None:
    """Refuse NaN/inf instead of averaging them in; each tensor in ``outs`` has one row per item."""
    bad = torch.zeros(len(t_lo), dtype=torch.bool)
    for o in outs:
        bad |= ~torch.isfinite(o).reshape(o.shape[0], -1).all(1).cpu()
    if bad.any():
        k = int(bad.nonzero()[0, 0])
        raise ModelOutputError(
            f"model {what} has NaN/inf at t={float(t_lo[k]):g}..{float(t_hi[k]):g} ({int(bad.sum())} of "
            f"{len(bad)} items in this batch); not averaged in. Check the weights, try `dtype` float32, "
            "or leave these timesteps out of `timesteps`"
        )


def run_batched(
    model: EpsModel,
    total: int,
    inputs_per_item: int,
    compute: Callable[[torch.Tensor], torch.Tensor],
    batch_size: int | str = "auto",
    progress: bool = False,
    stats: RunStats | None = None,
    label: str = "probe",
    journal: Journal | None = None,
) -> torch.Tensor:
    """Run ``compute(idx) -> float64 (m,) or (m, k)`` over items 0..total−1, packed into batches of network inputs.

    ``inputs_per_item`` network inputs per item (2 for an FD pair, 1 for a JVP). Backs off on
    out-of-memory (retrying the same items) and, for ``auto`` on CPU, searches the fastest batch. Launched
    with several processes (:mod:`lipscope.shard`), each computes whole blocks of the items and all gather
    the result; with a ``journal`` (:mod:`lipscope.journal`) finished items are kept as they go and items a
    previous, interrupted run finished are not computed again.
    """
    bs = resolve_batch_size(batch_size, model, total)
    stats = stats if stats is not None else RunStats()
    done_idx, done_vals = (
        journal.done(label, total) if journal is not None else (torch.empty(0, dtype=torch.long), None)
    )
    shard.barrier()  # every process read the same finished items before any writes new ones
    todo = torch.ones(total, dtype=torch.bool)
    todo[done_idx] = False
    mine = shard.split(todo.nonzero().flatten(), max(1, bs // inputs_per_item))
    auto = None
    if batch_size == "auto":  # searched on this process's share
        cands = CUDA_AUTO_CANDIDATES if model.device.type == "cuda" else CPU_AUTO_CANDIDATES
        known = remembered(model, inputs_per_item)
        auto = AutoBatch(cands, max(1, mine.numel()), inputs_per_item, known, warm_each=_compiled(model))
    got: list[tuple[torch.Tensor, torch.Tensor]] = []
    start, forwards = 0, 0
    t0 = time.perf_counter()
    try:
        with progress_bar(progress, mine.numel(), f"probe {label} {model.name}") as advance:
            while start < mine.numel():
                if auto is not None:
                    bs = auto.size()
                per = max(1, bs // inputs_per_item)
                tb = time.perf_counter()
                idx = mine[start : start + per]
                try:
                    vals = compute(idx)
                except (RuntimeError, torch.OutOfMemoryError) as e:
                    if not is_oom(e) or bs <= 2:
                        raise
                    bs = auto.out_of_memory(bs) if auto is not None else max(2, (bs // 2) - (bs // 2) % 2)
                    log.warning("out of memory: going on with batch size %d", bs)
                    if model.device.type == "cuda":
                        torch.cuda.empty_cache()
                    continue
                m = idx.numel()
                got.append((idx, vals.cpu()))
                if journal is not None:
                    journal.add(label, idx, vals)
                start += m
                if auto is not None:
                    auto.record(bs, inputs_per_item * m, time.perf_counter() - tb)
                forwards += inputs_per_item * m
                advance(m)
    finally:
        if journal is not None:
            journal.flush()  # what is finished survives an interrupt or an error
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    if auto is not None and auto.searched and shard.is_main():
        remember(model, inputs_per_item, auto.size())
    parts = shard.gather((got, forwards, seconds))
    pieces = [p for part in parts for p in part[0]]
    if done_vals is not None and done_idx.numel():
        pieces.append((done_idx, done_vals))
    width = next((tuple(v.shape[1:]) for _, v in pieces), ())
    out = torch.full((total, *width), float("nan"), dtype=torch.float64)
    seen = torch.zeros(total, dtype=torch.bool)
    for idx, vals in pieces:
        out[idx] = vals.to(torch.float64)
        seen[idx] = True
    if not bool(seen.all()):  # an internal error: never average a hole in
        raise RuntimeError(f"{label}: {int((~seen).sum())} of {total} items were computed by no process")
    stats.forwards += sum(p[1] for p in parts)
    stats.seconds += max(p[2] for p in parts)
    stats.batch_size = bs
    return out


def check_memory(samples: int, shape: tuple[int, ...] | None) -> None:
    """Refuse, before allocating, a probe whose samples alone would not fit in memory."""
    if shape is None:
        return
    need = samples * math.prod(shape) * 4 * 3  # x0, ε and x_t in float32
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return
    if need > ram // 2:
        raise InputError(
            f"`samples` {samples:,} of shape {tuple(shape)} need {need / 2**30:.3g} GiB, over half of this machine's "
            f"{ram / 2**30:.3g} GiB; use fewer samples"
        )
