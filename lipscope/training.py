"""One training loop for ``lipscope train`` (from a UNet config) and ``lipscope finetune`` (from a
pretrained model), with or without E-TSDM.

ε-loss (or the model's own v/x0 target) with noise at the true integer step t and the network fed
f(t) under E-TSDM (Yang et al., 2306.11251, Sec. 4); AdamW, warm-up + cosine through
``diffusers.optimization.get_scheduler``, gradient clipping, EMA through
``diffusers.training_utils.EMAModel``, mixed precision and multi-GPU through accelerate
(``accelerate launch -m lipscope finetune …``).

Reproducibility: the batch of step s (data indices, t, ε) comes from a generator seeded by
(seed, s, process index) alone, so a run resumed from a checkpoint replays exactly the steps an
uninterrupted run takes (bit-exact on CPU).

Run folder: ``loss.csv`` (step, loss, lr), ``train.json`` (options, final loss, wall time),
``checkpoints/step-N/`` (accelerate state + EMA + step), and the final model in ``pipeline/``
(a diffusers pipeline folder: model_index.json, unet/, scheduler/), written to a temporary
folder and renamed into place.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .data import sample_generator
from .errors import InputError
from .io import atomic_write_bytes, atomic_write_text, json_bytes
from .schedules import schedule_from_config

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


def batch_for_step(
    data: torch.Tensor, step: int, batch: int, T: int, seed: int, process: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x0, t, ε) of one step: a function of (seed, step, process) only."""
    g = sample_generator(seed, (step << 8) + process)
    idx = torch.randint(0, data.shape[0], (batch,), generator=g)
    t = torch.randint(0, T, (batch,), generator=g)
    eps = torch.randn((batch, *data.shape[1:]), generator=g)
    return data[idx], t, eps


