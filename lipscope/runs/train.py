"""``train`` and ``finetune`` runs: build or load the denoiser, load the data (latents encoded once and cached in
the run folder; captions encoded once by the pipeline's own frozen text encoders), run the one training loop."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import io as lio
from .. import rng
from ..captions import read_captions
from ..checkpoints import writing
from ..data import load_data
from ..errors import InputError, short_error
from ..families import family_of_model, pipeline_denoiser
from ..loading import check_unet_config, load_model, read_json, read_scheduler_config, unet_class
from ..models import EpsModel, from_unet
from ..prompts import conditioning_for, pipeline_source
from ..sampling import data_range_of
from ..schedules import DEFAULT_SCHEDULER_CONFIG
from ..training import TrainConfig, TrainData, check_trainable, train_loop
from .common import check_out_dir, main_lock

log = logging.getLogger("lipscope")


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
    captions: str | None = None  # .jsonl / .csv / folder of .txt side files, for an image-folder `data`
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
    reads = (opts.config, opts.model, opts.model_config, opts.data, opts.scheduler_config, opts.captions)
    out = check_out_dir(opts.out, resume=opts.resume, inputs=reads, whole=False) if main else lio.resolve_out(opts.out)
    if (opts.config is None) == (opts.model is None):
        raise InputError("pass exactly one of `config` (train from scratch) and `model` (fine-tune)")
    if opts.model is not None and str(opts.model).startswith("py:"):
        raise InputError(
            f"`model` {opts.model}: a py: callable cannot be fine-tuned; pass a diffusers denoiser lipscope wraps "
            "(hub id, pipeline folder or weights file)"
        )
    fresh = not out.exists()
    with main_lock(out):
        try:
            m = _initial_model(opts)
            if opts.model is not None:
                check_trainable(m, cfg)  # LoRA targets and rank, E-TSDM, family: before the latents are cached
            td = _train_data(opts, m, out)
            save = None if _family(m) == "unet2d" and m.latent is None else _pipeline_saver(opts, m)
            res = train_loop(m, None, td, cfg, out, resume=opts.resume, progress=progress, source=opts.source(),
                             save=save)  # fmt: skip
        except BaseException:
            if main and fresh and out.is_dir() and not any(out.iterdir()):
                out.rmdir()  # a run that failed before writing anything leaves no empty folder behind
            raise
        return {**res, "samples": int(td.x0.shape[0])}


def _family(m: EpsModel) -> str:
    fam = family_of_model(m)
    return fam.name if fam is not None else "?"


def _train_data(opts: TrainOptions, m: EpsModel, out: Path) -> TrainData:
    """x0 in the denoiser's space (latents: encoded once, cached in ``out/latents.safetensors``) and, for a
    conditional model, its conditioning rows: each image's caption (or the empty prompt) or DiT's null class."""
    cfg, fam = opts.training, family_of_model(m)
    pixel = tuple(m.latent.pixel_shape) if m.latent is not None else tuple(m.sample_shape or ())
    if opts.captions is not None and (fam is None or fam.conditioned_on != "text"):
        raise InputError(f"`captions`: {opts.model or opts.config} is not text-conditioned; leave out `captions`")
    span = data_range_of(m) if m.latent is None else None  # pixels in the model's range (VE: [0, 1])
    x = load_data(opts.data, None, cfg.seed, pixel, span or (-1.0, 1.0))
    info: dict[str, Any] = {}
    if opts.model is not None:  # what a LoRA run is applied to: a local path made absolute, a hub id at its revision
        local = Path(opts.model).expanduser()
        info["base_model"] = str(local.resolve()) if local.exists() else opts.model
        info["base_revision"] = opts.revision
    if m.latent is not None:
        x, info["latents"] = _cached_latents(m, x, out)
    if fam is None or fam.conditioned_on is None:
        return TrainData(x, spec=opts.data, info=info)
    caps = read_captions(opts.captions, opts.data) if opts.captions is not None else [""] * len(x)
    if fam.conditioned_on != "text":  # DiT: trained on the null class (class labels are not read from data yet)
        cond = conditioning_for(m, str(opts.model))
        info["conditioning"] = "null class (unconditional)"
        return TrainData(x, conditioning=cond, spec=opts.data, info=info)
    prompts = sorted(set(caps) | {""})
    where = {c: i for i, c in enumerate(prompts)}
    rows = torch.tensor([where[c] for c in caps])
    cond = conditioning_for(m, str(opts.model), prompts=prompts, revision=opts.revision, offline=opts.offline or None)
    info["captions"] = {"source": opts.captions or "none: every image gets the empty prompt",
                        "distinct": len(prompts) - 1, "dropout": cfg.caption_dropout,
                        "encoded_by": (cond.info if cond is not None else {}).get("encoded_by"),
                        "text_encoders": "frozen (prompts encoded once before training)"}  # fmt: skip
    return TrainData(x, conditioning=cond, rows=rows, empty_row=prompts.index(""), spec=opts.data, info=info)


def _cached_latents(m: EpsModel, x: torch.Tensor, out: Path) -> tuple[torch.Tensor, dict[str, Any]]:
    """The latents of images x by the pipeline's autoencoder, encoded once per run folder (keyed on the images'
    sha256 and the autoencoder's description)."""
    from safetensors.torch import load_file, save_file

    assert m.latent is not None
    weights = hashlib.sha256()
    for name, t in sorted(m.latent.vae.state_dict().items()):  # the autoencoder's weights, not only its config
        weights.update(name.encode())
        weights.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
    images = hashlib.sha256(x.contiguous().numpy().data.cast("B")).hexdigest()  # no copy of the images
    key = {"images_sha256": images, "codec": json.dumps(m.latent.describe(), sort_keys=True, default=str),
           "vae_sha256": weights.hexdigest(), "dtype": str(x.dtype)}  # fmt: skip
    path = out / "latents.safetensors"
    if path.is_file():
        try:
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                if f.metadata() == key:
                    z = load_file(str(path))["latents"]
                    if z.shape[0] == x.shape[0] and torch.isfinite(z).all():
                        return z, {**m.latent.describe(), "cache": "reused"}
        except Exception as e:  # a cache: a damaged one is encoded again (and replaced)
            log.warning("the latent cache %s cannot be read (%s); encoding the images again", path, short_error(e))
    z = m.latent.encode(x)
    if int(os.environ.get("RANK", "0")) == 0:
        tmp = out / ".latents.safetensors.tmp"
        with writing(path):
            try:
                out.mkdir(parents=True, exist_ok=True)
                save_file({"latents": z.contiguous()}, str(tmp), metadata=key)
                os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)
    return z, {**m.latent.describe(), "cache": "written"}


