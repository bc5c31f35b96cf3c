"""One training loop for ``lipscope train`` (from a UNet config) and ``finetune`` (a pretrained VP model), ± E-TSDM.

ε-loss (or the model's v/x0 target), noise at the true step t, the network fed f(t) under E-TSDM (Sec. 4);
AdamW, warm-up + cosine (``get_scheduler``), clipping, ``EMAModel``, mixed precision and multi-GPU through
accelerate (``accelerate launch -m lipscope finetune …``).

Reproducibility: step s's batch comes from a generator seeded by (seed, s, process index) alone: a resumed run
replays the steps an uninterrupted run takes (bit-exact on CPU).

Run folder: ``loss.csv`` (step, loss, lr), ``train.json``, ``checkpoints/step-N/``, ``pipeline/``.
Checkpoints need no unpickling: accelerate's state (``torch.load(weights_only=True)``), ``ema.safetensors``,
``ema.json``, ``lipscope_step.json`` (step, losses, options, model config, source, data sha256: a
resume refuses other values but :data:`SAFE_TO_CHANGE`). Folders are written under a dot-name and
renamed into place (a killed write leaves a dot-folder, removed on the next start); a failed write
removes its partial folder and is one :class:`InputError` line.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import math
import numbers
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import rng
from .batching import progress_bar
from .errors import InputError
from .etsdm import Etsdm, ETSDMUNet2DModel, etsdm_of
from .io import atomic_write_bytes, atomic_write_text, json_bytes
from .processes import vp_schedule
from .schedules import Schedule
from .targets import noisy, prediction_target

log = logging.getLogger("lipscope")


@dataclass
class TrainConfig:
    steps: int = 2000
    batch_size: int = 64
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 100
    lr_schedule: str = "cosine"
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    mixed_precision: str = "no"
    seed: int = 0
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    etsdm: bool = False
    t_tilde: float = 100.0
    n: int = 5

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Refuse values training cannot run with: one line, the parameter in backticks."""
        from diffusers.optimization import SchedulerType

        ints = {"steps": 1, "batch_size": 1, "n": 1, "checkpoint_every": 1, "keep_checkpoints": 1, "warmup_steps": 0}
        for k, lo in (ints | {"seed": 0}).items():
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < lo:
                raise InputError(f"`{k}` must be an integer ≥ {lo} (got {v!r})")
        reals = {"lr": "> 0", "t_tilde": "> 0", "weight_decay": "≥ 0", "grad_clip": "≥ 0", "ema_decay": "in [0, 1)"}
        for k, rule in reals.items():
            v = getattr(self, k)
            real = not isinstance(v, bool) and isinstance(v, numbers.Real) and math.isfinite(v)
            if not real or v < 0 or (v == 0 and rule == "> 0") or (k == "ema_decay" and v >= 1):
                raise InputError(f"`{k}` must be finite and {rule} (got {v!r})")
        choices = {"mixed_precision": ["no", "fp16", "bf16"], "lr_schedule": [s.value for s in SchedulerType]}
        for k, allowed in choices.items():
            if getattr(self, k) not in allowed:
                raise InputError(f"`{k}` must be one of {', '.join(allowed)} (got {getattr(self, k)!r})")


# what a resume may change: when checkpoints are written and how many are kept (losses and weights stay the same)
SAFE_TO_CHANGE = ("checkpoint_every", "keep_checkpoints")


def batch_for_step(
    data: torch.Tensor, step: int, batch: int, T: int, seed: int, process: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x0, t, ε) of one step: a function of (seed, step, process) only (stream TRAINING)."""
    g = rng.generator(seed, rng.Stream.TRAINING, step, process=process)
    idx = torch.randint(0, data.shape[0], (batch,), generator=g)
    t = torch.randint(0, T, (batch,), generator=g)
    eps = torch.randn((batch, *data.shape[1:]), generator=g)
    return data[idx], t, eps


def diffusion_loss(
    forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x0: torch.Tensor,
    t: torch.Tensor,
    eps: torch.Tensor,
    schedule: Schedule,
    prediction_type: str,
    etsdm: Etsdm | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The one diffusion loss: noise x0 at the true step t, feed the network f(t), regress its target.

    x_t = α_t x0 + σ_t ε (float32 coefficients from the float64 schedule); the network sees the
    E-TSDM condition f(t) when ``etsdm`` is set, else t (paper Sec. 4); the target is ε, v or x0 as
    ``prediction_type`` says. ``forward(x, c)`` returns the raw network output.
    """
    tt = t.to(torch.float64)
    a, s = schedule.alpha(tt).float(), schedule.sigma(tt).float()
    x = noisy(x0, eps, a, s).to(device) if device is not None else noisy(x0, eps, a, s)
    cond = (etsdm.map(tt) if etsdm is not None else tt).float().to(x.device)
    target = prediction_target(prediction_type, x0, eps, a, s).to(x.device)
    return torch.nn.functional.mse_loss(forward(x, cond).float(), target)


