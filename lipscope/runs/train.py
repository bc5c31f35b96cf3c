"""``train`` and ``finetune`` runs: build or load the UNet, load the data, run the one training loop."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import io as lio
from .. import rng
from ..data import load_data
from ..errors import InputError
from ..loading import check_unet_config, load_model, read_json, read_scheduler_config, unet_class
from ..models import require_unet
from ..processes import vp_schedule
from ..schedules import DEFAULT_SCHEDULER_CONFIG
from ..training import TrainConfig, train_loop
from .common import check_out_dir


@dataclass(frozen=True)
class TrainOptions:
    """``lipscope train`` (``config``: a UNet config to start from) or ``finetune`` (``model``)."""

    config: str | None = None
    model: str | None = None
    model_config: str | None = None  # finetune: the UNet config of a single weights file
    trust_pickle: bool = False
    data: str = "digits"
    scheduler_config: str | None = None
    out: str = "runs/train"
    revision: str | None = None
    offline: bool = False
    resume: bool = False
    training: TrainConfig = field(default_factory=TrainConfig)

    def source(self) -> str:
        return f"config {self.config}" if self.config is not None else f"finetune of {self.model}"


def run_training(opts: TrainOptions, progress: bool = False) -> dict[str, Any]:
    """Build (train) or load (finetune) the UNet, load the data, run the one training loop.

    The run folder is locked for the whole run; a non-empty ``out`` is refused unless ``resume``.
    """
    cfg = opts.training
    # under torchrun/accelerate every process runs this; the main one alone checks and locks the folder
    main = int(os.environ.get("RANK", "0")) == 0
    reads = (opts.config, opts.model, opts.data, opts.scheduler_config)
    out = check_out_dir(opts.out, resume=opts.resume, inputs=reads) if main else Path(opts.out)
    if (opts.config is None) == (opts.model is None):
        raise InputError("pass exactly one of `config` (train from scratch) and `model` (fine-tune)")
    if opts.model is not None and str(opts.model).startswith("py:"):
        raise InputError(
            f"`model` {opts.model}: a py: callable cannot be fine-tuned; pass a diffusers UNet2DModel "
            "(hub id, pipeline folder or weights file)"
        )
    with lio.run_lock(out) if main else contextlib.nullcontext():
        unet, sched_cfg = _initial_unet(opts)
        T = vp_schedule(sched_cfg, "training").T
        if cfg.etsdm and not cfg.t_tilde < T:
            raise InputError(f"`t_tilde` {cfg.t_tilde:g} must be below T = {T} (E-TSDM maps the steps t < t̃)")
        c, s = int(unet.config.in_channels), unet.config.sample_size
        hw = (s, s) if isinstance(s, int) else tuple(s)
        x = load_data(opts.data, None, cfg.seed, (c, *hw))
        res = train_loop(
            unet,
            sched_cfg,
            x,
            cfg,
            out,
            resume=opts.resume,
            progress=progress,
            source=opts.source(),
            data_spec=opts.data,
        )
        return {**res, "samples": int(x.shape[0])}


def _initial_unet(opts: TrainOptions) -> tuple[Any, dict[str, Any]]:
    """The UNet to start from and its scheduler config: built from ``config`` (weights from the seed
    alone, in an isolated RNG) or loaded from ``model``."""
    if opts.config is not None:
        cpath = Path(opts.config)
        ucfg = read_json(cpath / "config.json" if cpath.is_dir() else cpath, "model config")
        check_unet_config(ucfg, f"`config` {opts.config}")
        try:
            with rng.isolated_torch_rng(opts.training.seed):
                unet = unet_class(ucfg).from_config(ucfg)
        except Exception as e:  # diffusers raises many types for a config it cannot build
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise InputError(f"`config` {opts.config}: not a valid UNet2DModel config ({first}); fix the config") from e
        sched_cfg = read_scheduler_config(opts.scheduler_config) if opts.scheduler_config else None
        return unet, sched_cfg or dict(DEFAULT_SCHEDULER_CONFIG)
    m = load_model(
        str(opts.model),
        config=opts.model_config,
        scheduler_config=opts.scheduler_config,
        revision=opts.revision,
        offline=opts.offline or None,
        trust_pickle=opts.trust_pickle,
    )
    if m.latent is not None:
        raise InputError(
            f"`model` {opts.model} is a latent pipeline ({m.latent.kind}); fine-tuning trains pixel-space UNets only "
            "for now"
        )
    return require_unet(m, "fine-tuning"), m.scheduler_config
