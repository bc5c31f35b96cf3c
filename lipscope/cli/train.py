"""``lipscope train`` and ``lipscope finetune``: one training loop, with or without E-TSDM."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import typer

from .common import cli_errors, say, setup_logging
from .options import MIXED_PRECISION, RESUME_TRAINING, VERBOSE


def _train_config(opts: dict):
    """The TrainConfig of the options train and finetune share."""
    from ..training import TrainConfig

    return TrainConfig(
        steps=opts["steps"],
        batch_size=opts["batch_size"],
        lr=opts["lr"],
        warmup_steps=opts["warmup"],
        ema_decay=opts["ema_decay"],
        grad_clip=opts["grad_clip"],
        mixed_precision=opts["mixed_precision"],
        seed=opts["seed"],
        checkpoint_every=opts["checkpoint_every"],
        etsdm=opts["etsdm"],
        t_tilde=opts["t_tilde"],
        n=opts["n_sub"],
        grad_accum=opts["grad_accum"],
        **_finetune_only(opts),
    )


def _finetune_only(opts: dict) -> dict[str, Any]:
    """The TrainConfig fields only finetune has flags for."""
    extra: dict[str, Any] = {k: opts[k] for k in ("caption_dropout", "weighting", "lora", "lora_rank", "lora_alpha")
                             if k in opts}  # fmt: skip
    if opts.get("lora_targets"):
        extra["lora_targets"] = tuple(t.strip() for t in opts["lora_targets"].split(",") if t.strip())
    return extra


def _run(opts, progress: bool) -> None:
    from ..runs import run_training

    res = run_training(opts, progress=progress and sys.stderr.isatty())
    where = "lora" if opts.training.lora else "pipeline"
    say(
        f"trained {res['steps']} steps on {res['samples']} samples; final loss (mean of last 100) "
        f"{res['final_loss_mean_last_100']:.4g}; model in {opts.out}/{where}"
    )


@cli_errors
def train(
    config: Path = typer.Option(..., "--config", help="UNet2DModel config.json to train from scratch."),
    data: str = typer.Option("digits", "--data", "-d", help="Training data (as for probe)."),
    scheduler_config: Path | None = typer.Option(None, "--scheduler-config", help="Default: DDPM linear, T=1000."),
    out_dir: Path = typer.Option(Path("runs/train"), "--out", "-o"),
    steps: int = typer.Option(20000, "--steps", min=1),
    batch_size: int = typer.Option(64, "--batch-size", min=1, help="Per process."),
    grad_accum: int = typer.Option(1, "--grad-accum", min=1, help="Micro-batches per optimizer step."),
    lr: float = typer.Option(2e-4, "--lr"),
    warmup: int = typer.Option(200, "--warmup"),
    ema_decay: float = typer.Option(0.999, "--ema-decay"),
    grad_clip: float = typer.Option(1.0, "--grad-clip"),
    mixed_precision: str = typer.Option(
        "no", "--mixed-precision", parser=MIXED_PRECISION, help="no, fp16 or bf16 (accelerate)."
    ),
    seed: int = typer.Option(0, "--seed", min=0),
    checkpoint_every: int = typer.Option(500, "--checkpoint-every", min=1),
    etsdm: bool = typer.Option(False, "--etsdm/--no-etsdm", help="Train with the E-TSDM timestep map."),
    t_tilde: float | None = typer.Option(None, "--t-tilde", help="E-TSDM: t̃ in model steps (default 0.1·T)."),
    n_sub: int = typer.Option(5, "--n", help="E-TSDM: number of sub-intervals of [0, t̃)."),
    resume: bool = RESUME_TRAINING,
    progress: bool = typer.Option(True, "--progress/--no-progress"),
    verbose: bool = VERBOSE,
) -> None:
    """Train a UNet2DModel from a config (optionally with E-TSDM)."""
    setup_logging(verbose)
    from ..runs import TrainOptions

    cfg = _train_config(locals())
    opts = TrainOptions(
        config=str(config),
        data=data,
        scheduler_config=None if scheduler_config is None else str(scheduler_config),
        out=str(out_dir),
        resume=resume,
        training=cfg,
    )
    _run(opts, progress)


@cli_errors
def finetune(
    model: str = typer.Option(..., "--model", "-m", help="Pretrained model (as for probe)."),
    config: Path | None = typer.Option(None, "--config", help="UNet config.json for a single weights file."),
    scheduler_config: Path | None = typer.Option(
        None, "--scheduler-config", help="scheduler_config.json (default: from the model, else DDPM linear)."
    ),
    trust_pickle: bool = typer.Option(
        False, "--trust-pickle", help="Allow full unpickling of .pt/.bin checkpoints (runs code from the file)."
    ),
    data: str = typer.Option(
        "digits", "--data", "-d", help="Fine-tuning images (as for probe); latent models train on their latents."
    ),
    captions: str | None = typer.Option(
        None, "--captions", help="Captions of an image-folder --data: .jsonl/.csv (file_name,text) or .txt side files."
    ),
    caption_dropout: float = typer.Option(
        0.0, "--caption-dropout", help="Rate at which a caption is replaced by the empty prompt (for CFG)."
    ),
    weighting: str = typer.Option(
        "none", "--weighting", help="Flow models: none, logit_normal, mode, cosmap, sigma_sqrt (diffusers' scripts)."
    ),
    lora: bool = typer.Option(False, "--lora", help="Train LoRA adapters (peft) instead of every weight."),
    lora_rank: int = typer.Option(4, "--lora-rank", min=1),
    lora_alpha: int | None = typer.Option(
        None, "--lora-alpha", min=1, help="Default: the rank (scale alpha/rank = 1)."
    ),
    lora_targets: str = typer.Option("to_k,to_q,to_v,to_out.0", "--lora-targets", help="Comma-separated modules."),
    out_dir: Path = typer.Option(Path("runs/finetune"), "--out", "-o"),
    steps: int = typer.Option(2000, "--steps", min=1),
    batch_size: int = typer.Option(64, "--batch-size", min=1, help="Per process."),
    grad_accum: int = typer.Option(1, "--grad-accum", min=1, help="Micro-batches per optimizer step."),
    lr: float = typer.Option(5e-5, "--lr"),
    warmup: int = typer.Option(100, "--warmup"),
    ema_decay: float = typer.Option(0.999, "--ema-decay"),
    grad_clip: float = typer.Option(1.0, "--grad-clip"),
    mixed_precision: str = typer.Option(
        "no", "--mixed-precision", parser=MIXED_PRECISION, help="no, fp16 or bf16 (accelerate)."
    ),
    seed: int = typer.Option(0, "--seed", min=0),
    checkpoint_every: int = typer.Option(500, "--checkpoint-every", min=1),
    etsdm: bool = typer.Option(False, "--etsdm/--no-etsdm", help="Retrofit E-TSDM (off: the control run)."),
    t_tilde: float | None = typer.Option(
        None, "--t-tilde", help="E-TSDM: t̃ in model steps k = τ·T (flow: σ·1000); default 0.1·T (100 of 1000)."
    ),
    n_sub: int = typer.Option(5, "--n", help="E-TSDM: number of sub-intervals of [0, t̃)."),
    resume: bool = RESUME_TRAINING,
    revision: str | None = typer.Option(None, "--revision"),
    offline: bool = typer.Option(False, "--offline"),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
    verbose: bool = VERBOSE,
) -> None:
    """Fine-tune a pretrained model (any family) with the same loop; --etsdm retrofits the fix, without it a control."""
    setup_logging(verbose)
    from ..runs import TrainOptions

    cfg = _train_config(locals())
    opts = TrainOptions(
        model=model,
        model_config=None if config is None else str(config),
        scheduler_config=None if scheduler_config is None else str(scheduler_config),
        trust_pickle=trust_pickle,
        data=data,
        captions=captions,
        out=str(out_dir),
        revision=revision,
        offline=offline,
        resume=resume,
        training=cfg,
    )
    _run(opts, progress)
