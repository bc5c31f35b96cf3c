"""What every run shares: the inputs a run reads and the output-folder check, the lock, the model record of
run.json and what its numbers depend on, how a model is loaded."""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .. import io as lio
from .. import shard
from ..errors import InputError
from ..loading import load_model
from ..lora import lora_run_base
from ..models import EpsModel
from ..prompts import conditioning_for, read_prompt_file
from ..sampling import weights_digest

__all__ = [
    "ConditioningOptions",
    "ModelOptions",
    "check_out_dir",
    "input_paths",
    "main_lock",
    "model_digest",
    "model_info",
    "write_on_main",
]

# specs that name no file: built-in models and data sets, samples of the model, the Hugging Face hub
_NOT_PATHS = ("builtin:", "hf:")


def input_paths(*specs: object) -> list[tuple[Path, str]]:
    """Every file and folder a run reads, as (path, what it is), from its raw inputs: paths (models, data, configs,
    captions, prompt files, embeddings, feature folders, weights), the source of a ``py:module:factory`` spec (its
    top-level package folder, or the module file), the base model a LoRA run folder names, and the Hugging Face
    cache a hub id is read from. Lists and tuples are walked; None and names that are no path (``digits``,
    ``model``, ``builtin:…``) add nothing."""
    found: list[tuple[Path, str]] = []
    for v in specs:
        if v is None or v == "":
            continue
        if isinstance(v, (list, tuple)):
            found += input_paths(*v)
            continue
        s = str(v)
        if s.startswith("py:"):
            found += [(src, f"the source of {s}") for src in _py_source(s)]
            continue
        if s.startswith(_NOT_PATHS):
            continue
        p = Path(s).expanduser()
        try:
            exists = p.exists()
        except OSError:  # a name the file system cannot hold: the loader says so
            continue
        if exists:
            found.append((p, s))
            with contextlib.suppress(InputError):  # a damaged record: the loader says so
                base = lora_run_base(p) if p.is_dir() else None
                if base is not None:
                    found += [(b, f"the base model of {s}") for b, _ in input_paths(base[0])]
        elif s.count("/") == 1 and not s.startswith((".", "/", "~")):  # a hub id: read from the local cache
            found += [(c, f"the Hugging Face cache that {s} is read from") for c in _hub_cache()]
    return found


def _py_source(spec: str) -> list[Path]:
    """The source of ``py:package.module:factory`` without running it: its top-level package folder (or module
    file), found on sys.path and the working folder as the import will find it."""
    import importlib.machinery

    top = spec[3:].partition(":")[0].split(".")[0]
    if not top.isidentifier():
        return []
    mod = sys.modules.get(top)
    if mod is not None:
        where = list(getattr(mod, "__path__", None) or []) or [getattr(mod, "__file__", None)]
        return [Path(w) for w in where if w]
    try:
        found = importlib.machinery.PathFinder.find_spec(top, [os.getcwd(), *sys.path])
    except (ImportError, ValueError, OSError):
        return []
    if found is None:
        return []
    if found.submodule_search_locations:
        return [Path(w) for w in found.submodule_search_locations]
    return [Path(found.origin)] if found.origin and found.has_location else []


def _hub_cache() -> list[Path]:
    try:
        from huggingface_hub import constants

        return [Path(constants.HF_HUB_CACHE)]
    except ImportError:
        return []


def check_out_dir(
    out: str | Path,
    overwrite: bool = False,
    resume: bool = False,
    inputs: tuple[object, ...] = (),
    whole: bool = True,
) -> Path:
    """:func:`lipscope.io.check_out_dir` with the run's raw ``inputs`` turned into the paths it reads
    (:func:`input_paths`): an ``out`` that holds or is one of them is refused."""
    return lio.check_out_dir(out, overwrite=overwrite, resume=resume, inputs=input_paths(*inputs), whole=whole)


def check_out_file(out: str | Path, runs: Iterable[str | Path], verb: str) -> None:
    """Refuse, before any work, a single output file (a figure, a report page) written into one of the run folders
    ``runs`` the command ``verb``s (a run folder holds what its own command wrote, nothing else); its folder is
    otherwise only checked writable (a file beside others: not empty is fine, the current folder too)."""
    parent = Path(out).parent
    rp = parent.resolve()
    inside = [r for r in runs if (q := Path(r).resolve()) == rp or q in rp.parents]
    if inside:
        raise InputError(f"`out` {out} lies inside the run {inside[0]}, which this {verb}; write it elsewhere")
    check_out_dir(parent, resume=True, whole=False)


@contextlib.contextmanager
def main_lock(out: Path) -> Iterator[None]:
    """The run-folder lock, held by the main process (launched with several processes, the others compute and
    gather but never write). A lock refused on the main process is refused on every process (the same line, the
    same exit code), so none waits for a peer that stopped."""
    shard.barrier()  # every process checked `out` before the main one writes there
    with contextlib.ExitStack() as stack:
        refused = None
        if shard.is_main():
            try:
                stack.enter_context(lio.run_lock(out))
            except InputError as e:
                refused = e
        said = shard.broadcast(str(refused) if refused is not None else None)
        if refused is not None:
            raise refused
        if said is not None:
            raise InputError(said)
        yield


def model_digest(m: EpsModel, spec: str) -> str | None:
    """sha256 (16 hex) of what a model's numbers depend on beyond its configs: the network's weights (and a latent
    model's autoencoder), or the source file of a ``py:`` callable without weights; None for closed forms."""
    parts = []
    if m.module is not None:
        parts.append(weights_digest(m.module))
    if m.latent is not None:
        parts.append(weights_digest(m.latent.vae))
    if not parts and spec.startswith("py:"):  # the module is imported by now: its file
        file = getattr(sys.modules.get(spec[3:].partition(":")[0]), "__file__", None)
        if file and Path(file).is_file():
            parts.append(hashlib.sha256(Path(file).read_bytes()).hexdigest()[:16])
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16] if parts else None


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
