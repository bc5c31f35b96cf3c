"""A training run's checkpoints: written whole under a dot-name and renamed into place, read without unpickling.

A checkpoint ``checkpoints/step-N/`` holds accelerate's state (``torch.load(weights_only=True)``),
``ema.safetensors``, ``ema.json`` and ``lipscope_step.json`` (step, losses, options, model config, source, data
sha256): a resume refuses other values but :data:`SAFE_TO_CHANGE`. A failed write removes its partial folder and
is one :class:`InputError` line; a file that does not load names itself and the checkpoint to delete.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .errors import InputError
from .io import atomic_write_text

# what a resume may change: when checkpoints are written and how many are kept (losses and weights stay the same)
SAFE_TO_CHANGE = ("checkpoint_every", "keep_checkpoints")


def checkpoints(out: Path) -> list[Path]:
    """The complete checkpoints of a run, oldest first (dot-folders are unfinished writes)."""
    found = (out / "checkpoints").glob("step-*")
    cks = [p for p in found if p.name[5:].isdigit() and (p / "lipscope_step.json").exists()]
    return sorted(cks, key=lambda p: int(p.name.split("-")[1]))


def brief(e: BaseException) -> str:  # an exception in one short line
    return (str(e).strip().splitlines() or [type(e).__name__])[0].strip()[:200]


@contextlib.contextmanager
def writing(what: str | Path, partial: Path | None = None) -> Iterator[None]:
    """A failed or interrupted write removes ``partial``; a failed one (disk full) is one line."""
    try:
        yield
    except BaseException as e:
        if partial is not None:
            shutil.rmtree(partial, ignore_errors=True)
        if isinstance(e, (OSError, RuntimeError)) or type(e).__name__ == "SafetensorError":
            hints = {errno.ENOSPC: "free space", errno.EROFS: "make it writable", errno.EACCES: "make it writable"}
            hint = hints.get(getattr(e, "errno", 0), "free space or make it writable")
            raise InputError(f"could not write {what}: {brief(e)}; {hint} or choose another `out_dir`") from e
        raise


@contextlib.contextmanager
def reading(path: Path, ck: Path) -> Iterator[None]:
    """A checkpoint file that does not load (damaged, planted, another model's) is one line."""
    try:
        yield
    except InputError:
        raise
    except Exception as e:
        why = f"checkpoint file {path} cannot be loaded ({brief(e)})"
        raise InputError(f"{why}; delete {ck} to resume from the one before it, or start a new `out_dir`") from e


def check_same_run(old: Any, now: dict[str, Any], ck: Path) -> None:
    """Refuse a resume whose options, model or data differ from the checkpoint's, naming each."""
    if not isinstance(old, dict):
        raise InputError(f"{ck} was written by an older lipscope (no record of its options); start a new `out_dir`")
    was, d0, d1 = old.get("config", {}), old.get("data", {}), now["data"]
    # options a checkpoint predates (written before they existed) are not compared
    changed = {k: v for k, v in now["config"].items() if k not in SAFE_TO_CHANGE and k in was and was[k] != v}
    diffs = [f"`{k}` {was.get(k)!r} → {v!r}" for k, v in changed.items()]
    diffs += [f"model source {old.get('source')!r} → {now['source']!r}"] if old.get("source") != now["source"] else []
    diffs += [f"the {k.replace('_', ' ')}" for k in ("model_config", "scheduler") if old.get(k, now[k]) != now[k]]
    if old.get("processes", now.get("processes")) != now.get("processes"):
        diffs.append(f"the number of processes {old.get('processes')} → {now.get('processes')}")
    if (d0.get("shape"), d0.get("sha256")) != (d1["shape"], d1["sha256"]):
        was_data = f"{d0.get('spec')} {d0.get('shape')} sha256 {str(d0.get('sha256'))[:12]}…"
        diffs.append(f"`data` {was_data} → {d1['spec']} {d1['shape']} sha256 {d1['sha256'][:12]}…")
    diffs += [f"the {k} of the data" for k in ("conditioning", "rows") if d0.get(k, d1.get(k)) != d1.get(k)]
    if diffs:
        fix = "rerun with the original values or start a new `out_dir`"
        raise InputError(f"`resume`: {ck} was trained with other settings: {', '.join(diffs)}; {fix}")


def load_checkpoint(acc: Any, ema: Any, ck: Path) -> None:
    """accelerate's state, then the EMA: safetensors, JSON and ``torch.load(weights_only=True)`` only."""
    from accelerate.utils import load
    from safetensors import safe_open
    from safetensors.torch import load_file

    d = ck / "accelerate"
    for f in sorted(d.iterdir()) if d.is_dir() else []:  # name a bad file (accelerate skips a bad RNG file)
        with reading(f, ck):
            safe_open(str(f), "pt").keys() if f.suffix == ".safetensors" else load(f)
    with reading(d, ck):
        acc.load_state(str(d))
    with reading(ck / "ema.safetensors", ck):
        tensors = load_file(str(ck / "ema.safetensors"))
        shadow = [tensors.get(str(i)) for i in range(len(ema.shadow_params))]
        like = [(t.shape, t.dtype) if t is not None else None for t in shadow]
        if len(tensors) != len(shadow) or like != [(p.shape, p.dtype) for p in ema.shadow_params]:
            raise ValueError("its tensors do not match this model")
    with reading(ck / "ema.json", ck):  # diffusers checks each scalar's type
        ema.load_state_dict({**json.loads((ck / "ema.json").read_bytes()), "shadow_params": shadow})
    ema.to(acc.device)


def save_checkpoint(acc, ema, out: Path, step: int, losses: list, keep: int, run: dict) -> None:
    """Write ``checkpoints/.step-N.tmp`` in full, rename it to ``step-N``, drop the oldest. Called by every process:
    accelerate saves the weights and optimizer once and each process's RNG state; the main process does the rest."""
    from safetensors.torch import save_file

    d = out / "checkpoints"
    tmp, final = d / f".step-{step}.tmp", d / f"step-{step}"
    main = acc.is_main_process
    with writing(f"checkpoint {final}", partial=tmp if main else None):
        if main:
            d.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp / "accelerate"))
        acc.wait_for_everyone()
        if main:
            shadow = {str(i): p.detach().cpu().contiguous() for i, p in enumerate(ema.shadow_params)}
            save_file(shadow, tmp / "ema.safetensors")
            state = {k: v for k, v in ema.state_dict().items() if k != "shadow_params"}
            (tmp / "ema.json").write_text(json.dumps(state))
            (tmp / "lipscope_step.json").write_text(json.dumps({"step": step, "losses": losses, "run": run}))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
    acc.wait_for_everyone()
    if not main:
        return
    for old in checkpoints(out)[:-keep]:  # renamed first: a half-removed folder is never taken for one
        with contextlib.suppress(OSError):
            os.replace(old, d / f".{old.name}.old")
        shutil.rmtree(d / f".{old.name}.old", ignore_errors=True)


