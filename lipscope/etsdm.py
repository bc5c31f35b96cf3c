"""E-TSDM (Yang et al., 2306.11251, Sec. 4): share the timestep condition within sub-intervals near 0.

f(t) = (t̃/n)·⌊t·n/t̃⌋ for t < t̃, f(t) = t otherwise (defaults t̃ = 100 of T = 1000, n = 5). The
noise schedule is unchanged: training noises at the true t and the network sees f(t).
If n does not divide t̃ the sub-interval starts are the (fractional) multiples of t̃/n: the rule
is the same formula, applied to float timesteps.
"""

from __future__ import annotations

import torch

from .errors import InputError


def etsdm_map(t: torch.Tensor, t_tilde: float = 100.0, n: int = 5) -> torch.Tensor:
    """The E-TSDM condition f(t), vectorised over float tensors (t in model steps)."""
    if not t_tilde > 0 or int(n) != n or n < 1:
        raise InputError(f"E-TSDM needs t_tilde > 0 and an integer n ≥ 1 (got t_tilde={t_tilde}, n={n})")
    t = torch.as_tensor(t)
    w = t_tilde / n
    left = torch.floor(t * (n / t_tilde)) * w
    return torch.where(t < t_tilde, left, t)


def etsdm_boundaries(t_tilde: float = 100.0, n: int = 5) -> list[float]:
    """Sub-interval starts 0, t̃/n, …, t̃ (the last one is where the map becomes the identity)."""
    return [t_tilde * i / n for i in range(n + 1)]
