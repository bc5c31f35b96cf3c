"""Resolved options → run folder, shared by the CLI and the Python API.

Each command is one frozen options dataclass: the dataclass *is* the call (``run_probe(opts)``) and
its resolved form (defaults filled in) is what ``run.json`` records under ``options``. The CLI only
builds the dataclass from flags and prints the result; from Python::

    from lipscope.runs import ProbeOptions, run_probe
    res = run_probe(ProbeOptions(model="google/ddpm-cifar10-32", out="runs/cifar", samples=64))
    res.table, res.summary, res.meta   # lipschitz.csv, the printed summary, run.json

All files of a run are prepared in memory first and then written atomically (:mod:`lipscope.io`).
"""

from .common import ModelOptions, check_out_dir, model_info
from .probe import ProbeOptions, ProbeResult, compare_runs, read_probe_run, run_probe
from .sample import EvaluateOptions, EvaluateResult, SampleOptions, run_evaluate, run_sample
from .theory import TheoryOptions, TheoryResult, run_theory
from .train import TrainOptions, run_training

__all__ = [
    "EvaluateOptions",
    "EvaluateResult",
    "ModelOptions",
    "ProbeOptions",
    "ProbeResult",
    "SampleOptions",
    "TheoryOptions",
    "TheoryResult",
    "TrainOptions",
    "check_out_dir",
    "compare_runs",
    "model_info",
    "read_probe_run",
    "run_evaluate",
    "run_probe",
    "run_sample",
    "run_theory",
    "run_training",
]