def _checkpoints(out: Path) -> list[Path]:
    """The complete checkpoints of a run, oldest first (dot-folders are unfinished writes)."""
    found = (out / "checkpoints").glob("step-*")
    cks = [p for p in found if p.name[5:].isdigit() and (p / "lipscope_step.json").exists()]
    return sorted(cks, key=lambda p: int(p.name.split("-")[1]))


def _brief(e: BaseException) -> str:  # an exception in one short line
    return (str(e).strip().splitlines() or [type(e).__name__])[0].strip()[:200]


@contextlib.contextmanager
def _writing(what: str | Path, partial: Path | None = None) -> Iterator[None]:
    """A failed or interrupted write removes ``partial``; a failed one (disk full) is one line."""
    try:
        yield
    except BaseException as e:
        if partial is not None:
            shutil.rmtree(partial, ignore_errors=True)
        if isinstance(e, (OSError, RuntimeError)) or type(e).__name__ == "SafetensorError":
            hints = {errno.ENOSPC: "free space", errno.EROFS: "make it writable", errno.EACCES: "make it writable"}
            hint = hints.get(getattr(e, "errno", 0), "free space or make it writable")
            raise InputError(f"could not write {what}: {_brief(e)}; {hint} or choose another `out_dir`") from e
        raise


@contextlib.contextmanager
def _reading(path: Path, ck: Path) -> Iterator[None]:
    """A checkpoint file that does not load (damaged, planted, another model's) is one line."""
    try:
        yield
    except InputError:
        raise
    except Exception as e:
        why = f"checkpoint file {path} cannot be loaded ({_brief(e)})"
        raise InputError(f"{why}; delete {ck} to resume from the one before it, or start a new `out_dir`") from e


def save_pipeline(unet, scheduler_config: dict[str, Any], dest: Path, extra: dict[str, Any] | None = None) -> Path:
    """Save a diffusers pipeline folder atomically (temporary folder, then rename); on a failure or
    an interrupt the temporary folder is removed and a previous ``dest`` is left in place."""
    from diffusers import DDPMScheduler

    dest = Path(dest)
    tmp, old = dest.parent / f".{dest.name}.tmp-{os.getpid()}", dest.parent / f".{dest.name}.old-{os.getpid()}"
    moved = False  # True while the previous folder sits at `old` and the new one is not in place yet
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        unet.save_pretrained(tmp / "unet")
        DDPMScheduler.from_config(scheduler_config).save_pretrained(tmp / "scheduler")
        lib = "diffusers" if type(unet).__module__.startswith("diffusers") else type(unet).__module__
        index = {"_class_name": "DDPMPipeline", "unet": [lib, type(unet).__name__]}
        index["scheduler"] = ["diffusers", "DDPMScheduler"]
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
        if extra:
            (tmp / "lipscope.json").write_text(json.dumps(extra, indent=2, default=str) + "\n")
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


def train_loop(
    unet,
    scheduler_config: dict[str, Any],
    data: torch.Tensor,
    cfg: TrainConfig,
    out_dir: str | Path,
    resume: bool = False,
    progress: bool = False,
    source: str = "",
    stop_after: int | None = None,
    data_spec: str = "",
) -> dict[str, Any]:
    """Train ``unet`` (a UNet2DModel, ETSDMUNet2DModel when ``cfg.etsdm``) on x0 ``data`` (N, C, H, W).

    ``stop_after``: leave after that many steps (with a checkpoint); continue with ``resume=True``, which refuses
    other options (but :data:`SAFE_TO_CHANGE`), model (``source``), schedule or data (``data_spec``).
    """
    out = Path(out_dir)
    cfg.validate()
    if stop_after is not None and (isinstance(stop_after, bool) or stop_after < 1):
        raise InputError(f"`stop_after` must be ≥ 1 (got {stop_after!r})")
    if cfg.etsdm and etsdm_of(unet) is None:
        unet = ETSDMUNet2DModel.from_unet(unet, cfg.t_tilde, cfg.n)
    elif not cfg.etsdm and etsdm_of(unet) is not None:
        raise InputError("this model already carries an E-TSDM map; set `etsdm` to keep training it that way")
    data = data.float()
    arr = data.detach().cpu().contiguous().numpy()
    digest = hashlib.sha256(arr.data.cast("B")).hexdigest()  # no copy of the data
    run = {
        "config": asdict(cfg),
        "source": source,
        "model_config": {k: v for k, v in dict(unet.config).items() if not k.startswith("_")},
        "scheduler": scheduler_config,  # the noise schedule: a resume on another one is refused
        "data": {"spec": data_spec, "shape": list(arr.shape), "sha256": digest},
    }
    run = json.loads(json.dumps(run, default=str))  # as a checkpoint holds it
    with rng.isolated_torch_rng(cfg.seed):
        return _train(unet, scheduler_config, data, cfg, out, (resume, progress, stop_after), run)


