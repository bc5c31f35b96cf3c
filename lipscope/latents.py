"""Latent space: the autoencoder of a latent pipeline (LDM, Stable Diffusion, …) that turns pixels into the
latents its denoiser works on.

x0 for a latent model is ``(mean of the encoder's distribution − shift_factor) · scaling_factor`` for an
``AutoencoderKL`` (the way diffusers' training scripts and ``encode`` pipelines build latents; ``latent_dist``
mean rather than a sample, so x0 does not depend on a random draw), and ``encode(x).latents · scaling_factor``
(before quantisation) for a ``VQModel`` — the inverses of what the pipelines do before ``decode``
(``latents / scaling_factor``, LDMPipeline). Images are mapped to [−1, 1] first (the VAE's own range).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .data import ARRAY_SUFFIXES, DataRange, DataScaling, load_array, load_data_with_scaling
from .errors import InputError

log = logging.getLogger("lipscope")

VAE_COMPONENTS = ("vae", "vqvae")  # model_index.json names of the autoencoder in diffusers pipelines
VAE_CLASSES = ("AutoencoderKL", "VQModel")
ENCODE_BATCH = 16


@dataclass(frozen=True)
class LatentCodec:
    """A pipeline's autoencoder as pixels → latents (and what run.json records about it)."""

    vae: Any  # a diffusers AutoencoderKL or VQModel (an nn.Module with encode())
    kind: str  # AutoencoderKL or VQModel
    scaling_factor: float
    shift_factor: float | None
    pixel_shape: tuple[int, int, int]  # (C, H, W) the encoder takes
    component: str = "vae"
    downsample: int = 8  # pixels per latent along H and W: the pipelines' vae_scale_factor

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Latents of pixel images x (N, C, H, W) in [−1, 1], in batches, float32 (float64 if x is)."""
        p = next(self.vae.parameters())
        out = []
        with torch.no_grad():
            for s in range(0, x.shape[0], ENCODE_BATCH):
                xb = x[s : s + ENCODE_BATCH].to(p.device, p.dtype)
                if self.kind == "AutoencoderKL":
                    z = self.vae.encode(xb).latent_dist.mean
                    if self.shift_factor is not None:
                        z = z - self.shift_factor
                else:
                    z = self.vae.encode(xb).latents
                z = (z * self.scaling_factor).cpu().contiguous()  # conv outputs may be channels-last
                out.append(z.double() if x.dtype == torch.float64 else z.float())
        return torch.cat(out)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Pixels in [−1, 1] of latents z, as the pipelines decode: vae.decode(z / scaling_factor (+ shift))."""
        p = next(self.vae.parameters())
        out = []
        with torch.no_grad():
            for s in range(0, z.shape[0], ENCODE_BATCH):
                zb = z[s : s + ENCODE_BATCH].to(p.device, p.dtype) / self.scaling_factor
                if self.shift_factor is not None:
                    zb = zb + self.shift_factor
                out.append(self.vae.decode(zb).sample.clamp(-1, 1).float().cpu())
        return torch.cat(out)

    def describe(self) -> dict[str, Any]:
        what = "latent_dist.mean" if self.kind == "AutoencoderKL" else "encode().latents (before quantisation)"
        shift = f" − {self.shift_factor:g}" if self.shift_factor is not None else ""
        return {
            "space": "latent",
            "autoencoder": self.kind,
            "component": self.component,
            "scaling_factor": self.scaling_factor,
            "shift_factor": self.shift_factor,
            "pixel_shape": list(self.pixel_shape),
            "encoding": f"({what}{shift}) × {self.scaling_factor:g}",
        }


def codec_from_module(vae: nn.Module, component: str = "vae") -> LatentCodec:
    """Wrap a loaded diffusers autoencoder; refuses other classes by name."""
    kind = type(vae).__name__
    if kind not in VAE_CLASSES:
        raise InputError(
            f"the pipeline's {component} is a {kind}; lipscope encodes with {' or '.join(VAE_CLASSES)} only "
            "(pass precomputed latents as `data` LATENTS.npy instead)"
        )
    cfg: dict[str, Any] = dict(getattr(vae, "config", {}))
    size = cfg.get("sample_size", 256)
    hw = (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))
    sf = cfg.get("scaling_factor")
    if sf is None:
        log.warning("%s has no scaling_factor in its config: latents are not rescaled (factor 1)", kind)
    shift = cfg.get("shift_factor")
    return LatentCodec(
        vae=vae.eval(),
        kind=kind,
        scaling_factor=float(sf if sf is not None else 1.0),
        shift_factor=float(shift) if shift is not None else None,
        pixel_shape=(int(cfg.get("in_channels", 3)), *hw),
        component=component,
        downsample=2 ** (len(cfg.get("block_out_channels") or (0,) * 4) - 1),
    )


