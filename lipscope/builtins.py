"""Built-in models that need no download.

Trained by the project (recipes in each ``card.json``; ``scripts/etsdm_digits_evidence.py`` then
``scripts/build_zoo.py`` rebuild them), shipped as diffusers pipeline folders in ``lipscope/zoo/``:

* ``digits-ddpm``: UNet2DModel trained on scikit-learn's digits (8×8), DDPM linear, T = 1000;
* ``digits-etsdm``: its E-TSDM retrofit (t̃ = 100, n = 5, 2000 fine-tuning steps);
* ``digits-control``: the same fine-tune without E-TSDM.

And one closed form:

* ``digits-gaussian``: the exact optimal ε* for a Gaussian fitted to the digits (D = 64). Several
  digit pixels never vary (λ = 0), so ε* inherits the 1/σ blow-up of Theorem 3.1 exactly.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .errors import InputError
from .models import EpsModel

ZOO = Path(__file__).with_name("zoo")
CLOSED_FORMS = {"digits-gaussian": "exact ε* of a Gaussian fitted to scikit-learn digits (8×8), DDPM linear schedule"}
DEFAULT_DATA = "digits"  # every built-in is a digits model


def zoo_names() -> list[str]:
    return sorted(p.name for p in ZOO.iterdir() if (p / "model_index.json").exists()) if ZOO.exists() else []


def card(name: str) -> dict[str, Any]:
    """The model card of a built-in (provenance: data, recipe, steps, seed, loss, probe summary)."""
    if name in CLOSED_FORMS:
        return {"name": f"builtin:{name}", "kind": "closed form", "description": CLOSED_FORMS[name]}
    path = ZOO / name / "card.json"
    if not path.exists():
        raise InputError(f"builtin:{name} is not a built-in model; choose one of: {', '.join(list_builtins())}")
    return json.loads(path.read_text())


def list_builtins() -> list[str]:
    return [*zoo_names(), *CLOSED_FORMS]


def load_builtin(name: str, device: torch.device | str = "cpu", dtype: torch.dtype | str = "float32") -> EpsModel:
    if name in CLOSED_FORMS:
        from .data import digits_array
        from .theory import GaussianMixture, gaussian_eps_model

        g = GaussianMixture.fit(torch.from_numpy(digits_array()))
        # closed forms are cheap and exact in float64 on the CPU, whatever device/dtype was asked for
        return gaussian_eps_model(g, name=f"builtin:{name}")
    if name not in zoo_names():
        raise InputError(f"--model builtin:{name} is not a built-in model; choose one of: {', '.join(list_builtins())}")
    from .models import load_model

    m = load_model(str(ZOO / name), device=device, dtype=dtype)
    m.name = f"builtin:{name}"
    return m
