"""Independent reference implementations of ONE training step's loss, per model family, written from diffusers' own
example training scripts (diffusers 0.42.1 and the example scripts of the same era):

* ``sd_loss``   -- ``examples/text_to_image/train_text_to_image.py`` (+ ``train_text_to_image_lora.py``; SDXL:
  ``train_text_to_image_sdxl.py``'s ``added_cond_kwargs``);
* ``dit_loss``  -- no diffusers training script exists for DiT; the noising / target follow
  ``train_text_to_image.py`` and the output split follows ``DiTPipeline.__call__``;
* ``sd3_loss``  -- ``examples/dreambooth/train_dreambooth_sd3.py`` / ``train_dreambooth_lora_sd3.py``;
* ``flux_loss`` -- ``examples/dreambooth/train_dreambooth_flux.py`` (= ``train_dreambooth_lora_flux.py``'s loop).

lipscope is deliberately NOT imported here: this module is what lipscope's training code is tested against.

Every function takes the denoiser module already built and every random tensor already drawn (latents ``x0``,
``noise``, the timesteps or the flow-matching density sample ``u``), so a test can feed lipscope and this reference
the SAME draws; nothing in here draws random numbers. The functions neither switch the module's train / eval mode
nor disable autograd: the returned loss is differentiable w.r.t. the module's parameters, as in the scripts.

E-TSDM (``etsdm=(t_tilde, n)``): the noise is always added at the TRUE timestep; only the timestep the NETWORK is
fed is replaced by ``etsdm_reference(t, t_tilde, n)`` (the paper's piecewise-constant map on ``[0, t_tilde)``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import compute_loss_weighting_for_sd3

# FLUX.1's VAE: 2 ** (len(block_out_channels) - 1) = 8. ``_unpack_latents`` is handed ``latent H * vae_scale_factor``
# pixels (train_dreambooth_flux.py) and maps it back with ``2 * (height // (vae_scale_factor * 2))`` = H for even H,
# whatever the factor, so the value only has to be consistent between the two calls.
_FLUX_VAE_SCALE_FACTOR = 8


# --------------------------------------------------------------------------------------------------------------------
# E-TSDM
# --------------------------------------------------------------------------------------------------------------------


def etsdm_reference(t: torch.Tensor, t_tilde: float, n: int) -> torch.Tensor:
    """The E-TSDM timestep map, written plainly:

    ``t -> (t_tilde / n) * floor(t * n / t_tilde)`` for ``t < t_tilde``, ``t`` otherwise

    (``[0, t_tilde)`` is cut into ``n`` equal intervals and every ``t`` in an interval is fed the interval's start).
    Computed in float64, returned as float32 on ``t``'s device. ``t`` may be integer or floating; units are the
    caller's (DDPM steps 0..T-1, or ``sigma * 1000`` for the flow-matching families).
    """
    if not (isinstance(n, int) and n >= 1):
        raise ValueError(f"n must be a positive int, got {n!r}")
    if not t_tilde > 0:
        raise ValueError(f"t_tilde must be > 0, got {t_tilde!r}")
    t64 = torch.as_tensor(t).to(torch.float64)
    t_tilde = float(t_tilde)
    mapped = (t_tilde / n) * torch.floor(t64 * n / t_tilde)
    return torch.where(t64 < t_tilde, mapped, t64).to(torch.float32)


def _fed(timesteps: torch.Tensor, etsdm) -> torch.Tensor:
    """What the network is fed: the timesteps themselves, or their E-TSDM image."""
    if etsdm is None:
        return timesteps
    t_tilde, n = etsdm
    return etsdm_reference(timesteps, t_tilde, n)


# --------------------------------------------------------------------------------------------------------------------
# DDPM families (Stable Diffusion / SDXL, DiT)
# --------------------------------------------------------------------------------------------------------------------


def _ddpm_target(scheduler, latents, noise, timesteps):
    """train_text_to_image.py: ``target = noise`` (epsilon) or ``noise_scheduler.get_velocity(latents, noise,
    timesteps)`` (v_prediction); anything else raises, as the script does."""
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"Unknown prediction type {prediction_type}")


def sd_loss(
    unet,
    scheduler,
    latents: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    etsdm=None,
    added_cond_kwargs=None,
) -> torch.Tensor:
    """Stable Diffusion (``UNet2DConditionModel``) loss of one step, as ``train_text_to_image.py`` (``snr_gamma``
    None, no noise offset / input perturbation / DREAM):

    .. code-block:: python

        noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
        target = noise  # or noise_scheduler.get_velocity(latents, noise, timesteps) for v_prediction
        model_pred = unet(noisy_latents, timesteps, encoder_hidden_states, return_dict=False)[0]
        loss = F.mse_loss(model_pred.float(), target.float(), reduction="mean")

    ``timesteps`` are the integer DDPM steps the script draws (``torch.randint(0, T, (bsz,))``); they index
    ``alphas_cumprod`` in ``add_noise`` / ``get_velocity``. With ``etsdm=(t_tilde, n)`` the UNet is fed
    ``etsdm_reference(timesteps, t_tilde, n)`` instead (float32), the noising and the target stay at ``timesteps``.
    SDXL: ``added_cond_kwargs={"text_embeds": ..., "time_ids": ...}`` is passed through to the UNet, as
    ``train_text_to_image_sdxl.py`` does (None for SD 1.x / 2.x, the UNet's default).
    """
    noisy_latents = scheduler.add_noise(latents, noise, timesteps)
    target = _ddpm_target(scheduler, latents, noise, timesteps)
    model_pred = unet(
        noisy_latents,
        _fed(timesteps, etsdm),
        encoder_hidden_states,
        added_cond_kwargs=added_cond_kwargs,
        return_dict=False,
    )[0]
    return F.mse_loss(model_pred.float(), target.float(), reduction="mean")


def dit_loss(
    transformer,
    scheduler,
    latents: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    class_labels: torch.Tensor,
    etsdm=None,
) -> torch.Tensor:
    """DiT (``DiTTransformer2DModel``, class-conditional) loss of one step: the simple epsilon MSE.

    Noising as ``train_text_to_image.py`` (``scheduler.add_noise(latents, noise, timesteps)``, integer steps);
    the network is called as ``DiTPipeline`` calls it (``transformer(x, timestep=..., class_labels=...)``) and, as
    ``DiTPipeline`` splits a learned-sigma output (``out_channels // 2 == in_channels``), the epsilon prediction is
    the first ``in_channels`` channels (the rest, the variance interpolation, is dropped). ``loss = MSE(eps, noise)``.

    NOT included: the variational-bound term ``L_vb`` that the original DiT (facebookresearch/DiT, ``learn_sigma``)
    adds to train the variance channels -- diffusers has no DiT training script and no such loss. DiT checkpoints
    are epsilon-prediction; a scheduler with another ``prediction_type`` is refused.
    """
    if scheduler.config.prediction_type != "epsilon":
        raise ValueError(f"dit_loss expects an epsilon-prediction scheduler, got {scheduler.config.prediction_type!r}")
    noisy_latents = scheduler.add_noise(latents, noise, timesteps)
    noise_pred = transformer(
        noisy_latents, timestep=_fed(timesteps, etsdm), class_labels=class_labels, return_dict=False
    )[0]
    latent_channels = transformer.config.in_channels
    if transformer.config.out_channels // 2 == latent_channels:
        model_output, _ = torch.split(noise_pred, latent_channels, dim=1)
    else:
        model_output = noise_pred
    return F.mse_loss(model_output.float(), noise.float(), reduction="mean")


# --------------------------------------------------------------------------------------------------------------------
# Flow-matching families (SD3, FLUX.1)
# --------------------------------------------------------------------------------------------------------------------


def flow_scheduler_sigmas(scheduler_config: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """``(timesteps, sigmas)`` the flow-matching training scripts index: a FRESH
    ``FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)`` (the scripts' ``noise_scheduler_copy``, on
    which ``set_timesteps`` is never called), its ``.timesteps`` and ``.sigmas`` (both length ``T``, descending,
    ``timesteps == sigmas * T``; the static ``shift`` is applied unless ``use_dynamic_shifting``, as ``__init__``
    does -- FLUX.1-dev's config therefore trains on UNshifted sigmas)."""
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
    return scheduler.timesteps, scheduler.sigmas


def _flow_draw(scheduler, latents: torch.Tensor, u: torch.Tensor):
    """The scripts' timestep / sigma lookup and flow-matching noising, shared by SD3 and FLUX:

    .. code-block:: python

        indices = (u * noise_scheduler_copy.config.num_train_timesteps).long()
        timesteps = noise_scheduler_copy.timesteps[indices].to(device=model_input.device)
        sigmas = get_sigmas(timesteps, n_dim=model_input.ndim, dtype=model_input.dtype)

    with the scripts' ``get_sigmas`` (look each timestep up in ``schedule_timesteps`` by equality, take that
    sigma, unsqueeze to ``n_dim``). Returns ``(timesteps, sigmas)``; the caller noises
    ``(1.0 - sigmas) * model_input + sigmas * noise``.
    """
    num_train_timesteps = scheduler.config.num_train_timesteps
    if len(scheduler.timesteps) != num_train_timesteps or len(scheduler.sigmas) != num_train_timesteps:
        raise ValueError(
            "the training scripts index a fresh FlowMatchEulerDiscreteScheduler (no set_timesteps): expected "
            f"{num_train_timesteps} timesteps / sigmas, got {len(scheduler.timesteps)} / {len(scheduler.sigmas)}"
        )
    indices = (u * num_train_timesteps).long()
    timesteps = scheduler.timesteps[indices.cpu()].to(device=latents.device)

    # the script's get_sigmas(timesteps, n_dim=model_input.ndim, dtype=model_input.dtype)
    all_sigmas = scheduler.sigmas.to(device=latents.device, dtype=latents.dtype)
    schedule_timesteps = scheduler.timesteps.to(latents.device)
    step_indices = [(schedule_timesteps == t).nonzero().item() for t in timesteps]
    sigmas = all_sigmas[step_indices].flatten()
    while len(sigmas.shape) < latents.ndim:
        sigmas = sigmas.unsqueeze(-1)
    return timesteps, sigmas


def _weighted_flow_loss(model_pred, target, sigmas, weighting_scheme):
    """The scripts' reduction: per-sample mean of ``weighting * (pred - target) ** 2``, then the batch mean."""
    weighting = compute_loss_weighting_for_sd3(weighting_scheme=weighting_scheme, sigmas=sigmas)
    loss = torch.mean(
        (weighting.float() * (model_pred.float() - target.float()) ** 2).reshape(target.shape[0], -1),
        1,
    )
    return loss.mean()


def sd3_loss(
    transformer,
    scheduler,
    latents: torch.Tensor,
    noise: torch.Tensor,
    u: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    pooled_projections: torch.Tensor,
    weighting_scheme: str = "none",
    etsdm=None,
    precondition_outputs: bool = False,
) -> torch.Tensor:
    """Stable Diffusion 3 (``SD3Transformer2DModel``) rectified-flow loss of one step, as
    ``train_dreambooth_sd3.py`` (no prior preservation):

    * ``u`` is the density sample in ``[0, 1)`` already drawn (``compute_density_for_timestep_sampling``'s output);
      ``indices = (u * T).long()``, ``timesteps = scheduler.timesteps[indices]`` (``sigma * 1000``, descending in
      the index: ``u -> 0`` is pure noise), ``sigmas`` by the script's ``get_sigmas``;
    * ``noisy = (1 - sigma) * latents + sigma * noise``;
    * ``model_pred = transformer(hidden_states=noisy, timestep=timesteps, encoder_hidden_states=...,
      pooled_projections=..., return_dict=False)[0]`` -- with ``etsdm=(t_tilde, n)`` the transformer is fed
      ``etsdm_reference(timesteps, t_tilde, n)`` instead, ``t_tilde`` in the same ``sigma * 1000`` units (100 = 0.1
      of sigma's range); the noising stays at the true sigma;
    * ``target = noise - latents``; ``weighting = compute_loss_weighting_for_sd3(weighting_scheme, sigmas)``;
      ``loss = mean_b(mean_elements(weighting * (pred - target) ** 2))``.

    ``scheduler`` must be the fresh ``FlowMatchEulerDiscreteScheduler`` the script copies (no ``set_timesteps``).

    ``precondition_outputs``: ``train_dreambooth_sd3.py``'s ``--precondition_outputs`` (type int, DEFAULT 1 in the
    script) replaces ``model_pred`` by ``model_pred * (-sigmas) + noisy`` and the target by ``latents`` (EDM-style),
    which equals the plain loss re-weighted by ``sigma ** 2`` per sample. Default False here: the plain
    velocity target ``noise - latents`` (``--precondition_outputs 0``).
    """
    timesteps, sigmas = _flow_draw(scheduler, latents, u)
    noisy_model_input = (1.0 - sigmas) * latents + sigmas * noise
    model_pred = transformer(
        hidden_states=noisy_model_input,
        timestep=_fed(timesteps, etsdm),
        encoder_hidden_states=encoder_hidden_states,
        pooled_projections=pooled_projections,
        return_dict=False,
    )[0]
    if precondition_outputs:
        model_pred = model_pred * (-sigmas) + noisy_model_input
        target = latents
    else:
        target = noise - latents
    return _weighted_flow_loss(model_pred, target, sigmas, weighting_scheme)


def flux_helpers():
    """``(prepare_latent_image_ids, pack_latents, unpack_latents)``: ``FluxPipeline``'s own static methods
    (``transformers``, which the real pipeline class needs, is a test dependency)."""
    from diffusers import FluxPipeline

    return FluxPipeline._prepare_latent_image_ids, FluxPipeline._pack_latents, FluxPipeline._unpack_latents


def flux_loss(
    transformer,
    scheduler,
    latents: torch.Tensor,
    noise: torch.Tensor,
    u: torch.Tensor,
    prompt_embeds: torch.Tensor,
    pooled_prompt_embeds: torch.Tensor,
    guidance=None,
    weighting_scheme: str = "none",
    etsdm=None,
) -> torch.Tensor:
    """FLUX.1 (``FluxTransformer2DModel``) rectified-flow loss of one step, as ``train_dreambooth_flux.py`` (no
    prior preservation). ``latents`` are the UNPACKED ``(B, C, H, W)`` VAE latents (H, W even).

    * timesteps / sigmas / noising exactly as ``sd3_loss`` (same ``u``, ``indices``, ``get_sigmas``);
    * ``latent_image_ids = FluxPipeline._prepare_latent_image_ids(B, H // 2, W // 2, device, dtype)`` (0.42's
      helper takes the PACKED grid size; the script passes ``model_input.shape[2] // 2``), ``text_ids =
      zeros(seq_len, 3)`` (what ``encode_prompt`` returns), ``FluxPipeline._pack_latents(noisy, B, C, H, W)``;
    * ``guidance = torch.tensor([guidance]).expand(B)`` when ``transformer.config.guidance_embeds`` (the script's
      ``--guidance_scale``, default 3.5 there; required here), else None (the value is ignored);
    * ``transformer(hidden_states=packed, timestep=timesteps / 1000, guidance=..., pooled_projections=...,
      encoder_hidden_states=..., txt_ids=text_ids, img_ids=latent_image_ids, return_dict=False)[0]`` -- with
      ``etsdm=(t_tilde, n)`` the timestep is ``etsdm_reference(timesteps, t_tilde, n) / 1000``, ``t_tilde`` in
      ``sigma * 1000`` units;
    * ``FluxPipeline._unpack_latents(pred, height=H * vsf, width=W * vsf, vae_scale_factor=vsf)`` (gives back
      ``H x W`` for any ``vsf``; 8 here);
    * ``target = noise - latents``; weighted reduction as ``sd3_loss``.
    """
    prepare_latent_image_ids, pack_latents, unpack_latents = flux_helpers()
    batch_size, num_channels, height, width = latents.shape

    latent_image_ids = prepare_latent_image_ids(batch_size, height // 2, width // 2, latents.device, latents.dtype)
    text_ids = torch.zeros(prompt_embeds.shape[1], 3).to(device=prompt_embeds.device, dtype=prompt_embeds.dtype)

    timesteps, sigmas = _flow_draw(scheduler, latents, u)
    noisy_model_input = (1.0 - sigmas) * latents + sigmas * noise
    packed_noisy_model_input = pack_latents(
        noisy_model_input, batch_size=batch_size, num_channels_latents=num_channels, height=height, width=width
    )

    if transformer.config.guidance_embeds:
        if guidance is None:
            raise ValueError("the transformer embeds guidance (guidance_embeds=True): pass guidance=<scale>")
        guidance_tensor = torch.tensor([float(guidance)], device=latents.device).expand(batch_size)
    else:
        guidance_tensor = None

    model_pred = transformer(
        hidden_states=packed_noisy_model_input,
        timestep=_fed(timesteps, etsdm) / 1000,
        guidance=guidance_tensor,
        pooled_projections=pooled_prompt_embeds,
        encoder_hidden_states=prompt_embeds,
        txt_ids=text_ids,
        img_ids=latent_image_ids,
        return_dict=False,
    )[0]
    model_pred = unpack_latents(
        model_pred,
        height=height * _FLUX_VAE_SCALE_FACTOR,
        width=width * _FLUX_VAE_SCALE_FACTOR,
        vae_scale_factor=_FLUX_VAE_SCALE_FACTOR,
    )
    target = noise - latents
    return _weighted_flow_loss(model_pred, target, sigmas, weighting_scheme)
