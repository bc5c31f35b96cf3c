"""``train`` and ``finetune`` runs: build or load the UNet, load the data, run the one training loop."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import rng
from ..data import load_data
from ..errors import InputError
from ..loading import load_model, read_json, read_scheduler_config, unet_class
from ..schedules import DEFAULT_SCHEDULER_CONFIG
from ..training import TrainConfig, train_loop
from .common import check_out_dir


@dataclass(frozen=True)
class TrainOptions:
    """``lipscope train`` (``config``: a UNet config to start from) or ``finetune`` (``model``)."""

    config: str | None = None
    model: str | None = None
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
    """Build (train) or load (finetune) the UNet, load the data, run the one training loop."""

    cfg = opts.training
    check_out_dir(opts.out)
    if (opts.config is None) == (opts.model is None):
        raise InputError("pass exactly one of `config` (train from scratch) and `model` (fine-tune)")
    if opts.config is not None:
        cpath = Path(opts.config)
        ucfg = read_json(cpath / "config.json" if cpath.is_dir() else cpath, "model config")
        try:
            with rng.isolated_torch_rng(cfg.seed):  # the initial weights depend on the seed alone
                unet = unet_class(ucfg).from_config(ucfg)
        except (TypeError, ValueError, KeyError) as e:
            raise InputError(f"`config` {opts.config}: not a valid UNet2DModel config ({e})") from e
        sched_cfg = read_scheduler_config(opts.scheduler_config) if opts.scheduler_config else None
        sched_cfg = sched_cfg or dict(DEFAULT_SCHEDULER_CONFIG)
    else:
        m = load_model(str(opts.model), revision=opts.revision, offline=opts.offline or None)
        if m.module is None:
            raise InputError("fine-tuning needs a diffusers UNet (hub id, folder or weights file) as `model`")
        unet, sched_cfg = m.module, m.scheduler_config
    c, s = int(unet.config.in_channels), unet.config.sample_size
    hw = (s, s) if isinstance(s, int) else tuple(s)
    x = load_data(opts.data, None, cfg.seed, (c, *hw))
    res = train_loop(unet, sched_cfg, x, cfg, opts.out, resume=opts.resume, progress=progress, source=opts.source())
    return {**res, "samples": int(x.shape[0])}
