"""``sample`` and ``evaluate`` runs: samples of a model; sample quality against baselines on the same seeds."""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from .. import io as lio
from ..data import load_data
from ..errors import InputError
from ..evaluate import evaluate_models, metric_names, paired_differences, summarize_eval
from ..features import FeatureSpace, load_features
from ..loading import load_model
from ..plots import figure_png, plot_eval
from ..sampling import SAMPLERS, as_images, check_sampler, image_grid, png_bytes, sample
from .common import ConditioningOptions, check_out_dir, main_lock, write_on_main


@dataclass(frozen=True)
class SampleOptions(ConditioningOptions):
    """``lipscope sample``: samples.png (grid), samples.npz and run.json."""

    model: str = "builtin:digits-ddpm"
    scheduler: str = "ddim"
    steps: int = 50
    num: int = 64
    seed: int = 0
    batch_size: int = 256
    device: str = "auto"
    out: str = "runs/samples"
    overwrite: bool = False


def run_sample(opts: SampleOptions) -> dict[str, Any]:
    """Sample the model with its own noise levels and write the run folder (all files or none)."""
    if opts.num < 1:
        raise InputError("`num` must be ≥ 1")
    out = check_out_dir(opts.out, overwrite=opts.overwrite, inputs=(opts.model, *opts.conditioning_reads()))
    with main_lock(out):
        m = load_model(opts.model, device=opts.device)
        cond = opts.conditioning(m, opts.model)
        m = dataclasses.replace(m, conditioning=cond) if cond is not None else m
        x = sample(m, opts.num, scheduler=opts.scheduler, steps=opts.steps, seed=opts.seed, batch_size=opts.batch_size)
        meta = {
            "command": "sample",
            "options": asdict(opts),
            "model": opts.model,
            "config_hash": m.config_hash,
            "etsdm": asdict(m.etsdm) if m.etsdm is not None else None,
            "conditioning": {**cond.info, "guidance_scale": cond.guidance_scale} if cond is not None else None,
            "versions": lio.package_versions(),
        }
        arrays = {"x0": x.numpy()}  # in the model's own space (VE pixels in [0, 1])
        images = as_images(m, x)  # the grid shows images in [−1, 1]: latents decoded, pixels mapped from their range
        if m.latent is not None:  # x are latents: the npz keeps both
            arrays["images"] = images.numpy()
            meta["space"] = m.latent.describe()
        files = {
            "samples.png": png_bytes(image_grid(images)),
            "samples.npz": lio.npz_bytes(**arrays),
            "run.json": lio.json_bytes(meta),
        }
        write_on_main(out, files, opts.overwrite)
        return meta


@dataclass(frozen=True)
class EvaluateOptions(ConditioningOptions):
    """``lipscope evaluate``: sample quality vs steps for a model and its baselines, same seeds."""

    model: str = "builtin:digits-etsdm"
    baseline: tuple[str, ...] = ()
    data: str = "digits"
    scheduler: tuple[str, ...] = ("ddim", "dpmsolver")
    steps: tuple[int, ...] = (5, 10, 20, 50)
    num: int = 500
    seeds: int = 3
    inception_weights: str | None = None
    features: str = "digits"  # digits, a transformers vision-model folder (DINOv2, CLIP, …) or py:module:factory
    trust_pickle: bool = False  # full unpickling of .pt/.bin weights (models and feature extractor)
    device: str = "auto"
    out: str = "runs/eval"
    overwrite: bool = False


@dataclass
class EvaluateResult:
    table: pd.DataFrame
    summary: pd.DataFrame
    meta: dict[str, Any]
    fid_ok: bool
    paired: pd.DataFrame | None = None  # model − baseline per seed (eval_paired.csv); None without a baseline
    features: FeatureSpace | None = None


