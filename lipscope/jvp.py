"""The exact derivative ‖∂εθ/∂τ‖ by forward-mode AD (DESIGN.md, "Exact derivative"), batched like FD."""

from __future__ import annotations

import numpy as np
import torch

from .batching import RunStats, check_finite, run_batched
from .fwad import check_tangent_reaches, forward_ad_patches, jvp, refuse_learned_embedding
from .journal import Journal
from .models import EpsModel
from .points import noisy_inputs


def time_dtype(model: EpsModel) -> torch.dtype:
    """The dtype timesteps are fed in (float64 for a float64 model, else float32)."""
    return torch.float64 if model.dtype == torch.float64 else torch.float32


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
    """‖∂εθ(x_t, t)/∂τ‖₂ by forward-mode AD (dual tensors, :func:`lipscope.fwad.jvp`) w.r.t. the timestep input: (n, G).

    x_t is held fixed (drawn at t); the tangent is 1 step, times T for per-unit-τ. Runs inside
    :func:`lipscope.fwad.forward_ad_patches`, which restores the model afterwards.
    """
    n, G = x0.shape[0], len(t)
    t_x = torch.as_tensor(np.asarray(t, dtype=np.float64))
    T = model.T
    refuse_learned_embedding(model.name, model.config)
    checked = [False]

    def compute(idx: torch.Tensor) -> torch.Tensor:
        j, i = idx // n, idx % n
        x = noisy_inputs(model, x0[i], noise[i], t_x[j])
        tt = t_x[j].to(model.device, time_dtype(model))
        out, tangent = jvp(model.name, lambda s: model(x, s, i), (tt,), (torch.ones_like(tt),))
        check_finite([out, tangent], t_x[j], t_x[j], "output or its t-derivative")
        if not checked[0]:
            checked[0] = True
            check_tangent_reaches(model, model.name, x, tt, tangent, i)
        return torch.linalg.vector_norm(tangent.reshape(idx.numel(), -1).double(), dim=1) * T

    with forward_ad_patches(model.module):
        out = run_batched(model, n * G, 1, compute, batch_size, progress, stats, "jvp", journal)
    return out.reshape(G, n).T.contiguous()
