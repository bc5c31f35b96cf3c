"""``lipscope probe``: parse the flags into ProbeOptions, run, print the summary."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import typer
from rich.table import Table

from .common import cli_errors, say, setup_logging
from .options import (
    ATTRIBUTE,
    BATCH_SIZE,
    CLASS_LABEL,
    COMPILE,
    DEVICE,
    DTYPE,
    GUIDANCE_SCALE,
    METHOD,
    NEGATIVE_PROMPT,
    PLOT_X,
    PRECISION,
    PREDICTION_TYPE,
    PROMPT,
    PROMPT_EMBEDS,
    PROMPT_FILE,
    REFERENCE,
    SCHEME,
    SPACE,
    TARGET,
    VERBOSE,
    conditioning_kwargs,
)


def _data_range(v: str) -> tuple[float, float] | None | str:
    """``--data-range``: LO,HI (finite, LO < HI), auto or none."""
    v = v.strip()
    if v.lower() == "none":
        return None
    if v.lower() == "auto":
        return "auto"
    parts = v.split(",")
    try:
        lo, hi = (float(x) for x in parts)
    except ValueError:
        raise typer.BadParameter(f"{v!r} is not a range; use LO,HI (e.g. -1,1 or 0,1), auto or none") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise typer.BadParameter(f"{v!r}: needs finite LO < HI (e.g. -1,1 or 0,1) or none")
    return lo, hi


def _data_range_flag(v: str) -> str:
    _data_range(v)  # checked here, converted in the command
    return v.strip()


@cli_errors
def probe(
    model: str = typer.Option(
        "builtin:digits-ddpm",
        "--model",
        "-m",
        help="hub id, pipeline/unet folder, weights file (+ --config), py:module:factory or builtin:NAME.",
    ),
    model_arg: list[str] | None = typer.Option(
        None,
        "--model-arg",
        help="key=value keyword argument of a py: factory, or a generic pipeline's __call__ size for its capture "
        "(height, width, num_frames; repeatable; values parsed as JSON).",
    ),
    prediction_type: str | None = typer.Option(
        None,
        "--prediction-type",
        parser=PREDICTION_TYPE,
        help="What a py: network outputs (epsilon, v_prediction, sample, score, flow_prediction) where its process "
        "does not say; default: its process's own (a flow process: flow_prediction), else epsilon. A contradiction "
        "is refused.",
    ),
    data: str | None = typer.Option(
        None,
        "--data",
        "-d",
        help="digits, patches[:SIZE[:SCALE]], model, hf:NAME[:split], an image folder or a .npy/.npz/.pt file. "
        "Default: the built-in's data, else samples of the model.",
    ),
    out_dir: Path = typer.Option(
        Path("runs/probe"), "--out", "-o", help="Output folder for lipschitz.csv, run.json, lipschitz.png."
    ),
    timesteps: str = typer.Option(
        "default",
        "--timesteps",
        "-t",
        help="default, all, linear:N, log:N, range:a:b:s or a list 0,1,2.5 (model steps).",
    ),
    dt: float = typer.Option(1.0, "--dt", help="FD step Δt in model steps (fractional allowed)."),
    scheme: str = typer.Option(
        "forward", "--scheme", parser=SCHEME, help="forward (t, t+Δt) or central (t−Δt/2, t+Δt/2)."
    ),
    method: str = typer.Option(
        "fd",
        "--method",
        parser=METHOD,
        help="fd (finite differences), jvp (exact ‖∂ε/∂τ‖ by forward AD), jvp-ode / fd-ode (the total derivative along "
        "the model's probability-flow ODE: K_total, K_partial, K_space, t_share) or a comma list (fd,jvp).",
    ),
    space: str = typer.Option(
        "time",
        "--space",
        parser=SPACE,
        help="time, or condition: K between consecutive conditions the network is fed (E-TSDM: sub-interval starts).",
    ),
    samples: int = typer.Option(64, "--samples", "-n", min=2, help="Number of (x0, ε) samples per timestep."),
    seed: int = typer.Option(
        0, "--seed", min=0, help="Seed; every number is reproducible and independent of --batch-size."
    ),
    batch_size: str = typer.Option(
        "auto",
        "--batch-size",
        parser=BATCH_SIZE,
        help="Forwards per batch, or auto (largest that fits, backing off on OOM).",
    ),
    device: str = typer.Option(
        "auto", "--device", parser=DEVICE, help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N, mps."
    ),
    dtype: str = typer.Option("float32", "--dtype", parser=DTYPE, help="float32, float64, float16 or bfloat16."),
    tf32: bool = typer.Option(False, "--tf32", help="TF32 matmuls and convolutions on CUDA (10-bit mantissa inputs)."),
    channels_last: bool = typer.Option(False, "--channels-last", help="Channels-last weights (often faster on GPUs)."),
    compile: str | None = typer.Option(
        None,
        "--compile",
        parser=COMPILE,
        help="torch.compile the network call: default, reduce-overhead (CUDA graphs) or max-autotune; FD only.",
    ),
    precision: str | None = typer.Option(
        None,
        "--precision",
        parser=PRECISION,
        help="Network arithmetic for the probe: bf16, fp16, fp32 or fp64 (weights cast, restored after); each row "
        "gets K_rel_err_est against float32 (float64 for fp32) on a few samples, with a warning above 2%. "
        "--method jvp --precision bf16 is the fast exact probe.",
    ),
    config: Path | None = typer.Option(None, "--config", help="UNet config.json for a single weights file."),
    scheduler_config: Path | None = typer.Option(
        None, "--scheduler-config", help="scheduler_config.json (default: from the model, else DDPM linear)."
    ),
    revision: str | None = typer.Option(None, "--revision", help="Hub revision (branch, tag or commit)."),
    subfolder: str | None = typer.Option(None, "--subfolder", help="Subfolder holding the UNet."),
    offline: bool = typer.Option(
        False, "--offline", help="Only use the local Hugging Face cache (also: HF_HUB_OFFLINE=1)."
    ),
    trust_pickle: bool = typer.Option(
        False, "--trust-pickle", help="Allow full unpickling of .pt/.bin checkpoints (runs code from the file)."
    ),
    t_split: float | None = typer.Option(None, "--t-split", help="Split for the summary (default T/10 = 100 of 1000)."),
    data_range: str = typer.Option(
        "auto",
        "--data-range",
        parser=_data_range_flag,
        help="Range the model was trained on: LO,HI, none, or auto (the process family's convention: -1,1; "
        "0,1 for score-SDE VE; printed). Images, digits and uint8 are mapped into it; float arrays must lie "
        "inside it and are fed unchanged; none feeds float arrays as they are.",
    ),
    target: str = typer.Option(
        "eps",
        "--target",
        parser=TARGET,
        help="Parameterisation measured: eps (the paper's ε), x0, v, score or velocity (ε − x0), converted at the "
        "true t.",
    ),
    attribute: str | None = typer.Option(
        None,
        "--attribute",
        parser=ATTRIBUTE,
        help="blocks or layers: split ∂ε/∂t over the network's time-embedding consumers (attribution.csv, .png).",
    ),
    reference: str | None = typer.Option(
        None,
        "--reference",
        parser=REFERENCE,
        help="empirical, gaussian or both: rows of the Bayes-optimal ε of the data set (a mixture of its points) and "
        "of a Gaussian fitted to it, on the same x_t, with exact t-derivatives.",
    ),
    class_label: list[int] | None = CLASS_LABEL,
    prompt: list[str] | None = PROMPT,
    prompt_file: Path | None = PROMPT_FILE,
    negative_prompt: str | None = NEGATIVE_PROMPT,
    prompt_embeds: Path | None = PROMPT_EMBEDS,
    guidance_scale: float | None = GUIDANCE_SCALE,
    plot_x: str = typer.Option(
        "t",
        "--plot-x",
        parser=PLOT_X,
        help="lipschitz.png against t, or K per unit log-SNR against λ (lambda): compares noise processes.",
    ),
    sampler: str | None = typer.Option(
        None,
        "--sampler",
        help="NAME:STEPS[,…] (default, ddim, ddpm, dpmsolver++, dpmsolver, euler, euler-a, heun, unipc, lms, "
        "flow-euler; built from the model's scheduler config): each step's share of ∫K dτ (steps.csv, plot markers).",
    ),
    train_timesteps: str | None = typer.Option(
        None,
        "--train-timesteps",
        help="uniform, logit-normal:M,S, mode:S, shift:S or FILE.npy (e.g. a finetune run's timesteps.npy): the "
        "training mass at t ≤ the onset and per sampler step (run.json, shaded on the plot).",
    ),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty --out folder (atomically)."),
    resume: bool = typer.Option(
        False,
        "--resume",
        help="Continue the interrupted probe of --out (same options and model; any process count), or start it when "
        "there is none: finished items are kept beside --out, in .<out>.partial, as the probe goes.",
    ),
    allow_noise_limited: bool = typer.Option(
        False,
        "--allow-noise-limited",
        help="Keep a float16/bfloat16 FD run whose rows are limited by rounding noise (flagged in fd_noise_limited).",
    ),
    verbose: bool = VERBOSE,
) -> None:
    """Measure the Lipschitz constant of ε_θ in t: writes lipschitz.csv, run.json and lipschitz.png."""
    setup_logging(verbose)
    from .. import shard
    from ..runs import ProbeOptions, run_probe

    res = run_probe(
        ProbeOptions(
            model=model,
            model_args=tuple(model_arg or ()),
            prediction_type=prediction_type,
            config=_s(config),
            scheduler_config=_s(scheduler_config),
            revision=revision,
            subfolder=subfolder,
            offline=offline,
            trust_pickle=trust_pickle,
            device=device,
            dtype=dtype,
            data=data,
            out=str(out_dir),
            overwrite=overwrite,
            resume=resume,
            precision=precision,
            tf32=tf32,
            channels_last=channels_last,
            compile=compile,
            timesteps=timesteps,
            dt=dt,
            scheme=scheme,
            method=method,
            space=space,
            samples=samples,
            seed=seed,
            batch_size=batch_size,
            t_split=t_split,
            data_range=_data_range(data_range),
            target=target,
            plot_x=plot_x,
            attribute=attribute,
            reference=reference,
            sampler=sampler,
            train_timesteps=train_timesteps,
            **conditioning_kwargs(class_label, prompt, prompt_file, negative_prompt, prompt_embeds, guidance_scale),
            allow_noise_limited=allow_noise_limited,
        ),
        progress=progress and sys.stderr.isatty(),
    )
    if shard.is_main():  # launched with several processes: one summary
        _print_summary(res.model.name, res.summary, res.table, res.out, res.meta["wall_time_s"])


def _s(p: Path | None) -> str | None:
    return None if p is None else str(p)


def _print_summary(name: str, s: dict, df, out_dir: Path, wall: float) -> None:
    from .. import labels  # here: `--help` imports no pandas

    tab = Table(title=f"lipscope probe — {name}", show_header=False, title_justify="left")

    def num(v: float, fmt: str, why: str) -> str:
        return f"{v:{fmt}}" if v == v else f"n/a, because {why}"  # NaN: the grid has no point on that side

    usable = s["peak_K"] == s["peak_K"]
    peak = f"{s['peak_K']:.4g}  at t = {s['peak_t']:g}" if usable else "n/a, because no row is usable"
    tab.add_row("peak K", peak)
    above = f"no grid point at t ≥ {s['t_split']:g} is usable"
    below = f"no grid point below t = {s['t_split']:g} is usable"
    tab.add_row(f"median K, t ≥ {s['t_split']:g}", num(s["median_K_above"], ".4g", above))
    tab.add_row(f"mean K, t < {s['t_split']:g}", num(s["mean_K_below"], ".4g", below))
    tab.add_row("singularity ratio", num(s["singularity_ratio"], ".3g", "needs points on both sides of t_split"))
    for line in s.get("diagnosis", {}).get("sentences", []):  # exponent, onset, ODE, attribution, references
        what, _, text = line.partition(": ")
        tab.add_row(what, text)
    scaling = df.attrs.get("data_scaling")
    if scaling is not None:
        tab.add_row("data", str(scaling))
    tab.add_row("speed", labels.speed_line(df.attrs, list(dict.fromkeys(df["method"].astype(str))), wall))
    if (zeros := labels.zero_line(df)) is not None:  # E-TSDM inside a sub-interval: a finding, never noise
        tab.add_row("K = 0 exactly", zeros)
    flagged = int(df["fd_noise_limited"].sum())
    if flagged:
        fd = int(df["method"].astype(str).str.startswith("fd").sum())
        tab.add_row("noise-limited", f"{flagged} of {fd} FD rows (fd_noise_limited; use --method jvp or a larger --dt)")
    if s.get("excluded_rows"):
        tab.add_row(
            "left out", f"{s['excluded_rows']} unusable rows (usable = False: noise- or time-resolution-limited)"
        )
    if trunc := int(df["fd_trunc_limited"].sum()) if "fd_trunc_limited" in df else 0:
        tab.add_row("truncation", f"{trunc} FD rows over 10 % (fd_trunc_limited; a smaller --dt or --method jvp)")
    extra = ", attribution.csv, attribution.png" if df.attrs.get("attribution") is not None else ""
    extra += ", steps.csv" if s.get("step_budget") else ""
    tab.add_row("written", f"{out_dir}/lipschitz.csv, run.json, lipschitz.png{extra}")
    say(tab)