def _check_same_run(old: Any, now: dict[str, Any], ck: Path) -> None:
    """Refuse a resume whose options, model or data differ from the checkpoint's, naming each."""
    if not isinstance(old, dict):
        raise InputError(f"{ck} was written by an older lipscope (no record of its options); start a new `out_dir`")
    was, d0, d1 = old.get("config", {}), old.get("data", {}), now["data"]
    changed = {k: v for k, v in now["config"].items() if k not in SAFE_TO_CHANGE and was.get(k) != v}
    diffs = [f"`{k}` {was.get(k)!r} → {v!r}" for k, v in changed.items()]
    diffs += [f"model source {old.get('source')!r} → {now['source']!r}"] if old.get("source") != now["source"] else []
    diffs += [f"the {k.replace('_', ' ')}" for k in ("model_config", "scheduler") if old.get(k, now[k]) != now[k]]
    if (d0.get("shape"), d0.get("sha256")) != (d1["shape"], d1["sha256"]):
        was_data = f"{d0.get('spec')} {d0.get('shape')} sha256 {str(d0.get('sha256'))[:12]}…"
        diffs.append(f"`data` {was_data} → {d1['spec']} {d1['shape']} sha256 {d1['sha256'][:12]}…")
    if diffs:
        fix = "rerun with the original values or start a new `out_dir`"
        raise InputError(f"`resume`: {ck} was trained with other settings: {', '.join(diffs)}; {fix}")


def _load_checkpoint(acc: Any, ema: Any, ck: Path) -> None:
    """accelerate's state, then the EMA: safetensors, JSON and ``torch.load(weights_only=True)`` only."""
    from accelerate.utils import load
    from safetensors import safe_open
    from safetensors.torch import load_file

    d = ck / "accelerate"
    for f in sorted(d.iterdir()) if d.is_dir() else []:  # name a bad file (accelerate skips a bad RNG file)
        with _reading(f, ck):
            safe_open(str(f), "pt").keys() if f.suffix == ".safetensors" else load(f)
    with _reading(d, ck):
        acc.load_state(str(d))
    with _reading(ck / "ema.safetensors", ck):
        tensors = load_file(str(ck / "ema.safetensors"))
        shadow = [tensors.get(str(i)) for i in range(len(ema.shadow_params))]
        like = [(t.shape, t.dtype) if t is not None else None for t in shadow]
        if len(tensors) != len(shadow) or like != [(p.shape, p.dtype) for p in ema.shadow_params]:
            raise ValueError("its tensors do not match this model")
    with _reading(ck / "ema.json", ck):  # diffusers checks each scalar's type
        ema.load_state_dict({**json.loads((ck / "ema.json").read_bytes()), "shadow_params": shadow})
    ema.to(acc.device)


