"""One training loop for ``lipscope train`` (from a UNet config) and ``finetune`` (any family lipscope wraps), ± E-TSDM.

The family's own loss (:mod:`lipscope.objectives`: ε, v, x0 or flow velocity; noise at the true time t, the
network fed f(t) under E-TSDM, Sec. 4), conditioned per sample (captions with empty-prompt dropout, encoded once
by the pipeline's own frozen text encoders), on x0 that are pixels or cached latents. Every weight, or LoRA
adapters (peft). AdamW, warm-up + cosine (``get_scheduler``), clipping, ``EMAModel``, mixed precision, gradient
accumulation and multi-GPU through accelerate (``accelerate launch -m lipscope finetune …``).

Reproducibility: step s's draws come from a generator seeded by (seed, s, process index) alone: a resumed run
replays the steps an uninterrupted run takes (bit-exact on CPU).

Run folder: ``loss.csv``, ``train.json``, ``checkpoints/step-N/``, the model (``pipeline/``, or ``lora/`` for LoRA).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import numbers
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import rng
from .batching import progress_bar
from .checkpoints import (
    SAFE_TO_CHANGE,
    check_same_run,
    checkpoints,
    load_checkpoint,
    reading,
    save_checkpoint,
    save_pipeline,
    write_folder,
    write_losses,
    writing,
)
from .conditioning import Conditioning
from .errors import InputError
from .etsdm import etsdm_of, with_etsdm
from .families import family_of_model
from .io import atomic_write_bytes, json_bytes
from .lora import add_lora, check_lora, check_lora_options, save_lora, trainable_parameters
from .models import EpsModel
from .objectives import WEIGHTINGS, diffusion_loss, draw_step, flow_grid, loss_description, training_process
from .processes import FlowProcess, etsdm_axis

log = logging.getLogger("lipscope")

__all__ = ["SAFE_TO_CHANGE", "TrainConfig", "TrainData", "save_pipeline", "train_loop", "write_folder"]


@dataclass
class TrainConfig:
    steps: int = 2000
    batch_size: int = 64  # per process and micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step (effective batch: batch_size · grad_accum · processes)
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
    t_tilde: float | None = None  # model steps k = τ·T (VP: the step; flow: σ·1000); None: 0.1·T
    n: int = 5
    caption_dropout: float = 0.0  # the rate at which a caption is replaced by the empty prompt (CFG)
    weighting: str = "none"  # flow models: diffusers' timestep density and loss weighting (objectives.WEIGHTINGS)
    lora: bool = False  # train LoRA adapters (peft) instead of every weight
    lora_rank: int = 4
    lora_alpha: int | None = None  # None: the rank (scale 1)
    lora_targets: tuple[str, ...] = ("to_k", "to_q", "to_v", "to_out.0")

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Refuse values training cannot run with: one line, the parameter in backticks."""
        from diffusers.optimization import SchedulerType

        ints = {"steps": 1, "batch_size": 1, "n": 1, "checkpoint_every": 1, "keep_checkpoints": 1, "warmup_steps": 0,
                "lora_rank": 1, "grad_accum": 1}  # fmt: skip
        for k, lo in (ints | {"seed": 0}).items():
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < lo:
                raise InputError(f"`{k}` must be an integer ≥ {lo} (got {v!r})")
        reals = {"lr": "> 0", "t_tilde": "> 0", "weight_decay": "≥ 0", "grad_clip": "≥ 0", "ema_decay": "in [0, 1)",
                 "caption_dropout": "in [0, 1)", "lora_alpha": "> 0"}  # fmt: skip
        for k, rule in reals.items():
            v = getattr(self, k)
            if k in ("lora_alpha", "t_tilde") and v is None:
                continue
            real = not isinstance(v, bool) and isinstance(v, numbers.Real) and math.isfinite(v)
            if not real or v < 0 or (v == 0 and rule == "> 0") or (rule == "in [0, 1)" and v >= 1):
                raise InputError(f"`{k}` must be finite and {rule} (got {v!r})")
        if not self.lora_targets or not all(isinstance(m, str) and m for m in self.lora_targets):
            raise InputError(f"`lora_targets` must name one or more modules (got {self.lora_targets!r})")
        choices = {"mixed_precision": ["no", "fp16", "bf16"], "lr_schedule": [s.value for s in SchedulerType],
                   "weighting": list(WEIGHTINGS)}  # fmt: skip
        for k, allowed in choices.items():
            if getattr(self, k) not in allowed:
                raise InputError(f"`{k}` must be one of {', '.join(allowed)} (got {getattr(self, k)!r})")


