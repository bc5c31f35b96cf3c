"""Built-in models that need no download.

``digits-gaussian``: the exact optimal noise predictor ε* for a Gaussian fitted to scikit-learn's
digits (8×8, D = 64) under the DDPM linear schedule (T = 1000). Several digit pixels never vary
(λ = 0), so ε* inherits the 1/σ blow-up of Theorem 3.1 exactly: a reference curve for the probe.
"""

from __future__ import annotations

import torch

from .errors import InputError
from .models import EpsModel

BUILTINS = {
    "digits-gaussian": "exact ε* of a Gaussian fitted to scikit-learn digits (8×8), DDPM linear schedule",
}
DEFAULT_DATA = {"digits-gaussian": "digits"}


def load_builtin(name: str, device: torch.device | str = "cpu", dtype: torch.dtype | str = "float64") -> EpsModel:
    if name not in BUILTINS:
        raise InputError(f"--model builtin:{name} is not a built-in model; choose one of: {', '.join(BUILTINS)}")
    from .data import digits_array
    from .theory import GaussianMixture, gaussian_eps_model

    g = GaussianMixture.fit(torch.from_numpy(digits_array()))
    # closed forms are cheap and exact in float64 on the CPU, whatever device/dtype was asked for
    return gaussian_eps_model(g, name=f"builtin:{name}")
