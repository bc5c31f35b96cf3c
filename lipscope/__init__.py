"""lipscope: find, explain and fix the Lipschitz singularity of diffusion models near t = 0.

Yang et al., "Lipschitz Singularities in Diffusion Models", ICLR 2024 (arXiv 2306.11251).
"""

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
