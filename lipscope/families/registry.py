"""What the generic adapter was tested on, and the status of every denoiser class diffusers ships (docs/models.md).

``TESTED``: the pipelines tests/test_generic.py runs as tiny random-weight folders — FD and JVP, CFG where the
pipeline has it, data through its autoencoder, K against an independent per-sample loop over the pipeline's own
denoising step — with what the capture must find (the timestep it feeds, how it guides). ``FAMILY_GENERIC``: how
the hand-written families compare with the generic path on the same folders. ``REFUSED``: classes that are not a
pipeline's denoiser of a continuous noise process, with the reason, refused by name. Every other class of
``diffusers.models`` is "generic, untested": its pipeline is tried through its own call and refused in one line
if the capture cannot identify it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Tested:
    denoiser: str
    autoencoder: str | None  # data are encoded through it; None: the denoiser works on pixels / audio
    guidance: str  # how the pipeline guides, as the capture identifies it
    conditioning: str  # what the test conditions it on
    time: str  # the fed timestep for model step k, as identified


_T5 = "prompts, encoded by the pipeline (tiny offline T5)"
_EMB = "prompt embeddings passed to __call__ (its text encoder needs a hub tokenizer)"
_TWO = "CFG, conditional and unconditional calls"
_BATCH = "CFG, both branches in one batched call"
_NORM = "CFG rescaled to the conditional output's norm (last dim), two calls"

TESTED: dict[str, Tested] = {
    "Flux2Pipeline": Tested("Flux2Transformer2DModel", "AutoencoderKLFlux2", "guidance-distilled: fed as an input",
                            _EMB, "(1/1000)·k"),
    "QwenImagePipeline": Tested("QwenImageTransformer2DModel", "AutoencoderKLQwenImage", _NORM, _EMB, "(1/1000)·k"),
    "ZImagePipeline": Tested("ZImageTransformer2DModel", "AutoencoderKL", _BATCH + "; output negated", _EMB + "; lists",
                             "1 + (-1/1000)·k"),
    "ChromaPipeline": Tested("ChromaTransformer2DModel", "AutoencoderKL", _TWO, _T5, "(1/1000)·k"),
    "SanaPipeline": Tested("SanaTransformer2DModel", "AutoencoderDC", _BATCH, _EMB, "(1)·k"),
    "Lumina2Pipeline": Tested("Lumina2Transformer2DModel", "AutoencoderKL", _NORM + "; output negated", _EMB,
                              "1 + (-1/1000)·k"),
    "AuraFlowPipeline": Tested("AuraFlowTransformer2DModel", "AutoencoderKL", _BATCH, _T5 + " (UMT5)", "(1/1000)·k"),
    "CogView4Pipeline": Tested("CogView4Transformer2DModel", "AutoencoderKL", _TWO, _EMB,
                               "(b·k)/(1 + c·k): unshifted time at a shifted noise level"),
    "HiDreamImagePipeline": Tested("HiDreamImageTransformer2DModel", "AutoencoderKL", _BATCH + "; output negated",
                                   _EMB + " (T5, Llama layers, pooled)", "(1)·k"),
    "WanPipeline": Tested("WanTransformer3DModel", "AutoencoderKLWan", _TWO, _T5 + " (UMT5)", "(1)·k"),
    "HunyuanVideoPipeline": Tested("HunyuanVideoTransformer3DModel", "AutoencoderKLHunyuanVideo",
                                   "true CFG, two calls; guidance-distilled input as well", _EMB, "(1)·k"),
    "LTXPipeline": Tested("LTXVideoTransformer3DModel", "AutoencoderKLLTXVideo", _BATCH, _T5, "(1)·k"),
    "CogVideoXPipeline": Tested("CogVideoXTransformer3DModel", "AutoencoderKLCogVideoX", _BATCH, _T5, "(1)·k"),
    "IFPipeline": Tested("UNet2DConditionModel", None, _BATCH + "; learned variance dropped", _T5, "(1)·k"),
    "DanceDiffusionPipeline": Tested("UNet1DModel", None, "none (unconditional)", "unconditional", "(1/1000)·k"),
}  # fmt: skip

# the hand-written families against the generic path on the same tiny folders (tests/test_generic_families.py)
FAMILY_GENERIC: dict[str, str] = {
    "UNet2DModel": "identical tables (DDPMPipeline)",
    "UNet2DConditionModel": "identical tables (StableDiffusionPipeline); IF stage I: generic only",
    "DiTTransformer2DModel": "identical tables (DiTPipeline, no guidance: its pipeline hard-codes null class 1000)",
    "SD3Transformer2DModel": "identical tables (StableDiffusion3Pipeline, CFG)",
    "PixArtTransformer2DModel": "identical tables (PixArtAlphaPipeline, CFG)",
    "FluxTransformer2DModel": "equal ε fields under the 2×2 packing (FluxPipeline); tables differ only by the noise "
    "drawn in another layout",
}

REFUSED: dict[str, str] = {
    "UVit2DModel": "a masked-token model (aMUSEd): it predicts token logits; there is no continuous noise level to "
    "differentiate in",
    "MiniMaxMusic3RVQDepthDecoder": "an autoregressive decoder over residual codebooks, not a denoiser",
    "TransformerTemporalModel": "a temporal-attention block inside video UNets, not a pipeline's denoiser",
    "MotionAdapter": "AnimateDiff's motion-module weights, loaded into a UNetMotionModel; not a denoiser itself",
}


def refusal(cls: str | None) -> str | None:
    """Why a denoiser class is refused by name (None: the generic adapter tries it)."""
    why = REFUSED.get(str(cls))
    return None if why is None else f"{why}; lipscope cannot probe it"


def denoiser_classes() -> list[tuple[str, str]]:
    """(class, module) of every model class in diffusers.models' transformers and unets."""
    import diffusers.models.transformers as tr
    import diffusers.models.unets as un
    from diffusers import ModelMixin

    out = []
    for pkg in (tr, un):
        for name in dir(pkg):
            obj = getattr(pkg, name)
            if isinstance(obj, type) and issubclass(obj, ModelMixin) and obj is not ModelMixin:
                out.append((name, obj.__module__.removeprefix("diffusers.models.")))
    return sorted(set(out))


