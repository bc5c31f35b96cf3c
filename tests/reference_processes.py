"""Brute-force per-sample references for ``||eps(x_k, k_b) - eps(x_k, k_a)|| / ((k_b - k_a) / T)``.

Written only from diffusers' scheduler / pipeline / model calls and plain torch (lipscope is deliberately NOT imported:
this module is the independent reference lipscope is tested against). Every reference

* works in float64: inputs are cast with ``.to(torch.float64)`` and every module is evaluated as a ``.double()``
  deep copy (the caller's modules and schedulers are never modified);
* loops over samples in plain Python, one sample (batch of 1) at a time, with no batching tricks;
* draws ``x_k`` ONCE at ``k_a = k`` from the given ``x0`` and ``noise`` and feeds the SAME ``x_k`` at both
  ``k_a = k`` and ``k_b = k + dt`` (forward difference, integer ``k`` and ``dt >= 1``);
* returns a float64 tensor of shape ``(n,)``.

Float32 leaks that remain (all inside diffusers, documented so tolerances can be set accordingly):

* the positional time embedding (``get_timestep_embedding``) casts timesteps to float32 before the sin/cos, so a
  positional UNet sees its timestep rounded to float32 (exact for integer timesteps, not for EDM's ``c_noise``);
* ``FlowMatchEulerDiscreteScheduler`` stores its sigmas in float32, so the ``x_k`` built with ``scale_noise`` uses
  ``float32(k / T)`` (relative error <= 6e-8 in sigma); the eps conversion uses the exact float64 ``k / T``;
* ``DDIMScheduler.alphas_cumprod`` is a float32 cumulative product (its ``add_noise`` casts it to float64 afterwards).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

F64 = torch.float64


# --------------------------------------------------------------------------- helpers


def _f64(x: torch.Tensor) -> torch.Tensor:
    return x.detach().to(F64)


def _f64_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A float64, eval-mode deep copy (the caller's module keeps its dtype and mode)."""
    return copy.deepcopy(module).double().eval()


@contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _check_steps(k: int, dt: int, k_max: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or isinstance(dt, bool) or not isinstance(dt, int):
        raise TypeError(f"k and dt must be Python ints, got {type(k).__name__} and {type(dt).__name__}")
    if dt < 1 or k < 0 or k + dt > k_max:
        raise ValueError(f"need 0 <= k < k + dt <= {k_max}, got k={k}, dt={dt}")


def _check_pair(x0: torch.Tensor, noise: torch.Tensor) -> None:
    if x0.shape != noise.shape or x0.dim() != 4:
        raise ValueError(f"x0 and noise must share one (n, C, H, W) shape, got {tuple(x0.shape)}, {tuple(noise.shape)}")


def _fd(eps_a: torch.Tensor, eps_b: torch.Tensor, dt: int, T: int) -> float:
    return (torch.linalg.vector_norm(eps_b - eps_a) / (dt / T)).item()


# --------------------------------------------------------------------------- VE (ScoreSdeVe)


def ve_sigma_table(scheduler) -> torch.Tensor:
    """float64 ``sigma(k) = sigma_min * (sigma_max / sigma_min) ** (k / T)`` for k = 0..T, via ``set_sigmas(T + 1)``.

    ``ScoreSdeVeScheduler.set_sigmas`` sets
    ``self.discrete_sigmas = torch.exp(torch.linspace(math.log(sigma_min), math.log(sigma_max), num_inference_steps))``
    so with ``num_inference_steps = T + 1`` entry k is ``exp(log sigma_min + (k / T) log(sigma_max / sigma_min))``.
    (The scheduler's own ``__init__`` calls ``set_sigmas(T, ...)``, i.e. a grid in k / (T - 1): NOT this one.)
    ``torch.linspace`` without a dtype uses the default dtype, so it is run under a float64 default.
    """
    cfg = scheduler.config
    T = cfg.num_train_timesteps
    sched = copy.deepcopy(scheduler)
    with _default_dtype(F64):
        sched.set_sigmas(T + 1, sigma_min=cfg.sigma_min, sigma_max=cfg.sigma_max, sampling_eps=cfg.sampling_eps)
    table = sched.discrete_sigmas
    assert table.dtype == F64 and table.shape == (T + 1,)
    k = torch.arange(T + 1, dtype=F64)
    formula = cfg.sigma_min * (cfg.sigma_max / cfg.sigma_min) ** (k / T)
    torch.testing.assert_close(table, formula, rtol=1e-12, atol=0.0)
    return table


def ve_fd_reference(pipe_or_unet, scheduler, x0: torch.Tensor, noise: torch.Tensor, k: int, dt: int) -> torch.Tensor:
    """ScoreSdeVe: x_k = x0 + sigma(k) noise; the UNet is fed sigma and returns the score s; eps = -sigma * s.

    ``pipe_or_unet`` is a ``ScoreSdeVePipeline`` (its ``.unet`` is used; ``scheduler=None`` takes its ``.scheduler``)
    or a bare ``UNet2DModel``. The network call mirrors ``ScoreSdeVePipeline.__call__``:
    ``model_output = self.unet(sample, sigma_t).sample`` with ``sigma_t = self.scheduler.sigmas[i] * ones(batch)``.
    """
    unet = getattr(pipe_or_unet, "unet", pipe_or_unet)
    if scheduler is None:
        scheduler = pipe_or_unet.scheduler
    T = scheduler.config.num_train_timesteps
    _check_steps(k, dt, T)
    _check_pair(x0, noise)
    sched = copy.deepcopy(scheduler)
    with _default_dtype(F64):
        sched.set_sigmas(T + 1)  # discrete_sigmas[k] = sigma(k), see ve_sigma_table
    sigmas = ve_sigma_table(scheduler)
    torch.testing.assert_close(sched.discrete_sigmas, sigmas, rtol=0.0, atol=0.0)
    model = _f64_copy(unet)
    x0, noise = _f64(x0), _f64(noise)
    out = torch.empty(x0.shape[0], dtype=F64)
    with torch.no_grad():
        for i in range(x0.shape[0]):
            # ScoreSdeVeScheduler.add_noise: original_samples + noise * discrete_sigmas[timesteps][:, None, None, None]
            x_k = sched.add_noise(x0[i : i + 1], noise[i : i + 1], torch.tensor([k]))
            eps = []
            for kk in (k, k + dt):
                sigma = sigmas[kk].reshape(1)
                score = model(x_k, sigma).sample
                eps.append(-sigma * score)
            out[i] = _fd(eps[0], eps[1], dt, T)
    return out


# --------------------------------------------------------------------------- flow matching


def flow_noising_scheduler(scheduler, k: int) -> FlowMatchEulerDiscreteScheduler:
    """A copy of ``scheduler`` holding exactly ``timesteps = [k]``, ``sigmas = [k / T, 0]`` (un-shifted sigma).

    ``FlowMatchEulerDiscreteScheduler.set_timesteps`` shifts custom sigmas too
    (``sigmas = self.shift * sigmas / (1 + (self.shift - 1) * sigmas)``, or ``time_shift(mu, ...)`` when
    ``use_dynamic_shifting``), so the copy is built with ``shift=1.0`` and every other sigma remapping switched off;
    the shift only changes which sigmas a sampler visits, never the sigma <-> timestep = sigma * T relation.
    ``timesteps=[k]`` is passed explicitly so the timestep is exactly k (``float32(k / T) * T`` need not be).
    """
    T = scheduler.config.num_train_timesteps
    noiser = FlowMatchEulerDiscreteScheduler.from_config(
        scheduler.config,
        shift=1.0,
        use_dynamic_shifting=False,
        shift_terminal=None,
        use_karras_sigmas=False,
        use_exponential_sigmas=False,
        use_beta_sigmas=False,
        invert_sigmas=False,
    )
    noiser.set_timesteps(sigmas=[k / T], timesteps=[float(k)])
    assert noiser.timesteps.tolist() == [float(k)]
    assert abs(noiser.sigmas[0].item() - k / T) <= 1e-7 and noiser.sigmas[1].item() == 0.0
    return noiser


def flow_fd_reference(unet, scheduler, x0: torch.Tensor, noise: torch.Tensor, k: int, dt: int) -> torch.Tensor:
    """Flow matching: sigma = k / T, x_k = (1 - sigma) x0 + sigma noise via ``scale_noise``; the UNet is fed the
    timestep k (float tensor) and returns v (trained toward noise - x0); eps = x + (1 - sigma) v at the evaluation
    point's sigma.

    ``scale_noise`` finds the step index with ``index_for_timestep(t, self.timesteps)`` and returns
    ``sigma * noise + (1.0 - sigma) * sample`` with ``sigma = self.sigmas[step_index]``.
    """
    T = scheduler.config.num_train_timesteps
    _check_steps(k, dt, T)
    _check_pair(x0, noise)
    noiser = flow_noising_scheduler(scheduler, k)
    model = _f64_copy(unet)
    x0, noise = _f64(x0), _f64(noise)
    out = torch.empty(x0.shape[0], dtype=F64)
    with torch.no_grad():
        for i in range(x0.shape[0]):
            x_k = noiser.scale_noise(x0[i : i + 1], torch.tensor([float(k)], dtype=F64), noise[i : i + 1])
            eps = []
            for kk in (k, k + dt):
                sigma = kk / T
                v = model(x_k, torch.tensor([float(kk)], dtype=F64)).sample
                eps.append(x_k + (1.0 - sigma) * v)
            out[i] = _fd(eps[0], eps[1], dt, T)
    return out


# --------------------------------------------------------------------------- EDM


def edm_sigma(scheduler, k: int) -> torch.Tensor:
    """0-d float64 Karras sigma read from the low-noise end: ramp = 1 - k / (T - 1) into ``_compute_karras_sigmas``.

    ``_compute_karras_sigmas`` returns ``(max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho``, which for that
    ramp equals ``(sigma_min**(1/rho) + k/(T-1) * (sigma_max**(1/rho) - sigma_min**(1/rho)))**rho`` (asserted).
    This is the grid of ``set_timesteps(T)`` (``torch.linspace(0, 1, T)`` ramps), read backwards:
    ``sigmas[T - 1 - k]``; the ``__init__`` grid (``arange(T + 1) / T``) is a different one.
    """
    cfg = scheduler.config
    T = cfg.num_train_timesteps
    if cfg.sigma_schedule != "karras":
        raise ValueError(f"only the karras EDM schedule is covered, got {cfg.sigma_schedule!r}")
    ramp = torch.tensor([1.0 - k / (T - 1)], dtype=F64)
    sigma = scheduler._compute_karras_sigmas(ramp)
    assert sigma.dtype == F64
    lo, hi, rho = cfg.sigma_min ** (1 / cfg.rho), cfg.sigma_max ** (1 / cfg.rho), cfg.rho
    formula = (lo + (k / (T - 1)) * (hi - lo)) ** rho
    assert math.isclose(sigma.item(), formula, rel_tol=1e-12), (sigma.item(), formula)
    return sigma[0]


def edm_fd_reference(unet, scheduler, x0: torch.Tensor, noise: torch.Tensor, k: int, dt: int) -> torch.Tensor:
    """EDM (EDMEulerScheduler): x_k = x0 + sigma(k) noise (written directly: the scheduler's ``add_noise`` looks the
    sigma up through float32 ``c_noise`` timesteps). At the evaluation point's sigma the UNet is fed
    ``precondition_inputs(x, sigma)`` (``x * 1 / sqrt(sigma**2 + sigma_data**2)``) and the timestep
    ``precondition_noise(sigma)`` (``0.25 * log(sigma)``); ``precondition_outputs(x, out, sigma)`` gives
    ``x0_hat = c_skip * x + c_out * out``; eps = (x - x0_hat) / sigma (``derivative`` in ``EDMEulerScheduler.step``).
    """
    T = scheduler.config.num_train_timesteps
    _check_steps(k, dt, T - 1)
    _check_pair(x0, noise)
    model = _f64_copy(unet)
    x0, noise = _f64(x0), _f64(noise)
    sigma_k = edm_sigma(scheduler, k)
    out = torch.empty(x0.shape[0], dtype=F64)
    with torch.no_grad():
        for i in range(x0.shape[0]):
            x_k = x0[i : i + 1] + sigma_k * noise[i : i + 1]
            eps = []
            for kk in (k, k + dt):
                sigma = edm_sigma(scheduler, kk)
                model_in = scheduler.precondition_inputs(x_k, sigma)
                c_noise = scheduler.precondition_noise(sigma.reshape(1))
                raw = model(model_in, c_noise).sample
                x0_hat = scheduler.precondition_outputs(x_k, raw, sigma)
                eps.append((x_k - x0_hat) / sigma)
            out[i] = _fd(eps[0], eps[1], dt, T)
    return out


# --------------------------------------------------------------------------- latent diffusion (LDMPipeline)


def ldm_encode(vae, images: torch.Tensor) -> torch.Tensor:
    """Latents the LDMPipeline UNet works on. ``LDMPipeline.__call__`` decodes with
    ``latents = latents / self.vqvae.config.scaling_factor; image = self.vqvae.decode(latents).sample`` (for KL and
    VQ alike, and it never adds a ``shift_factor`` back), so encoding multiplies by ``scaling_factor``:
    AutoencoderKL: ``(encode(images).latent_dist.mean - shift_factor) * scaling_factor`` (shift only if not None);
    VQModel: ``encode(images).latents * scaling_factor`` (pre-quantisation latents; ``decode`` quantises).
    ``vae`` must already be float64 when ``images`` is.
    """
    cfg = vae.config
    encoded = vae.encode(images)
    if hasattr(encoded, "latent_dist"):
        latents = encoded.latent_dist.mean
        shift = getattr(cfg, "shift_factor", None)
        if shift is not None:
            latents = latents - shift
    else:
        latents = encoded.latents
    return latents * cfg.scaling_factor


def ldm_fd_reference(pipe, images: torch.Tensor, noise: torch.Tensor, k: int, dt: int) -> torch.Tensor:
    """LDMPipeline: latents = ``ldm_encode(pipe.vqvae, images)``, x_k = ``pipe.scheduler.add_noise(latents, noise,
    k)``; the UNet is fed the integer timestep k (as the pipeline feeds ``t``) and returns eps directly.

    ``images``: float in [-1, 1] with the autoencoder's pixel shape (n, C, H, W); ``noise``: the latent shape.
    """
    scheduler = pipe.scheduler
    T = scheduler.config.num_train_timesteps
    _check_steps(k, dt, T - 1)
    if images.dim() != 4 or noise.dim() != 4 or images.shape[0] != noise.shape[0]:
        raise ValueError(f"images and noise must be (n, C, H, W), one n: {tuple(images.shape)}, {tuple(noise.shape)}")
    if scheduler.config.prediction_type != "epsilon":
        raise ValueError(f"only epsilon-prediction LDMs are covered, got {scheduler.config.prediction_type!r}")
    sched = copy.deepcopy(scheduler)  # add_noise moves its alphas_cumprod; keep the caller's untouched
    vae = _f64_copy(pipe.vqvae)
    model = _f64_copy(pipe.unet)
    images, noise = _f64(images), _f64(noise)
    out = torch.empty(images.shape[0], dtype=F64)
    with torch.no_grad():
        for i in range(images.shape[0]):
            latents = ldm_encode(vae, images[i : i + 1])
            if latents.shape != noise[i : i + 1].shape:
                raise ValueError(f"noise has shape {tuple(noise.shape[1:])}, latents {tuple(latents.shape[1:])}")
            x_k = sched.add_noise(latents, noise[i : i + 1], torch.tensor([k]))
            eps = [model(x_k, torch.tensor([kk])).sample for kk in (k, k + dt)]
            out[i] = _fd(eps[0], eps[1], dt, T)
    return out


def vp_alphas_sigmas(scheduler, k) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 ``alpha_k = sqrt(alphas_cumprod[k])``, ``sigma_k = sqrt(1 - alphas_cumprod[k])`` (DDPM family).

    ``alphas_cumprod`` itself is computed by diffusers in float32; it is cast to float64 before the square roots.
    """
    abar = scheduler.alphas_cumprod.detach().to(device="cpu", dtype=F64)[torch.as_tensor(k, dtype=torch.long)]
    return abar.sqrt(), (1.0 - abar).sqrt()


# --------------------------------------------------------------------------- self-test


if __name__ == "__main__":
    import sys
    import tempfile
    from pathlib import Path

    from diffusers import EDMEulerScheduler, LDMPipeline, ScoreSdeVePipeline, UNet2DModel

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from process_fixtures import (  # noqa: E402
        LDM_IMAGE_SHAPE,
        LDM_LATENT_SHAPE,
        save_edm_folder,
        save_flow_folder,
        save_ldm_pipeline,
        save_ve_pipeline,
    )

    torch.set_printoptions(precision=6)
    N = 3

    def pair(shape, seed):
        g = torch.Generator().manual_seed(seed)
        x0 = torch.rand((N, *shape), generator=g, dtype=F64) * 2 - 1
        noise = torch.randn((N, *shape), generator=g, dtype=F64)
        return x0, noise

    def show(name, fn):
        for k in (10, 0):
            vals = fn(k)
            print(f"{name:8s} k={k:2d} dt=1: {vals.tolist()}  finite={bool(torch.isfinite(vals).all())}")

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)

        ve = ScoreSdeVePipeline.from_pretrained(save_ve_pipeline(root / "ve"))
        x0, noise = pair((1, 8, 8), 0)
        table = ve_sigma_table(ve.scheduler)
        print(f"VE sigma(0)={table[0].item():.6g} sigma(10)={table[10].item():.6g} sigma(T)={table[-1].item():.6g}")
        show("ve", lambda k: ve_fd_reference(ve, None, x0, noise, k, 1))

        flow_dir = save_flow_folder(root / "flow", shift=3.0)
        flow_unet = UNet2DModel.from_pretrained(flow_dir / "unet")
        flow_sched = FlowMatchEulerDiscreteScheduler.from_pretrained(flow_dir / "scheduler")
        shifted = copy.deepcopy(flow_sched)
        shifted.set_timesteps(sigmas=[0.01])
        print(f"flow: set_timesteps(sigmas=[0.01]) with shift=3 holds sigma={shifted.sigmas[0].item():.6g} (shifted)")
        show("flow", lambda k: flow_fd_reference(flow_unet, flow_sched, x0, noise, k, 1))

        edm_dir = save_edm_folder(root / "edm")
        edm_unet = UNet2DModel.from_pretrained(edm_dir / "unet")
        edm_sched = EDMEulerScheduler.from_pretrained(edm_dir / "scheduler")
        grid = copy.deepcopy(edm_sched)
        T_edm = grid.config.num_train_timesteps
        grid.set_timesteps(T_edm)
        ours = torch.stack([edm_sigma(edm_sched, j) for j in range(T_edm)])
        torch.testing.assert_close(grid.sigmas[:T_edm].flip(0).to(F64), ours, rtol=1e-6, atol=0.0)
        print(f"EDM sigma(0)={ours[0].item():.6g} sigma(10)={ours[10].item():.6g} sigma(T-1)={ours[-1].item():.6g}")
        show("edm", lambda k: edm_fd_reference(edm_unet, edm_sched, x0, noise, k, 1))

        for vae in ("kl", "vq"):
            pipe = LDMPipeline.from_pretrained(save_ldm_pipeline(root / f"ldm_{vae}", vae=vae))
            image = pipe(num_inference_steps=2, output_type="np").images
            print(
                f"LDM[{vae}] vqvae={type(pipe.vqvae).__name__} scaling_factor={pipe.vqvae.config.scaling_factor}"
                f" sample shape={image.shape}"
            )
            images, _ = pair(LDM_IMAGE_SHAPE, 1)
            _, latent_noise = pair(LDM_LATENT_SHAPE, 2)
            show(f"ldm-{vae}", lambda k, p=pipe, x=images, n=latent_noise: ldm_fd_reference(p, x, n, k, 1))
        alpha, sigma = vp_alphas_sigmas(pipe.scheduler, 10)
        print(f"VP k=10: alpha={alpha.item():.9f} sigma={sigma.item():.9f} sum sq={(alpha**2 + sigma**2).item()}")
