"""What every run shares: the output-folder check, the model record of run.json, how a model is loaded."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from ..io import check_out_dir
from ..loading import load_model
from ..models import EpsModel

__all__ = ["ModelOptions", "check_out_dir", "model_info"]


def model_info(m: EpsModel) -> dict[str, Any]:
    """What run.json records about the model that was measured."""
    return {
        "etsdm": asdict(m.etsdm) if m.etsdm is not None else None,
        "name": m.name,
        "config_hash": m.config_hash,
        "T": m.T,
        "prediction_type": m.prediction_type,
        "process": m.schedule.describe(),
        "space": m.latent.describe() if m.latent is not None else {"space": "pixel"},
        "sample_shape": m.sample_shape,
        "config": m.config,
        "scheduler_config": m.scheduler_config,
        "rounds_timesteps": m.rounds_timesteps,
    }


@dataclass(frozen=True)
class ModelOptions:
    """How a model spec is loaded (:func:`lipscope.loading.load_model`)."""

    model: str = "builtin:digits-ddpm"
    config: str | None = None
    scheduler_config: str | None = None
    revision: str | None = None
    subfolder: str | None = None
    offline: bool = False
    trust_pickle: bool = False
    device: str = "auto"
    dtype: str = "float32"
    model_args: tuple[str, ...] | dict[str, Any] = ()  # py: factory keyword arguments (key=value strings or a dict)

    def load(self) -> EpsModel:
        return load_model(
            self.model,
            config=self.config,
            scheduler_config=self.scheduler_config,
            revision=self.revision,
            subfolder=self.subfolder,
            offline=self.offline or None,
            trust_pickle=self.trust_pickle,
            device=self.device,
            dtype=self.dtype,
            model_args=self.model_args,
        )
