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
from .errors import InputError, short_error
from .io import atomic_write_bytes, json_bytes, npz_bytes, resolve_out


class DamagedJournal(InputError):
    """A journal block that cannot be read: the rest of the journal is kept (the message says which to delete)."""


def journal_dir(out: str | Path) -> Path:
    """Where the journal of run folder ``out`` lives: ``.<name>.partial`` beside it (beside a symlink's target)."""
    p = resolve_out(out)
    return p.parent / f".{p.name}.partial"


def interrupted(out: str | Path, resume: bool, overwrite: bool) -> dict[str, Any] | None:
    """The options of the interrupted run of ``out`` that a ``resume`` continues; None when there is none (a
    ``resume`` then starts afresh). Refuses a fresh run over a journal (unless ``overwrite``)."""
    meta = journal_dir(out) / "options.json"
    if not resume:
        if meta.is_file() and not overwrite:
            raise InputError(
                f"`out` {out} has an interrupted run ({meta.parent}); continue it with `resume`, or pass `overwrite` "
                "to start again"
            )
        return None
    if not meta.is_file():
        return None
    try:
        old = json.loads(meta.read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"`resume`: {meta} is unreadable ({short_error(e)}); pass `overwrite` to start again") from e
    if not isinstance(old, dict):
        raise InputError(f"`resume`: {meta} is not a lipscope journal; pass `overwrite` to start again")
    return old


# how a changed key is named when a resume is refused (others: by their option name)
WHAT = {
    "weights_sha256": "model weights",
    "config_hash": "model config",
    "conditioning": "conditioning (prompts, embeddings, class labels)",
}


def changed(old: dict[str, Any], want: dict[str, Any]) -> list[str]:
    """What differs between the run a journal holds and this one, in words (keys starting with _ are not compared)."""
    out = []
    for k in sorted(set(old) | set(want)):
        if k.startswith("_") or old.get(k) == want.get(k):
            continue
        if k in WHAT:
            a, b = (str(v)[:12] if v is not None else "none" for v in (old.get(k), want.get(k)))
            out.append(f"{WHAT[k]} ({a}… → {b}…)" if k.endswith(("sha256", "hash")) else WHAT[k])
        else:
            out.append(k)
    return out


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
            diffs = changed(old, want)
            if diffs:
                raise InputError(
                    f"`resume`: {out} was started with other {', '.join(diffs)}; use the same options and model, or "
                    "pass `overwrite` to start again"
                )
        elif shard.is_main():
            shutil.rmtree(self.root, ignore_errors=True)  # written with the first finished block
        self._meta = json_bytes(want)
        self._old = old if old is not None else want
        shard.barrier()

    def done(self, label: str, total: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(indices, values) of every finished item of ``label`` (of ``total``), from all processes' blocks; a damaged
        block (cut short, or not the plain arrays lipscope writes: nothing is unpickled) is one line naming it."""
        idx, vals = [], []
        for f in sorted(self.root.glob(f"{label}-r*.npz")):
            i, v = _read_block(f, total)
            idx.append(i)
            vals.append(v)
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


def _read_block(f: Path, total: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One journal block: ``idx`` (integer, 1-d, in [0, total)) and ``vals`` (float, one row per index)."""
    try:
        with np.load(f, allow_pickle=False) as z:
            i, v = z["idx"], z["vals"]
        if i.dtype.kind not in "iu" or i.ndim != 1 or v.dtype.kind != "f" or len(v) != len(i):
            raise ValueError("not the idx/vals arrays lipscope writes")
        if len(i) and (i.min() < 0 or (total is not None and i.max() >= total)):
            raise ValueError(f"item indices outside 0..{total}")
    except Exception as e:  # a truncated zip, an object array (refused: allow_pickle=False), missing or odd arrays
        raise DamagedJournal(
            f"`resume`: the journal block {f} is damaged ({short_error(e)[:120]}); delete that file (its items are "
            "computed again) or pass `overwrite` to start again"
        ) from e
    return torch.from_numpy(i.astype(np.int64)), torch.from_numpy(v)
