"""Any diffusers pipeline, through its own ``__call__``: the generic adapter.

At load, the pipeline is built with ``DiffusionPipeline.from_pretrained`` and its noise process read from its
scheduler. The conditioning step runs the pipeline once — 3 steps at the capture size (``model_args``: height,
width, num_frames, …), latents out — on the run's prompts, prompt embeddings (passed to ``__call__`` under its own
argument names), class labels and guidance scale, recording every denoiser call (:mod:`.capture`). From that
recording (:mod:`.identify`) lipscope knows the denoiser's latent and timestep inputs, how the timestep follows the
model step, which inputs are per-row conditioning and how the calls' outputs are combined; the scheduler's own
``step`` confirms the prediction convention; the pipeline's decode path gives the autoencoder map
(:mod:`.pipecodec`). The probe then calls the denoiser in its own (possibly packed) input space with only the latent
and the timestep replaced. Whatever cannot be identified is refused in one line naming it.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
from dataclasses import dataclass
from typing import Any

import torch

from ..conditioning import Conditioning
from ..errors import InputError, short_error
from ..models import EpsModel, resolve_device, resolve_dtype
from ..processes import FlowProcess, process_from_config
from ..schedules import NoiseProcess, Schedule
from .capture import record
from .embeds import EncodedPrompts, read_embeds
from .identify import identify_call, verify_process
from .inputs import Unidentified
from .pipecodec import UnidentifiedCodec, identify_codec
from .replay import CapturedCall

log = logging.getLogger("lipscope")

CAPTURE_STEPS = 4  # enough to fit the timestep map (2 unknowns, 3 if linear-fractional) and check it on another
CONTROLLED = ("prompt", "negative_prompt", "latents", "num_inference_steps", "output_type", "generator",
              "callback_on_step_end", "return_dict", "class_labels")  # fmt: skip


@dataclass(frozen=True)
class Space:
    """The input space a capture fixes: the denoiser's latent rows and the autoencoder map into them."""

    sample_shape: tuple[int, ...]
    codec: Any = None


@dataclass(frozen=True)
class CapturedConditioning(Conditioning):
    """A generic pipeline's conditioning: the recorded call itself; sample i gets condition i mod P."""

    call: Any = None
    space: Space | None = None

    def rows(self, idx: torch.Tensor, device: torch.device, dtype: torch.dtype):
        q = torch.as_tensor(idx).reshape(-1).cpu() % self.count
        return {"call": self.call, "q": q}, None

    def digest(self) -> str:
        import hashlib

        h = hashlib.sha256(super().digest().encode())
        for tpl in self.call.templates:
            for v in _tensors(tpl.root):
                t = v.detach().cpu()
                h.update(f"{t.dtype}|{tuple(t.shape)}|".encode())
                flat = torch.empty(t.numel(), dtype=t.dtype).copy_(t.reshape(-1))  # dense: inputs may be expanded
                h.update(flat.view(torch.uint8).numpy().tobytes())
        h.update(self.call.combination.describe().encode())
        return h.hexdigest()[:16]


def _tensors(root: Any):
    if isinstance(root, torch.Tensor):
        yield root
    elif isinstance(root, dict):
        for v in root.values():
            yield from _tensors(v)
    elif isinstance(root, (list, tuple)):
        for v in root:
            yield from _tensors(v)


class PipelineNet:
    """The EpsModel ``net`` of a generic pipeline: the captured call for rows of conditions q."""

    def __init__(self, pipe: Any, component: str, call_args: dict[str, Any], kmap: float) -> None:
        self.pipe, self.component, self.call_args, self.kmap = pipe, component, dict(call_args), kmap

    def __call__(self, x: torch.Tensor, c: torch.Tensor, call: CapturedCall | None = None, q=None) -> torch.Tensor:
        if call is None:
            raise InputError(
                "a generic pipeline is probed through its captured call: build its conditioning with "
                "lipscope.families.resolve_conditioning (or conditioning_for) first"
            )
        return call(x, c, q)


def timestep_units(scheduler: Any) -> float:
    """Model steps per unit of the scheduler's timesteps: T for continuous-time schedulers (τ ∈ [0, 1]), else 1."""
    return float(scheduler.config.num_train_timesteps) if type(scheduler).__name__ == "IPNDMScheduler" else 1.0