def _pipeline_saver(opts: TrainOptions, m: EpsModel):
    """Write the whole pipeline of ``opts.model`` with the trained denoiser in place of its own (diffusers'
    ``from_pretrained`` with the component replaced, then ``save_pretrained``); an E-TSDM denoiser is named
    ``["lipscope.etsdm", "ETSDM…"]`` in model_index.json (stock diffusers loads it after ``import lipscope.etsdm``)."""
    from diffusers import DiffusionPipeline

    root, index, hub = pipeline_source(str(opts.model), opts.revision, opts.offline or None)
    comp = pipeline_denoiser(index, str(opts.model))[1]

    def save(denoiser: Any, dest: Path, record: dict[str, Any]) -> None:
        pipe = DiffusionPipeline.from_pretrained(root, **{comp: denoiser}, **hub)
        pipe.save_pretrained(str(dest), safe_serialization=True)
        idx = json.loads((dest / "model_index.json").read_text())
        if not type(denoiser).__module__.startswith("diffusers"):
            idx[comp] = [type(denoiser).__module__, type(denoiser).__name__]
        (dest / "model_index.json").write_text(json.dumps(idx, indent=2) + "\n")
        (dest / "lipscope.json").write_text(json.dumps(record, indent=2, default=str) + "\n")

    return save


def _initial_model(opts: TrainOptions) -> EpsModel:
    """The model to train: a UNet2DModel built from ``config`` (weights from the seed alone, in an isolated RNG)
    or a pretrained model of any family lipscope wraps, loaded from ``model``."""
    if opts.config is not None:
        unet, sched_cfg = _initial_unet(opts)
        return from_unet(unet, sched_cfg, device=unet.device)
    m = load_model(
        str(opts.model),
        config=opts.model_config,
        scheduler_config=opts.scheduler_config,
        revision=opts.revision,
        offline=opts.offline or None,
        trust_pickle=opts.trust_pickle,
    )
    if m.config.get("lipscope_adapter") == "generic":  # probed through its own call; trained through a family only
        family_of_model(m).build(m.module)  # type: ignore[union-attr]  # refuses in one line, naming why
    if m.module is None or family_of_model(m) is None:
        raise InputError(
            f"`model` {opts.model}: fine-tuning needs a diffusers denoiser lipscope wraps (a hub id, pipeline folder "
            "or weights file); a py: callable or a closed form cannot be trained"
        )
    return m


def _initial_unet(opts: TrainOptions) -> tuple[Any, dict[str, Any]]:
    """A UNet built from ``config`` (weights from the seed alone, in an isolated RNG) and its scheduler config."""
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
    raise InputError("`config` is needed to build a UNet")  # _initial_model loads `model`
