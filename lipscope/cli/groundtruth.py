"""``lipscope groundtruth``: E-TSDM's effect measured exactly on data with a known density."""

from __future__ import annotations

from pathlib import Path

import typer

from .common import cli_errors, parse_list, say, setup_logging


@cli_errors
def groundtruth(
    data: str = typer.Option(
        "digits-gmm:10",
        "--data",
        "-d",
        help="digits-gmm:K[:rank=R][:floor=F][:seed=S], gmm:K:SHAPE[:…] or mixture.npz.",
    ),
    process: str = typer.Option("vp", "--process", help="vp (DDPM linear, ε) or flow (rectified flow, velocity)."),
    size: str = typer.Option("full", "--size", help="full (GPU) or reduced (2 CPU cores, < 10 min): unset sizes."),
    arch: str | None = typer.Option(None, "--arch", help="unet, dit or both (comma list)."),
    train: str = typer.Option("base,etsdm,control", "--train", help="Models per seed: base, etsdm, control."),
    etsdm_from: str = typer.Option("base", "--etsdm-from", help="base (fine-tune, with control) or scratch."),
    steps: int | None = typer.Option(None, "--steps", help="Training steps of the base (and scratch E-TSDM)."),
    finetune_steps: int | None = typer.Option(None, "--finetune-steps", help="Steps of the E-TSDM/control fine-tunes."),
    batch_size: int = typer.Option(64, "--batch-size"),
    lr: float = typer.Option(1e-3, "--lr", help="Base (and scratch E-TSDM) learning rate."),
    finetune_lr: float = typer.Option(2e-4, "--finetune-lr", help="Fine-tunes' learning rate."),
    t_tilde: float | None = typer.Option(None, "--t-tilde", help="E-TSDM t̃ in model steps (default 0.1·T)."),
    n_sub: int = typer.Option(5, "--n", help="E-TSDM: sub-intervals of [0, t̃)."),
    samplers: str | None = typer.Option(
        None, "--samplers", help="ddim, dpmsolver++:1/2/3, euler, heun, unipc:2/3 (comma list)."
    ),
    nfe: str | None = typer.Option(None, "--nfe", help="Model calls per sample, e.g. 5,10,20,50."),
    seeds: int | None = typer.Option(None, "--seeds", help="Independent replicates (training and x_T)."),
    samples: int | None = typer.Option(None, "--samples", help="x_T per seed for sampler and distribution error."),
    eval_samples: int | None = typer.Option(None, "--eval-samples", help="x_t per t for network error and K."),
    timesteps: str | None = typer.Option(None, "--timesteps", "-t", help="Grid of t for network error and K."),
    rtol: float = typer.Option(1e-10, "--rtol", help="Tolerance of the exact ODE solve (per sample)."),
    model_config: Path | None = typer.Option(None, "--model-config", help="UNet2DModel/DiT config for one --arch."),
    keep_models: bool = typer.Option(True, "--keep-models/--no-keep-models", help="Copy the models into --out."),
    keep_journal: bool = typer.Option(
        False, "--keep-journal", help="Keep the finished items beside --out (--resume --overwrite re-tabulates)."
    ),
    out_dir: Path = typer.Option(Path("runs/groundtruth"), "--out", "-o"),
    resume: bool = typer.Option(False, "--resume", help="Continue the killed run of --out (same options)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty --out (atomically)."),
    threads: int | None = typer.Option(
        None, "--threads", min=1, help="torch CPU threads (default torch's; 1 on a CPU shared with other jobs)."
    ),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Ground truth for E-TSDM: exact scores, the exact ODE, sampler and distribution error on a known density."""
    setup_logging(verbose)
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    from ..runs.groundtruth import DEFAULT_GRID, GroundTruthOptions, run_groundtruth

    names = lambda s: tuple(v.strip() for v in s.split(",") if v.strip()) if s is not None else None  # noqa: E731
    opts = GroundTruthOptions(
        data=data, process=process, size=size, arch=names(arch), train=names(train) or (), etsdm_from=etsdm_from,
        steps=steps, finetune_steps=finetune_steps, batch_size=batch_size, lr=lr, finetune_lr=finetune_lr,
        t_tilde=t_tilde, n_sub=n_sub, samplers=names(samplers),
        nfe=None if nfe is None else tuple(parse_list(nfe, int, "nfe")), seeds=seeds, samples=samples,
        eval_samples=eval_samples, timesteps=timesteps or DEFAULT_GRID, rtol=rtol,
        model_config=None if model_config is None else str(model_config), keep_models=keep_models,
        keep_journal=keep_journal, out=str(out_dir),
        resume=resume, overwrite=overwrite,
    )  # fmt: skip
    meta = run_groundtruth(opts)
    lines = meta["summary"]
    shown = [x for x in lines if "sampler error:" in x or "network error first" in x or "NLL" in x] or lines
    say(*shown, f"{len(lines) - len(shown)} more comparisons in run.json (summary) and paired.csv")
    say(
        f"written: {out_dir}/ network_error.csv, sampler_error.csv, distribution.csv, paired.csv, bands.csv, "
        "run.json, mixture.npz, sampler_error.png, network_error.png, models/"
    )