def process_of(scheduler: Any) -> NoiseProcess:
    """The noise process of a pipeline's scheduler: lipscope's for known classes (flow also where a VP-family solver
    runs flow sigmas), else a VP schedule from the scheduler's own ``alphas_cumprod``."""
    name = type(scheduler).__name__
    cfg = {**dict(scheduler.config), "_class_name": name}
    if cfg.get("use_flow_sigmas") or cfg.get("prediction_type") == "flow_prediction":
        return FlowProcess(steps=int(cfg.get("num_train_timesteps", 1000)), shift=cfg.get("flow_shift"))
    try:
        p = process_from_config(cfg)
    except InputError as e:
        ac = getattr(scheduler, "alphas_cumprod", None)
        if not isinstance(ac, torch.Tensor):
            raise InputError(f"`model`: its scheduler {name} is no noise process lipscope knows ({e})") from None
        log.info("%s: VP schedule read from the scheduler's own alphas_cumprod", name)
        log_ab = ac.to(torch.float64).log().clamp(min=-745.0)
        p = Schedule(log_alpha_bar=log_ab, prediction_type=str(cfg.get("prediction_type", "epsilon")))
    if p.kind in ("ve", "edm"):
        raise InputError(
            f"`model`: its scheduler {name} is a {p.kind.upper()} process, whose denoiser is fed σ-dependent scaled "
            "inputs; the generic adapter handles VP, flow and cosine processes"
        )
    return p


def model_step(step: Any, process: NoiseProcess, units: float) -> float:
    """lipscope's model step k of a recorded step: σ·T from the scheduler's own σ for flow matching (the timestep a
    pipeline passes may be unshifted, CogView4), else the scheduler's timestep in model steps."""
    if process.kind == "flow" and step.sigma is not None:
        return step.sigma * process.T
    return float(torch.as_tensor(step.timestep).reshape(-1)[0]) * units


def next_step(process: NoiseProcess, units: float):
    """The model step a scheduler steps to from its step i (for the verification of deterministic steps)."""

    def knext(s: Any, i: int) -> float:
        if process.kind == "flow" and hasattr(s, "sigmas"):
            return float(s.sigmas[i + 1]) * process.T
        ts = s.timesteps
        return float(ts[i + 1]) * units if i + 1 < len(ts) else 0.0

    return knext


def build_refused(denoiser: Any, *args: Any, **kwargs: Any) -> EpsModel:
    """The generic adapter needs the whole pipeline, not a denoiser alone (LoRA runs and training need a family)."""
    raise InputError(
        f"`model` (a {type(denoiser).__name__}) is probed by the generic adapter through its pipeline's own call; "
        "training, LoRA and E-TSDM need a hand-written family (lipscope.families.FAMILIES)"
    )


@contextlib.contextmanager
def _quiet_loading():
    """diffusers' and transformers' loading bars and type notes off while a pipeline loads (restored after): the
    terminal gets lipscope's own lines (one line for bad input)."""
    from diffusers.utils import logging as dlog

    tlog: Any = None
    with contextlib.suppress(ImportError):
        from transformers.utils import logging as tlog
    saved = [(m, m.get_verbosity(), m.is_progress_bar_enabled()) for m in (dlog, tlog) if m is not None]
    for m, _, _ in saved:
        m.set_verbosity_error()
        m.disable_progress_bar()
    try:
        yield
    finally:
        for m, level, bars in saved:
            m.set_verbosity(level)
            if bars:
                m.enable_progress_bar()


def load(root: str, component: str, scheduler_config: dict | None, name: str, device, dtype,
         call_args: dict[str, Any] | None = None, index: dict | None = None, **hub: Any) -> EpsModel:  # fmt: skip
    """A generic pipeline as an EpsModel: its input space is fixed by the capture its conditioning runs."""
    import diffusers

    dev, dt = resolve_device(device), resolve_dtype(dtype)
    nulls = {k: None for k, v in (index or {}).items()
             if isinstance(v, list) and len(v) == 2 and v[1] is None and not k.startswith("_")}  # fmt: skip
    try:
        with _quiet_loading():
            pipe = diffusers.DiffusionPipeline.from_pretrained(root, dtype=dt, **nulls, **hub).to(dev)
    except (OSError, ValueError, RuntimeError, TypeError, AttributeError, ImportError) as e:
        what = (index or {}).get(component, [None, None])[1]
        raise InputError(
            f"`model` {root} is a {(index or {}).get('_class_name', 'pipeline')} ({component}: {what}); the generic "
            f"adapter could not load it ({short_error(e)})"
        ) from e
    if scheduler_config is not None:  # another scheduler (its class by the config's _class_name), as the user asked
        cls = getattr(diffusers, str(scheduler_config.get("_class_name")), None) or type(pipe.scheduler)
        pipe.scheduler = cls.from_config(scheduler_config)
    denoiser = getattr(pipe, component)
    process = process_of(pipe.scheduler)
    sig = inspect.signature(pipe.__call__).parameters
    bad = [k for k in (call_args or {}) if k in CONTROLLED or k not in sig]
    if bad:
        raise InputError(
            f"`model_args` {', '.join(bad)}: not a {type(pipe).__name__} argument lipscope leaves to you (give sizes "
            "such as height, width, num_frames, max_sequence_length)"
        )
    cfg = {k: v for k, v in dict(denoiser.config).items() if not k.startswith("_")}
    cfg.update(_class_name=type(denoiser).__name__, lipscope_adapter="generic", pipeline=type(pipe).__name__)
    net = PipelineNet(pipe, component, call_args or {}, timestep_units(pipe.scheduler))
    return EpsModel(
        net=net, schedule=process, name=name, sample_shape=None, prediction_type=process.prediction_type,
        device=dev, dtype=dt, config=cfg, scheduler_config=dict(pipe.scheduler.config), module=denoiser.eval(),
    )  # fmt: skip


