"""E-TSDM (Yang et al., 2306.11251, Sec. 4): share the timestep condition within sub-intervals near 0.

f(t) = (t̃/n)·⌊t·n/t̃⌋ for t < t̃, f(t) = t otherwise (defaults t̃ = 100 of T = 1000, n = 5). The
noise schedule is unchanged: training noises at the true t and the network sees f(t).
If n does not divide t̃ the sub-interval starts are the (fractional) multiples of t̃/n: the rule
is the same formula, applied to float timesteps. Below 0 (an EDM σ under σ_min, which EDM's log-normal training
density draws) the first sub-interval continues: f = 0.

The map lives on lipscope's model-step axis k for every process. VP and flow denoisers are fed k (in their own
units); VE and EDM denoisers are fed σ or c_noise = ¼ ln σ, so their E-TSDM classes carry the process's axis
(``etsdm_axis`` in the config: VE k = T ln(σ/σ_min)/ln(σ_max/σ_min), linear in ln σ; EDM k = the step of the
model's Karras or exponential ramp) and map fed → k → f(k) → fed (docs/etsdm.md).
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import UNet2DModel

# diffusers' pipeline loader finds a component's load method by looking these base classes up in the
# component's own module (as it does for transformers): keep them importable from lipscope.etsdm.
from diffusers.models.modeling_utils import ModelMixin  # noqa: F401

from .errors import InputError
from .sigmas import edm_sigma, edm_step, ve_sigma, ve_step


def etsdm_map(t: torch.Tensor, t_tilde: float = 100.0, n: int = 5) -> torch.Tensor:
    """The E-TSDM condition f(t), vectorised over float tensors (t in model steps)."""
    if not t_tilde > 0 or int(n) != n or n < 1:
        raise InputError(f"E-TSDM needs t_tilde > 0 and an integer n ≥ 1 (got t_tilde={t_tilde}, n={n})")
    t = torch.as_tensor(t)
    w = t_tilde / n
    left = torch.floor(t.clamp(min=0) * (n / t_tilde)) * w
    return torch.where(t < t_tilde, left, t)


AXES = ("ve", "edm")  # processes whose denoisers are fed a function of σ, not the step


def check_axis(axis: Any) -> None:
    """Refuse an ``etsdm_axis`` that does not describe a VE or EDM process (what :func:`fed_to_step` reads)."""
    keys = {"ve": {"process", "T", "sigma_min", "sigma_max"}, "edm": {"process", "T", "sigma_min", "sigma_max", "rho",
                                                                      "ramp"}}  # fmt: skip
    ok = isinstance(axis, dict) and axis.get("process") in AXES and set(axis) == keys[axis["process"]]
    if not ok or not (0 < axis["sigma_min"] < axis["sigma_max"] and int(axis["T"]) >= 2):
        raise InputError(f"`axis` {axis!r}: give lipscope.processes.etsdm_axis(process) of a VE or EDM process")


def fed_to_step(fed: torch.Tensor, axis: dict[str, Any]) -> torch.Tensor:
    """The model step k (float64) of what a VE (σ) or EDM (c_noise = ¼ ln σ) denoiser is fed."""
    a = axis
    if a["process"] == "ve":
        return ve_step(fed, int(a["T"]), a["sigma_min"], a["sigma_max"])
    return edm_step(torch.exp(4 * fed.to(torch.float64)), int(a["T"]), a["sigma_min"], a["sigma_max"], a["rho"],
                    a["ramp"])  # fmt: skip


def step_to_fed(k: torch.Tensor, axis: dict[str, Any]) -> torch.Tensor:
    """What a VE (σ) or EDM (c_noise = ¼ ln σ) denoiser is fed at model step k (float64)."""
    a = axis
    if a["process"] == "ve":
        return ve_sigma(k, int(a["T"]), a["sigma_min"], a["sigma_max"])
    return 0.25 * torch.log(edm_sigma(k, int(a["T"]), a["sigma_min"], a["sigma_max"], a["rho"], a["ramp"]))


def etsdm_boundaries(t_tilde: float = 100.0, n: int = 5) -> list[float]:
    """Sub-interval starts 0, t̃/n, …, t̃ (the last one is where the map becomes the identity)."""
    return [t_tilde * i / n for i in range(n + 1)]


@dataclass(frozen=True)
class Etsdm:
    """The E-TSDM settings a model carries: the one place its map lives (t̃ and n in model steps)."""

    t_tilde: float = 100.0
    n: int = 5

    def __post_init__(self) -> None:
        etsdm_map(torch.zeros(1), self.t_tilde, self.n)  # validates t_tilde and n

    @property
    def width(self) -> float:
        """Sub-interval width t̃/n."""
        return self.t_tilde / self.n

    def map(self, t: torch.Tensor) -> torch.Tensor:
        """f(t): the condition the network is fed for true step t."""
        return etsdm_map(t, self.t_tilde, self.n)

    def boundaries(self) -> list[float]:
        """Sub-interval starts 0, t̃/n, …, t̃."""
        return etsdm_boundaries(self.t_tilde, self.n)

    def crosses(self, t_a: np.ndarray, t_b: np.ndarray) -> np.ndarray:
        """True where (t_a, t_b] contains a sub-interval boundary t̃/n, 2t̃/n, …, t̃."""
        b = np.asarray(self.boundaries()[1:])
        return np.asarray(((np.asarray(t_a)[:, None] < b[None]) & (b[None] <= np.asarray(t_b)[:, None])).any(1))


# ---- diffusers denoisers that carry their own map ------------------------------------------------

# denoiser class → the denoiser's timestep units per model step k (k = τ·T, what lipscope's map is written in):
# 1 for networks fed the step (UNets, DiT, PixArt) or σ·1000 (SD3); 1/1000 for Flux, which its pipeline feeds σ
UNITS_PER_STEP: dict[str, float] = {
    "UNet2DModel": 1.0,
    "UNet2DConditionModel": 1.0,
    "DiTTransformer2DModel": 1.0,
    "PixArtTransformer2DModel": 1.0,
    "SD3Transformer2DModel": 1.0,
    "FluxTransformer2DModel": 1e-3,
}


class _ETSDMForward:
    """The forward of every E-TSDM denoiser: the ``timestep`` argument is replaced by f(timestep)."""

    config: Any
    _timestep_index: int  # position of ``timestep`` in the base class's forward (self excluded)

    def condition(self, timestep: Any) -> torch.Tensor:
        """f(timestep) in the denoiser's own timestep units: integer timesteps become float32; half-precision ones
        (Flux pipelines cast σ to the latents' dtype) are mapped in float32 and cast back."""
        t = torch.as_tensor(timestep)
        t_tilde, n, axis = float(self.config.etsdm_t_tilde), int(self.config.etsdm_n), axis_of(self)
        if axis is not None:  # VE σ / EDM c_noise: to the model step, map, back (float64), in the fed dtype
            fed = etsdm_map(fed_to_step(t.to(torch.float64), axis), t_tilde, n)
            return step_to_fed(fed, axis).to(t.dtype if t.is_floating_point() else torch.float32)
        if not t.is_floating_point():
            return etsdm_map(t.to(torch.float32), t_tilde, n)
        wide = t.to(torch.float32) if t.dtype in (torch.float16, torch.bfloat16) else t
        return etsdm_map(wide, t_tilde, n).to(t.dtype)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        i = self._timestep_index
        if "timestep" in kwargs:
            kwargs["timestep"] = self.condition(kwargs["timestep"])
        elif len(args) > i:
            args = (*args[:i], self.condition(args[i]), *args[i + 1 :])
        return super().forward(*args, **kwargs)  # type: ignore[misc]

    def forward_condition(self, *args: Any, **kwargs: Any) -> Any:
        """The network at an explicit condition (no map): what lipscope's adapter and training loss call."""
        return super().forward(*args, **kwargs)  # type: ignore[misc]


def _etsdm_class(base: Any) -> Any:
    """``ETSDM<base>``: ``base`` whose forward feeds f(timestep); its config adds ``etsdm_t_tilde``, ``etsdm_n``
    (in the denoiser's own timestep units) and names the class, so a saved model is never read as ``base``."""
    name = f"ETSDM{base.__name__}"
    default = 100.0 * UNITS_PER_STEP[base.__name__]

    def __init__(
        self, *args: Any, etsdm_t_tilde: float = default, etsdm_n: int = 5, etsdm_axis: Any = None, **kwargs: Any
    ) -> None:
        base.__init__(self, *args, **kwargs)
        etsdm_map(torch.zeros(1), etsdm_t_tilde, etsdm_n)  # validates the settings
        self.register_to_config(etsdm_t_tilde=float(etsdm_t_tilde), etsdm_n=int(etsdm_n))
        if etsdm_axis is not None:  # VE / EDM: t̃ in model steps on this axis (kept out of VP configs)
            check_axis(etsdm_axis)
            self.register_to_config(etsdm_axis=dict(etsdm_axis))

    # diffusers reads a model's config keys from its __init__ signature: the base's, then ours
    sig = inspect.signature(base.__init__)
    params = [p for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    ours = [inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY, default=v) for k, v in
            (("etsdm_t_tilde", default), ("etsdm_n", 5), ("etsdm_axis", None))]  # fmt: skip
    __init__.__signature__ = sig.replace(parameters=[*params, *ours])  # type: ignore[attr-defined]
    __init__.__qualname__ = f"{name}.__init__"
    fwd = [p for p in inspect.signature(base.forward).parameters if p != "self"]
    doc = (
        f"``{base.__name__}`` whose forward feeds the network f(timestep) (E-TSDM, Sec. 4); see :mod:`lipscope.etsdm`."
    )

    def forward(self: Any, *args: Any, **kwargs: Any) -> Any:
        return _ETSDMForward.forward(self, *args, **kwargs)

    forward.__signature__ = inspect.signature(base.forward)  # type: ignore[attr-defined]  # hooks bind by name
    forward.__qualname__ = f"{name}.forward"
    attrs = {"__init__": __init__, "forward": forward, "__module__": __name__, "__qualname__": name, "__doc__": doc,
             "_timestep_index": fwd.index("timestep")}  # fmt: skip
    return type(name, (_ETSDMForward, base), attrs)


def _diffusers_class(name: str) -> Any:
    import diffusers

    return getattr(diffusers, name)


# one class per supported denoiser, importable by name: model_index.json says ["lipscope.etsdm", "ETSDM…"]
ETSDMUNet2DModel = _etsdm_class(UNet2DModel)
ETSDMUNet2DConditionModel = _etsdm_class(_diffusers_class("UNet2DConditionModel"))
ETSDMDiTTransformer2DModel = _etsdm_class(_diffusers_class("DiTTransformer2DModel"))
ETSDMPixArtTransformer2DModel = _etsdm_class(_diffusers_class("PixArtTransformer2DModel"))
ETSDMSD3Transformer2DModel = _etsdm_class(_diffusers_class("SD3Transformer2DModel"))
ETSDMFluxTransformer2DModel = _etsdm_class(_diffusers_class("FluxTransformer2DModel"))
ETSDM_CLASSES: dict[str, Any] = {
    c.__name__: c
    for c in (
        ETSDMUNet2DModel,
        ETSDMUNet2DConditionModel,
        ETSDMDiTTransformer2DModel,
        ETSDMPixArtTransformer2DModel,
        ETSDMSD3Transformer2DModel,
        ETSDMFluxTransformer2DModel,
    )  # fmt: skip
}


def _base_name(module: object) -> str | None:
    """The diffusers class an E-TSDM denoiser (or a plain one) is built on, when it is one lipscope maps."""
    for c in type(module).__mro__:
        if c.__name__ in UNITS_PER_STEP and c.__module__.startswith("diffusers"):
            return c.__name__
    return None


def axis_of(module: object) -> dict[str, Any] | None:
    """The VE / EDM axis an E-TSDM denoiser maps on (None: it is fed the model step, in its own units)."""
    axis = getattr(getattr(module, "config", None), "etsdm_axis", None)
    return dict(axis) if axis is not None else None


def _units(module: object) -> float:
    """The denoiser's stored t̃ units per model step (:data:`UNITS_PER_STEP` of its class; 1 on a VE / EDM axis)."""
    return 1.0 if axis_of(module) is not None else UNITS_PER_STEP[_base_name(module) or ""]


def is_etsdm(module: object) -> bool:
    return isinstance(module, _ETSDMForward)


def etsdm_of(module: object) -> Etsdm | None:
    """The E-TSDM settings an E-TSDM denoiser carries, in model steps k (None for other modules)."""
    if not isinstance(module, _ETSDMForward):
        return None
    return Etsdm(float(module.config.etsdm_t_tilde) / _units(module), int(module.config.etsdm_n))


def with_etsdm(
    module: Any, t_tilde: float = 100.0, n: int = 5, *, inplace: bool = False, axis: dict[str, Any] | None = None
) -> Any:
    """Retrofit: ``module`` with the map f attached (``t_tilde`` in model steps k = τ·T, stored in the denoiser's
    own timestep units): its class becomes the E-TSDM subclass and its config gains ``etsdm_t_tilde``, ``etsdm_n``.
    A VE or EDM denoiser (fed σ or ¼ ln σ) needs ``axis`` = :func:`lipscope.processes.etsdm_axis` of its process: its
    forward then maps fed → k → f(k) → fed, and ``etsdm_t_tilde`` is stored in model steps.
    No new weights are drawn (torch's RNG is untouched); ``inplace`` converts ``module`` itself (what a training run
    or a pipeline that owns it wants: no second copy of a large model), otherwise a deep copy. An E-TSDM module
    that already carries this map is returned as it is; one with another map is refused."""
    import copy

    etsdm_map(torch.zeros(1), t_tilde, n)  # validates t_tilde, n
    if axis is not None:
        check_axis(axis)
    if isinstance(module, _ETSDMForward):
        have, want = etsdm_of(module), Etsdm(float(t_tilde), int(n))
        same = have is not None and have.n == want.n and math.isclose(have.t_tilde, want.t_tilde, rel_tol=1e-9)
        if not same or axis_of(module) != (dict(axis) if axis is not None else None):
            raise InputError(
                f"this model already carries the E-TSDM map {have} (axis {axis_of(module)}); set `t_tilde`, `n` and "
                "`axis` to it"
            )
        return module
    base = _base_name(module)
    if base is None or type(module).__name__ != base:
        supported = ", ".join(UNITS_PER_STEP)
        raise InputError(f"E-TSDM: {type(module).__name__} has no E-TSDM class; supported denoisers: {supported}")
    new = module if inplace else copy.deepcopy(module)
    new.__class__ = ETSDM_CLASSES[f"ETSDM{base}"]
    units = 1.0 if axis is not None else UNITS_PER_STEP[base]
    new.register_to_config(etsdm_t_tilde=float(t_tilde) * units, etsdm_n=int(n))
    if axis is not None:
        new.register_to_config(etsdm_axis=dict(axis))
    return new


def unmapped(module: Any) -> Any:
    """What to call for the network at an explicit condition: an E-TSDM denoiser's ``forward_condition``."""
    return module.forward_condition if isinstance(module, _ETSDMForward) else module


def load_etsdm_lora(target: Any, path: str | Path, component: str | None = None) -> Any:
    """Load a LoRA that lipscope saved (``pytorch_lora_weights.safetensors`` or its folder) into a stock pipeline
    or denoiser, with its E-TSDM map: the denoiser becomes its E-TSDM class first (same weights), then the adapter
    is loaded by diffusers' ``load_lora_adapter``. Returns the denoiser (a pipeline's is also set on it).

    Stock ``load_lora_weights`` refuses such a file (its adapter metadata holds ``etsdm_*`` keys that
    ``LoraConfig`` does not take), so the map is never dropped silently.
    """
    import json

    from safetensors import safe_open

    file = Path(path)
    file = file / "pytorch_lora_weights.safetensors" if file.is_dir() else file
    if not file.is_file():
        raise InputError(f"E-TSDM LoRA: no pytorch_lora_weights.safetensors at {path}; pass a lipscope LoRA folder")
    with safe_open(str(file), "pt") as f:
        raw = (f.metadata() or {}).get("lora_adapter_metadata")
        state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    is_pipe = not isinstance(target, torch.nn.Module)
    comp = component or ("unet" if getattr(target, "unet", None) is not None else "transformer")
    denoiser = getattr(target, comp) if is_pipe else target
    meta = json.loads(raw) if raw else {}
    mapped = {k.removeprefix(f"{comp}."): meta.pop(k) for k in list(meta) if k.startswith(f"{comp}.etsdm_")}
    if not any(k.startswith(f"{comp}.") for k in state):
        raise InputError(f"E-TSDM LoRA {file}: no `{comp}.` weights in it; pass `component` (unet or transformer)")
    if getattr(denoiser, "peft_config", None):
        raise InputError(f"E-TSDM LoRA {file}: the {comp} already holds a LoRA adapter; load into a fresh pipeline")
    if "etsdm_t_tilde" in mapped:
        axis = mapped.get("etsdm_axis")  # VE / EDM: t̃ already in model steps on that axis
        steps = float(mapped["etsdm_t_tilde"]) / (1.0 if axis is not None else _units(denoiser))
        denoiser = with_etsdm(denoiser, steps, int(mapped["etsdm_n"]), inplace=True, axis=axis)
    try:
        denoiser.load_lora_adapter(state, prefix=comp, metadata=meta or None)
    except (ValueError, TypeError, RuntimeError, KeyError) as e:
        why = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise InputError(
            f"E-TSDM LoRA {file}: does not fit this {type(denoiser).__name__} ({why}); use its base"
        ) from e
    if is_pipe:
        target.register_modules(**{comp: denoiser})
    return denoiser