def write_losses(out: Path, losses: list) -> None:
    lines = ["step,loss,lr"] + [f"{s},{v:.9g},{lr:.6g}" for s, v, lr in losses]
    with writing(out / "loss.csv"):
        atomic_write_text(out / "loss.csv", "\n".join(lines) + "\n")


def write_folder(dest: Path, fill: Callable[[Path], Any]) -> Path:
    """Write a folder atomically: ``fill(tmp)`` writes a temporary folder, which is then renamed to ``dest``; on a
    failure or an interrupt the temporary folder is removed and a previous ``dest`` is left in place."""
    dest = Path(dest)
    tmp, old = dest.parent / f".{dest.name}.tmp-{os.getpid()}", dest.parent / f".{dest.name}.old-{os.getpid()}"
    moved = False  # True while the previous folder sits at `old` and the new one is not in place yet
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        fill(tmp)
        if moved := dest.exists():
            os.replace(dest, old)
        os.replace(tmp, dest)
        moved = False
    finally:
        if moved and not dest.exists():
            os.replace(old, dest)
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return dest


def save_pipeline(unet, scheduler_config: dict[str, Any], dest: Path, extra: dict[str, Any] | None = None) -> Path:
    """Save a DDPM pipeline folder of a ``UNet2DModel`` (E-TSDM: its class from ``lipscope.etsdm``) atomically, with
    the scheduler its config names (DDPM when it names none; a flow model keeps its ``FlowMatchEulerDiscreteScheduler``,
    whose ``step`` DDPMPipeline's loop calls the same way; a VE model is a ``ScoreSdeVePipeline``)."""
    import diffusers

    name = scheduler_config.get("_class_name") or "DDPMScheduler"
    sched_cls = getattr(diffusers, name, None) if name.endswith("Scheduler") else None
    sched_cls = sched_cls or diffusers.DDPMScheduler

    def fill(tmp: Path) -> None:
        unet.save_pretrained(tmp / "unet")
        sched_cls.from_config(scheduler_config).save_pretrained(tmp / "scheduler")
        lib = "diffusers" if type(unet).__module__.startswith("diffusers") else type(unet).__module__
        pipe = "ScoreSdeVePipeline" if sched_cls.__name__ == "ScoreSdeVeScheduler" else "DDPMPipeline"
        index = {"_class_name": pipe, "unet": [lib, type(unet).__name__]}
        index["scheduler"] = ["diffusers", sched_cls.__name__]
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
        if extra:
            (tmp / "lipscope.json").write_text(json.dumps(extra, indent=2, default=str) + "\n")

    return write_folder(dest, fill)
