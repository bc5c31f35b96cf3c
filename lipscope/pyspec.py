"""``py:package.module:factory`` specs → EpsModel: import the factory, call it with ``model_args``.

The factory returns an ``EpsModel``, an ``nn.Module`` or any callable ``eps(x, t)`` (t: float
tensor (B,) in model steps). ``model_args`` are its keyword arguments: a mapping, or ``key=value``
strings (``--model-arg scale=2 --model-arg name=x``) whose values are parsed as JSON when they parse
(numbers, true/false, null, lists, objects) and kept as strings otherwise.

When the model's input shape is known, the network is probed once at load
(:func:`detect_rounding`): a network that fails on float t is refused in one line,
and an adapter that rounds t to whole steps is flagged (``EpsModel.rounds_timesteps``).
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import json
import logging
import os
import sys
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from .conditioning import Conditioning
from .errors import InputError, short_error
from .models import EpsModel, from_callable
from .processes import process_from_config
from .schedules import NoiseProcess, Schedule

log = logging.getLogger("lipscope")


def parse_model_args(args: Mapping[str, Any] | Iterable[str] | None) -> dict[str, Any]:
    """``key=value`` strings (or a mapping, returned as a dict) → factory keyword arguments."""
    if args is None:
        return {}
    if isinstance(args, Mapping):
        out = dict(args)
    else:
        if isinstance(args, str):
            args = [args]
        out = {}
        for item in args:
            key, sep, raw = str(item).partition("=")
            key = key.strip()
            if not sep or not key.isidentifier():
                raise InputError(f"`model_args` {item!r}: use key=value with a Python identifier as the key")
            if key in out:
                raise InputError(f"`model_args` gives {key} twice; give each key once")
            try:
                out[key] = json.loads(raw)
            except ValueError:
                out[key] = raw
    bad = [k for k in out if not (isinstance(k, str) and k.isidentifier())]
    if bad:
        raise InputError(f"`model_args` key {bad[0]!r} is not a Python identifier")
    return out


def refuse_prediction_type(spec: str, prediction_type: str | None) -> None:
    """`prediction_type` is for py: specs only (other specs read theirs from their configs)."""
    if prediction_type is not None:
        raise InputError(
            f"`prediction_type` is for py: models; `model` {spec} takes it from its scheduler config (give another "
            "`scheduler_config` to change it)"
        )


def class_label_spec(obj: Any, spec: str) -> dict[str, Any] | None:
    """How a network takes class labels, when its call has a ``class_labels`` parameter: ``num_classes`` and
    ``null_class`` (its ``num_classes`` and ``null_class_label`` attributes, or None) and whether a label is
    ``required`` (no default); None for a network without one (:func:`lipscope.conditioning.class_conditioning`)."""
    fn = obj.forward if isinstance(obj, torch.nn.Module) else obj
    try:
        p = inspect.signature(fn).parameters.get("class_labels")
    except (TypeError, ValueError):  # a builtin or C callable: no signature to read
        return None
    if p is None:
        return None
    out = {"num_classes": getattr(obj, "num_classes", None), "null_class": getattr(obj, "null_class_label", None)}
    for k, v in out.items():
        if v is not None and not (isinstance(v, int) and not isinstance(v, bool) and v >= 0):
            raise InputError(f"`model` {spec}: the network's {k} must be an integer ≥ 0, got {v!r}")
    return {**out, "required": p.default is inspect.Parameter.empty}


def detect_rounding(model: EpsModel) -> bool:
    """Whether the network rounds t to whole steps: one probe on a fixed tiny input of ``sample_shape``.

    ε(x, k + 0.5) equal to ε(x, k) or ε(x, k + 1) exactly while ε(x, k + 1) ≠ ε(x, k), k a mid-range
    integer (all three converted at the same true t, so only the network's use of its condition differs).
    A network that fails on float t raises the one-line InputError of :meth:`EpsModel.at_condition`.
    """
    if model.sample_shape is None:
        return False
    n = 1
    for d in model.sample_shape:
        n *= int(d)
    x = torch.linspace(-1.0, 1.0, n, dtype=torch.float64).reshape(1, *model.sample_shape)
    k = float(max(model.T // 2, 1))
    t = torch.tensor([k])
    if (labels := model.config.get("class_labels")) is not None:  # a class-conditional network: one label
        label = labels["null_class"] if labels["null_class"] is not None else 0
        model = dataclasses.replace(model, conditioning=Conditioning({"class_labels": torch.tensor([label])}))
    with torch.no_grad():
        lo, mid, hi = (model.at_condition(x, torch.tensor([c]), t) for c in (k, k + 0.5, k + 1.0))
    return not torch.equal(lo, hi) and (torch.equal(mid, lo) or torch.equal(mid, hi))


def import_factory(spec: str, param: str, usage: str, builds: str) -> tuple[Any, str, str, Any]:
    """(module, module name, factory name, factory) of ``py:module:factory``, imported from the working folder or
    PYTHONPATH; every failure is one line naming ``param`` (``usage``: the form to use; ``builds``: what the
    factory builds, for a missing one)."""
    mod_name, _, fn_name = spec[3:].partition(":")
    if not mod_name or not fn_name:
        raise InputError(f"`{param}` {spec}: use {usage}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise InputError(f"`{param}` {spec}: cannot import {mod_name} ({short_error(e)}); is it on PYTHONPATH?") from e
    except (Exception, SystemExit) as e:  # the module's own code failed: one line, no traceback
        raise InputError(f"`{param}` {spec}: importing {mod_name} raised {short_error(e)}; fix the module") from e
    factory = getattr(mod, fn_name, None)
    if factory is None or not callable(factory):
        raise InputError(f"`{param}` {spec}: {mod_name} has no callable {fn_name}; name the function that {builds}")
    return mod, mod_name, fn_name, factory


def network_process(obj: Any, spec: str) -> tuple[NoiseProcess | None, dict[str, Any] | None]:
    """(process, scheduler config) a network carries as ``.schedule``: a lipscope NoiseProcess (no config), or a
    diffusers scheduler (its config); (None, None) without one. Anything else there is refused by name."""
    s = getattr(obj, "schedule", None)
    if s is None or isinstance(s, NoiseProcess):
        return s, None
    cfg = getattr(s, "config", None)
    if type(s).__name__.endswith("Scheduler") and isinstance(cfg, Mapping):  # a diffusers scheduler object
        cfg = {**dict(cfg), "_class_name": type(s).__name__}
        return process_from_config(cfg), cfg
    raise InputError(
        f"`model` {spec}: the network's .schedule is a {type(s).__name__}, not a lipscope NoiseProcess (Schedule, "
        "FlowProcess, VEProcess, EDMProcess) or a diffusers scheduler; attach one of those, or remove it and give "
        "`scheduler_config`"
    )


def _one_process(spec: str, own: NoiseProcess, sched_cfg: dict | None) -> None:
    """Refuse a `scheduler_config` that names another process than the one the network carries."""
    if sched_cfg is None:
        return
    given = process_from_config(sched_cfg)
    same = given.describe() == own.describe()
    if same and isinstance(own, Schedule) and isinstance(given, Schedule):  # VP: the same ᾱ too
        same = torch.allclose(own.log_alpha_bar, given.log_alpha_bar, rtol=1e-10, atol=0)
    if not same:

        def what(p: NoiseProcess) -> str:
            return f"{p.kind}, T = {p.T}, predicting {p.prediction_type}"

        raise InputError(
            f"`model` {spec} carries its own process ({what(own)}) and `scheduler_config` gives another "
            f"({what(given)}); drop `scheduler_config` or the network's .schedule"
        )


def load_py(
    spec: str,
    sched_cfg: dict | None,
    dev: torch.device,
    dt: torch.dtype,
    model_args: dict[str, Any] | None = None,
    prediction_type: str | None = None,
) -> EpsModel:
    """Import ``py:module:factory``, call ``factory(**model_args)`` and wrap what it returns: under the process the
    network carries (``.schedule``), else ``sched_cfg``'s, else DDPM's; predicting what that process states, else
    ``prediction_type``, else ε (:func:`lipscope.models.resolve_prediction_type`)."""
    kwargs = dict(model_args or {})
    _, mod_name, fn_name, factory = import_factory(spec, "model", "py:package.module:factory", "builds the model")
    call = f"{mod_name}:{fn_name}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())})"
    try:
        obj = factory(**kwargs)
    except InputError:
        raise
    except TypeError as e:
        fix = "fix the factory"
        if e.__traceback__ is not None and e.__traceback__.tb_next is None:  # raised by the call: args do not fit
            fix = "give `model_args` (key=value) that match its parameters"
        raise InputError(f"`model` {spec}: the factory {call} raised {short_error(e)}; {fix}") from e
    except (Exception, SystemExit) as e:
        raise InputError(f"`model` {spec}: the factory {call} raised {short_error(e)}; fix the factory") from e
    if isinstance(obj, EpsModel):
        model = obj
        _one_process(spec, model.schedule, sched_cfg)
        if prediction_type not in (None, model.prediction_type):
            raise InputError(
                f"`prediction_type` {prediction_type} contradicts the EpsModel {spec} returns (it predicts "
                f"{model.prediction_type}); drop `prediction_type` or change the factory"
            )
    elif not callable(obj):
        raise InputError(
            f"`model` {spec}: the factory returned {type(obj).__name__}; it must return an EpsModel, an nn.Module "
            "or a callable eps(x, t)"
        )
    else:
        schedule, cfg = network_process(obj, spec)
        if schedule is not None:
            _one_process(spec, schedule, sched_cfg)
        cfg = cfg if cfg is not None else sched_cfg
        model = from_callable(
            obj, schedule, name=spec, scheduler_config=cfg, device=dev, dtype=dt, prediction_type=prediction_type
        )
        if (labels := class_label_spec(obj, spec)) is not None:
            model = dataclasses.replace(model, config={**model.config, "class_labels": labels})
    if model.sample_shape is None:
        log.info("%s: no sample_shape, so whether the adapter rounds t is not checked at load", spec)
        return model
    rounds = detect_rounding(model)
    if rounds:
        log.warning(
            "%s rounds t to whole steps inside the adapter (ε at k + 0.5 equals ε at k or k + 1): "
            "fractional FD steps give K = 0 or double K; use whole steps",
            spec,
        )
    return dataclasses.replace(model, rounds_timesteps=rounds) if rounds != model.rounds_timesteps else model