def _target(pred_type: str, x0: torch.Tensor, eps: torch.Tensor, a: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    if pred_type == "epsilon":
        return eps
    if pred_type == "v_prediction":
        return a * eps - s * x0
    if pred_type == "sample":
        return x0
    raise InputError(f"prediction_type {pred_type!r} cannot be trained; use epsilon, v_prediction or sample")


def _checkpoints(out: Path) -> list[Path]:
    d = out / "checkpoints"
    if not d.exists():
        return []
    cks = [p for p in d.iterdir() if p.name.startswith("step-") and (p / "lipscope_step.json").exists()]
    return sorted(cks, key=lambda p: int(p.name.split("-")[1]))


def save_pipeline(unet, scheduler_config: dict[str, Any], dest: Path, extra: dict[str, Any] | None = None) -> Path:
    """Save a diffusers pipeline folder atomically (temporary folder, then rename)."""
    from diffusers import DDPMScheduler

    dest = Path(dest)
    tmp = dest.parent / f".{dest.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    unet.save_pretrained(tmp / "unet")
    DDPMScheduler.from_config(scheduler_config).save_pretrained(tmp / "scheduler")
    cls = type(unet)
    lib = "diffusers" if cls.__module__.startswith("diffusers") else cls.__module__
    index = {
        "_class_name": "DDPMPipeline",
        "unet": [lib, cls.__name__],
        "scheduler": ["diffusers", "DDPMScheduler"],
    }
    (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    if extra:
        (tmp / "lipscope.json").write_text(json.dumps(extra, indent=2, default=str) + "\n")
    old = dest.parent / f".{dest.name}.old-{os.getpid()}"
    if dest.exists():
        os.replace(dest, old)
    os.replace(tmp, dest)
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
) -> dict[str, Any]:
    """Train ``unet`` (a UNet2DModel, ETSDMUNet2DModel when ``cfg.etsdm``) on x0 ``data`` (N, C, H, W).

    ``stop_after``: leave after that many steps of this session, with a checkpoint, so a long run
    can be split across sessions and continued with ``resume=True``.
    """
    from accelerate import Accelerator
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    from .etsdm import ETSDMUNet2DModel, etsdm_map, is_etsdm

    out = Path(out_dir)
    if cfg.steps < 1 or cfg.batch_size < 1:
        raise InputError("--steps and --batch-size must be ≥ 1")
    if cfg.etsdm and not is_etsdm(unet):
        unet = ETSDMUNet2DModel.from_unet(unet, cfg.t_tilde, cfg.n)
    elif not cfg.etsdm and is_etsdm(unet):
        raise InputError("this model already carries an E-TSDM map; pass --etsdm to keep training it that way")
    schedule = schedule_from_config(scheduler_config)
    T = schedule.T
    pred_type = schedule.prediction_type
    cks = _checkpoints(out)
    if resume and not cks:
        raise InputError(f"--resume: no checkpoint in {out}/checkpoints; start without --resume")
    if not resume and (out / "loss.csv").exists():
        raise InputError(f"{out} already holds a run; pass --resume to continue it or choose another --out")

    acc = Accelerator(mixed_precision=cfg.mixed_precision, cpu=not torch.cuda.is_available())
    torch.manual_seed(cfg.seed)
    unet.train()
    ema = EMAModel(unet.parameters(), decay=cfg.ema_decay, model_cls=type(unet), model_config=unet.config)
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    lr_sched = get_scheduler(cfg.lr_schedule, opt, num_warmup_steps=cfg.warmup_steps, num_training_steps=cfg.steps)
    unet, opt, lr_sched = acc.prepare(unet, opt, lr_sched)
    ema.to(acc.device)
    fmap = (lambda t: etsdm_map(t, cfg.t_tilde, cfg.n)) if cfg.etsdm else None
    base = acc.unwrap_model(unet)
    raw_forward = base.forward_condition if is_etsdm(base) else None

    start, losses = 0, []
    if resume:
        ck = cks[-1]
        acc.load_state(str(ck / "accelerate"))
        ema.load_state_dict(torch.load(ck / "ema.pt", weights_only=False))
        meta = json.loads((ck / "lipscope_step.json").read_text())
        start, losses = meta["step"], meta["losses"]
        log.info("resumed from %s (step %d)", ck, start)

    a_all = schedule.alpha(torch.arange(T, dtype=torch.float64)).float()
    s_all = schedule.sigma(torch.arange(T, dtype=torch.float64)).float()
    data = data.float()
    t0 = time.time()
    from .probe import _progress

    end = cfg.steps if stop_after is None else min(cfg.steps, start + stop_after)
    with _progress(progress and acc.is_main_process, end - start, "train") as advance:
        for step in range(start, end):
            x0, t, eps = batch_for_step(data, step, cfg.batch_size, T, cfg.seed, acc.process_index)
            shape = (-1,) + (1,) * (x0.ndim - 1)
            a, s = a_all[t].reshape(shape), s_all[t].reshape(shape)
            x = (a * x0 + s * eps).to(acc.device)
            cond = (fmap(t.double()) if fmap else t.double()).float().to(acc.device)
            with acc.autocast():
                # the network sees f(t); the map is applied here once (raw forward for E-TSDM nets)
                pred = raw_forward(x, cond).sample if raw_forward else unet(x, cond).sample
                loss = torch.nn.functional.mse_loss(pred.float(), _target(pred_type, x0, eps, a, s).to(acc.device))
            acc.backward(loss)
            if acc.sync_gradients and cfg.grad_clip > 0:
                acc.clip_grad_norm_(unet.parameters(), cfg.grad_clip)
            opt.step()
            lr_sched.step()
            opt.zero_grad(set_to_none=True)
            ema.step(unet.parameters())
            lv = acc.gather(loss.detach()[None]).mean().item()
            if not math.isfinite(lv):
                raise InputError(f"loss became {lv} at step {step}; lower --lr or use --mixed-precision no")
            losses.append([step, lv, lr_sched.get_last_lr()[0]])
            advance(1)
            done = step + 1
            if acc.is_main_process and (done % cfg.checkpoint_every == 0 or done in (cfg.steps, end)):
                _save_checkpoint(acc, ema, out, done, losses, cfg.keep_checkpoints)
                _write_losses(out, losses)
            acc.wait_for_everyone()

    if end < cfg.steps:
        acc.wait_for_everyone()
        acc.end_training()
        return {"stopped_at": end, "steps": cfg.steps}
    result: dict[str, Any] = {
        "steps": cfg.steps,
        "final_loss_mean_last_100": float(np.mean([v for _, v, _ in losses[-100:]])),
    }
    if acc.is_main_process:
        final = acc.unwrap_model(unet)
        ema.copy_to(final.parameters())
        final.eval()
        result.update(
            {
                "config": asdict(cfg),
                "source": source,
                "train_seconds_this_session": time.time() - t0,
                "processes": acc.num_processes,
                "device": str(acc.device),
                "prediction_type": pred_type,
                "class": type(final).__name__,
            }
        )
        save_pipeline(final, scheduler_config, out / "pipeline", extra={"training": result})
        atomic_write_bytes(out / "train.json", json_bytes(result))
    acc.wait_for_everyone()
    acc.end_training()
    return result


def _write_losses(out: Path, losses: list) -> None:
    lines = ["step,loss,lr"] + [f"{s},{v:.9g},{lr:.6g}" for s, v, lr in losses]
    atomic_write_text(out / "loss.csv", "\n".join(lines) + "\n")


def _save_checkpoint(acc, ema, out: Path, step: int, losses: list, keep: int) -> None:
    d = out / "checkpoints"
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / f".step-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    acc.save_state(str(tmp / "accelerate"))
    torch.save(ema.state_dict(), tmp / "ema.pt")
    (tmp / "lipscope_step.json").write_text(json.dumps({"step": step, "losses": losses}))
    final = d / f"step-{step}"
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in _checkpoints(out)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