def run_evaluate(opts: EvaluateOptions) -> EvaluateResult:
    reads = (opts.model, opts.baseline, opts.data, opts.features, opts.inception_weights, opts.conditioning_reads())
    out = check_out_dir(opts.out, overwrite=opts.overwrite, inputs=reads)
    for sch in opts.scheduler:
        if sch not in SAMPLERS:
            raise InputError(f"`scheduler` {sch!r} not known; use {', '.join(SAMPLERS)}")
    if opts.num < 3 or opts.seeds < 1:
        raise InputError("`num` must be ≥ 3 and `seeds` ≥ 1")
    if opts.inception_weights:
        if not Path(opts.inception_weights).is_file():
            raise InputError(f"`inception_weights` {opts.inception_weights}: no such file; check the path")
        try:
            import torchmetrics  # noqa: F401
        except ImportError:
            raise InputError(
                "`inception_weights` needs torchmetrics for FID: pip install 'lipscope[fid]' (or leave it out)"
            ) from None
    space = load_features(opts.features, trust_pickle=opts.trust_pickle, device=opts.device)
    with main_lock(out):
        specs = {"model": opts.model}
        for i, b in enumerate(opts.baseline):
            specs["baseline" if i == 0 else f"baseline{i + 1}"] = b
        models = {}
        for k, spec in specs.items():  # every model with the same conditioning (prompts encoded by its pipeline)
            m = load_model(spec, device=opts.device, trust_pickle=opts.trust_pickle)
            cond = opts.conditioning(m, spec)
            models[k] = dataclasses.replace(m, conditioning=cond) if cond is not None else m
        for m in models.values():  # a sampler a model's process has none of: refused before any sampling
            for sch in opts.scheduler:
                check_sampler(m, sch)
        shapes = {k: _image_shape(m) for k, m in models.items()}
        if len(set(shapes.values())) != 1:
            raise InputError(
                f"`model` and `baseline` give images of different shapes {sorted(set(shapes.values()), key=str)}; "
                "compare models of one image size"
            )
        ref = load_data(opts.data, None, 0, shapes["model"])
        probe = space(ref[:2])  # the extractor runs on these images (one line if not) before any sampling
        if space.dimension is None:
            space = dataclasses.replace(space, dimension=int(probe.shape[1]))
        df = evaluate_models(
            models,
            ref,
            schedulers=list(opts.scheduler),
            steps=list(opts.steps),
            num=opts.num,
            seeds=list(range(opts.seeds)),
            inception_weights=opts.inception_weights,
            features=space,
        )
        df.insert(1, "spec", df["model"].map(specs))
        summ = summarize_eval(df)
        paired = paired_differences(df, "baseline") if opts.baseline else None
        fid_ok = bool(df["fid_available"].any())
        meta = {
            "command": "evaluate",
            "options": asdict(opts),
            "fid": "computed" if fid_ok else "unavailable (no local Inception weights)",
            "reference_size": int(len(ref)),
            "features": {
                "spec": opts.features,
                "name": space.name,
                "kind": space.kind,
                "dim": space.dimension,
                "sha256": space.sha256,
                "preprocessing": space.preprocessing,
            },
            "comparability": comparability_note(space, opts.num, opts.data),
            "conditioning": {k: _cond_info(m) for k, m in models.items()},
            "space": {
                k: m.latent.describe() if m.latent is not None else {"space": "pixel"} for k, m in models.items()
            },
            "versions": lio.package_versions(),
        }
        files = {
            "eval.csv": lio.csv_bytes(df),
            "eval_summary.csv": lio.csv_bytes(summ),
            "eval.png": figure_png(plot_eval(summ, metric_names(space.name))),
            "run.json": lio.json_bytes(meta),
        }
        if paired is not None:
            files["eval_paired.csv"] = lio.csv_bytes(paired)
        write_on_main(out, files, opts.overwrite)
        return EvaluateResult(df, summ, meta, fid_ok, paired, space)


def comparability_note(space: FeatureSpace, num: int, data: str) -> str:
    """What the FD/KID numbers of a run can be compared with (only runs in the same space and setting)."""
    return (
        f"FD/KID here use {space.name} features ({space.kind}) on {num} samples per seed against the {data} "
        "reference; they are not comparable to published FID/KID values (Inception-v3 pool features, 50k samples, "
        "dataset statistics), nor to runs in another feature space (sha256), sample count or reference"
    )


def _image_shape(m) -> tuple[int, ...] | None:
    """The (C, H, W) of a model's images: its samples, or for a latent model what its autoencoder decodes to."""
    if m.latent is not None:
        return tuple(m.latent.pixel_shape)
    return tuple(m.sample_shape) if m.sample_shape is not None else None


def _cond_info(m) -> dict[str, Any] | None:
    c = m.conditioning
    return {**c.info, "guidance_scale": c.guidance_scale} if c is not None else None
