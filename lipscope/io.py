"""Writing outputs safely: atomic files, run folders that are complete or absent, locks, metadata.

* :func:`atomic_write_bytes`: a temp file in the same folder, fsync, ``os.replace``: readers see the
  old file or the whole new one.
* :func:`check_out_dir`: what may be written where, decided before any work starts (an existing
  file, a path under a file, an unwritable parent, a non-empty folder without ``overwrite``).
* :func:`run_lock`: an exclusive ``flock`` on ``.<name>.lock`` beside the run folder; the kernel
  drops it when the process dies, even by SIGKILL, so a stale lock never blocks.
* :func:`write_run_folder`: every file of a run is staged in ``.<name>.tmp-<pid>`` and the folder
  is renamed into place at once; a failure or an interrupt removes the staging folder and leaves
  ``out`` as it was.

Files get the permissions the umask allows (0644 with the usual umask), not mkstemp's 0600. Write
failures (disk full, read-only file system) become one :class:`InputError` line naming the path.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import io
import json
import os
import platform
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .errors import InputError, short_error


def _umask_mode(mode: int = 0o666) -> int:
    cur = os.umask(0)
    os.umask(cur)
    return mode & ~cur


class WriteFailure(InputError):
    """An output that could not be written (disk full, read-only, permissions): the fix is in the user's hands,
    and a rerun with the same options (``resume``) can go on once it is made."""


def write_failure(path: str | Path, e: OSError) -> WriteFailure:
    """One line for a write that failed (disk full, read-only, permissions)."""
    hint = "free some space" if e.errno == errno.ENOSPC else "check the permissions"
    return WriteFailure(f"could not write {path} ({e.strerror or e}); {hint} or choose another `out`")


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` so readers see the old file or the whole new one, never a part."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise write_failure(path, e) from e
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _umask_mode())
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise write_failure(path, e) from e
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def csv_bytes(df: pd.DataFrame) -> bytes:
    return df.to_csv(index=False, float_format="%.9g").encode("utf-8")


def json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True, default=_jsonable) + "\n").encode("utf-8")


def npz_bytes(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez_compressed(buf, allow_pickle=False, **arrays)
    return buf.getvalue()


def _jsonable(o: Any) -> Any:
    import dataclasses

    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    if dataclasses.is_dataclass(o) and not isinstance(o, type):
        return dataclasses.asdict(o)
    return str(o)


# ---------------------------------------------------------------------------------------------
# run folders
# ---------------------------------------------------------------------------------------------


def _describe(folder: Path) -> str:
    meta = folder / "run.json"
    try:
        cmd = json.loads(meta.read_text()).get("command") if meta.is_file() else None
    except (OSError, ValueError, AttributeError):
        cmd = None
    if cmd:
        return f"a lipscope {cmd} run"
    names = sorted(p.name for p in folder.iterdir())[:3]
    return "files (" + ", ".join(names) + ("…" if len(names) == 3 else "") + ")"


def resolve_out(out: str | Path) -> Path:
    """The folder a run writes for ``out``: absolute, with symlinks followed. A symlinked ``out`` (live or dangling)
    is the folder it points to: the run is written there (its lock, journal and staging folder beside the target)
    and the link is left as it is; a symlink loop is refused."""
    p = Path(os.path.realpath(os.path.abspath(out)))
    if p.is_symlink():  # realpath stops inside a loop
        raise InputError(f"`out` {out} is a symlink loop; point it at a folder or choose another `out`")
    return p


def check_out_dir(
    out: str | Path,
    overwrite: bool = False,
    resume: bool = False,
    inputs: Iterable[object] = (),
    whole: bool = True,
) -> Path:
    """Refuse, before any work, an output path lipscope must not or cannot write; returns it resolved
    (:func:`resolve_out`). ``inputs``: paths, or (path, what it is).

    An existing file; a path under a file; a parent folder that cannot be written; a non-empty folder unless
    ``overwrite`` (replace it) or ``resume`` (continue the run it holds); a folder that holds or is one of the run's
    ``inputs`` (paths it reads); a path the file system cannot hold. ``whole``: the run folder is written elsewhere
    and renamed into place (probe, theory, sample, evaluate), so the current folder, one above it, home and a root
    are refused; without ``whole`` (train, finetune write into ``out`` as they go) only with ``overwrite``.
    """
    try:
        return _check_out_dir(Path(out), overwrite, resume, inputs, whole)
    except OSError as e:  # e.g. ENAMETOOLONG from stat(): Path.exists() does not swallow it
        raise InputError(f"`out` {str(out)[:80]}…: {short_error(e)[:120]}; choose a shorter path") from e


def _check_out_dir(p: Path, overwrite: bool, resume: bool, inputs: Iterable[object], whole: bool) -> Path:
    rp = resolve_out(p)
    shown = str(p) if Path(os.path.abspath(p)) == rp else f"{p} (→ {rp})"
    if rp.exists() and not rp.is_dir():
        raise InputError(f"`out` {shown} exists and is not a folder; choose another path")
    for q in inputs:  # a path, or (path, what it is)
        q, what = q if isinstance(q, tuple) else (q, None)
        try:
            rq = Path(q).resolve() if isinstance(q, (str, os.PathLike)) and str(q) and Path(q).exists() else None
        except (OSError, RuntimeError):  # an unreadable input path (or a link loop) is the loader's to report
            rq = None
        if rq is not None and (rq == rp or rp in rq.parents):
            named = f"{q} ({what})" if what and what != str(q) else str(q)
            raise InputError(f"`out` {shown} holds {named}, which this run reads; choose another `out`")
    cwd = Path.cwd().resolve()
    if (whole or overwrite) and (
        rp == cwd or rp in cwd.parents or rp == Path.home().resolve() or rp == Path(rp.anchor)
    ):
        why = "`overwrite` would delete it" if overwrite else "a run folder is written beside it and renamed into place"
        raise InputError(
            f"`out` {shown} is the current folder, one above it, home or a root: {why}; choose a new folder for `out`"
        )
    if rp.is_dir() and any(rp.iterdir()) and not (overwrite or resume):
        fix = "pass `overwrite` to replace it" if whole else "pass `resume` to continue the run it holds"
        raise InputError(f"`out` {shown} already holds {_describe(rp)}; {fix} or choose another `out`")
    anc = rp if rp.exists() else rp.parent
    while not anc.exists():
        anc = anc.parent
    if not anc.is_dir():
        raise InputError(f"`out` {shown} lies under {anc}, which is a file; choose another path")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise InputError(f"`out` {shown}: {anc} is not writable; choose another path")
    return rp


def _lock_file(out: Path) -> Path:
    return out.parent / f".{out.name}.lock"


def lock_holder(out: str | Path) -> str | None:
    """Who holds the lock of run folder ``out`` ("lipscope process PID on HOST"), None when nobody does."""
    lock = _lock_file(resolve_out(out))
    try:
        fd = os.open(lock, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        who = os.read(fd, 200).decode("utf-8", "replace").split()
        return f"lipscope process {who[0]} on {who[1]}" if len(who) == 2 else "another lipscope process"
    finally:
        os.close(fd)
    return None


@contextlib.contextmanager
def run_lock(out: str | Path) -> Iterator[None]:
    """Hold an exclusive lock on the run folder ``out`` (``.<name>.lock`` beside it, holding "PID HOST") for the
    block; a held lock is refused naming its holder."""
    p = resolve_out(out)
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(_lock_file(p), os.O_RDWR | os.O_CREAT, _umask_mode())
    except OSError as e:
        raise write_failure(p, e) from e
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            who = lock_holder(p) or "another lipscope process"
            raise InputError(f"`out` {out} is being written by {who}; wait for it or choose another `out`") from None
        with contextlib.suppress(OSError):  # who holds it, for the message a second process gets
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()} {platform.node() or 'localhost'}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing drops the lock; the lock file stays (removing it would race)


def write_run_folder(out: str | Path, files: dict[str, bytes], overwrite: bool = False) -> Path:
    """Write a whole run folder at once: staged beside ``out``, then renamed into place.

    ``out`` ends up holding exactly ``files`` (an existing folder is replaced only with
    ``overwrite``); on any failure or interrupt it is left as it was.
    """
    dest = check_out_dir(out, overwrite=overwrite)
    stage = dest.parent / f".{dest.name}.tmp-{os.getpid()}"
    old = dest.parent / f".{dest.name}.old-{os.getpid()}"
    moved = False  # True while the previous folder sits at `old` and the new one is not in place yet
    try:
        shutil.rmtree(stage, ignore_errors=True)
        stage.mkdir(parents=True)
        for name, data in files.items():
            with open(stage / name, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        if dest.exists():
            os.replace(dest, old)
            moved = True
        os.replace(stage, dest)
        moved = False
    except OSError as e:
        raise write_failure(dest, e) from e
    finally:
        if moved and not dest.exists():
            os.replace(old, dest)  # put the previous run back (failure or interrupt between the renames)
        shutil.rmtree(stage, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return dest


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("lipscope", "torch", "diffusers", "numpy", "pandas", "huggingface_hub"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def user_cache_dir() -> Path:
    """lipscope's cache folder: ``$LIPSCOPE_CACHE``, else ``$XDG_CACHE_HOME/lipscope``, else ``~/.cache/lipscope``."""
    if os.environ.get("LIPSCOPE_CACHE"):
        return Path(os.environ["LIPSCOPE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lipscope"
