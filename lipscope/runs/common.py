"""What every run shares: the output-folder check, the model record of run.json, how a model is loaded."""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .. import io as lio
from .. import shard
from ..io import check_out_dir
from ..loading import load_model
from ..models import EpsModel
from ..prompts import conditioning_for, read_prompt_file

__all__ = ["ConditioningOptions", "ModelOptions", "check_out_dir", "main_lock", "model_info", "write_on_main"]


def main_lock(out: Path):
    """The run-folder lock, held by the main process (launched with several processes, the others compute and
    gather but never write)."""
    shard.barrier()  # every process checked `out` before the main one writes there
    return lio.run_lock(out) if shard.is_main() else contextlib.nullcontext()


def write_on_main(out: Path, files: dict[str, bytes], overwrite: bool) -> None:
    """The main process writes the run folder (atomically); the others wait for it."""
    if shard.is_main():
        lio.write_run_folder(out, files, overwrite=overwrite)
    shard.barrier()


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
    prediction_type: str | None = None  # what a py: network outputs where its process does not say

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
            prediction_type=self.prediction_type,
        )


@dataclass(frozen=True)
class ConditioningOptions:
    """What a conditional model is fed (:func:`lipscope.prompts.conditioning_for`): class labels (DiT), prompts
    encoded by the pipeline's own text encoders or precomputed ``prompt_embeds`` (SD/SDXL, SD3, PixArt, Flux), and
    the guidance scale. Nothing given: the family's unconditional default (the empty prompt, the null class)."""

    class_labels: tuple[int, ...] = ()
    prompt: tuple[str, ...] = ()
    prompt_file: str | None = None  # one prompt per line, after `prompt`
    negative_prompt: str | None = None  # the unconditional branch of CFG (default: the pipeline's, "" or zeros)
    prompt_embeds: str | None = None
    guidance_scale: float | None = None

    def conditioning_reads(self) -> tuple[str | None, ...]:
        return (self.prompt_embeds, self.prompt_file)

    def conditioning(self, m: EpsModel, spec: str, revision: str | None = None, offline: bool | None = None):
        """The :class:`~lipscope.conditioning.Conditioning` of ``m`` (None: unconditional model)."""
        prompts = list(self.prompt) + (read_prompt_file(self.prompt_file) if self.prompt_file else [])
        return conditioning_for(
            m,
            spec,
            class_labels=self.class_labels,
            prompts=prompts,
            negative_prompt=self.negative_prompt,
            prompt_embeds=self.prompt_embeds,
            guidance_scale=self.guidance_scale,
            revision=revision,
            offline=offline,
        )