# what a resume may change: see lipscope.checkpoints.SAFE_TO_CHANGE


@dataclass
class TrainData:
    """What a run trains on: x0 in the denoiser's space (pixels, or latents encoded once), and for a conditional
    model the conditioning row of each sample (``rows``) in ``conditioning`` plus the empty prompt's row."""

    x0: torch.Tensor
    conditioning: Conditioning | None = None
    rows: torch.Tensor | None = None  # (N,) row of ``conditioning`` per sample
    empty_row: int | None = None  # the unconditional row captions drop to
    spec: str = ""
    info: dict[str, Any] = field(default_factory=dict)  # recorded in train.json (captions, latents)
    # known density: fresh(index, n, rank) draws micro-batch ``index``'s n x0 afresh (``x0`` only feeds the hash)
    fresh: Callable[[int, int, int], torch.Tensor] | None = None


class _TrainNet(torch.nn.Module):
    """The denoiser called as its family calls it (map-free: the loss feeds f(t)); what accelerate prepares, so
    a multi-GPU run synchronises the gradients of this call."""

    def __init__(self, denoiser: torch.nn.Module, call: Callable[..., torch.Tensor]):
        super().__init__()
        self.denoiser, self._call = denoiser, call

    def forward(self, x: torch.Tensor, c: torch.Tensor, **kw: Any) -> torch.Tensor:
        return self._call(x, c, **kw)


def check_trainable(model: EpsModel, cfg: TrainConfig) -> None:
    """Refuse what training ``model`` with ``cfg`` cannot do, before anything is written (latents, checkpoints): a
    model lipscope cannot train, one that holds a LoRA adapter or an E-TSDM map the options drop, LoRA for a family
    without ``load_lora_weights``, targets that name no layer, a rank no targeted layer can use."""
    fam = family_of_model(model)
    if fam is None or model.module is None:
        raise InputError(f"`model` {model.name}: training needs a diffusers denoiser lipscope wraps")
    if getattr(model.module, "peft_config", None):
        raise InputError(f"`model` {model.name} holds a LoRA adapter; fine-tune its base model (or a merged copy)")
    if not cfg.etsdm and etsdm_of(model.module) is not None:
        raise InputError("this model already carries an E-TSDM map; set `etsdm` to keep training it that way")
    if cfg.lora:
        check_lora(fam.name)
        check_lora_options(model.module, cfg.lora_rank, cfg.lora_targets)


def _prepare_denoiser(model: EpsModel, cfg: TrainConfig, t_tilde: float) -> tuple[Any, EpsModel]:
    """The module to train (E-TSDM attached when asked, LoRA adapters added) and the EpsModel that calls it."""
    check_trainable(model, cfg)
    fam, denoiser = family_of_model(model), model.module
    assert fam is not None and denoiser is not None
    if cfg.etsdm:  # in place: the run owns the loaded module; an E-TSDM model must carry this very map
        denoiser = with_etsdm(denoiser, t_tilde, cfg.n, inplace=True, axis=etsdm_axis(model.schedule))
    if cfg.lora:
        add_lora(denoiser, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets)
    built = fam.build(denoiser, model.scheduler_config, model.name, model.device, model.dtype)
    return denoiser, built


