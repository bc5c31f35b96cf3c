"""E-TSDM (Yang et al., 2306.11251, Sec. 4): share the timestep condition within sub-intervals near 0.

f(t) = (t̃/n)·⌊t·n/t̃⌋ for t < t̃, f(t) = t otherwise (defaults t̃ = 100 of T = 1000, n = 5). The
noise schedule is unchanged: training noises at the true t and the network sees f(t).
If n does not divide t̃ the sub-interval starts are the (fractional) multiples of t̃/n: the rule
is the same formula, applied to float timesteps.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import UNet2DModel

# diffusers' pipeline loader finds a component's load method by looking these base classes up in the
# component's own module (as it does for transformers): keep them importable from lipscope.etsdm.
from diffusers.models.modeling_utils import ModelMixin  # noqa: F401

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


# ---- a diffusers UNet that carries its own map ---------------------------------------------------


class ETSDMUNet2DModel(UNet2DModel):
    """``UNet2DModel`` whose forward feeds the network f(t) (E-TSDM) instead of t.

    Saved models name this class in ``unet/config.json`` and ``model_index.json`` together with
    ``etsdm_t_tilde`` and ``etsdm_n``. Stock diffusers then either applies the map (after
    ``import lipscope.etsdm``: ``DDPMPipeline.from_pretrained(path)`` and ``DDIMPipeline`` sample it
    correctly) or refuses to load the pipeline; ``UNet2DModel.from_pretrained(path/"unet")`` warns
    that the etsdm_* attributes "are not expected and will be ignored". It is never dropped silently.
    """

    def __init__(self, *args, etsdm_t_tilde: float = 100.0, etsdm_n: int = 5, **kwargs):
        super().__init__(*args, **kwargs)
        etsdm_map(torch.zeros(1), etsdm_t_tilde, etsdm_n)  # validates the settings
        self.register_to_config(etsdm_t_tilde=float(etsdm_t_tilde), etsdm_n=int(etsdm_n))

    def condition(self, timestep: torch.Tensor) -> torch.Tensor:
        """f(t) for the network (float; integer timesteps from a pipeline are cast first)."""
        t = torch.as_tensor(timestep)
        t = t.to(torch.float32) if not t.is_floating_point() else t
        return etsdm_map(t, float(self.config.etsdm_t_tilde), int(self.config.etsdm_n))

    def forward(self, sample, timestep, class_labels=None, return_dict: bool = True):
        if not torch.is_tensor(timestep):
            timestep = torch.tensor([timestep], dtype=torch.float32, device=sample.device)
        return super().forward(sample, self.condition(timestep), class_labels, return_dict)

    def forward_condition(self, sample, condition, class_labels=None, return_dict: bool = True):
        """The network at an explicit condition (no map): what ``probe(space="condition")`` probes."""
        return super().forward(sample, condition, class_labels, return_dict)

    @classmethod
    def from_unet(cls, unet: UNet2DModel, t_tilde: float = 100.0, n: int = 5) -> ETSDMUNet2DModel:
        """Retrofit: same architecture and weights, map attached."""
        etsdm_map(torch.zeros(1), t_tilde, n)  # validates t_tilde, n
        cfg = {k: v for k, v in unet.config.items() if not k.startswith("_") and not k.startswith("etsdm_")}
        new = cls.from_config({**cfg, "etsdm_t_tilde": float(t_tilde), "etsdm_n": int(n)})
        new.load_state_dict(unet.state_dict())
        new.train(unet.training)
        return new.to(device=unet.device, dtype=unet.dtype)


# diffusers reads a model's config keys from its __init__ signature: expose UNet2DModel's + ours
_sig = inspect.signature(UNet2DModel.__init__)
# functions take any attribute; typeshed does not declare the __signature__ that inspect.signature honours
ETSDMUNet2DModel.__init__.__signature__ = _sig.replace(  # type: ignore[attr-defined]
    parameters=[
        *_sig.parameters.values(),
        inspect.Parameter("etsdm_t_tilde", inspect.Parameter.KEYWORD_ONLY, default=100.0),
        inspect.Parameter("etsdm_n", inspect.Parameter.KEYWORD_ONLY, default=5),
    ]
)


def is_etsdm(module: object) -> bool:
    return isinstance(module, ETSDMUNet2DModel)


def etsdm_of(module: object) -> Etsdm | None:
    """The E-TSDM settings an ``ETSDMUNet2DModel`` carries in its config (None for other modules)."""
    if not isinstance(module, ETSDMUNet2DModel):
        return None
    return Etsdm(float(module.config.etsdm_t_tilde), int(module.config.etsdm_n))
