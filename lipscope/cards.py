"""The cards of the built-in models (``lipscope/zoo/NAME/card.json``) and where their folders are: plain files,
read without torch, so ``lipscope models`` answers at once. The models themselves: :mod:`lipscope.zoo`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import InputError

ZOO = Path(__file__).with_name("zoo")
CLOSED_FORMS = {"digits-gaussian": "exact ε* of a Gaussian fitted to scikit-learn digits (8×8), DDPM linear schedule"}
DEFAULT_DATA = "digits"  # every built-in is a digits model


def zoo_names() -> list[str]:
    return sorted(p.name for p in ZOO.iterdir() if (p / "model_index.json").exists()) if ZOO.exists() else []


def list_builtins() -> list[str]:
    return [*zoo_names(), *CLOSED_FORMS]


def card(name: str) -> dict[str, Any]:
    """The model card of a built-in (provenance: data, recipe, steps, seed, loss, probe summary)."""
    if name in CLOSED_FORMS:
        return {"name": f"builtin:{name}", "kind": "closed form", "description": CLOSED_FORMS[name]}
    path = ZOO / name / "card.json"
    if not path.exists():
        raise InputError(f"builtin:{name} is not a built-in model; choose one of: {', '.join(list_builtins())}")
    return json.loads(path.read_text())


def folder(name: str) -> Path:
    """The pipeline folder of a zoo model."""
    if name not in zoo_names():
        raise InputError(f"builtin:{name} is not a built-in model; choose one of: {', '.join(list_builtins())}")
    return ZOO / name