def status(cls: str) -> tuple[str, str]:
    """(status, detail) of a denoiser class: tested, family, refused or generic untested."""
    from . import FAMILIES

    tested = [p for p, t in TESTED.items() if t.denoiser == cls]
    fam = next((f.name for f in FAMILIES if cls in f.classes), None)
    if fam is not None:
        return f"family `{fam}` (E-TSDM, LoRA, training)", FAMILY_GENERIC.get(cls, "") + (
            f"; generic tested: {', '.join(tested)}" if tested and cls not in FAMILY_GENERIC else "")  # fmt: skip
    if tested:
        return "tested (generic)", ", ".join(tested)
    if cls in REFUSED:
        return "refused", REFUSED[cls]
    return "generic, untested", ""


BEGIN = "<!-- generated by `python -m lipscope.families.registry docs/models.md`: do not edit below -->"


def models_table() -> str:
    """The section of docs/models.md generated from the registry (tests/test_generic_registry.py checks it)."""
    import diffusers

    lines = [
        BEGIN,
        "",
        "# Every diffusers denoiser class",
        "",
        f"Every model class of `diffusers.models` (transformers and unets) in diffusers {diffusers.__version__},",
        "and how lipscope probes it. Generated from `lipscope/families/registry.py` by",
        "`python -m lipscope.families.registry docs/models.md`; `tests/test_generic_registry.py` fails when stale.",
        "",
        "* **family**: a hand-written adapter (`lipscope/families/<name>.py`) that also carries E-TSDM classes, LoRA",
        "  and training; where noted, the generic adapter was run on the same folders and compared.",
        "* **tested (generic)**: the generic adapter (docs/generic.md) on a tiny random-weight folder of the pipeline:",
        "  FD and JVP, CFG where the pipeline has it, data through its autoencoder, K equal to an independent",
        "  per-sample loop over the pipeline's own denoising step (tests/test_generic.py).",
        "* **generic, untested**: its pipeline goes through the generic adapter; what the capture cannot identify is",
        "  refused in one line, never probed on a guess.",
        "* **refused**: not a denoiser of a continuous noise process; refused by name.",
        "",
        "| class | module | status | detail |",
        "| --- | --- | --- | --- |",
    ]
    for cls, mod in denoiser_classes():
        st, detail = status(cls)
        lines.append(f"| `{cls}` | `{mod}` | {st} | {detail} |")
    lines += ["", "## Tested pipelines", "",
              "| pipeline | denoiser | probe | CFG / guidance | latent data | conditioning | fed timestep |",
              "| --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for p, t in TESTED.items():
        data = f"through `{t.autoencoder}`" if t.autoencoder else "pixels / audio (no autoencoder)"
        lines.append(f"| `{p}` | `{t.denoiser}` | fd, jvp | {t.guidance} | {data} | {t.conditioning} | {t.time} |")
    return "\n".join(lines) + "\n"


def write_models_md(path: str) -> None:
    """Replace the generated section of ``path`` (everything from BEGIN on) with :func:`models_table`."""
    from pathlib import Path

    doc = Path(path)
    text = doc.read_text()
    head = text.split(BEGIN)[0].rstrip("\n")
    doc.write_text(f"{head}\n\n{models_table()}")


if __name__ == "__main__":
    import sys

    write_models_md(sys.argv[1])
