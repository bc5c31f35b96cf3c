"""A pipeline's autoencoder as the map between pixels (images or videos) and the denoiser's own latent space, whatever
the pipeline does in between (packing into tokens, per-channel normalisation, frame/channel transposes).

The pipeline's path from its final latents P to ``vae.decode``'s input D is identified on the pipeline itself: four
runs in which the last step's result is replaced by 0, 1, the element index and a random P, each stopped inside
``vae.decode`` (two-step runs, the denoiser stubbed with its recorded outputs). If D = a ⊙ P[idx] + b (an
element-wise affine map after a permutation — what packing, transposes and per-channel scaling are), the runs give
b, a, idx, and the random one checks it; anything else is refused. Encoding is then the inverse:
P[idx] = (mean of the encoder's distribution − b) / a.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..data import DataScaling, choose_indices, load_array, load_data_with_scaling, scale_array
from ..errors import InputError
from .capture import first_output, record
from .inputs import Unidentified, relative_error, unit_roundoff

log = logging.getLogger("lipscope")

IMAGE_BATCH, VIDEO_BATCH = 16, 1  # samples per encoder call (one video at a time)


def _decode_input(dec: tuple[tuple, dict]) -> torch.Tensor:
    args, kwargs = dec
    z = args[0] if args else next(v for k, v in kwargs.items() if isinstance(v, torch.Tensor))
    return z.detach().to("cpu", torch.float64)  # the map is kept on the CPU, applied per batch


def _encode(vae: Any, x: torch.Tensor) -> torch.Tensor:
    """The encoder's latent of x: its distribution's mean (KL autoencoders) or its deterministic latent."""
    out = vae.encode(x)
    out = out[0] if isinstance(out, tuple) else out
    if hasattr(out, "latent_dist"):
        return out.latent_dist.mode()
    for name in ("latent", "latents"):
        if hasattr(out, name):
            return getattr(out, name)
    return out if isinstance(out, torch.Tensor) else out.mode()


@dataclass(frozen=True)
class PipelineCodec:
    """Pixels ↔ a generic pipeline's latents (the denoiser's layout), per sample: D = a ⊙ P[idx] + b."""

    vae: Any
    kind: str
    scale: torch.Tensor  # a, over one decode-input row (float64)
    shift: torch.Tensor  # b
    index: torch.Tensor  # idx: decode-input element j comes from latent element idx[j]
    decode_row: tuple[int, ...]
    sample_row: tuple[int, ...]
    vae_pixels: tuple[int, ...]  # what the autoencoder takes, per sample
    pixel_shape: tuple[int, ...]  # what data is loaded as: images (C, H, W), or videos (C, F, H, W)
    decode_args: tuple
    decode_kwargs: dict[str, Any]
    residual: float
    component: str = "vae"
    downsample: int = 1

    @property
    def is_video(self) -> bool:
        return len(self.pixel_shape) == 4

    def load_pixels(self, spec: Any, n: int, seed: int, data_range: Any) -> tuple[torch.Tensor, DataScaling]:
        """Images through :func:`lipscope.data.load_data_with_scaling`; videos from an array (file) (N, C, F, H, W)."""
        if not self.is_video:
            return load_data_with_scaling(spec, n, seed, self.pixel_shape, data_range)
        a = spec.detach().cpu().numpy() if isinstance(spec, torch.Tensor) else spec
        if isinstance(a, str) and a.lower().endswith((".npy", ".npz", ".pt", ".pth")):
            from pathlib import Path

            a = load_array(Path(a))
        if not isinstance(a, np.ndarray) or tuple(a.shape[1:]) != self.pixel_shape:
            got = tuple(a.shape) if isinstance(a, np.ndarray) else repr(spec)
            raise InputError(
                f"`data` {got}: this pipeline's autoencoder takes videos (N, {', '.join(map(str, self.pixel_shape))}); "
                "give an array (file) of videos, or precomputed latents"
            )
        y, how = scale_array(a, "`data` videos", data_range)
        return torch.from_numpy(y[choose_indices(a.shape[0], n, seed)]), how

    def _batches(self, x: torch.Tensor):
        step = VIDEO_BATCH if self.is_video else IMAGE_BATCH
        return [x[s : s + step] for s in range(0, x.shape[0], step)]

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Latents (N, *sample_row) of pixels x (N, *pixel_shape) in [−1, 1]; videos one at a time, and where one
        does not fit in memory, through the autoencoder's own tiling (``enable_tiling``: frames and tiles in turn)."""
        p = next(self.vae.parameters())
        out = []
        with torch.no_grad():
            for xb in self._batches(x):
                z = self._encode_fitting(xb.reshape(xb.shape[0], *self.vae_pixels).to(p.device, p.dtype))
                d = z.reshape(z.shape[0], -1).to(torch.float64).cpu()
                lat = torch.empty_like(d)
                lat[:, self.index] = (d - self.shift) / self.scale
                out.append(lat.reshape(z.shape[0], *self.sample_row))
        z = torch.cat(out)
        return z if x.dtype == torch.float64 else z.float()

    def _encode_fitting(self, x: torch.Tensor) -> torch.Tensor:
        try:
            return _encode(self.vae, x)
        except torch.OutOfMemoryError:
            if not hasattr(self.vae, "enable_tiling") or getattr(self.vae, "use_tiling", False):
                raise
            log.warning("%s: out of memory encoding one sample; encoding it with the autoencoder's tiling", self.kind)
            if x.is_cuda:
                torch.cuda.empty_cache()
            self.vae.enable_tiling()
            return _encode(self.vae, x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Pixels in [−1, 1] of latents z, through the map the pipeline applies before ``vae.decode``."""
        p = next(self.vae.parameters())
        out = []
        with torch.no_grad():
            for zb in self._batches(z):
                d = self.scale * zb.reshape(zb.shape[0], -1).to("cpu", torch.float64)[:, self.index] + self.shift
                dz = d.reshape(zb.shape[0], *self.decode_row).to(p.device, p.dtype)
                px = first_output(self.vae.decode(dz, *self.decode_args, **self.decode_kwargs))
                out.append(px.clamp(-1, 1).float().cpu().reshape(zb.shape[0], *self.pixel_shape))
        return torch.cat(out)

    def describe(self) -> dict[str, Any]:
        return {
            "space": "latent",
            "autoencoder": self.kind,
            "component": self.component,
            "pixel_shape": list(self.pixel_shape),
            "latent_shape": list(self.sample_row),
            "encoding": "the pipeline's map to vae.decode, identified and inverted: latent[idx] = (encoder mean − b)/a",
            "map": {"a_range": [float(self.scale.min()), float(self.scale.max())],
                    "b_range": [float(self.shift.min()), float(self.shift.max())],
                    "identity_layout": bool(torch.equal(self.index, torch.arange(self.index.numel()))),
                    "check_rel_residual": self.residual},
        }  # fmt: skip


@dataclass(frozen=True)
class UnidentifiedCodec:
    """A pipeline whose path to ``vae.decode`` could not be identified: it is probed on precomputed latents only
    (arrays of the denoiser's shape, fed as they are); pixel data is refused with the reason."""

    reason: str
    pixel_shape: tuple[int, ...] = ()
    kind: str = "unidentified"
    component: str = "vae"
    downsample: int = 1

    def _refuse(self, *_: Any, **__: Any) -> Any:
        raise InputError(
            f"`data`: this pipeline's autoencoder map could not be identified ({self.reason}); give precomputed "
            "latents in the denoiser's own shape"
        )

    load_pixels = encode = decode = _refuse

    def describe(self) -> dict[str, Any]:
        return {"space": "latent", "autoencoder": "unidentified", "reason": self.reason}


def identify_codec(pipe: Any, denoiser: Any, call_kwargs: dict[str, Any], sample: torch.Tensor,
                   stub: list[Any]) -> PipelineCodec:  # fmt: skip
    """The autoencoder map of ``pipe`` (see the module docstring); ``sample``: the recorded latents (P, …);
    ``stub``: the denoiser's recorded return values of one step (the runs only follow the latents' path)."""
    vae = pipe.vae
    kw = {**call_kwargs, "num_inference_steps": 2}  # not 1: some pipelines take another path for one step (PixArt)
    if "output_type" in kw:
        kw["output_type"] = "pt"
    n = sample.numel()
    gen = torch.Generator().manual_seed(12345)
    finals = [torch.zeros(n), torch.ones(n), torch.arange(n, dtype=torch.float64), torch.randn(n, generator=gen)]
    ds, decs = [], []
    for f in finals:
        rec = record(pipe, denoiser, kw, final=f.reshape(sample.shape), stop_at_decode=True, stub=stub)
        if rec.decode is None:
            raise Unidentified("the pipeline did not call vae.decode with output_type 'pt'")
        ds.append(_decode_input(rec.decode))
        decs.append(rec.decode)
    d0, d1, didx, drand = ds
    if d0.numel() != n:
        raise Unidentified(f"vae.decode gets {d0.numel()} numbers for {n} latent numbers")
    a, b = (d1 - d0).reshape(-1), d0.reshape(-1)
    if bool((a.abs() < 1e-12).any()):
        raise Unidentified("part of the latents does not reach vae.decode")
    pos = ((didx.reshape(-1) - b) / a).reshape(-1)
    idx = pos.round()
    u = unit_roundoff(sample.dtype)
    if float((pos - idx).abs().max()) > 0.25 or not torch.equal(idx.sort().values, torch.arange(n, dtype=idx.dtype)):
        raise Unidentified("the latents reach vae.decode through more than a permutation and an element-wise scaling")
    idx = idx.long()
    res = relative_error(a * finals[3].to(torch.float64)[idx] + b, drand.reshape(-1))
    if res > 256 * u:
        raise Unidentified(f"vae.decode's input is not an element-wise affine map of the latents (residual {res:.2g})")
    rows, drow = sample.shape[0], tuple(d0.shape[1:])
    per = n // rows
    i2 = idx.reshape(rows, per) - (torch.arange(rows) * per)[:, None]
    if d0.shape[0] != rows or not (i2 == i2[0]).all() or not (a.reshape(rows, per) == a[:per]).all():
        raise Unidentified("the map to vae.decode mixes samples")
    dec_args, dec_kwargs = _decode_extra(decs[0])
    p = next(vae.parameters())
    probe = first_output(vae.decode(d0[:1].to(p.device, p.dtype), *dec_args, **dec_kwargs))
    vae_pixels = tuple(probe.shape[1:])
    pixel = vae_pixels
    if len(vae_pixels) == 4 and vae_pixels[1] == 1:  # a video autoencoder on one frame: images
        pixel = (vae_pixels[0], *vae_pixels[2:])
    z = _encode(vae, torch.zeros(1, *vae_pixels, dtype=probe.dtype, device=probe.device))
    if tuple(z.shape[1:]) != drow:
        raise Unidentified(f"the encoder gives latents {tuple(z.shape[1:])}, the decoder takes {drow}")
    return PipelineCodec(
        vae=vae.eval(), kind=type(vae).__name__, scale=a[:per].clone(), shift=b[:per].clone(), index=i2[0].clone(),
        decode_row=drow, sample_row=tuple(sample.shape[1:]), vae_pixels=vae_pixels, pixel_shape=pixel,
        decode_args=dec_args, decode_kwargs=dec_kwargs, residual=res, downsample=max(1, pixel[-1] // drow[-1]),
    )  # fmt: skip


def _decode_extra(dec: tuple[tuple, dict[str, Any]]) -> tuple[tuple, dict[str, Any]]:
    """The arguments other than the latents the pipeline passes to ``vae.decode`` (e.g. LTX's timestep)."""
    args, kwargs = dec
    out = {k: v for k, v in kwargs.items() if k != "return_dict"}
    if not args:  # the latents were passed by keyword: drop them
        out.pop(next(k for k, v in kwargs.items() if isinstance(v, torch.Tensor)), None)
    return tuple(args[1:]), out