CallPlan = tuple[dict[str, Any], int, float | None, dict[str, Any]]


def _call_kwargs(pipe: Any, net: PipelineNet, model: EpsModel, class_labels, prompts, negative_prompt,
                 prompt_embeds, guidance_scale) -> CallPlan:  # fmt: skip
    """The ``__call__`` arguments of the capture, the number of conditions P, the CFG value the pipeline ran with."""
    sig = inspect.signature(pipe.__call__).parameters
    pname = type(pipe).__name__
    kw: dict[str, Any] = {"num_inference_steps": CAPTURE_STEPS, **net.call_args}
    if "output_type" in sig:
        kw["output_type"] = "latent"
    if "generator" in sig:
        kw["generator"] = torch.Generator(device=model.device).manual_seed(0)
    info: dict[str, Any] = {}
    p = 1
    if class_labels:
        if "class_labels" not in sig:
            raise InputError(f"`model` {model.name} ({pname}) takes no class labels; leave out `class_labels`")
        kw["class_labels"], p = list(class_labels), len(class_labels)
        info["class_labels"] = list(class_labels)
    elif prompt_embeds is not None:
        t = prompt_embeds.tensors if isinstance(prompt_embeds, EncodedPrompts) else (
            read_embeds(prompt_embeds) if isinstance(prompt_embeds, str) else dict(prompt_embeds))  # fmt: skip
        unknown = sorted({k.split(".")[0] for k in t} - set(sig))
        if unknown:
            raise InputError(
                f"`prompt_embeds`: {', '.join(unknown)} not {pname} arguments (its embeddings are "
                f"{', '.join(k for k in sig if 'embeds' in k or 'mask' in k)})"
            )
        given = _as_call_arguments(t, model)
        kw.update(given)
        if "negative_prompt_embeds" in given and "negative_prompt" in sig:
            kw["negative_prompt"] = None  # some pipelines default it to "" and refuse both
        p = _rows(next(iter(given.values())))
        info.update(conditioning="prompt embeddings", keys=sorted(t), prompts=p)
        if isinstance(prompt_embeds, str):
            info["file"] = prompt_embeds
    elif "prompt" in sig:
        prompts = list(prompts or [""])
        kw["prompt"], p = prompts, len(prompts)
        info.update(conditioning="prompts" if any(prompts) else "the empty prompt", prompts=prompts)
    elif prompts or negative_prompt is not None:
        raise InputError(f"`model` {model.name} ({pname}) takes no prompt; leave out `prompt` / `negative_prompt`")
    if negative_prompt is not None:
        if "negative_prompt" not in sig:
            raise InputError(f"`model` {model.name} ({pname}) takes no negative prompt; leave out `negative_prompt`")
        kw["negative_prompt"] = [negative_prompt] * p
        info["negative_prompt"] = negative_prompt
    cfg_param = next((n for n in ("true_cfg_scale", "guidance_scale") if n in sig), None)
    if guidance_scale is not None and not (isinstance(guidance_scale, (int, float)) and math.isfinite(guidance_scale)):
        raise InputError(f"`guidance_scale` must be a finite number (got {guidance_scale!r})")
    if guidance_scale is not None:
        if cfg_param is None:
            raise InputError(f"`model` {model.name} ({pname}) has no guidance scale; leave out `guidance_scale`")
        kw[cfg_param] = float(guidance_scale)
    cfg_value = kw.get(cfg_param) if cfg_param else None
    if cfg_param and cfg_value is None:
        d = sig[cfg_param].default
        cfg_value = d if isinstance(d, (int, float)) else None
    info["guidance"] = {"parameter": cfg_param, "value": cfg_value, "asked": guidance_scale}
    return kw, p, (float(cfg_value) if cfg_value is not None else None), info


