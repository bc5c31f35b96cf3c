"""One training step's loss for EDM and VE models, written from the papers' reference code (lipscope is deliberately
NOT imported: this is what lipscope's objectives are tested against):

* :func:`edm_loss` -- NVlabs/edm ``training/loss.py`` ``EDMLoss.__call__`` with ``training/networks.py``
  ``EDMPrecond.forward`` around a diffusers ``UNet2DModel`` (its ``model(c_in·x, c_noise)``);
* :func:`ve_loss` -- score_sde(_pytorch) ``losses.py`` ``get_sde_loss_fn`` (continuous, ``reduce_mean=True``,
  ``likelihood_weighting=False``) for ``VESDE`` with an NCSN++-style score network fed σ (``get_score_fn``: labels =
  std, the network divides by σ itself: diffusers' fourier UNet2DModel).

The random draws (NVlabs' ``rnd_normal`` and noise, score_sde's t and z) are arguments, so a test feeds the same
draws to lipscope. Everything is computed in the dtype of the inputs (tests pass float64 and a float64 copy of the
network, so the reference's own rounding is negligible).

E-TSDM (``etsdm=(t_tilde, n)``, on lipscope's model-step axis, docs/etsdm.md): only the network's time input is
replaced, by the one at f(k) with k the step of σ on the process's ramp (VE: k = T·t; EDM: the Karras ramp
k = (T−1)(σ^{1/ρ} − σ_min^{1/ρ})/(σ_max^{1/ρ} − σ_min^{1/ρ}), the inverse of
``EDMEulerScheduler._compute_karras_sigmas`` read from the low end); f(k) = (t̃/n)⌊k n/t̃⌋ for k < t̃, with k < 0
(σ below σ_min) in the first sub-interval. The noise, c_in, c_skip, c_out and the weight stay at the true σ.
"""

from __future__ import annotations

import torch


def _f(k: torch.Tensor, etsdm) -> torch.Tensor:
    t_tilde, n = etsdm
    w = t_tilde / n
    return torch.where(k < t_tilde, torch.floor(k.clamp(min=0) / w) * w, k)


def edm_step_sigma(sigma: torch.Tensor, cfg, etsdm) -> torch.Tensor:
    """σ at f(k(σ)) on an EDM Karras ramp ``cfg`` (sigma_min, sigma_max, rho, num_train_timesteps)."""
    lo, hi, rho, T = (
        cfg["sigma_min"] ** (1 / cfg["rho"]),
        cfg["sigma_max"] ** (1 / cfg["rho"]),
        cfg["rho"],
        cfg["num_train_timesteps"],
    )
    k = (T - 1) * (sigma ** (1 / rho) - lo) / (hi - lo)
    return (lo + _f(k, etsdm) / (T - 1) * (hi - lo)) ** rho


def edm_loss(unet, images, noise_unit, rnd_normal, *, sigma_data=0.5, P_mean=-1.2, P_std=1.2, v_prediction=False,
             ramp=None, etsdm=None):  # fmt: skip
    """``EDMLoss`` (P_mean, P_std, σ_data) of one batch, mean over every element (NVlabs sums a sample's elements and
    averages the batch: a constant factor). ``rnd_normal`` (B,), ``noise_unit`` ~ N(0, I) (``torch.randn_like(y)``).
    ``v_prediction``: diffusers' EDM schedulers' v-prediction, c_out negated (``precondition_outputs``)."""
    rnd_normal = rnd_normal.reshape(-1, 1, 1, 1)
    sigma = (rnd_normal * P_std + P_mean).exp()
    weight = (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2
    y = images
    n = noise_unit * sigma
    x = y + n
    # EDMPrecond.forward
    c_skip = sigma_data**2 / (sigma**2 + sigma_data**2)
    c_out = sigma * sigma_data / (sigma**2 + sigma_data**2).sqrt() * (-1.0 if v_prediction else 1.0)
    c_in = 1 / (sigma_data**2 + sigma**2).sqrt()
    fed = sigma if etsdm is None else edm_step_sigma(sigma, ramp, etsdm)
    c_noise = fed.log() / 4
    F_x = unet(c_in * x, c_noise.flatten()).sample
    D_yn = c_skip * x + c_out * F_x
    loss = weight * ((D_yn - y) ** 2)
    return loss.mean()


def ve_loss(unet, batch, z, t, *, sigma_min, sigma_max, T=None, etsdm=None):  # noqa: N803
    """score_sde's continuous VE loss: std = σ_min (σ_max/σ_min)^t, x = batch + std·z, score = model(x, std),
    losses = (score·std + z)², mean over a sample's elements, then over the batch. ``T``: the model steps per unit
    t (the scheduler's num_train_timesteps), needed for E-TSDM's k = T·t."""
    std = sigma_min * (sigma_max / sigma_min) ** t
    perturbed_data = batch + std[:, None, None, None] * z
    fed = std if etsdm is None else sigma_min * (sigma_max / sigma_min) ** (_f(t * T, etsdm) / T)
    score = unet(perturbed_data, fed).sample
    losses = torch.square(score * std[:, None, None, None] + z)
    losses = torch.mean(losses.reshape(losses.shape[0], -1), dim=-1)
    return torch.mean(losses)