def vae_component(index: dict[str, Any]) -> tuple[str, str] | None:
    """(component, class) of the autoencoder named in a model_index.json, if any."""
    for name in VAE_COMPONENTS:
        v = index.get(name)
        if isinstance(v, (list, tuple)) and len(v) == 2 and v[1]:
            return name, str(v[1])
    return None


def load_codec(root: str | Path, index: dict[str, Any], device: torch.device, dtype: torch.dtype, **hub) -> LatentCodec:
    """The autoencoder of a pipeline (local folder, or hub repo with ``hub`` kwargs for ``from_pretrained``)."""
    comp = vae_component(index)
    assert comp is not None
    name, cls_name = comp
    if cls_name not in VAE_CLASSES:
        raise InputError(
            f"`model` {root}: its {name} is a {cls_name}; lipscope encodes with {' or '.join(VAE_CLASSES)} only "
            "(pass precomputed latents as `data` LATENTS.npy instead)"
        )
    import diffusers

    if not hub and Path(root).is_dir() and not (Path(root) / name / "config.json").is_file():
        raise InputError(
            f"`model` {root}: model_index.json names a {name} ({cls_name}) but {Path(root) / name}/config.json is "
            "missing; restore that folder (or pass precomputed latents as `data`)"
        )
    cls = getattr(diffusers, cls_name)
    work = torch.float64 if dtype == torch.float64 else torch.float32  # encoding is data preparation: not in bf16
    try:
        vae = cls.from_pretrained(root, subfolder=name, torch_dtype=work, **hub)
    except (OSError, ValueError, RuntimeError) as e:
        msg = (str(e).strip().splitlines() or [""])[0][:200]
        raise InputError(f"`model` {root}: could not load its {name} ({type(e).__name__}: {msg})") from e
    vae = vae.to(device)
    return codec_from_module(vae, name)


def latent_x0(
    codec: LatentCodec,
    spec: str | np.ndarray | torch.Tensor,
    n: int,
    seed: int,
    data_range: DataRange,
    latent_shape: tuple[int, ...] | None,
) -> tuple[torch.Tensor, DataScaling]:
    """x0 of a latent model: an array (or array file) of the latent shape (NCHW) is taken as precomputed
    latents, fed as it is; anything else is pixel data, mapped to ``data_range`` and encoded."""
    raw: np.ndarray | torch.Tensor | None = None
    if isinstance(spec, (np.ndarray, torch.Tensor)):
        raw = spec
    elif Path(str(spec)).suffix.lower() in ARRAY_SUFFIXES and Path(str(spec)).is_file():
        raw = load_array(Path(str(spec)))
    if raw is not None and latent_shape is not None and tuple(raw.shape[1:]) == tuple(latent_shape):
        x, how = load_data_with_scaling(raw, n, seed, latent_shape, None)
        return x, DataScaling("latents", f"precomputed latents: {how.mapping}")
    load = getattr(codec, "load_pixels", None)  # a generic pipeline's codec also takes videos
    try:
        pix, how = load(spec, n, seed, data_range) if load else load_data_with_scaling(spec, n, seed, codec.pixel_shape,
                                                                                        data_range)  # fmt: skip
    except InputError as e:
        if raw is None:
            raise
        shape = ", ".join(map(str, latent_shape or ()))
        raise InputError(f"{e}; or give precomputed latents of shape (N, {shape})") from e
    z = codec.encode(pix.double() if isinstance(spec, torch.Tensor) and spec.dtype == torch.float64 else pix)
    if latent_shape is not None and tuple(z.shape[1:]) != tuple(latent_shape):
        raise InputError(
            f"the {codec.kind} encodes {tuple(pix.shape[1:])} images to latents {tuple(z.shape[1:])}, but the "
            f"denoiser takes {tuple(latent_shape)}; check the pipeline's components"
        )
    return z, DataScaling(
        how.source_kind, f"{how.mapping}, encoded by the {codec.kind}: {codec.describe()['encoding']}"
    )
