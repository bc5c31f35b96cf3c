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
import json
import logging
import os
import sys
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from .errors import InputError, short_error
from .models import EpsModel, from_callable
from .schedules import Schedule

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


def load_py(
    spec: str, sched_cfg: dict | None, dev: torch.device, dt: torch.dtype, model_args: dict[str, Any] | None = None
) -> EpsModel:
    """Import ``py:module:factory``, call ``factory(**model_args)`` and wrap what it returns."""
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
    elif not callable(obj):
        raise InputError(
            f"`model` {spec}: the factory returned {type(obj).__name__}; it must return an EpsModel, an nn.Module "
            "or a callable eps(x, t)"
        )
    else:
        schedule = obj.schedule if isinstance(getattr(obj, "schedule", None), Schedule) else None
        model = from_callable(obj, schedule, name=spec, scheduler_config=sched_cfg, device=dev, dtype=dt)
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
