"""``lipscope sample`` and ``lipscope evaluate``: draw samples; sample quality against baselines."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from .. import shard
from .common import cli_errors, parse_list, say, setup_logging
from .options import (
    CLASS_LABEL,
    DEVICE,
    GUIDANCE_SCALE,
    NEGATIVE_PROMPT,
    PROMPT,
    PROMPT_EMBEDS,
    PROMPT_FILE,
    SAMPLER,
    VERBOSE,
    conditioning_kwargs,
)


@cli_errors
def sample(
    model: str = typer.Option(..., "--model", "-m"),
    scheduler: str = typer.Option(
        "ddim",
        "--scheduler",
        parser=SAMPLER,
        help="ddpm, ddim, dpmsolver (DPM-Solver++ 2M), pc (score-SDE VE predictor-corrector); VE/EDM: ddim is Euler.",
    ),
    steps: int = typer.Option(50, "--steps"),
    num: int = typer.Option(64, "--num", "-n", min=1),
    seed: int = typer.Option(0, "--seed", min=0),
    batch_size: int = typer.Option(256, "--batch-size", min=1),
    device: str = typer.Option("auto", "--device", parser=DEVICE),
    out_dir: Path = typer.Option(Path("runs/samples"), "--out", "-o"),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty --out folder (atomically)."),
    class_label: list[int] | None = CLASS_LABEL,
    prompt: list[str] | None = PROMPT,
    prompt_file: Path | None = PROMPT_FILE,
    negative_prompt: str | None = NEGATIVE_PROMPT,
    prompt_embeds: Path | None = PROMPT_EMBEDS,
    guidance_scale: float | None = GUIDANCE_SCALE,
    verbose: bool = VERBOSE,
) -> None:
    """Sample a model (E-TSDM map honoured): writes samples.png (grid) and samples.npz."""
    setup_logging(verbose)
    from ..runs import SampleOptions, run_sample

    opts = SampleOptions(
        model=model,
        scheduler=scheduler,
        steps=steps,
        num=num,
        seed=seed,
        batch_size=batch_size,
        device=device,
        out=str(out_dir),
        overwrite=overwrite,
        **conditioning_kwargs(class_label, prompt, prompt_file, negative_prompt, prompt_embeds, guidance_scale),
    )
    run_sample(opts)
    if shard.is_main():
        say(f"{num} samples ({scheduler}, {steps} steps) written to {out_dir}/samples.png and samples.npz")


@cli_errors
def evaluate(
    model: str = typer.Option(..., "--model", "-m"),
    baseline: list[str] = typer.Option(
        [], "--baseline", "-b", help="Model(s) to compare with, same seeds (repeatable)."
    ),
    data: str = typer.Option("digits", "--data", "-d", help="Reference data."),
    scheduler: str = typer.Option("ddim,dpmsolver", "--scheduler", help="Comma list: ddpm, ddim, dpmsolver, pc (VE)."),
    steps: str = typer.Option("5,10,20,50", "--steps", help="Comma list of sampling step counts."),
    num: int = typer.Option(500, "--num", "-n", min=3, help="Samples per (model, scheduler, steps, seed)."),
    seeds: int = typer.Option(3, "--seeds", min=1, help="Number of seeds (0..S−1): the spread of each metric."),
    inception_weights: str | None = typer.Option(
        None, "--inception-weights", help="Local Inception weights for FID (torchmetrics, extra 'fid')."
    ),
    features: str = typer.Option(
        "digits",
        "--features",
        help="Feature space of FD/KID: digits (the built-in digits classifier), a local transformers vision-model "
        "folder such as DINOv2 or CLIP, or py:module:factory (factory() returns images → features).",
    ),
    trust_pickle: bool = typer.Option(
        False, "--trust-pickle", help="Allow full unpickling of .pt/.bin checkpoints (runs code from the file)."
    ),
    device: str = typer.Option("auto", "--device", parser=DEVICE),
    out_dir: Path = typer.Option(Path("runs/eval"), "--out", "-o"),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty --out folder (atomically)."),
    class_label: list[int] | None = CLASS_LABEL,
    prompt: list[str] | None = PROMPT,
    prompt_file: Path | None = PROMPT_FILE,
    negative_prompt: str | None = NEGATIVE_PROMPT,
    prompt_embeds: Path | None = PROMPT_EMBEDS,
    guidance_scale: float | None = GUIDANCE_SCALE,
    verbose: bool = VERBOSE,
) -> None:
    """Sample quality vs steps for a model and a baseline: Fréchet distances (pixels, --features: the
    digits classifier by default), KID (same features; unbiased at small --num), sliced Wasserstein, FID
    when Inception weights are available, and the per-seed differences model − baseline with t intervals.
    Writes eval.csv, eval_summary.csv, eval_paired.csv (with a baseline), eval.png."""
    setup_logging(verbose)
    from ..runs import EvaluateOptions, run_evaluate

    res = run_evaluate(
        EvaluateOptions(
            model=model,
            baseline=tuple(baseline),
            data=data,
            scheduler=tuple(parse_list(scheduler, str, "scheduler")),
            steps=tuple(parse_list(steps, int, "steps")),
            num=num,
            seeds=seeds,
            inception_weights=inception_weights,
            features=features,
            trust_pickle=trust_pickle,
            device=device,
            out=str(out_dir),
            overwrite=overwrite,
            **conditioning_kwargs(class_label, prompt, prompt_file, negative_prompt, prompt_embeds, guidance_scale),
        )
    )
    name = res.features.name if res.features is not None else "digits"
    tab = Table(title="lipscope evaluate (mean ± std over seeds)", title_justify="left")
    for c in ("model", "scheduler", "steps", f"FD {name}", f"KID {name}", "FD pixel", "SWD", "FID"):
        tab.add_column(c)
    for _, r in res.summary.iterrows():
        fid = f"{r['fid_mean']:.3g}" if res.fid_ok else "unavailable"
        tab.add_row(
            r["model"],
            r["scheduler"],
            str(r["steps"]),
            f"{r[f'fd_{name}_mean']:.3g} ± {r[f'fd_{name}_std']:.2g}",
            f"{r[f'kid_{name}_mean']:.3g} ± {r[f'kid_{name}_std']:.2g}",
            f"{r['fd_pixel_mean']:.3g} ± {r['fd_pixel_std']:.2g}",
            f"{r['swd_pixel_mean']:.3g} ± {r['swd_pixel_std']:.2g}",
            fid,
        )
    if shard.is_main():
        say(tab)
        if res.paired is not None and len(res.paired):
            say(_paired_table(res.paired))
        say(f"note: {res.meta['comparability']}")


def _paired_table(paired) -> Table:
    """model − baseline per seed: mean, t interval (none from one seed), seeds where the model is lower."""
    conf = f"{100 * float(paired['confidence'].iloc[0]):g}%"
    tab = Table(
        title=f"model − baseline, paired by seed (mean, {conf} t interval; lower is better)", title_justify="left"
    )
    for c in ("model", "scheduler", "steps", "metric", "Δ mean", f"{conf} CI", "model lower"):
        tab.add_column(c)
    for _, r in paired.iterrows():
        n = int(r["n"])
        ci = f"[{r['ci_low']:+.3g}, {r['ci_high']:+.3g}]" if n > 1 else "none (1 seed)"
        better = f"{round(r['frac_better'] * n)}/{n} seeds"
        tab.add_row(r["model"], r["scheduler"], str(r["steps"]), r["metric"], f"{r['diff_mean']:+.3g}", ci, better)
    return tab
