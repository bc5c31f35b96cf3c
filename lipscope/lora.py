"""LoRA fine-tuning through peft, saved the way diffusers' ``load_lora_weights`` reads it.

Adapters are added with the denoiser's own ``add_adapter`` (diffusers' ``PeftAdapterMixin``; the base weights
frozen first, as diffusers' LoRA training scripts do) and saved with the family pipeline's ``save_lora_weights``
(``pytorch_lora_weights.safetensors``, keys ``unet.…`` / ``transformer.…``, the adapter's LoraConfig in the
safetensors metadata). An E-TSDM run adds ``etsdm_t_tilde`` and ``etsdm_n`` (in the denoiser's timestep units) to
that metadata: stock ``load_lora_weights`` then refuses the file (``LoraConfig`` takes no such keys) instead of
dropping the map, and :func:`lipscope.etsdm.load_etsdm_lora` loads it with the map.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .errors import InputError, short_error
from .etsdm import etsdm_of

# family → (the pipeline class whose save_lora_weights writes its denoiser's LoRA, the keyword it takes)
LORA_PIPELINES = {
    "sd": ("StableDiffusionPipeline", "unet_lora_layers"),
    "sd3": ("StableDiffusion3Pipeline", "transformer_lora_layers"),
    "flux": ("FluxPipeline", "transformer_lora_layers"),
}


def peft_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("peft") is not None


def check_lora(family: str) -> None:
    """Refuse ``lora`` for families whose pipelines have no ``load_lora_weights`` (a LoRA nobody can load)."""
    import inspect

    import diffusers

    if family not in LORA_PIPELINES:
        have = ", ".join(LORA_PIPELINES)
        raise InputError(
            f"`lora`: the {family} family's diffusers pipeline has no load_lora_weights, so a LoRA of it could not be "
            f"loaded; fine-tune every weight (leave out `lora`) or use one of: {have}"
        )
    if not peft_available():
        raise InputError("`lora` trains adapters with peft: pip install 'lipscope[lora]'")
    pipe, key = LORA_PIPELINES[family]
    meta_key = key.replace("_lora_layers", "_lora_adapter_metadata")
    if meta_key not in inspect.signature(getattr(diffusers, pipe).save_lora_weights).parameters:
        raise InputError(  # the map travels in the adapter metadata: without it a saved LoRA would lose it
            f"`lora`: diffusers {diffusers.__version__} cannot store LoRA adapter metadata (where the E-TSDM map "
            "goes); pip install -U 'diffusers>=0.35'"
        )


# the layers peft puts LoRA adapters on (torch.nn types); a target that names another module is refused
LORA_LAYERS = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.Embedding)


def _layer_rank(m: torch.nn.Module) -> int:
    """The highest rank an update of layer ``m`` can have (min of its input and output sizes, a kernel counted
    into its input): a LoRA rank above it adds parameters and no expressiveness."""
    if isinstance(m, torch.nn.Linear):
        return min(m.in_features, m.out_features)
    if isinstance(m, torch.nn.Embedding):
        return min(m.num_embeddings, m.embedding_dim)
    assert isinstance(m, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d))
    k = 1
    for d in m.kernel_size:
        k *= int(d)
    return min(m.in_channels // m.groups * k, m.out_channels)


def check_lora_options(denoiser: Any, rank: int, targets: tuple[str, ...]) -> None:
    """Refuse, before any work, ``targets`` that match no layer of ``denoiser`` (peft's own name matching) or a
    module peft cannot adapt, and a ``rank`` above what every targeted layer can use."""
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    named = list(denoiser.named_modules())
    hit: list[tuple[str, torch.nn.Module]] = []
    for t in targets:
        config = LoraConfig(r=1, target_modules=[t])
        mine = [(n, m) for n, m in named if n and check_target_module_exists(config, n)]
        if not mine:
            layers = sorted({n.rsplit(".", 1)[-1] for n, m in named if isinstance(m, torch.nn.Linear)})
            raise InputError(
                f"`lora_targets` {t}: no module of {type(denoiser).__name__} has that name; its linear layers are "
                f"named {', '.join(layers[:12])}"
            )
        odd = [(n, m) for n, m in mine if not isinstance(m, LORA_LAYERS)]
        if odd:
            raise InputError(
                f"`lora_targets` {t} names {odd[0][0]}, a {type(odd[0][1]).__name__}; LoRA adapts linear, conv and "
                "embedding layers: name those"
            )
        hit += mine
    most = max(_layer_rank(m) for _, m in hit)
    if rank > most:
        raise InputError(
            f"`lora_rank` {rank} is above what any targeted layer can use (an update of a layer has rank ≤ min(its "
            f"input, output size) = {most} here at most); use a rank ≤ {most}"
        )


def add_lora(denoiser: Any, rank: int, alpha: int | None, targets: tuple[str, ...]) -> None:
    """Freeze ``denoiser`` and add one LoRA adapter (gaussian init, as diffusers' scripts) to ``targets``."""
    from peft import LoraConfig

    if not hasattr(denoiser, "add_adapter"):
        raise InputError(f"`lora`: {type(denoiser).__name__} takes no peft adapters; fine-tune every weight")
    denoiser.requires_grad_(False)
    config = LoraConfig(
        r=rank, lora_alpha=alpha if alpha is not None else rank, init_lora_weights="gaussian",
        target_modules=list(targets),
    )  # fmt: skip
    try:
        denoiser.add_adapter(config)
    except ValueError as e:
        names = sorted({n.rsplit(".", 1)[-1] for n, m in denoiser.named_modules() if isinstance(m, torch.nn.Linear)})
        raise InputError(
            f"`lora_targets` {', '.join(targets)}: {short_error(e)}; its linear layers are named "
            f"{', '.join(names[:12])}"
        ) from e


def trainable_parameters(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters a run optimises: every weight, or only the LoRA adapters."""
    return [p for p in module.parameters() if p.requires_grad]


def lora_metadata(denoiser: Any) -> dict[str, Any]:
    """The adapter's LoraConfig as diffusers stores it, plus the E-TSDM map of an E-TSDM denoiser."""
    meta = denoiser.peft_config["default"].to_dict()
    meta = {k: (sorted(v) if isinstance(v, set) else v) for k, v in meta.items()}
    if etsdm_of(denoiser) is not None:  # the map as the denoiser's config holds it: in its own timestep units
        cfg = denoiser.config
        meta |= {"etsdm_t_tilde": float(cfg.etsdm_t_tilde), "etsdm_n": int(cfg.etsdm_n)}
        meta["etsdm_class"] = type(denoiser).__name__
        if getattr(cfg, "etsdm_axis", None) is not None:  # VE / EDM: the axis the map is written on
            meta["etsdm_axis"] = dict(cfg.etsdm_axis)
    return meta


def save_lora(denoiser: Any, family: str, dest: Path, record: dict[str, Any]) -> Path:
    """``dest/pytorch_lora_weights.safetensors`` by the family pipeline's ``save_lora_weights``, and lipscope.json."""
    import diffusers
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    check_lora(family)
    pipe, key = LORA_PIPELINES[family]
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(denoiser))
    meta_key = key.replace("_lora_layers", "_lora_adapter_metadata")
    dest = Path(dest)
    getattr(diffusers, pipe).save_lora_weights(
        str(dest), **{key: layers, meta_key: lora_metadata(denoiser)}, safe_serialization=True
    )
    (dest / "lipscope.json").write_text(json.dumps({**record, "lora_pipeline": pipe}, indent=2, default=str) + "\n")
    return dest


def lora_run_base(run: str | Path) -> tuple[str, str | None] | None:
    """(base model spec, its revision) that a ``finetune --lora`` run folder was trained from, as :func:`save_lora`'s
    ``lora/lipscope.json`` records it; None for any other path."""
    file = Path(run) / "lora" / "lipscope.json"
    if not file.is_file():
        return None
    try:
        rec = json.loads(file.read_text(encoding="utf-8")).get("training", {})
    except (OSError, ValueError, AttributeError) as e:
        raise InputError(f"`model` {run}: {file} cannot be read ({short_error(e)}); restore it or retrain") from e
    if not isinstance(base := rec.get("base_model"), str):
        raise InputError(f"`model` {run}: lora/lipscope.json names no base_model; retrain with this lipscope")
    return base, rec.get("base_revision")
