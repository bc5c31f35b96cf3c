"""Independent per-sample references for the generic adapter: K(k, k′) = ‖ε(x_k, k′) − ε(x_k, k)‖ / ((k′ − k)/T) from
each pipeline's OWN denoising step, and its latents from its own autoencoder path.

lipscope is deliberately NOT imported. The model output at a noise level comes from the pipeline's ``__call__``
itself, one sample at a time: one step, ``latents`` = the sample (in the space ``__call__`` takes them), the
scheduler's state set right after the pipeline's own ``set_timesteps`` to the chosen point (flow matching:
``sigmas = [σ, 0]``, ``timesteps = [σ·T]``; VP: ``timesteps = [k]``), and the pipeline's own call stopped inside
``scheduler.step``, where ``model_output`` is what it integrates (its CFG combination, sign, learned-variance split
included). CogView4 feeds an unshifted whole-step time while its noise level is shifted: it gets its own
``timesteps=[t]`` (t whole) and the σ its scheduler derives from it is read back. DeepFloyd IF and DanceDiffusion
take no ``latents``: their denoiser call is written out from their ``__call__`` (quoted below).

ε from the model output, as each scheduler defines the prediction:

* flow matching (``FlowMatchEulerDiscreteScheduler``: ``scale_noise`` x = σ ε + (1 − σ) x0, ``step`` x' = x +
  (σ' − σ) u): u = ε − x0, so ε = x + (1 − σ) u;
* VP v-prediction (CogVideoX's DDIM ``step``: ``pred_epsilon = alpha_prod_t**0.5 * model_output + beta_prod_t**0.5 *
  sample``), ᾱ from ``scheduler.alphas_cumprod``; ε-prediction (IF's DDPM, learned variance: the first C channels);
* IPNDM (DanceDiffusion: ``ets = sample * betas[i] + model_output * alphas[i]`` with (alphas, betas) = (cos, sin)
  of π t / 2): ε = sin(π t/2) x + cos(π t/2) v.

Encoders: the inverse of each pipeline's own path to ``vae.decode`` (written from that path, with the pipeline's own
packing helpers), applied to the encoder's mean (``latent_dist.mode()``; Sana's deep-compression encoder:
``.latent``).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch

F64 = torch.float64


class _Stop(Exception):  # noqa: N818
    def __init__(self, out: torch.Tensor, sample: torch.Tensor, sigma: float | None) -> None:
        self.out, self.sample, self.sigma = out, sample, sigma


def step_output(pipe: Any, latents: torch.Tensor, point: float, kind: str, call: dict[str, Any]) -> tuple:
    """(model output handed to ``scheduler.step``, sample, σ or k used) of ``pipe`` at ``point`` (σ for flow, k for
    VP; CogView4: the unshifted t) for one sample ``latents`` (in ``__call__``'s latent space)."""
    s = pipe.scheduler
    orig_set = s.set_timesteps
    T = s.config.num_train_timesteps

    def set_timesteps(*a, **kw):
        orig_set(*a, **kw)
        if kind == "flow":
            s.sigmas = torch.tensor([point, 0.0])
            s.timesteps = torch.tensor([point * T])
        elif kind == "vp":
            s.timesteps = torch.tensor([int(point)])

    def step(model_output, timestep, sample, *a, **kw):
        sigmas = getattr(s, "sigmas", None)
        sigma = float(sigmas[0]) if kind in ("flow", "cogview4") and sigmas is not None else None
        raise _Stop(model_output.detach().clone(), sample.detach().clone(), sigma)

    # functools.wraps: the pipelines inspect set_timesteps' signature (retrieve_timesteps)
    s.set_timesteps, s.step = functools.wraps(orig_set)(set_timesteps), step
    extra = {"timesteps": [point * T]} if kind == "cogview4" else {}  # it truncates t to whole steps, σ from that
    try:
        pipe(**call, **extra, latents=latents, num_inference_steps=1, output_type="latent")
    except _Stop as e:
        return e.out, e.sample, e.sigma
    finally:
        del s.set_timesteps, s.step
    raise AssertionError("the pipeline never reached scheduler.step")


def flow_eps(u: torch.Tensor, x: torch.Tensor, sigma: float) -> torch.Tensor:
    return x + (1 - sigma) * u


def k_flow(pipe: Any, x0: torch.Tensor, noise: torch.Tensor, conds: list[dict], points: tuple[float, float],
           unpack=None, cogview: bool = False) -> tuple[torch.Tensor, tuple[float, float]]:  # fmt: skip
    """K per sample (per unit of σ = k/T) between the flow-matching points σ_a, σ_b (CogView4: two unshifted times,
    their σ read back from its scheduler), and the model steps σ·T used. x0, noise: (n, …) in the denoiser's space;
    ``conds[i]``: sample i's ``__call__`` conditioning; ``unpack``: the inverse of what ``__call__`` does to the
    ``latents`` it is given (Flux.2 packs them itself). x = σ_a ε + (1 − σ_a) x0 is drawn once and fed at both; ε is
    formed from the sample the pipeline itself handed ``step``."""
    kind = "cogview4" if cogview else "flow"
    T = pipe.scheduler.config.num_train_timesteps
    lat = unpack or (lambda v: v)
    out, sig = [], list(points)
    for i in range(x0.shape[0]):
        if cogview:
            sig = [step_output(pipe, lat(torch.zeros_like(x0[:1])), p, kind, conds[i])[2] for p in points]
        x = sig[0] * noise[i : i + 1] + (1 - sig[0]) * x0[i : i + 1]
        eps = []
        for p, s in zip(points, sig, strict=True):
            u, sample, _ = step_output(pipe, lat(x), p, kind, conds[i])
            eps.append(flow_eps(u.to(F64).reshape(x.shape), sample.to(F64).reshape(x.shape), s))
        out.append(torch.linalg.vector_norm(eps[1] - eps[0]) / (sig[1] - sig[0]))
    return torch.stack(out), (sig[0] * T, sig[1] * T)


def k_vp_v(pipe: Any, x0: torch.Tensor, noise: torch.Tensor, conds: list[dict], ks: tuple[int, int]) -> torch.Tensor:
    """K per sample between integer steps k_a, k_b for a VP v-prediction pipeline (CogVideoX)."""
    ac = pipe.scheduler.alphas_cumprod.to(F64)
    T = pipe.scheduler.config.num_train_timesteps
    out = []
    for i in range(x0.shape[0]):
        a, s = ac[ks[0]].sqrt(), (1 - ac[ks[0]]).sqrt()
        x = a * x0[i : i + 1] + s * noise[i : i + 1]
        eps = []
        for k in ks:
            v, _, _ = step_output(pipe, x, k, "vp", conds[i])
            eps.append(ac[k].sqrt() * v.to(F64) + (1 - ac[k]).sqrt() * x)
        out.append(torch.linalg.vector_norm(eps[1] - eps[0]) / ((ks[1] - ks[0]) / T))
    return torch.stack(out)


def k_if(pipe: Any, x0: torch.Tensor, noise: torch.Tensor, embeds: list[tuple[torch.Tensor, torch.Tensor]],
         ks: tuple[int, int], w: float) -> torch.Tensor:  # fmt: skip
    """DeepFloyd IF stage I, written from IFPipeline.__call__ (it takes no ``latents``)::

        model_input = torch.cat([intermediate_images] * 2) if do_classifier_free_guidance else intermediate_images
        noise_pred = self.unet(model_input, t, encoder_hidden_states=prompt_embeds, ..., return_dict=False)[0]
        noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
        noise_pred_uncond, _ = noise_pred_uncond.split(model_input.shape[1], dim=1)
        noise_pred_text, predicted_variance = noise_pred_text.split(model_input.shape[1], dim=1)
        noise_pred = noise_pred_uncond + guidance_scale * (noise_pred_text - noise_pred_uncond)

    with ``prompt_embeds = torch.cat([negative_prompt_embeds, prompt_embeds])``; ε-prediction. ``embeds[i]``:
    (prompt_embeds, negative_prompt_embeds) of sample i. ᾱ = ∏(1 − β) in float64 from ``scheduler.betas``."""
    ab = torch.cumprod(1 - pipe.scheduler.betas.to(F64), 0)
    T = pipe.scheduler.config.num_train_timesteps
    c = x0.shape[1]
    out = []
    for i in range(x0.shape[0]):
        x = ab[ks[0]].sqrt() * x0[i : i + 1] + (1 - ab[ks[0]]).sqrt() * noise[i : i + 1]
        eps = []
        for k in ks:
            pe, npe = embeds[i]
            pred = pipe.unet(torch.cat([x] * 2), torch.tensor(k), encoder_hidden_states=torch.cat([npe, pe]),
                             return_dict=False)[0]  # fmt: skip
            unc, txt = pred.chunk(2)
            eps.append(unc[:, :c] + w * (txt[:, :c] - unc[:, :c]))
        out.append(torch.linalg.vector_norm(eps[1] - eps[0]) / ((ks[1] - ks[0]) / T))
    return torch.stack(out)


def k_dance(pipe: Any, x0: torch.Tensor, noise: torch.Tensor, ts: tuple[float, float]) -> torch.Tensor:
    """DanceDiffusion, written from its ``__call__``: ``model_output = self.unet(audio, t).sample`` with t the
    IPNDM timestep in [0, 1] (α = cos(π t/2), σ = sin(π t/2)), v-prediction. K per unit of t (T = 1 step of t)."""
    out = []
    for i in range(x0.shape[0]):
        a, s = math.cos(math.pi * ts[0] / 2), math.sin(math.pi * ts[0] / 2)
        x = a * x0[i : i + 1] + s * noise[i : i + 1]
        eps = []
        for t in ts:
            v = pipe.unet(x, torch.tensor(t, dtype=F64)).sample
            eps.append(math.sin(math.pi * t / 2) * x + math.cos(math.pi * t / 2) * v)
        out.append(torch.linalg.vector_norm(eps[1] - eps[0]) / (ts[1] - ts[0]))
    return torch.stack(out)


# --------------------------------------------------------------------------- encoders (pixels → the denoiser's space)


def _mean(vae: Any, px: torch.Tensor) -> torch.Tensor:
    out = vae.encode(px)
    return out.latent if hasattr(out, "latent") else out.latent_dist.mode()


def _channel(v, z: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(v, dtype=z.dtype).view(1, -1, *([1] * (z.ndim - 2)))


def encode(name: str, pipe: Any, px: torch.Tensor) -> torch.Tensor:
    """x0 of pixels ``px`` (images (n, 3, H, W) or videos (n, 3, F, H, W) in [−1, 1]) in ``name``'s denoiser space:
    the inverse of its ``__call__``'s path from latents to ``vae.decode`` (quoted per pipeline)."""
    vae, cfg = pipe.vae, pipe.vae.config
    if name == "Flux2Pipeline":  # unpack_with_ids; latents * sqrt(bn.running_var + eps) + bn.running_mean; unpatchify
        z = pipe._patchify_latents(_mean(vae, px))
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + cfg.batch_norm_eps)
        return pipe._pack_latents((z - vae.bn.running_mean.view(1, -1, 1, 1)) / std)
    if name == "QwenImagePipeline":  # unpack; latents / (1 / std) + mean; decode(...)[:, :, 0]
        z = _mean(vae, px[:, :, None])
        z = (z - _channel(cfg.latents_mean, z)) / _channel(cfg.latents_std, z)
        b, c, _, h, w = z.shape
        return pipe._pack_latents(z[:, :, 0], b, c, h, w)
    if name == "WanPipeline":  # latents / (1 / std) + mean
        z = _mean(vae, px)
        return (z - _channel(cfg.latents_mean, z)) / _channel(cfg.latents_std, z)
    if name == "ChromaPipeline":  # unpack; latents / scaling_factor + shift_factor
        z = (_mean(vae, px) - cfg.shift_factor) * cfg.scaling_factor
        b, c, h, w = z.shape
        return pipe._pack_latents(z, b, c, h, w)
    if name in ("ZImagePipeline", "Lumina2Pipeline", "HiDreamImagePipeline"):  # latents / sf + shift_factor
        return (_mean(vae, px) - cfg.shift_factor) * cfg.scaling_factor
    if name in ("SanaPipeline", "AuraFlowPipeline", "CogView4Pipeline", "HunyuanVideoPipeline"):  # latents / sf
        return _mean(vae, px) * cfg.scaling_factor
    if name == "LTXPipeline":  # unpack; _denormalize_latents(latents, vae.latents_mean, vae.latents_std, sf)
        z = pipe._normalize_latents(_mean(vae, px), vae.latents_mean, vae.latents_std, cfg.scaling_factor)
        return pipe._pack_latents(z, pipe.transformer_spatial_patch_size, pipe.transformer_temporal_patch_size)
    if name == "CogVideoXPipeline":  # latents.permute(0, 2, 1, 3, 4); 1 / vae_scaling_factor_image * latents
        return (_mean(vae, px) * pipe.vae_scaling_factor_image).permute(0, 2, 1, 3, 4)
    raise KeyError(name)


def flux2_unpack(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The inverse of Flux2Pipeline._pack_latents ((B, C, H, W) → (B, H·W, C) by reshape and permute): Flux2's
    ``prepare_latents`` packs the ``latents`` it is given."""
    return x.permute(0, 2, 1).reshape(x.shape[0], x.shape[2], h, w)