def _as_call_arguments(t: dict[str, torch.Tensor], model: EpsModel) -> dict[str, Any]:
    """Embedding tensors as ``__call__`` arguments, on the model's device (floats in its dtype); keys ``name.0``,
    ``name.1``, … make a list (one tensor per prompt, lengths may differ: Z-Image's ``prompt_embeds``)."""
    import re

    def cast(v: torch.Tensor) -> torch.Tensor:
        return v.to(model.device, model.dtype if v.is_floating_point() else v.dtype)

    out: dict[str, Any] = {}
    lists: dict[str, dict[int, torch.Tensor]] = {}
    for k, v in t.items():
        m = re.fullmatch(r"(.+)\.(\d+)", k)
        if m:
            lists.setdefault(m.group(1), {})[int(m.group(2))] = cast(v)
        else:
            out[k] = cast(v)
    for k, items in lists.items():
        if sorted(items) != list(range(len(items))):
            raise InputError(f"`prompt_embeds`: {k}.0, {k}.1, … must be numbered from 0 without gaps")
        out[k] = [items[i] for i in range(len(items))]
    return out


def _rows(v: Any) -> int:
    return len(v) if isinstance(v, list) else int(v.shape[0])


def conditioning(
    model: EpsModel,
    class_labels: list[int] | tuple[int, ...] | None = None,
    prompt_embeds: Any = None,
    guidance_scale: float | None = None,
    prompts: list[str] | None = None,
    negative_prompt: str | None = None,
    **other: Any,
) -> CapturedConditioning:
    """Run the pipeline once on this conditioning, record it and identify what the probe replays."""
    net = model.net
    if not isinstance(net, PipelineNet):
        raise InputError(f"`model` {model.name} is not a generic pipeline")
    pipe, denoiser = net.pipe, getattr(net.pipe, net.component)
    pname = type(pipe).__name__
    kw, p, cfg_value, info = _call_kwargs(pipe, net, model, class_labels, prompts, negative_prompt, prompt_embeds,
                                          guidance_scale)  # fmt: skip
    pipe.set_progress_bar_config(disable=True)  # lipscope's own progress reports the probe
    try:
        rec = record(pipe, denoiser, kw)
    except InputError:
        raise
    except Exception as e:
        raise InputError(
            f"`model` {model.name}: {pname}'s own call failed during the capture ({short_error(e)})"
        ) from e
    try:
        if not rec.steps or rec.steps[0].sample.shape[0] != p:
            raise Unidentified(f"the pipeline's latents have {rec.steps[0].sample.shape[0] if rec.steps else 0} rows "
                               f"for {p} conditions")  # fmt: skip
        ks = [model_step(s, model.schedule, net.kmap) for s in rec.steps]
        call, found = identify_call(rec, ks, denoiser, model.dtype, cfg_value, guidance_scale is not None)
        parts = sum(1 for ws in call.combination.weights for w in ws if w)
        if guidance_scale is not None and parts < 2 and not _embedded(rec, guidance_scale):
            raise Unidentified(f"the pipeline ran no unconditional branch and fed guidance {guidance_scale:g} to no "
                               "input (for true CFG it may need negative prompt embeddings)")  # fmt: skip
        step_diff = verify_process(rec, pipe.scheduler, model.schedule, ks, next_step(model.schedule, net.kmap))
        codec = _codec(pipe, denoiser, kw, rec)
    except Unidentified as e:
        raise InputError(f"`model` {model.name}: cannot probe {pname} generically: {e}") from None
    info.update(
        adapter="generic (the pipeline's own call, recorded once)",
        pipeline=pname,
        denoiser=type(denoiser).__name__,
        capture_call={k: v for k, v in kw.items() if isinstance(v, (int, float, str)) and k != "prompt"},
        model_steps_recorded=ks,
        sample_dtype=str(rec.steps[0].sample.dtype).removeprefix("torch."),
        model_output_dtype=str(rec.steps[0].model_output.dtype).removeprefix("torch."),
        process_check_rel_diff=step_diff,
        **found,
    )
    if guidance_scale is not None:
        info["guidance_scale"] = float(guidance_scale)
    space = Space(tuple(rec.steps[0].sample.shape[1:]), codec)
    return CapturedConditioning({"rows": torch.arange(p)}, None, None, info, call=call, space=space)


def _codec(pipe: Any, denoiser: Any, kw: dict[str, Any], rec: Any) -> Any:
    """The pipeline's autoencoder map (None: no autoencoder); where it cannot be identified, a codec that takes
    precomputed latents only and says why (the denoiser itself is still probed)."""
    if getattr(pipe, "vae", None) is None:
        return None
    try:
        return identify_codec(pipe, denoiser, kw, rec.steps[0].sample, [c.returned for c in rec.calls_of(0)])
    except Unidentified as e:
        log.warning("%s: %s; image data cannot be encoded, give precomputed latents", type(pipe).__name__, e)
        return UnidentifiedCodec(str(e))


def _embedded(rec: Any, w: float) -> bool:
    """Whether the recorded calls feed the guidance value w to the denoiser as an input (guidance-distilled)."""
    for c in rec.calls_of(0):
        for v in _tensors({"a": c.args, "k": c.kwargs}):
            if v.numel() and v.is_floating_point() and torch.all(v == w):
                return True
    return False
