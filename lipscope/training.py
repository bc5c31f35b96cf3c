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
from collections.abc import Callable
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
from .schedules import Schedule, noisy, prediction_target, schedule_from_config

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
    out = Path(out_dir)
    if cfg.steps < 1 or cfg.batch_size < 1:
        raise InputError(f"`steps` and `batch_size` must be ≥ 1 (got {cfg.steps} and {cfg.batch_size})")
    if cfg.etsdm and etsdm_of(unet) is None:
        unet = ETSDMUNet2DModel.from_unet(unet, cfg.t_tilde, cfg.n)
    elif not cfg.etsdm and etsdm_of(unet) is not None:
        raise InputError("this model already carries an E-TSDM map; set `etsdm` to keep training it that way")
    with rng.isolated_torch_rng(cfg.seed):
        return _train(unet, scheduler_config, data, cfg, out, resume, progress, source, stop_after)


def _train(
    unet: Any,
    scheduler_config: dict[str, Any],
    data: torch.Tensor,
    cfg: TrainConfig,
    out: Path,
    resume: bool,
    progress: bool,
    source: str,
    stop_after: int | None,
) -> dict[str, Any]:
    from accelerate import Accelerator
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    schedule = schedule_from_config(scheduler_config)
    T = schedule.T
    pred_type = schedule.prediction_type
    cks = _checkpoints(out)
    if resume and not cks:
        raise InputError(f"`resume`: no checkpoint in {out}/checkpoints; start without `resume`")
    if not resume and (out / "loss.csv").exists():
        raise InputError(f"{out} already holds a run; pass `resume` to continue it or choose another `out_dir`")

    acc = Accelerator(mixed_precision=cfg.mixed_precision, cpu=not torch.cuda.is_available())
    unet.train()
    ema = EMAModel(unet.parameters(), decay=cfg.ema_decay, model_cls=type(unet), model_config=unet.config)
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    lr_sched = get_scheduler(cfg.lr_schedule, opt, num_warmup_steps=cfg.warmup_steps, num_training_steps=cfg.steps)
    unet, opt, lr_sched = acc.prepare(unet, opt, lr_sched)
    ema.to(acc.device)
    etsdm = etsdm_of(acc.unwrap_model(unet))
    # the network sees f(t): the map is applied once, by the loss (the raw forward for E-TSDM nets)
    forward = acc.unwrap_model(unet).forward_condition if etsdm is not None else unet

    start, losses = 0, []
    if resume:
        ck = cks[-1]
        acc.load_state(str(ck / "accelerate"))
        ema.load_state_dict(torch.load(ck / "ema.pt", weights_only=False))
        meta = json.loads((ck / "lipscope_step.json").read_text())
        start, losses = meta["step"], meta["losses"]
        log.info("resumed from %s (step %d)", ck, start)

    data = data.float()
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
            if not math.isfinite(lv):
                raise InputError(f"loss became {lv} at step {step}; lower `lr` or set `mixed_precision` to no")
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
