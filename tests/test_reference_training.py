"""Sanity checks of tests/reference_training.py (the diffusers-script training-loss references) on tiny random
models. Independent of lipscope: nothing here imports it."""

from __future__ import annotations

import pytest
import reference_training as rt
import torch
import torch.nn.functional as F
from diffusers import (
    DDIMScheduler,
    DiTTransformer2DModel,
    FlowMatchEulerDiscreteScheduler,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    UNet2DConditionModel,
)
from family_fixtures import (
    _TINY_COND_UNET,
    LATENT_SHAPE,
    SD_CROSS_ATTENTION_DIM,
    SDXL_ADDITION_TIME_EMBED_DIM,
    SDXL_POOLED_DIM,
    SDXL_PROJECTION_DIM,
    TINY_DIT,
    sd_scheduler,
)
from family_fixtures2 import _TINY_SD3, SD3_JOINT_ATTENTION_DIM, SD3_POOLED_DIM
from family_fixtures3 import _TINY_FLUX, FLUX_JOINT_ATTENTION_DIM, FLUX_POOLED_DIM, FLUX_SCHEDULER_CONFIG

B = 2
TOKENS = 5


def _seeded(build):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return build().eval()


def _draws(seed=0, shape=(B, *LATENT_SHAPE)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g), g


class _Capture:
    """Forward pre-hook recording the positional and keyword arguments a module is called with."""

    def __init__(self, module):
        self.args, self.kwargs = None, None
        self.handle = module.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        self.args, self.kwargs = args, dict(kwargs)

    def remove(self):
        self.handle.remove()


# ------------------------------------------------------------------------------------------------------------------


def test_etsdm_reference_hand_values():
    t = torch.tensor([0.0, 19.9, 20.0, 45.0, 99.9, 100.0, 150.0, 999.0])
    out = rt.etsdm_reference(t, 100, 5)
    assert out.dtype == torch.float32
    assert out.tolist() == [0.0, 0.0, 20.0, 40.0, 80.0, 100.0, 150.0, 999.0]
    # integer DDPM steps
    assert rt.etsdm_reference(torch.tensor([0, 19, 20, 99, 100, 500]), 100, 5).tolist() == [0, 0, 20, 80, 100, 500]
    # n = 1: everything below t_tilde is fed 0
    assert rt.etsdm_reference(torch.tensor([3.0, 99.0, 100.0]), 100, 1).tolist() == [0.0, 0.0, 100.0]
    with pytest.raises(ValueError):
        rt.etsdm_reference(t, 100, 0)
    with pytest.raises(ValueError):
        rt.etsdm_reference(t, 0.0, 5)


# ------------------------------------------------------------------------------------------------------------------
# Stable Diffusion / SDXL


def test_sd_loss_epsilon_noises_at_true_t_and_feeds_etsdm():
    unet = _seeded(lambda: UNet2DConditionModel(**_TINY_COND_UNET))
    sched = sd_scheduler("epsilon")
    x0, eps, g = _draws()
    ehs = torch.randn(B, TOKENS, SD_CROSS_ATTENTION_DIM, generator=g)
    t = torch.tensor([7, 450])
    cap = _Capture(unet)
    with torch.no_grad():
        plain = rt.sd_loss(unet, sched, x0, eps, t, ehs)
        assert torch.isfinite(plain) and plain > 0
        assert torch.equal(cap.args[1], t)  # the script feeds the integer steps themselves
        mapped = rt.sd_loss(unet, sched, x0, eps, t, ehs, etsdm=(100, 5))
    # noise stays at the true t; only the network input is mapped (7 -> 0, 450 unchanged)
    assert torch.equal(cap.args[0], sched.add_noise(x0, eps, t))
    assert cap.args[1].tolist() == [0.0, 450.0]
    assert torch.isfinite(mapped) and mapped != plain
    cap.remove()