def _train(
    unet: Any, scheduler_config: dict, data: torch.Tensor, cfg: TrainConfig, out: Path, flags: tuple, run: dict
) -> dict[str, Any]:
    from accelerate import Accelerator
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    resume, progress, stop_after = flags
    schedule = vp_schedule(scheduler_config, "training")
    T, pred_type = schedule.T, schedule.prediction_type
    cks = _checkpoints(out)
    if resume and not cks:
        raise InputError(f"`resume`: no checkpoint in {out}/checkpoints; start without `resume`")
    if not resume and ((out / "loss.csv").exists() or cks):
        raise InputError(f"{out} already holds a run; pass `resume` to continue it or choose another `out_dir`")
    meta: dict[str, Any] = {"step": 0, "losses": []}
    if resume:
        with _reading(cks[-1] / "lipscope_step.json", cks[-1]):
            meta = json.loads((cks[-1] / "lipscope_step.json").read_bytes())
            if not isinstance(meta["step"], int) or not isinstance(meta["losses"], list):
                raise ValueError("not a lipscope step record")
        _check_same_run(meta.get("run"), run, cks[-1])

    acc = Accelerator(mixed_precision=cfg.mixed_precision, cpu=not torch.cuda.is_available())
    if acc.is_main_process:  # what a killed write left: dot-folders and temporary files
        for p in [*(out / "checkpoints").glob(".step-*"), *out.glob(".pipeline.*"), *out.glob(".*.tmp")]:
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    unet.train()
    ema = EMAModel(unet.parameters(), decay=cfg.ema_decay, model_cls=type(unet), model_config=unet.config)
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    lr_sched = get_scheduler(cfg.lr_schedule, opt, num_warmup_steps=cfg.warmup_steps, num_training_steps=cfg.steps)
    unet, opt, lr_sched = acc.prepare(unet, opt, lr_sched)
    ema.to(acc.device)
    etsdm = etsdm_of(acc.unwrap_model(unet))
    # the network sees f(t): the map is applied once, by the loss (the raw forward for E-TSDM nets)
    forward = acc.unwrap_model(unet).forward_condition if etsdm is not None else unet

    start, losses = meta["step"], meta["losses"]
    if resume:
        _load_checkpoint(acc, ema, cks[-1])
        log.info("resumed from %s (step %d)", cks[-1], start)

    t0 = time.time()

    def net(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return forward(x, c).sample

    end = cfg.steps if stop_after is None else min(cfg.steps, start + stop_after)
    with progress_bar(progress and acc.is_main_process, end - start, "train") as advance:
        for step in range(start, end):
            x0, t, eps = batch_for_step(data, step, cfg.batch_size, T, cfg.seed, acc.process_index)
            with acc.autocast():
                loss = diffusion_loss(net, x0, t, eps, schedule, pred_type, etsdm, device=acc.device)
            acc.backward(loss)
            if acc.sync_gradients and cfg.grad_clip > 0:
                acc.clip_grad_norm_(unet.parameters(), cfg.grad_clip)
            opt.step()
            lr_sched.step()
            opt.zero_grad(set_to_none=True)
            ema.step(unet.parameters())
            lv = acc.gather(loss.detach()[None]).mean().item()
            if not math.isfinite(lv):  # raised before this step's checkpoint: the last one is intact
                last = ([p.name for p in _checkpoints(out)] or ["none"])[-1]
                fix = "lower `lr` (or set `mixed_precision` to no) and start a new `out_dir` (a resume repeats them)"
                raise InputError(f"loss became {lv} at step {step} (last checkpoint: {last}); {fix}")
            losses.append([step, lv, lr_sched.get_last_lr()[0]])
            advance(1)
            done = step + 1
            if acc.is_main_process and (done % cfg.checkpoint_every == 0 or done in (cfg.steps, end)):
                _save_checkpoint(acc, ema, out, done, losses, cfg.keep_checkpoints, run)
                _write_losses(out, losses)
            acc.wait_for_everyone()

    if end < cfg.steps:
        acc.end_training()
        return {"stopped_at": end, "steps": cfg.steps}
    mean = float(np.mean([v for _, v, _ in losses[-100:]]))
    result: dict[str, Any] = {"steps": cfg.steps, "final_loss_mean_last_100": mean}
    if acc.is_main_process:
        final = acc.unwrap_model(unet)
        ema.copy_to(final.parameters())
        final.eval()
        result |= {"config": asdict(cfg), "source": run["source"], "data": run["data"], "class": type(final).__name__}
        result |= {"train_seconds_this_session": time.time() - t0, "processes": acc.num_processes}
        result |= {"device": str(acc.device), "prediction_type": pred_type}
        _write_losses(out, losses)  # again: a resumed run that failed after its last checkpoint lacks it
        with _writing(out / "pipeline"):
            save_pipeline(final, scheduler_config, out / "pipeline", extra={"training": result})
        with _writing(out / "train.json"):
            atomic_write_bytes(out / "train.json", json_bytes(result))
    acc.wait_for_everyone()
    acc.end_training()
    return result


def _write_losses(out: Path, losses: list) -> None:
    lines = ["step,loss,lr"] + [f"{s},{v:.9g},{lr:.6g}" for s, v, lr in losses]
    with _writing(out / "loss.csv"):
        atomic_write_text(out / "loss.csv", "\n".join(lines) + "\n")


def _save_checkpoint(acc, ema, out: Path, step: int, losses: list, keep: int, run: dict) -> None:
    """Write ``checkpoints/.step-N.tmp`` in full, rename it to ``step-N``, drop the oldest."""
    from safetensors.torch import save_file

    d = out / "checkpoints"
    tmp, final = d / f".step-{step}.tmp", d / f"step-{step}"
    with _writing(f"checkpoint {final}", partial=tmp):
        d.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        acc.save_state(str(tmp / "accelerate"))
        shadow = {str(i): p.detach().cpu().contiguous() for i, p in enumerate(ema.shadow_params)}
        save_file(shadow, tmp / "ema.safetensors")
        (tmp / "ema.json").write_text(json.dumps({k: v for k, v in ema.state_dict().items() if k != "shadow_params"}))
        (tmp / "lipscope_step.json").write_text(json.dumps({"step": step, "losses": losses, "run": run}))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    for old in _checkpoints(out)[:-keep]:  # renamed first: a half-removed folder is never taken for one
        with contextlib.suppress(OSError):
            os.replace(old, d / f".{old.name}.old")
        shutil.rmtree(d / f".{old.name}.old", ignore_errors=True)
