"""lipscope: find, explain and fix the Lipschitz singularity of diffusion models near t = 0.

Yang et al., "Lipschitz Singularities in Diffusion Models", ICLR 2024 (arXiv 2306.11251).

The public names are imported on first use (PEP 562), so ``import lipscope`` and the command line's ``--help``
do not pay for torch and diffusers.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .budget import step_budget
    from .data import load_data
    from .errors import InputError, ModelOutputError
    from .etsdm import Etsdm
    from .explain import explain
    from .loading import load_model
    from .models import EpsModel, from_callable, from_unet
    from .probe import probe
    from .processes import EDMProcess, FlowProcess, VEProcess, process_from_config
    from .prompts import conditioning_for, encode_prompts
    from .reduction import summary
    from .schedules import NoiseProcess, Schedule, default_schedule, parse_grid, schedule_from_config


def report(runs, out, evals=(), fmt: str = "html"):
    """Write one page (HTML, or markdown with ``fmt="md"``) of probe ``runs`` and evaluate runs ``evals`` to ``out``
    (``lipscope report``; docs/report.md); returns the path and the verdict lines."""
    from .runs.report import report as _report

    return _report(runs, out, evals, fmt)


__version__ = "0.1.0"

# public name → the module that defines it
_WHERE = {
    "step_budget": "budget",
    "load_data": "data",
    "InputError": "errors",
    "ModelOutputError": "errors",
    "Etsdm": "etsdm",
    "explain": "explain",
    "load_model": "loading",
    "EpsModel": "models",
    "from_callable": "models",
    "from_unet": "models",
    "probe": "probe",
    "EDMProcess": "processes",
    "FlowProcess": "processes",
    "VEProcess": "processes",
    "process_from_config": "processes",
    "conditioning_for": "prompts",
    "encode_prompts": "prompts",
    "summary": "reduction",
    "NoiseProcess": "schedules",
    "Schedule": "schedules",
    "default_schedule": "schedules",
    "parse_grid": "schedules",
    "schedule_from_config": "schedules",
}


def __getattr__(name: str) -> Any:
    """``lipscope.probe`` etc.: the public name, imported from its module on first use and kept."""
    where = _WHERE.get(name)
    if where is None:
        raise AttributeError(f"module 'lipscope' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{where}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_WHERE})


class _Package(types.ModuleType):
    """The package object: importing the submodule ``lipscope.probe`` (which Python then binds as the package's
    attribute ``probe``) leaves ``lipscope.probe`` the function, as the public API promises."""

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and _WHERE.get(name) == name and hasattr(value, name):
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


__all__ = [
    "EDMProcess",
    "EpsModel",
    "Etsdm",
    "FlowProcess",
    "InputError",
    "ModelOutputError",
    "NoiseProcess",
    "Schedule",
    "VEProcess",
    "conditioning_for",
    "default_schedule",
    "encode_prompts",
    "explain",
    "from_callable",
    "from_unet",
    "load_data",
    "load_model",
    "parse_grid",
    "probe",
    "report",
    "process_from_config",
    "schedule_from_config",
    "step_budget",
    "summary",
]