def test_sd_loss_v_prediction_matches_hand_formula():
    unet = _seeded(lambda: UNet2DConditionModel(**_TINY_COND_UNET))
    sched = sd_scheduler("v_prediction")
    x0, eps, g = _draws(1)
    ehs = torch.randn(B, TOKENS, SD_CROSS_ATTENTION_DIM, generator=g)
    t = torch.tensor([30, 900])
    # scaled_linear betas 0.00085 -> 0.012 by hand
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    abar = torch.cumprod(1 - betas, 0)[t].view(B, 1, 1, 1)
    a, s = abar.sqrt(), (1 - abar).sqrt()
    noisy = (a * x0.double() + s * eps.double()).float()
    v = (a * eps.double() - s * x0.double()).float()
    with torch.no_grad():
        loss = rt.sd_loss(unet, sched, x0, eps, t, ehs)
        pred = unet(noisy, t, ehs).sample
    expected = F.mse_loss(pred, v)
    assert torch.isfinite(loss) and loss > 0
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


def test_sdxl_added_cond_kwargs_are_passed_through():
    kwargs = dict(
        _TINY_COND_UNET,
        addition_embed_type="text_time",
        addition_time_embed_dim=SDXL_ADDITION_TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=SDXL_PROJECTION_DIM,
    )
    unet = _seeded(lambda: UNet2DConditionModel(**kwargs))
    sched = sd_scheduler()
    x0, eps, g = _draws(2)
    ehs = torch.randn(B, TOKENS, SD_CROSS_ATTENTION_DIM, generator=g)
    time_ids = torch.tensor([[16.0, 16.0, 0.0, 0.0, 16.0, 16.0]] * B)
    cond = {"text_embeds": torch.randn(B, SDXL_POOLED_DIM, generator=g), "time_ids": time_ids}
    cond2 = {"text_embeds": torch.randn(B, SDXL_POOLED_DIM, generator=g), "time_ids": time_ids}
    t = torch.tensor([100, 600])
    with torch.no_grad():
        loss = rt.sd_loss(unet, sched, x0, eps, t, ehs, added_cond_kwargs=cond)
        loss2 = rt.sd_loss(unet, sched, x0, eps, t, ehs, added_cond_kwargs=cond2)
    assert torch.isfinite(loss) and loss > 0 and loss != loss2


# ------------------------------------------------------------------------------------------------------------------
# DiT


def _tiny_dit():
    # the DiTTransformer2DModel of family_fixtures.save_dit_pipeline (learned sigma)
    return DiTTransformer2DModel(**TINY_DIT)


def test_dit_loss_uses_the_epsilon_half():
    dit = _seeded(_tiny_dit)
    # a non-zero final projection, so the model output is not identically zero (ada_norm_zero DiTs start at zero)
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(3)
        dit.proj_out_2.weight.normal_(0, 0.5)
        dit.proj_out_2.bias.normal_(0, 0.5)
    sched = DDIMScheduler(num_train_timesteps=1000)
    x0, eps, _ = _draws(3)
    labels = torch.tensor([1, 7])
    t = torch.tensor([12, 700])
    with torch.no_grad():
        loss = rt.dit_loss(dit, sched, x0, eps, t, labels)
        out = dit(sched.add_noise(x0, eps, t), timestep=t, class_labels=labels).sample
        mapped = rt.dit_loss(dit, sched, x0, eps, t, labels, etsdm=(100, 5))
    assert out.shape[1] == 2 * LATENT_SHAPE[0]
    torch.testing.assert_close(loss, F.mse_loss(out[:, : LATENT_SHAPE[0]], eps))
    assert loss != F.mse_loss(out[:, LATENT_SHAPE[0] :], eps)
    assert torch.isfinite(loss) and loss > 0 and torch.isfinite(mapped) and mapped != loss
    with pytest.raises(ValueError):
        rt.dit_loss(dit, DDIMScheduler(prediction_type="v_prediction"), x0, eps, t, labels)


# ------------------------------------------------------------------------------------------------------------------
# flow matching: schedulers, SD3, FLUX