def _micro_loss(
    net: Any, td: TrainData, cfg: TrainConfig, process: Any, index: int, *, acc: Any, grid: Any, etsdm: Any, target: str
) -> torch.Tensor:
    """The loss of one micro-batch: draw item ``index`` of the TRAINING stream, condition, noise, regress."""
    b = draw_step(len(td.x0), tuple(td.x0.shape[1:]), index, cfg.batch_size, process, cfg.seed,
                  rank=acc.process_index, weighting=cfg.weighting, grid=grid, dropout=cfg.caption_dropout)  # fmt: skip
    kw: dict[str, Any] = {}
    if td.conditioning is not None:
        r = td.rows[b.idx] if td.rows is not None else b.idx
        r = torch.where(b.drop, td.empty_row if td.empty_row is not None else r, r)
        kw = td.conditioning.rows(r, acc.device, torch.float32)[0]
    with acc.autocast():
        x0 = td.x0[b.idx] if td.fresh is None else td.fresh(index, cfg.batch_size, acc.process_index).float()
        return diffusion_loss(net, x0, b.t, b.eps, process, target, etsdm, device=acc.device,
                              weighting=cfg.weighting, **kw)  # fmt: skip


def resolved_config(cfg: TrainConfig, process: Any) -> TrainConfig:
    """``cfg`` with what the run will use where it leaves a choice open, each said once: E-TSDM's t̃ (0.1·T when
    unset, recorded so train.json names the map), and a warm-up no longer than a tenth of the steps when the one
    given would not end before the run does (the learning rate would never reach `lr`)."""
    changes: dict[str, Any] = {}
    if cfg.etsdm and cfg.t_tilde is None:
        changes["t_tilde"] = 0.1 * process.T
    if cfg.warmup_steps >= cfg.steps:
        changes["warmup_steps"] = cfg.steps // 10
        log.warning("`warmup_steps` %d is not below `steps` %d: the learning rate would never reach `lr`; warm-up "
                    "shortened to %d (a tenth of the steps); set `warmup_steps` to choose", cfg.warmup_steps,
                    cfg.steps, changes["warmup_steps"])  # fmt: skip
    return dataclasses.replace(cfg, **changes) if changes else cfg


def train_loop(
    model: EpsModel | Any,
    scheduler_config: dict[str, Any] | None,
    data: torch.Tensor | TrainData,
    cfg: TrainConfig,
    out_dir: str | Path,
    resume: bool = False,
    progress: bool = False,
    source: str = "",
    stop_after: int | None = None,
    data_spec: str = "",
    save: Callable[[torch.nn.Module, Path, dict[str, Any]], Any] | None = None,
) -> dict[str, Any]:
    """Train ``model`` (an EpsModel of any family, or a bare ``UNet2DModel`` with its ``scheduler_config``) on
    ``data`` (x0 (N, C, H, W), or :class:`TrainData` with conditioning).

    ``save(denoiser, dest, record)`` writes the final model (default: a DDPM pipeline folder for UNet2DModels;
    LoRA runs write ``lora/`` themselves). ``stop_after``: leave after that many steps (with a checkpoint);
    continue with ``resume=True``, which refuses other options (but :data:`SAFE_TO_CHANGE`), model (``source``),
    schedule or data.
    """
    from .models import from_unet

    out = Path(out_dir)
    cfg.validate()
    if stop_after is not None and (isinstance(stop_after, bool) or stop_after < 1):
        raise InputError(f"`stop_after` must be ≥ 1 (got {stop_after!r})")
    if not isinstance(model, EpsModel):
        model = from_unet(model, scheduler_config, device=model.device, dtype=model.dtype)
    td = data if isinstance(data, TrainData) else TrainData(data, spec=data_spec)
    td = dataclasses.replace(td, x0=td.x0.float())  # what the loss and the data hash see
    process = training_process(model.scheduler_config)
    t_tilde = cfg.t_tilde if cfg.t_tilde is not None else 0.1 * process.T
    if cfg.etsdm and not t_tilde < process.T:
        raise InputError(f"`t_tilde` {t_tilde:g} must be below T = {process.T} (E-TSDM maps the steps t < t̃)")
    if cfg.weighting != "none" and not isinstance(process, FlowProcess):
        raise InputError(
            f"`weighting` {cfg.weighting} is for flow-matching models; {model.name} is {process.kind}: leave it out"
        )
    if cfg.caption_dropout > 0 and td.empty_row is None:
        raise InputError("`caption_dropout` needs a text-conditioned model trained on captions; leave it at 0")
    with rng.isolated_torch_rng(cfg.seed):  # LoRA's initial A matrices: a function of the seed alone
        denoiser, built = _prepare_denoiser(model, cfg, t_tilde)
    cfg = resolved_config(cfg, process)  # after every refusal: a refused run prints no warning first
    arr = td.x0.detach().cpu().contiguous().numpy()
    digest = hashlib.sha256(arr.data.cast("B")).hexdigest()  # no copy of the data
    cond_digest = td.conditioning.digest() if td.conditioning is not None else None
    rows_digest = hashlib.sha256(td.rows.numpy().tobytes()).hexdigest()[:16] if td.rows is not None else None
    run = {
        "config": asdict(cfg),
        "source": source,
        "model_config": {k: v for k, v in dict(denoiser.config).items() if not k.startswith("_")},
        "scheduler": model.scheduler_config,  # the noise schedule: a resume on another one is refused
        "processes": int(os.environ.get("WORLD_SIZE", "1")),  # each process draws its own stream: same count to resume
        "data": dict(spec=td.spec, shape=list(arr.shape), sha256=digest, conditioning=cond_digest, rows=rows_digest),
    }
    run = json.loads(json.dumps(run, default=str))  # as a checkpoint holds it
    with rng.isolated_torch_rng(cfg.seed):
        return _train(denoiser, built, process, td, cfg, out, (resume, progress, stop_after, save), run)


