"""The models of a ground-truth run: built from a seed, trained by lipscope's own loop on fresh samples of the known
density, saved and loaded as diffusers denoisers (one folder per model, resumable from its checkpoints)."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import rng
from ..checkpoints import checkpoints
from ..errors import InputError
from ..etsdm import ETSDM_CLASSES
from ..families import dit
from ..loading import read_json
from ..mixtures import TRAIN_REFERENCE, KnownDensity, draw, train_block
from ..models import EpsModel, from_unet
from ..schedules import DEFAULT_SCHEDULER_CONFIG
from ..training import TrainConfig, TrainData, train_loop

log = logging.getLogger("lipscope")

ARCHS = ("unet", "dit")
VARIANTS = ("base", "etsdm", "control")
FLOW_SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 1.0,
                  "use_dynamic_shifting": False}  # fmt: skip
FINETUNE_SEED = 1000  # fine-tunes of replicate s draw from the TRAINING and FRESH streams of seed 1000 + s


def scheduler_config(process: str) -> dict[str, Any]:
    """DDPM's linear VP schedule (T = 1000, ε) or rectified flow (FlowMatchEuler, shift 1, velocity)."""
    return dict(DEFAULT_SCHEDULER_CONFIG) if process == "vp" else dict(FLOW_SCHEDULER)


def default_config(arch: str, shape: tuple[int, ...]) -> dict[str, Any]:
    """The tiny pixel UNet (the digits model's layout: channels 32, 64, attention at the lower resolution) or a
    DiT-like transformer (4 layers, width 64, patch 2, adaLN-zero, one class whose null label it is fed)."""
    c, h = shape[0], shape[1]
    if arch == "unet":
        return {"_class_name": "UNet2DModel", "sample_size": h, "in_channels": c, "out_channels": c,
                "layers_per_block": 1, "block_out_channels": [32, 64], "down_block_types": ["DownBlock2D",
                "AttnDownBlock2D"], "up_block_types": ["AttnUpBlock2D", "UpBlock2D"], "norm_num_groups": 8,
                "attention_head_dim": 16, "time_embedding_type": "positional", "flip_sin_to_cos": True,
                "freq_shift": 0}  # fmt: skip
    return {"_class_name": "DiTTransformer2DModel", "num_attention_heads": 4, "attention_head_dim": 16,
            "in_channels": c, "out_channels": c, "num_layers": 4, "sample_size": h, "patch_size": 2,
            "norm_type": "ada_norm_zero", "num_embeds_ada_norm": 1}  # fmt: skip


def check_shape(shape: tuple[int, ...]) -> None:
    """The UNet and the DiT (patch 2) take square images with an even side."""
    if len(shape) != 3 or shape[1] != shape[2] or shape[1] % 2:
        raise InputError(
            f"`data` has sample shape {shape}; training a UNet or DiT needs square images C×H×H with H even "
            "(e.g. gmm:8:1x8x8)"
        )


@dataclass(frozen=True)
class Unit:
    """One trained model: architecture, variant (base, etsdm, control) and replicate seed."""

    arch: str
    variant: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.arch}-{self.variant}-s{self.seed}"


def _denoiser_class(cfg: dict[str, Any]) -> Any:
    import diffusers

    name = str(cfg.get("_class_name"))
    cls = ETSDM_CLASSES.get(name) or getattr(diffusers, name, None)
    if cls is None or name.removeprefix("ETSDM") not in ("UNet2DModel", "DiTTransformer2DModel"):
        raise InputError(f"`model_config`: {name} is not a UNet2DModel or DiTTransformer2DModel config")
    return cls


def as_model(denoiser: Any, sched_cfg: dict[str, Any], name: str) -> EpsModel:
    """The EpsModel of a UNet (``from_unet``) or a DiT (its family's adapter, fed its null class)."""
    if type(denoiser).__name__.endswith("UNet2DModel"):
        return from_unet(denoiser, sched_cfg, name=name)
    m = dit.build(denoiser, sched_cfg, name, "cpu", "float32")
    return dataclasses.replace(m, conditioning=dit.conditioning(m))


