"""The exact derivative ‖∂εθ/∂τ‖ by forward-mode AD (DESIGN.md, "Exact derivative"), batched like FD."""

from __future__ import annotations

import numpy as np
import torch

from .batching import RunStats, check_finite, is_oom, run_batched
from .errors import InputError
from .fwad import forward_ad_patches
from .journal import Journal
from .models import EpsModel
from .points import noisy_inputs


def jvp_norms(
    model: EpsModel,
    x0: torch.Tensor,
    noise: torch.Tensor,
    t: np.ndarray,
    batch_size: int | str = "auto",
    progress: bool = False,
    stats: RunStats | None = None,
    journal: Journal | None = None,
) -> torch.Tensor:
    """‖∂εθ(x_t, t)/∂τ‖₂ by forward-mode AD (``torch.func.jvp``) w.r.t. the timestep input: (n, G).

    x_t is held fixed (drawn at t); the tangent is 1 step, times T for per-unit-τ. Runs inside
    :func:`lipscope.fwad.forward_ad_patches`, which restores the model afterwards.
    """
    n, G = x0.shape[0], len(t)
    t_x = torch.as_tensor(np.asarray(t, dtype=np.float64))
    T = model.T
    _refuse_learned_embedding(model)
    checked = [False]

    def compute(idx: torch.Tensor) -> torch.Tensor:
        j, i = idx // n, idx % n
        x = noisy_inputs(model, x0[i], noise[i], t_x[j])
        tt = t_x[j].to(model.device, torch.float64 if model.dtype == torch.float64 else torch.float32)
        try:
            with torch.no_grad():
                # torch types jvp's result as a 2- or 3-tuple (no overload on has_aux); without has_aux it is 2
                out, tangent = torch.func.jvp(lambda s: model(x, s, i), (tt,), (torch.ones_like(tt),))  # type: ignore[misc]
        except (NotImplementedError, RuntimeError) as e:  # only the JVP itself: not the runner, not the gather
            if is_oom(e):
                raise
            raise InputError(
                f"{model.name} cannot be differentiated in t with forward-mode AD ({str(e).splitlines()[0][:160]}); "
                "use `method` fd"
            ) from e
        check_finite([out, tangent], t_x[j], t_x[j], "output or its t-derivative")
        if not checked[0]:
            checked[0] = True
            _check_tangent_reaches(model, x, tt, tangent, i)
        return torch.linalg.vector_norm(tangent.reshape(idx.numel(), -1).double(), dim=1) * T

    with forward_ad_patches(model.module):
        out = run_batched(model, n * G, 1, compute, batch_size, progress, stats, "jvp", journal)
    return out.reshape(G, n).T.contiguous()


def _refuse_learned_embedding(model: EpsModel) -> None:
    if model.config.get("time_embedding_type") == "learned":
        raise InputError(
            f"{model.name} looks timesteps up in a learned embedding table: ε is not differentiable in t; "
            "use `method` fd"
        )


def _check_tangent_reaches(
    model: EpsModel, x: torch.Tensor, tt: torch.Tensor, tangent: torch.Tensor, rows: torch.Tensor
) -> None:
    """A zero tangent where a finite difference moves means t reaches the network through an integer
    cast or a table: forward AD would silently report 0."""
    if tangent.abs().max() > 0:
        return
    with torch.inference_mode():
        lo = torch.clamp(tt - 1, min=0)
        d = model(x, lo + 1, rows) - model(x, lo, rows)
    if d.abs().max() > 0:
        raise InputError(
            f"{model.name}: the timestep does not reach the network differentiably (d/dt is 0 but ε changes "
            "between steps: an integer cast or embedding table); use `method` fd"
        )
