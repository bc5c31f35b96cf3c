"""Few-step ODE samplers as diffusers implements them, run from a given x_T in float64 (VP and flow matching).

``SAMPLERS``: ``ddim`` (η = 0), ``dpmsolver++:K`` (DPM-Solver++(KM), K = 1, 2, 3), ``euler``, ``heun``, ``unipc:K``
(UniPC-bh2 of order K; ``unipc`` = order 2). VP samplers are built on the model's own betas with trailing timestep
spacing (every one starts at step T − 1) and end at σ = 0 (DDIM ``set_alpha_to_one``, ``final_sigmas_type='zero'``),
ε-prediction, no clipping (Gaussian data is unbounded). Flow samplers: ``ddim`` and ``euler`` are diffusers'
``FlowMatchEulerDiscreteScheduler`` (DDIM's update is exactly the Euler flow step), ``heun`` its Heun variant, and
DPM-Solver++ / UniPC with ``use_flow_sigmas`` and ``prediction_type='flow_prediction'`` (they start at σ = 1 − 1/T,
the flow-match schedulers at σ = 1: :func:`start_step` says which, so the exact ODE starts where the sampler does).

The loop is a pipeline's: ``x ← x_T · init_noise_sigma``; per timestep ``scale_model_input``, the model at that
timestep, ``step`` (flow: the network is fed σ·T of the step's own σ, see :func:`run`). A sampler's NFE is the
number of model calls (Heun: 2·steps − 1), counted, not assumed.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

import torch

from .errors import InputError
from .models import EpsModel
from .processes import FlowProcess
from .sampling import betas_of
from .schedules import Schedule

SAMPLERS = ("ddim", "dpmsolver++:1", "dpmsolver++:2", "dpmsolver++:3", "euler", "heun", "unipc:2", "unipc:3")


def parse_sampler(name: str) -> str:
    """A sampler name in canonical form (``dpmsolver++`` → ``dpmsolver++:2``, ``unipc`` → ``unipc:2``)."""
    n = name.strip().lower()
    n = {"dpmsolver++": "dpmsolver++:2", "dpmsolver": "dpmsolver++:2", "unipc": "unipc:2"}.get(n, n)
    if n not in SAMPLERS:
        raise InputError(f"`samplers` {name!r} not known; use {', '.join(SAMPLERS)} (dpmsolver++ = dpmsolver++:2)")
    return n


def steps_for(name: str, nfe: int) -> int:
    """The number of scheduler steps that spend about ``nfe`` model calls (Heun: 2·steps − 1 ≤ nfe)."""
    if not isinstance(nfe, int) or nfe < 1:
        raise InputError(f"`nfe` must be whole numbers ≥ 1 (got {nfe!r})")
    if name == "heun":
        if nfe < 3:
            raise InputError("`nfe` below 3 cannot run Heun (one step costs 2 model calls, the last 1); use ≥ 3")
        return (nfe + 1) // 2
    return nfe


def make_scheduler(name: str, model: EpsModel, steps: int) -> Any:
    """The diffusers scheduler of sampler ``name`` for ``model``'s process, timesteps set for ``steps``."""
    import diffusers as d

    name = parse_sampler(name)
    kind, _, order = name.partition(":")
    if steps > model.T:
        raise InputError(f"`nfe` {steps} steps is more than the model's T = {model.T}")
    if isinstance(model.schedule, FlowProcess):
        cfg = {k: v for k, v in model.scheduler_config.items() if not k.startswith("_")}
        if cfg.get("use_dynamic_shifting"):
            raise InputError(
                "ground truth sampling needs a fixed timestep shift; the model's config uses a dynamic one"
            )
        shift = float(cfg.get("shift", 1.0))
        flow = {"num_train_timesteps": model.T, "prediction_type": "flow_prediction", "use_flow_sigmas": True,
                "flow_shift": shift, "final_sigmas_type": "zero"}  # fmt: skip
        if kind in ("ddim", "euler", "heun"):
            cls = d.FlowMatchHeunDiscreteScheduler if kind == "heun" else d.FlowMatchEulerDiscreteScheduler
            keys = inspect.signature(cls.__init__).parameters
            s = cls.from_config({k: v for k, v in cfg.items() if k in keys})
        elif kind == "dpmsolver++":
            s = d.DPMSolverMultistepScheduler(**flow, algorithm_type="dpmsolver++", solver_order=int(order))
        else:
            s = d.UniPCMultistepScheduler(**flow, solver_order=int(order))
    elif isinstance(model.schedule, Schedule):
        vp = {"num_train_timesteps": model.T, "trained_betas": betas_of(model), "prediction_type": "epsilon",
              "timestep_spacing": "trailing"}  # fmt: skip
        if kind == "ddim":
            s = d.DDIMScheduler(**vp, clip_sample=False, set_alpha_to_one=True)
        elif kind == "dpmsolver++":
            s = d.DPMSolverMultistepScheduler(**vp, algorithm_type="dpmsolver++", solver_order=int(order),
                                              final_sigmas_type="zero")  # fmt: skip
        elif kind == "euler":
            s = d.EulerDiscreteScheduler(**vp, final_sigmas_type="zero")
        elif kind == "heun":
            s = d.HeunDiscreteScheduler(**vp)
        else:
            s = d.UniPCMultistepScheduler(**vp, solver_order=int(order), final_sigmas_type="zero")
    else:
        raise InputError(f"sampling a {model.schedule.kind} process is not supported here (VP and flow only)")
    s.set_timesteps(steps)
    return s