def _train(
    denoiser: Any, built: EpsModel, process: Any, td: TrainData, cfg: TrainConfig, out: Path, flags: tuple, run: dict
) -> dict[str, Any]:
    from accelerate import Accelerator
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    resume, progress, stop_after, save = flags
    cks = checkpoints(out)  # complete ones: a `.step-N.tmp` a kill left is no checkpoint (and is removed below)
    if resume and not cks:  # a job script passes `resume` on every start: nothing to continue is a fresh start
        log.warning("`resume`: %s holds no complete checkpoint to continue; starting at step 0", out)
        resume = False
    elif not resume and ((out / "loss.csv").exists() or cks):
        raise InputError(f"{out} already holds a run; pass `resume` to continue it or choose another `out_dir`")
    meta: dict[str, Any] = {"step": 0, "losses": []}
    if resume:
        with reading(cks[-1] / "lipscope_step.json", cks[-1]):
            meta = json.loads((cks[-1] / "lipscope_step.json").read_bytes())
            if not isinstance(meta["step"], int) or not isinstance(meta["losses"], list):
                raise ValueError("not a lipscope step record")
        check_same_run(meta.get("run"), run, cks[-1])

    mp, launched = cfg.mixed_precision, os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if mp == "no" and launched != "no":  # `accelerate launch --mixed_precision X` decides when lipscope's flag is unset
        mp = launched
        log.info("mixed precision %s from accelerate launch", mp)
    acc = Accelerator(mixed_precision=mp, cpu=not torch.cuda.is_available())
    if acc.is_main_process:  # what a killed write left: a model folder moved aside mid-swap, dot-folders, temp files
        for kind in ("pipeline", "lora"):
            if not (out / kind).exists() and (olds := sorted(out.glob(f".{kind}.old-*"))):
                os.replace(olds[-1], out / kind)
        for p in [*(out / "checkpoints").glob(".step-*"), *out.glob(".pipeline.*"), *out.glob(".lora.*"),
                  *out.glob(".*.tmp")]:  # fmt: skip
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    denoiser.train()
    params = trainable_parameters(denoiser)
    ema = EMAModel(params, decay=cfg.ema_decay, model_cls=type(denoiser), model_config=denoiser.config)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    # accelerate steps a prepared scheduler once per process per optimizer step (split_batches=False), as diffusers'
    # training scripts account for: the schedule is written in those units
    k = acc.num_processes
    lr_sched = get_scheduler(
        cfg.lr_schedule, opt, num_warmup_steps=cfg.warmup_steps * k, num_training_steps=cfg.steps * k
    )
    net, opt, lr_sched = acc.prepare(_TrainNet(denoiser, built.net), opt, lr_sched)
    ema.to(acc.device)
    etsdm, pred_type = etsdm_of(denoiser), built.prediction_type
    fam_name = family_of_model(built).name  # type: ignore[union-attr]
    grid = flow_grid(built.scheduler_config) if isinstance(process, FlowProcess) else None

    start, losses = meta["step"], meta["losses"]
    if resume:
        load_checkpoint(acc, ema, cks[-1])
        log.info("resumed from %s (step %d)", cks[-1], start)

    t0 = time.time()
    end = cfg.steps if stop_after is None else min(cfg.steps, start + stop_after)
    with progress_bar(progress and acc.is_main_process, end - start, "train") as advance:
        for step in range(start, end):
            loss = torch.zeros((), device=acc.device)
            for j in range(cfg.grad_accum):  # micro-batch j of step s draws item s·accum + j (accum 1: item s)
                # DDP decides in the forward whether the backward all-reduces: both go inside no_sync
                with acc.no_sync(net) if j < cfg.grad_accum - 1 else contextlib.nullcontext():
                    micro = _micro_loss(net, td, cfg, process, step * cfg.grad_accum + j, acc=acc, grid=grid,
                                        etsdm=etsdm, target=pred_type)  # fmt: skip
                    acc.backward(micro / cfg.grad_accum)
                loss += micro.detach() / cfg.grad_accum
            if acc.sync_gradients and cfg.grad_clip > 0:
                acc.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            lr_sched.step()
            opt.zero_grad(set_to_none=True)
            ema.step(params)
            lv = acc.gather(loss.detach()[None]).mean().item()
            if not math.isfinite(lv):  # raised before this step's checkpoint: the last one is intact
                last = ([p.name for p in checkpoints(out)] or ["none"])[-1]
                fix = "lower `lr` (or set `mixed_precision` to no) and start a new `out_dir` (a resume repeats them)"
                raise InputError(f"loss became {lv} at step {step} (last checkpoint: {last}); {fix}")
            losses.append([step, lv, lr_sched.get_last_lr()[0]])
            recent = [v for _, v, _ in losses[-100:]]
            advance(1, f"loss {lv:.4g} (mean of last {len(recent)}: {np.mean(recent):.4g})")
            done = step + 1
            if done % cfg.checkpoint_every == 0 or done in (cfg.steps, end):  # every process: its RNG state too
                save_checkpoint(acc, ema, out, done, losses, cfg.keep_checkpoints, run)
                if acc.is_main_process:
                    write_losses(out, losses)
            acc.wait_for_everyone()

    if end < cfg.steps:
        acc.end_training()
        return {"stopped_at": end, "steps": cfg.steps}
    tail = [v for _, v, _ in losses[-100:]]  # fewer in a run of fewer steps: the count is recorded
    result: dict[str, Any] = {"steps": cfg.steps, "final_loss_mean_last_100": float(np.mean(tail))}
    result["final_loss_mean_of_steps"] = len(tail)
    if acc.is_main_process:
        final = acc.unwrap_model(net).denoiser
        ema.copy_to(trainable_parameters(final))
        final.eval()
        result |= {"config": asdict(cfg), "source": run["source"], "data": run["data"], "class": type(final).__name__}
        result |= {"train_seconds_this_session": time.time() - t0, "processes": acc.num_processes}
        result |= {"device": str(acc.device), "prediction_type": pred_type, "process": process.describe()}
        result |= {"loss": loss_description(process, cfg.weighting)}
        result |= {"mixed_precision": acc.mixed_precision}
        result |= {"trained": "LoRA adapters" if cfg.lora else "every weight", **td.info}
        if etsdm is not None:
            result["etsdm"] = {"t_tilde_steps": etsdm.t_tilde, "n": etsdm.n, "t_tilde_tau": etsdm.t_tilde / process.T,
                               "units_fed": final.config.etsdm_t_tilde}  # fmt: skip
        write_losses(out, losses)  # again: a resumed run that failed after its last checkpoint lacks it
        dest = out / ("lora" if cfg.lora else "pipeline")
        with writing(dest):
            if cfg.lora:
                write_folder(dest, lambda tmp: save_lora(final, fam_name, tmp, {"training": result}))
            elif save is not None:
                write_folder(dest, lambda tmp: save(final, tmp, {"training": result}))
            else:
                save_pipeline(final, built.scheduler_config, dest, extra={"training": result})
        with writing(out / "train.json"):
            atomic_write_bytes(out / "train.json", json_bytes(result))
    acc.wait_for_everyone()
    acc.end_training()
    return result
