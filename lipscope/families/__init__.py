"""Model families: which denoiser classes lipscope wraps, how, and what conditions them — the one registry.

A family is recognised from a pipeline's ``model_index.json`` (its ``unet`` or ``transformer`` component) or
a denoiser config's ``_class_name``. Each family is one small module with a ``build`` function (denoiser →
:class:`~lipscope.models.EpsModel`) and, for conditional families, a ``conditioning`` function (options →
:class:`~lipscope.conditioning.Conditioning`). Adding a family is one module and one line in ``FAMILIES``.

Every other pipeline (and the cascades the hand-written families do not wrap, DeepFloyd IF) goes to ``GENERIC``
(:mod:`.generic`): its own ``__call__`` recorded once and replayed; :mod:`.registry` says which pipelines that was
tested on and the status of every diffusers denoiser class (docs/models.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import InputError
from ..models import EpsModel
from . import dit, flux, generic, pixart, sd, sd3, unet2d
from .embeds import EncodedPrompts


@dataclass(frozen=True)
class Family:
    name: str
    classes: tuple[str, ...]  # denoiser class names (model_index.json / config _class_name)
    component: str  # the pipeline component that holds the denoiser
    build: Callable[..., EpsModel]  # (denoiser, scheduler_config, name, device, dtype) → EpsModel
    conditioning: Callable[..., Any] | None = None  # (model, **options) → Conditioning | None
    conditioned_on: str | None = None  # "class" or "text"
    encode: Callable[..., dict] | None = None  # (pipeline, prompts, negative_prompt, device) → encode_prompt's tensors
    load: Callable[..., EpsModel] | None = (
        None  # (root, component, scheduler_config, name, device, dtype, …): whole pipeline
    )


def _with_etsdm(*classes: str) -> tuple[str, ...]:  # each class and its E-TSDM subclass (lipscope.etsdm)
    return (*classes, *(f"ETSDM{c}" for c in classes))


FAMILIES: tuple[Family, ...] = (
    Family("unet2d", _with_etsdm("UNet2DModel"), "unet", unet2d.build),
    Family("dit", _with_etsdm("DiTTransformer2DModel"), "transformer", dit.build, dit.conditioning, "class"),
    Family("sd", _with_etsdm("UNet2DConditionModel"), "unet", sd.build, sd.conditioning, "text", sd.encode),
    Family("sd3", _with_etsdm("SD3Transformer2DModel"), "transformer", sd3.build, sd3.conditioning, "text", sd3.encode),
    Family(
        "pixart",
        _with_etsdm("PixArtTransformer2DModel"),
        "transformer",
        pixart.build,
        pixart.conditioning,
        "text",
        pixart.encode,
    ),  # fmt: skip
    Family(
        "flux", _with_etsdm("FluxTransformer2DModel"), "transformer", flux.build, flux.conditioning, "text", flux.encode
    ),  # fmt: skip
)


# any other pipeline: its own call recorded and replayed (conditioned on whatever its __call__ takes)
GENERIC = Family("generic", (), "", generic.build_refused, generic.conditioning, "call", None, generic.load)

__all__ = ["FAMILIES", "GENERIC", "EncodedPrompts", "Family", "family_of_class", "family_of_model", "load_denoiser",
           "no_call_args", "pipeline_denoiser", "resolve_conditioning", "supported"]  # fmt: skip


# pipelines whose denoiser class a family wraps but whose conditioning or inputs differ (DeepFloyd IF's cascaded
# pixel UNets and T5 call, Kandinsky's image embeddings, SD's upscaler): never wrapped by that family; they go to
# the generic adapter, which records what their own call feeds
FOREIGN_PIPELINES = ("IF", "Kandinsky", "StableDiffusionUpscale", "StableDiffusionLatentUpscale", "StableUnCLIP")


def family_of_class(cls: str | None) -> Family | None:
    return next((f for f in FAMILIES if cls in f.classes), None)


def family_of_model(model: EpsModel) -> Family | None:
    if model.config.get("lipscope_adapter") == "generic":
        return GENERIC
    return family_of_class(model.config.get("_class_name", "UNet2DModel"))


def supported() -> str:
    return ", ".join(f"{f.name} ({'/'.join(f.classes)})" for f in FAMILIES)


def pipeline_denoiser(index: dict[str, Any], where: str) -> tuple[Family, str]:
    """(family, component) of a pipeline's denoiser: a hand-written family where one wraps its class in this kind of
    pipeline, else the generic adapter; refuses, naming the class and why, what the generic adapter cannot take."""
    from .registry import refusal

    comps = {
        k: v[1] for k in ("unet", "transformer", "prior") if isinstance(v := index.get(k), list | tuple) and len(v) == 2
    }
    pipe = str(index.get("_class_name") or "")
    other = pipe.startswith(FOREIGN_PIPELINES)  # a denoiser class a family wraps, in a pipeline it does not
    for comp, cls in comps.items():
        fam = family_of_class(cls)
        if fam is not None and not other:
            return fam, comp
    for comp, cls in comps.items():
        why = refusal(cls)
        if why is not None:
            raise InputError(f"`model` {where} is a {pipe or 'pipeline'} whose {comp} is a {cls}: {why}")
        if cls:
            return GENERIC, comp
    raise InputError(
        f"`model` {where} is a {index.get('_class_name', 'pipeline')} (no unet or transformer component), which "
        f"lipscope cannot probe; supported: {supported()} and any pipeline with a unet or transformer (generic); wrap "
        "other networks as `model` py:module:factory"
    )


def no_call_args(call_args: dict[str, Any] | None, spec: Any) -> None:
    """Refuse ``model_args`` for a model that is neither a py: factory nor a generic pipeline."""
    if call_args:
        raise InputError(
            f"`model_args` are passed to a py: factory or a generic pipeline's call, and `model` {spec} is neither; "
            "drop `model_args`"
        )


def load_denoiser(
    fam: Family, root: str, subfolder: str | None, sched_cfg: dict | None, name: str, dev, dt,
    call_args: dict[str, Any] | None = None, index: dict[str, Any] | None = None, **hub: Any,
) -> EpsModel:  # fmt: skip
    """Load a family's denoiser with its class's ``from_pretrained`` and build its EpsModel (the generic adapter:
    the whole pipeline; ``call_args``: its ``__call__`` sizes for the capture, given as ``model_args``)."""
    import diffusers

    from ..errors import short_error
    from ..etsdm import ETSDM_CLASSES

    if fam.load is not None:
        return fam.load(root, subfolder, sched_cfg, name, dev, dt, call_args=call_args, index=index, **hub)
    no_call_args(call_args, name)

    try:
        cls = getattr(diffusers, fam.classes[0])
        # a saved E-TSDM denoiser is loaded as its class: the base class would drop the map's config keys
        cls = ETSDM_CLASSES.get(cls.load_config(root, subfolder=subfolder, **hub).get("_class_name"), cls)
        module = cls.from_pretrained(root, subfolder=subfolder, **hub)
    except (OSError, ValueError, RuntimeError) as e:
        raise InputError(f"`model` {root}: could not load its {fam.classes[0]} ({short_error(e)})") from e
    return fam.build(module, sched_cfg, name=name, device=dev, dtype=dt)


def resolve_conditioning(
    model: EpsModel,
    class_labels: list[int] | tuple[int, ...] | None = None,
    prompt_embeds: Any = None,
    guidance_scale: float | None = None,
):
    """The :class:`~lipscope.conditioning.Conditioning` a model is probed with: the family's default
    (unconditional: null class) when nothing is given; conditioning given to an unconditional model is refused."""
    import math

    fam = family_of_model(model)
    given = [k for k, v in (("class_labels", class_labels), ("prompt_embeds", prompt_embeds)) if v]
    if guidance_scale is not None:
        if not (isinstance(guidance_scale, (int, float)) and math.isfinite(guidance_scale)):
            raise InputError(f"`guidance_scale` must be a finite number (got {guidance_scale!r})")
        given.append("guidance_scale")
    if fam is None or fam.conditioning is None:
        if given:
            raise InputError(f"`model` {model.name} is unconditional; leave out {', '.join(f'`{g}`' for g in given)}")
        return None
    return fam.conditioning(
        model, class_labels=list(class_labels or []), prompt_embeds=prompt_embeds, guidance_scale=guidance_scale
    )