def start_step(name: str, model: EpsModel, steps: int) -> float:
    """The model step (fractional for flow) at which sampler ``name`` starts from x_T: VP T − 1 (trailing
    spacing), flow σ_0·T with the scheduler's first σ."""
    s = make_scheduler(name, model, steps)
    if isinstance(model.schedule, FlowProcess):
        return float(s.sigmas[0]) * model.T
    return float(s.timesteps[0])


def run(model: EpsModel, name: str, nfe: int, x_t: torch.Tensor, batch_size: int = 256) -> tuple[torch.Tensor, int]:
    """x̂0 of sampler ``name`` at ``nfe`` model calls from x_T (float64 (N, *shape), the process state at
    :func:`start_step`), in float64; and the NFE actually spent per sample."""
    flow = isinstance(model.schedule, FlowProcess)
    if model.target != ("velocity" if flow else "eps"):
        model = dataclasses.replace(model, target="velocity" if flow else "eps")
    steps = steps_for(name, nfe)
    outs, calls = [], 0
    with torch.inference_mode():
        for lo in range(0, x_t.shape[0], batch_size):
            sched = make_scheduler(name, model, steps)  # multistep solvers keep per-run state
            x = x_t[lo : lo + batch_size].double() * float(getattr(sched, "init_noise_sigma", 1.0))
            rows = torch.arange(lo, lo + x.shape[0])
            calls = 0
            for t in sched.timesteps:
                inp = sched.scale_model_input(x, t) if hasattr(sched, "scale_model_input") else x
                # flow: the network at σ·T of the σ the step uses (DPM-Solver++/UniPC's timesteps are σ·T truncated
                # to integers; fed those, the field would sit up to 1/T in σ away from where the update assumes it)
                k = float(sched.sigmas[sched.step_index or 0]) * model.T if flow else float(t)
                out = model(inp, torch.full((x.shape[0],), k, dtype=torch.float64), rows).double()
                calls += 1
                x = sched.step(out, t, x).prev_sample.double()
            if not torch.isfinite(x).all():
                raise RuntimeError(f"sampler {name} at {nfe} NFE gave non-finite samples on {model.name}")
            outs.append(x)
    return torch.cat(outs), calls


def nfe_of(name: str, nfe: int) -> int:
    """Model calls of sampler ``name`` asked for ``nfe`` (Heun: 2·steps − 1)."""
    steps = steps_for(name, nfe)
    return 2 * steps - 1 if name == "heun" else steps


__all__ = ["SAMPLERS", "make_scheduler", "nfe_of", "parse_sampler", "run", "start_step", "steps_for"]