def build(cfg: dict[str, Any], seed: int) -> Any:
    """A denoiser from its config, weights drawn from the seed alone (isolated RNG)."""
    cls = _denoiser_class(cfg)
    try:
        with rng.isolated_torch_rng(seed):
            return cls.from_config(cfg)
    except Exception as e:  # diffusers raises many types for a config it cannot build
        raise InputError(
            f"`model_config`: cannot build {cfg.get('_class_name')} ({str(e).splitlines()[0][:160]})"
        ) from e


def load(folder: Path, sched_cfg: dict[str, Any], name: str) -> EpsModel:
    cfg = read_json(folder / "config.json", "model config")
    return as_model(_denoiser_class(cfg).from_pretrained(str(folder)), sched_cfg, name)


def _save(denoiser: Any, dest: Path, record: dict[str, Any]) -> None:
    denoiser.save_pretrained(str(dest))
    (dest / "lipscope.json").write_text(json.dumps(record, indent=2, default=str) + "\n")


def train_unit(u: Unit, root: Path, kd: KnownDensity, sched_cfg: dict, arch_cfg: dict, opts: Any) -> dict[str, Any]:
    """Train (or continue, or skip when done) one model in ``root/<unit>``; returns its train.json record.

    base (and etsdm with ``etsdm_from`` scratch): ``steps`` from seed-drawn weights; etsdm and control: the base's
    EMA weights fine-tuned ``finetune_steps`` with and without the map, on identical draws (seed 1000 + s)."""
    folder = root / u.name
    done = folder / "pipeline" / "config.json"
    if done.is_file() and (folder / "train.json").is_file():
        return json.loads((folder / "train.json").read_text())
    resume = bool(checkpoints(folder))
    if not resume:
        shutil.rmtree(folder, ignore_errors=True)
    scratch = u.variant == "base" or opts.etsdm_from == "scratch"
    if scratch:
        model, source = as_model(build(arch_cfg, u.seed), sched_cfg, u.name), f"groundtruth {u.arch} from seed"
        steps, lr, seed = opts.steps, opts.lr, u.seed
    else:
        base = root / Unit(u.arch, "base", u.seed).name / "pipeline"
        model, source = load(base, sched_cfg, u.name), f"groundtruth {u.arch} fine-tune of {base.parent.name}"
        steps, lr, seed = opts.finetune_steps, opts.finetune_lr, FINETUNE_SEED + u.seed
    cfg = TrainConfig(steps=steps, batch_size=opts.batch_size, lr=lr, warmup_steps=min(opts.warmup, steps - 1),
                      ema_decay=opts.ema_decay, seed=seed, checkpoint_every=opts.checkpoint_every,
                      etsdm=u.variant == "etsdm", t_tilde=opts.t_tilde, n=opts.n_sub)  # fmt: skip
    g = kd.mixture
    td = TrainData(
        draw(g, 0, TRAIN_REFERENCE, 256).float(),
        conditioning=model.conditioning,
        spec=f"{kd.spec} (mixture sha256 {kd.digest})",
        info={"data": "fresh samples of the known density every step (stream FRESH)", "mixture": kd.digest},
        fresh=lambda i, n, r: draw(g, seed, train_block(i, r), n),
    )
    log.info("training %s (%d steps%s)", u.name, steps, ", resumed" if resume else "")
    return train_loop(model, None, td, cfg, folder, resume=resume, source=source, save=_save)


def read_arch_config(path: str | None, arch: str, shape: tuple[int, ...]) -> dict[str, Any]:
    """The denoiser config of ``arch``: the given JSON file, else :func:`default_config`; its shape must fit."""
    if path is None:
        return default_config(arch, shape)
    cfg = read_json(Path(path), "model config")
    want = "UNet2DModel" if arch == "unet" else "DiTTransformer2DModel"
    if cfg.get("_class_name") != want:
        raise InputError(f"`model_config` {path} is a {cfg.get('_class_name')} config; with one arch, give a {want}")
    if cfg.get("in_channels") != shape[0] or cfg.get("sample_size") not in (shape[1], [shape[1], shape[2]]):
        raise InputError(f"`model_config` {path}: in_channels and sample_size must match the data shape {shape}")
    return cfg
