"""Completed work of a long run, kept in the run folder as it goes, so an interrupted or pre-empted run
continues where it stopped (``resume``) and ends with the table an uninterrupted run gives.

``.<out>.partial/`` beside the run folder (which stays untouched until the finished run is written, all at
once) holds ``options.json`` (everything that changes the numbers) and blocks of finished items,
``<label>-r<rank>-<first>-<count>.npz`` (item indices and their values), each written atomically at most
every ``every_s`` seconds and when the run stops (an interrupt included). Any number of processes may write
blocks; a resumed run, with the same or another process count, computes only the items no block holds. The
journal is removed once the run folder is written (so a failed final write can still be resumed).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import shard
from .errors import InputError
from .io import atomic_write_bytes, json_bytes, npz_bytes


def journal_dir(out: str | Path) -> Path:
    """Where the journal of run folder ``out`` lives: ``.<name>.partial`` beside it."""
    p = Path(out)
    return p.parent / f".{p.name}.partial"


def interrupted(out: str | Path, resume: bool, overwrite: bool) -> dict[str, Any] | None:
    """The options of the interrupted run of ``out`` that a ``resume`` continues (None for a fresh run); refuses
    a fresh run over a journal (unless ``overwrite``) and a ``resume`` without one."""
    meta = journal_dir(out) / "options.json"
    if not resume:
        if meta.is_file() and not overwrite:
            raise InputError(
                f"`out` {out} has an interrupted run ({meta.parent}); continue it with `resume`, or pass `overwrite` "
                "to start again"
            )
        return None
    if not meta.is_file():
        raise InputError(f"`resume`: there is no interrupted run of {out} to continue; leave out `resume`")
    try:
        old = json.loads(meta.read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"`resume`: {meta} is unreadable ({e}); start a new `out`") from e
    if not isinstance(old, dict):
        raise InputError(f"`resume`: {meta} is not a lipscope journal; start a new `out`")
    return old


class Journal:
    """The blocks of finished items of one run folder (see the module docstring)."""

    def __init__(
        self, out: str | Path, key: dict[str, Any], resume: bool, overwrite: bool = False, every_s: float = 30.0
    ) -> None:
        self.root = journal_dir(out)
        self.every_s = every_s
        self._buf: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self._last = time.monotonic()
        want = json.loads(json_bytes(key))
        old = interrupted(out, resume, overwrite)
        if old is not None:
            diffs = [k for k in sorted(set(old) | set(want)) if old.get(k) != want.get(k) and not k.startswith("_")]
            if diffs:
                raise InputError(
                    f"`resume`: {out} was started with other {', '.join(diffs)}; use the same options or start a new "
                    "`out`"
                )
        elif shard.is_main():
            shutil.rmtree(self.root, ignore_errors=True)  # written with the first finished block
        self._meta = json_bytes(want)
        self._old = old if old is not None else want
        shard.barrier()

    def done(self, label: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(indices, values) of every finished item of ``label``, from all processes' blocks."""
        idx, vals = [], []
        for f in sorted(self.root.glob(f"{label}-r*.npz")):
            with np.load(f, allow_pickle=False) as z:
                idx.append(torch.from_numpy(z["idx"]))
                vals.append(torch.from_numpy(z["vals"]))
        if not idx:
            return torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.float64)
        return torch.cat(idx), torch.cat(vals)

    def add(self, label: str, idx: torch.Tensor, vals: torch.Tensor) -> None:
        """Keep finished items; written out every ``every_s`` seconds (and by :meth:`flush`)."""
        self._buf.setdefault(label, []).append((idx.cpu(), vals.cpu()))
        if time.monotonic() - self._last >= self.every_s:
            self.flush()

    def flush(self) -> None:
        if any(self._buf.values()) and not (self.root / "options.json").is_file():
            self.root.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(self.root / "options.json", self._meta)  # any process: the same bytes
        for label, parts in self._buf.items():
            if parts:
                idx, vals = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
                name = f"{label}-r{shard.rank()}-{int(idx[0])}-{idx.numel()}.npz"
                atomic_write_bytes(self.root / name, npz_bytes(idx=idx.numpy(), vals=vals.numpy()))
        self._buf.clear()
        self._last = time.monotonic()

    def started_with(self, key: str) -> Any:
        """An option of the run this journal continues (or of this run)."""
        return self._old.get(key)

    def has_blocks(self) -> bool:
        """Whether any process kept finished items (then a failed run leaves them for `resume`)."""
        return any(self.root.glob("*.npz"))

    def discard(self) -> None:
        """Remove the journal: the run folder is written, or the run failed on something a rerun would meet."""
        shutil.rmtree(self.root, ignore_errors=True)
