"""Random-weight denoisers at the real sizes of the families lipscope wraps (the GPU suite's and the JVP benchmark's
models), built from diffusers' own classes with the published configs and wrapped by lipscope's family code.

Configs are those of the hub repositories' ``config.json`` (SD 1.5: runwayml/stable-diffusion-v1-5 unet; SDXL:
stabilityai/stable-diffusion-xl-base-1.0 unet; DiT-XL/2-256: facebook/DiT-XL-2-256 transformer; PixArt-α-512:
PixArt-alpha/PixArt-XL-2-512x512 transformer; SD3-medium: stabilityai/stable-diffusion-3-medium-diffusers
transformer; FLUX.1-dev transformer), written out here because no weights or configs are downloaded. Each has a
``tiny`` twin of the same class (every code path at test size).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

from lipscope.families import EncodedPrompts, family_of_class

_SD_SCHED = {
    "_class_name": "DDPMScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
}
_DIT_SCHED = {
    "_class_name": "DDPMScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "prediction_type": "epsilon",
}
_FLOW_SCHED = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}


@dataclass(frozen=True)
class Model:
    name: str
    cls: str  # diffusers class
    config: dict[str, Any]
    tiny: dict[str, Any]
    shape: tuple[int, ...]  # latent (C, H, W) the pipeline feeds at its default resolution
    tiny_shape: tuple[int, ...]
    scheduler: dict[str, Any]
    text: tuple[int, int, int] | None = None  # (tokens, width, pooled width; 0: none) of encode_prompt's output
    tiny_text: tuple[int, int, int] | None = None
    guidance: float | None = None  # CFG scale (both branches in one call), or Flux's embedded guidance
    conditioning: str = ""
    # block-count keys → kept blocks per precision where the full model does not fit the budget (80 GB, 8 min)
    fit_blocks: dict[str, dict[str, int]] = field(default_factory=dict)
    block_keys: tuple[str, ...] = ()


_SD_TINY = dict(
    sample_size=8,
    block_out_channels=(8, 16),
    layers_per_block=1,
    norm_num_groups=4,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=16,
    attention_head_dim=4,
)

MODELS: dict[str, Model] = {
    "sd15": Model(
        "sd15",
        "UNet2DConditionModel",
        dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8),
        _SD_TINY,
        (4, 64, 64),
        (4, 8, 8),
        _SD_SCHED,
        (77, 768, 0),
        (8, 16, 0),
        7.5,
        "text, CFG 7.5 (both branches)",
    ),
    "sdxl": Model(
        "sdxl",
        "UNet2DConditionModel",
        dict(
            sample_size=128,
            block_out_channels=(320, 640, 1280),
            attention_head_dim=(5, 10, 20),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10),
            cross_attention_dim=2048,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
        ),
        _SD_TINY
        | dict(
            cross_attention_dim=32,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=64,
            transformer_layers_per_block=(1, 2),
        ),
        (4, 128, 128),
        (4, 8, 8),
        _SD_SCHED,
        (77, 2048, 1280),
        (8, 32, 16),
        5.0,
        "text + time ids, CFG 5 (both branches)",
    ),
    "dit-xl-2-256": Model(
        "dit-xl-2-256",
        "DiTTransformer2DModel",
        dict(sample_size=32, out_channels=8),
        dict(num_attention_heads=2, attention_head_dim=8, num_layers=2, sample_size=8, out_channels=8),
        (4, 32, 32),
        (4, 8, 8),
        _DIT_SCHED,
        None,
        None,
        4.0,
        "class labels, CFG 4 (both branches)",
        block_keys=("num_layers",),
    ),
    "pixart-alpha-512": Model(
        "pixart-alpha-512",
        "PixArtTransformer2DModel",
        dict(sample_size=64, caption_channels=4096, interpolation_scale=1, use_additional_conditions=False),
        dict(
            num_attention_heads=2,
            attention_head_dim=8,
            num_layers=2,
            cross_attention_dim=16,
            caption_channels=16,
            sample_size=8,
            use_additional_conditions=False,
        ),
        (4, 64, 64),
        (4, 8, 8),
        _DIT_SCHED,
        (120, 4096, 0),
        (8, 16, 0),
        4.5,
        "T5 embeddings + mask, CFG 4.5 (both branches)",
        block_keys=("num_layers",),
    ),
    "sd3-medium": Model(
        "sd3-medium",
        "SD3Transformer2DModel",
        dict(num_layers=24, num_attention_heads=24, caption_projection_dim=1536, pos_embed_max_size=192),
        dict(
            sample_size=8,
            num_layers=2,
            num_attention_heads=2,
            attention_head_dim=8,
            joint_attention_dim=16,
            caption_projection_dim=16,
            pooled_projection_dim=16,
            pos_embed_max_size=16,
        ),
        (16, 128, 128),
        (16, 8, 8),
        _FLOW_SCHED,
        (333, 4096, 2048),
        (8, 16, 16),
        7.0,
        "CLIP+T5 embeddings, CFG 7 (both branches)",
        block_keys=("num_layers",),
    ),
    "flux-dev": Model(
        "flux-dev",
        "FluxTransformer2DModel",
        dict(guidance_embeds=True),
        dict(
            in_channels=16,
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=16,
            pooled_projection_dim=16,
            guidance_embeds=True,
            axes_dims_rope=(4, 6, 6),
        ),
        (16, 128, 128),
        (4, 8, 8),
        _FLOW_SCHED,
        (512, 4096, 768),
        (8, 16, 16),
        3.5,
        "T5+CLIP embeddings, embedded guidance 3.5",
        # 12 B parameters: 48 GB in fp32 leaves too little for a batch and the time budget; bf16 runs the full model
        fit_blocks={
            "fp32": {"num_layers": 10, "num_single_layers": 19},
            "tf32": {"num_layers": 10, "num_single_layers": 19},
        },
        block_keys=("num_layers", "num_single_layers"),
    ),
}


def _prompts(text: tuple[int, int, int], cls: str, w: float | None) -> EncodedPrompts:
    """Random encode_prompt outputs of the real shapes (one prompt; negatives for CFG)."""
    tokens, width, pooled = text
    g = torch.Generator().manual_seed(0)
    t: dict[str, torch.Tensor] = {}
    for pre in ("", "negative_") if w is not None and cls != "FluxTransformer2DModel" else ("",):
        t[f"{pre}prompt_embeds"] = torch.randn(1, tokens, width, generator=g)
        if pooled:
            t[f"{pre}pooled_prompt_embeds"] = torch.randn(1, pooled, generator=g)
        if cls == "PixArtTransformer2DModel":
            t[f"{pre}prompt_attention_mask"] = torch.ones(1, tokens, dtype=torch.long)
    return EncodedPrompts(t, {"conditioning": "random embeddings of the real shapes"})


def build(spec: Model, tiny: bool, dev: torch.device, dtype: torch.dtype, max_blocks: int | None = None):
    """(EpsModel with its conditioning, blocks kept: "all" or "k=n, …") for one model at one weight dtype."""
    import diffusers

    cfg = dict(spec.tiny if tiny else spec.config)
    prec = "bf16" if dtype == torch.bfloat16 else "fp32"
    cut = {} if tiny else dict(spec.fit_blocks.get(prec, {}))
    cls = getattr(diffusers, spec.cls)
    defaults = {k: v.default for k, v in __import__("inspect").signature(cls.__init__).parameters.items()}
    for k in spec.block_keys:
        if max_blocks is not None:
            cut[k] = min(cut.get(k, 10**9), max_blocks, cfg.get(k, defaults[k]))
    full = {k: cfg.get(k, defaults[k]) for k in spec.block_keys}
    cut = {k: v for k, v in cut.items() if v < full[k]}
    cfg.update(cut)
    diffusers.utils.logging.set_verbosity_error()  # "modules that should be kept in float32": none here
    with torch.device(dev):
        module = cls(**cfg).to(dtype)
    for (
        mod
    ) in module.modules():  # buffers that are views of a float64 base (DiT's pos_embed) break dynamo's fake tensors
        for k, b in list(mod._buffers.items()):
            if b is not None and b._base is not None:
                mod._buffers[k] = b.clone()
    fam = family_of_class(spec.cls)
    assert fam is not None
    m = fam.build(module, dict(spec.scheduler), name=spec.name, device=dev, dtype=dtype)
    m = dataclasses.replace(m, sample_shape=spec.tiny_shape if tiny else spec.shape)
    if spec.cls == "DiTTransformer2DModel":
        cond = fam.conditioning(m, class_labels=[1, 2], guidance_scale=spec.guidance)
    else:
        text = spec.tiny_text if tiny else spec.text
        assert text is not None and fam.conditioning is not None
        cond = fam.conditioning(m, prompt_embeds=_prompts(text, spec.cls, spec.guidance), guidance_scale=spec.guidance)
    blocks = ", ".join(f"{k}={v} of {full[k]}" for k, v in cut.items())
    return dataclasses.replace(m, conditioning=cond), blocks or "all"
