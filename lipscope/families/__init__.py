"""Model families: which denoiser classes lipscope wraps, how, and what conditions them — the one registry.

A family is recognised from a pipeline's ``model_index.json`` (its ``unet`` or ``transformer`` component) or
a denoiser config's ``_class_name``. Each family is one small module with a ``build`` function (denoiser →
:class:`~lipscope.models.EpsModel`) and, for conditional families, a ``conditioning`` function (options →
:class:`~lipscope.conditioning.Conditioning`). Adding a family is one module and one line in ``FAMILIES``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..conditioning import class_conditioning
from ..errors import InputError
from ..models import EpsModel
from . import dit, flux, pixart, sd, sd3, unet2d
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


__all__ = ["FAMILIES", "EncodedPrompts", "Family", "family_of_class", "family_of_model", "load_denoiser",
           "pipeline_denoiser", "resolve_conditioning", "supported"]  # fmt: skip


# pipelines whose denoiser class a family wraps but whose conditioning or inputs differ (DeepFloyd IF's cascaded
# pixel UNets and T5 call, Kandinsky's image embeddings, SD's upscaler): refused by name, not mis-wrapped
FOREIGN_PIPELINES = ("IF", "Kandinsky", "StableDiffusionUpscale", "StableDiffusionLatentUpscale", "StableUnCLIP")


def family_of_class(cls: str | None) -> Family | None:
    return next((f for f in FAMILIES if cls in f.classes), None)


def family_of_model(model: EpsModel) -> Family | None:
    return family_of_class(model.config.get("_class_name", "UNet2DModel"))


def supported() -> str:
    return ", ".join(f"{f.name} ({'/'.join(f.classes)})" for f in FAMILIES)


def pipeline_denoiser(index: dict[str, Any], where: str) -> tuple[Family, str]:
    """(family, component) of a pipeline's denoiser; refuses, naming the classes, what no family wraps."""
    comps = {
        k: v[1] for k in ("unet", "transformer", "prior") if isinstance(v := index.get(k), list | tuple) and len(v) == 2
    }
    pipe = str(index.get("_class_name") or "")
    other = pipe.startswith(FOREIGN_PIPELINES)  # a denoiser class a family wraps, in a pipeline it does not
    for comp, cls in comps.items():
        fam = family_of_class(cls)
        if fam is not None and not other:
            return fam, comp
    if other:
        raise InputError(
            f"`model` {where} is a {pipe}, whose {', '.join(comps.values())} is fed other inputs than the families "
            f"lipscope wraps ({supported()}); wrap it as `model` py:module:factory"
        )
    raise InputError(
        f"`model` {where} is a {index.get('_class_name', 'pipeline')} "
        f"({', '.join(f'{k}: {v}' for k, v in comps.items()) or 'no unet or transformer component'}), which "
        f"lipscope does not support yet; supported: {supported()}; wrap other networks as `model` "
        "py:module:factory"
    )


def load_denoiser(
    fam: Family, root: str, subfolder: str | None, sched_cfg: dict | None, name: str, dev, dt, **hub: Any
) -> EpsModel:
    """Load a family's denoiser with its class's ``from_pretrained`` and build its EpsModel."""
    import diffusers

    from ..errors import short_error
    from ..etsdm import ETSDM_CLASSES

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
    if (fam is None or fam.conditioning is None) and (spec := model.config.get("class_labels")) is not None:
        if prompt_embeds:  # a py: network taking class_labels (lipscope.pyspec)
            raise InputError(f"`model` {model.name} is class-conditional: give `class_labels`, not `prompt_embeds`")
        return class_conditioning(model.name, list(class_labels or []), guidance_scale, **spec)
    if fam is None or fam.conditioning is None:
        if given:
            raise InputError(f"`model` {model.name} is unconditional; leave out {', '.join(f'`{g}`' for g in given)}")
        return None
    return fam.conditioning(
        model, class_labels=list(class_labels or []), prompt_embeds=prompt_embeds, guidance_scale=guidance_scale
    )
