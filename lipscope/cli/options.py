"""Option types checked at the command-line boundary (choices and ranges), before any work starts.

Each is a typer ``parser``: a bad value raises ``typer.BadParameter``, which :func:`lipscope.cli.main`
prints as one line naming the flag (exit 2). The library validates the same values again (the
Python API has no such boundary).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer

from ..models import DTYPES
from ..precision import PRECISIONS
from ..probe import SCHEMES
from ..sampling import SAMPLERS
from ..speed import COMPILE_MODES
from ..targets import TARGETS


def choice(*values: str) -> Callable[[str], str]:
    """A parser accepting exactly ``values``."""

    def parse(v: str) -> str:
        if v not in values:
            raise typer.BadParameter(f"{v!r} is not one of {', '.join(values)}")
        return v

    return parse


def device(v: str) -> str:
    """auto, cpu, mps, cuda or cuda:N."""
    base, _, idx = v.partition(":")
    if (base in ("auto", "cpu", "mps") and not idx) or (base == "cuda" and (not idx or idx.isdigit())):
        return v
    raise typer.BadParameter(f"{v!r} is not a device; use auto, cpu, cuda, cuda:N or mps")


def batch_size(v: str) -> str:
    """auto or an integer ≥ 2 (an FD pair takes two forwards)."""
    v = v.strip()
    if v == "auto":
        return v
    try:
        n = int(v)
    except ValueError:
        raise typer.BadParameter(f"{v!r} is not a batch size; use auto or an integer ≥ 2") from None
    if n < 2:
        raise typer.BadParameter(f"{n} is too small; use auto or an integer ≥ 2 (each FD pair takes two forwards)")
    return str(n)


METHOD = choice("fd", "jvp", "fd,jvp", "jvp,fd")
SCHEME = choice(*SCHEMES)
SPACE = choice("time", "condition")
TARGET = choice(*TARGETS)
PLOT_X = choice("t", "lambda")
DTYPE = choice(*DTYPES)
PRECISION = choice(*PRECISIONS)
COMPILE = choice(*COMPILE_MODES)
SAMPLER = choice(*SAMPLERS)
MIXED_PRECISION = choice("no", "fp16", "bf16")
SCHEDULE = choice("linear", "scaled_linear", "cosine", "sigmoid", "vp-linear", "vp-cosine")
DEVICE = device
BATCH_SIZE = batch_size


VERBOSE = typer.Option(
    False,
    "--verbose",
    "-v",
    help="Also lipscope's info lines, and the messages and progress bars of diffusers, transformers and the hub.",
)
RESUME_TRAINING = typer.Option(
    False,
    "--resume",
    help="Continue from the last complete checkpoint in --out (same options), or start at step 0 when there is none.",
)

# conditioning flags shared by probe, sample and evaluate (lipscope.runs.ConditioningOptions)
CLASS_LABEL = typer.Option(
    None, "--class-label", help="Class to condition a class-conditional model (DiT) on (repeatable; cycled)."
)
PROMPT = typer.Option(
    None,
    "--prompt",
    help="Prompt for a text-conditioned model, encoded by the pipeline's own text encoders (repeatable; cycled "
    "over the samples; needs transformers). Default: the empty prompt.",
)
PROMPT_FILE = typer.Option(None, "--prompt-file", help="Text file with one prompt per line (after --prompt).")
NEGATIVE_PROMPT = typer.Option(
    None, "--negative-prompt", help="Prompt of the unconditional CFG branch (default: the pipeline's own)."
)
PROMPT_EMBEDS = typer.Option(
    None,
    "--prompt-embeds",
    help="safetensors file with encode_prompt's tensors (prompt_embeds, negative_prompt_embeds, pooled…), instead "
    "of --prompt.",
)
GUIDANCE_SCALE = typer.Option(
    None,
    "--guidance-scale",
    help="Classifier-free guidance: probe ε_u + w(ε_c − ε_u), both branches in one batch (guidance-distilled "
    "Flux: the guidance input, default 3.5).",
)


def conditioning_kwargs(
    class_label: list[int] | None,
    prompt: list[str] | None,
    prompt_file: Path | None,
    negative_prompt: str | None,
    prompt_embeds: Path | None,
    guidance_scale: float | None,
) -> dict[str, Any]:
    """The conditioning flags as :class:`lipscope.runs.ConditioningOptions` fields."""
    return {
        "class_labels": tuple(class_label or ()),
        "prompt": tuple(prompt or ()),
        "prompt_file": None if prompt_file is None else str(prompt_file),
        "negative_prompt": negative_prompt,
        "prompt_embeds": None if prompt_embeds is None else str(prompt_embeds),
        "guidance_scale": guidance_scale,
    }