def test_flow_scheduler_sigmas_fresh_shifted_and_dynamic():
    ts, sig = rt.flow_scheduler_sigmas({"num_train_timesteps": 1000, "shift": 3.0})
    assert ts.shape == sig.shape == (1000,)
    s = torch.linspace(1000, 1, 1000, dtype=torch.float64) / 1000
    torch.testing.assert_close(sig.double(), 3 * s / (1 + 2 * s), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(ts, sig * 1000)
    # FLUX.1-dev (use_dynamic_shifting): a fresh scheduler is unshifted
    ts_f, sig_f = rt.flow_scheduler_sigmas(FLUX_SCHEDULER_CONFIG)
    torch.testing.assert_close(sig_f.double(), s, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(ts_f, sig_f * 1000)


def _sd3_setup(seed=4):
    sd3 = _seeded(lambda: SD3Transformer2DModel(**_TINY_SD3))
    x0, eps, g = _draws(seed)
    ehs = torch.randn(B, TOKENS, SD3_JOINT_ATTENTION_DIM, generator=g)
    pooled = torch.randn(B, SD3_POOLED_DIM, generator=g)
    return sd3, x0, eps, ehs, pooled


def test_sd3_loss_noising_timestep_and_reduction():
    sd3, x0, eps, ehs, pooled = _sd3_setup()
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    u = torch.tensor([0.25, 0.9995])
    idx = (u * 1000).long()
    assert idx.tolist() == [250, 999]
    s = (1000 - idx).double() / 1000  # unshifted sigma of index idx
    sigma = (3 * s / (1 + 2 * s)).float()
    torch.testing.assert_close(sched.sigmas[idx], sigma)
    sig4 = sched.sigmas[idx].view(B, 1, 1, 1)
    cap = _Capture(sd3)
    with torch.no_grad():
        loss = rt.sd3_loss(sd3, sched, x0, eps, u, ehs, pooled)
        noisy, fed = cap.kwargs["hidden_states"], cap.kwargs["timestep"]
        torch.testing.assert_close(noisy, (1 - sig4) * x0 + sig4 * eps)
        torch.testing.assert_close(fed, sched.sigmas[idx] * 1000)
        assert torch.equal(fed, sched.timesteps[idx])
        pred = sd3(hidden_states=noisy, timestep=fed, encoder_hidden_states=ehs, pooled_projections=pooled).sample
        per_sample = ((pred - (eps - x0)) ** 2).reshape(B, -1).mean(1)
        torch.testing.assert_close(loss, per_sample.mean())
        assert torch.isfinite(loss) and loss > 0

        w_sqrt = rt.sd3_loss(sd3, sched, x0, eps, u, ehs, pooled, weighting_scheme="sigma_sqrt")
        torch.testing.assert_close(w_sqrt, (per_sample / sched.sigmas[idx] ** 2).mean())
        w_cos = rt.sd3_loss(sd3, sched, x0, eps, u, ehs, pooled, weighting_scheme="cosmap")
        sg = sched.sigmas[idx]
        torch.testing.assert_close(w_cos, (per_sample * 2 / (torch.pi * (1 - 2 * sg + 2 * sg**2))).mean())
        # the script's --precondition_outputs 1: the plain loss re-weighted by sigma ** 2
        pre = rt.sd3_loss(sd3, sched, x0, eps, u, ehs, pooled, precondition_outputs=True)
        torch.testing.assert_close(pre, (per_sample * sg**2).mean(), rtol=1e-5, atol=1e-7)

        # E-TSDM: u = 0.9995 -> index 999 -> t = sigma*1000 ~ 3.0 (shift 3) < 100 -> fed 0; noise unchanged
        mapped = rt.sd3_loss(sd3, sched, x0, eps, u, ehs, pooled, etsdm=(100, 5))
        torch.testing.assert_close(cap.kwargs["hidden_states"], noisy)
        assert cap.kwargs["timestep"].tolist() == [sched.timesteps[250].item(), 0.0]
        assert torch.isfinite(mapped) and mapped != loss
    cap.remove()
    with pytest.raises(ValueError):
        used = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
        used.set_timesteps(10)
        rt.sd3_loss(sd3, used, x0, eps, u, ehs, pooled)


def test_flux_pack_roundtrip_and_helpers():
    prep, pack, unpack = rt.flux_helpers()
    x = torch.randn(B, 4, 6, 8)
    packed = pack(x, B, 4, 6, 8)
    assert packed.shape == (B, 12, 16)
    for vsf in (4, 8, 16):
        assert torch.equal(unpack(packed, 6 * vsf, 8 * vsf, vsf), x)
    ids = prep(B, 3, 4, "cpu", torch.float32)
    assert ids.shape == (12, 3)
    assert ids[:, 0].eq(0).all() and ids[:, 1].tolist() == [0.0] * 4 + [1.0] * 4 + [2.0] * 4
    assert ids[:, 2].tolist() == [0.0, 1.0, 2.0, 3.0] * 3
    # token k of the packing is the 2 x 2 patch at (row, col) = ids[k, 1:]
    k = 6
    r, c = int(ids[k, 1]), int(ids[k, 2])
    assert torch.equal(packed[:, k].view(B, 4, 2, 2), x[:, :, 2 * r : 2 * r + 2, 2 * c : 2 * c + 2])
    from diffusers import FluxPipeline

    assert (prep, pack, unpack) == (
        FluxPipeline._prepare_latent_image_ids,
        FluxPipeline._pack_latents,
        FluxPipeline._unpack_latents,
    )


@pytest.mark.parametrize("guidance_embeds", [True, False])
def test_flux_loss_inputs_and_value(guidance_embeds):
    flux = _seeded(lambda: FluxTransformer2DModel(**_TINY_FLUX, guidance_embeds=guidance_embeds))
    sched = FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER_CONFIG)
    x0, eps, g = _draws(5)
    pe = torch.randn(B, TOKENS, FLUX_JOINT_ATTENTION_DIM, generator=g)
    pooled = torch.randn(B, FLUX_POOLED_DIM, generator=g)
    u = torch.tensor([0.1, 0.97])
    idx = (u * 1000).long()
    sigma = sched.sigmas[idx]
    torch.testing.assert_close(sigma.double(), (1000 - idx).double() / 1000)  # dynamic shifting: unshifted
    _, pack, unpack = rt.flux_helpers()
    C, H, W = LATENT_SHAPE
    cap = _Capture(flux)
    with torch.no_grad():
        loss = rt.flux_loss(flux, sched, x0, eps, u, pe, pooled, guidance=3.5)
        kw = cap.kwargs
        sig4 = sigma.view(B, 1, 1, 1)
        torch.testing.assert_close(kw["hidden_states"], pack((1 - sig4) * x0 + sig4 * eps, B, C, H, W))
        assert kw["hidden_states"].shape == (B, (H // 2) * (W // 2), 4 * C)
        torch.testing.assert_close(kw["timestep"], sigma)  # timesteps / 1000
        assert kw["img_ids"].shape == ((H // 2) * (W // 2), 3) and kw["img_ids"][:, 1:].max() == H // 2 - 1
        assert torch.equal(kw["txt_ids"], torch.zeros(TOKENS, 3))
        if guidance_embeds:
            assert kw["guidance"].tolist() == [3.5] * B
        else:
            assert kw["guidance"] is None
        pred = flux(**kw)[0]  # kw holds return_dict=False
        pred = unpack(pred, H * 8, W * 8, 8)
        torch.testing.assert_close(loss, ((pred - (eps - x0)) ** 2).reshape(B, -1).mean(1).mean())
        assert torch.isfinite(loss) and loss > 0

        # E-TSDM with t_tilde in sigma*1000 units: index 970 -> t = 30 -> fed 20 / 1000; noise unchanged
        mapped = rt.flux_loss(flux, sched, x0, eps, u, pe, pooled, guidance=3.5, etsdm=(100, 5))
        torch.testing.assert_close(cap.kwargs["hidden_states"], kw["hidden_states"])
        torch.testing.assert_close(cap.kwargs["timestep"], torch.tensor([sigma[0].item(), 0.02]))
        assert torch.isfinite(mapped) and mapped != loss
        w = rt.flux_loss(flux, sched, x0, eps, u, pe, pooled, guidance=3.5, weighting_scheme="sigma_sqrt")
        per_sample = ((pred - (eps - x0)) ** 2).reshape(B, -1).mean(1)
        torch.testing.assert_close(w, (per_sample / sigma**2).mean())
    cap.remove()
    if guidance_embeds:
        with pytest.raises(ValueError):
            rt.flux_loss(flux, sched, x0, eps, u, pe, pooled)
