"""Brute-force per-sample reference for ``||eps(x_k, k + dt) - eps(x_k, k)|| / (dt / T)`` for the FLUX.1 family
(``FluxPipeline``), written from the pipeline's own denoising calls.

Written only from diffusers' scheduler / model calls, FluxPipeline's packing helpers and plain torch (lipscope is
deliberately NOT imported: this module is the independent reference lipscope is tested against), in the style of
``tests/reference_families2.py``:

* float64 throughout: inputs are cast with ``.to(torch.float64)`` and every module is evaluated as a ``.double()``
  eval-mode deep copy (the caller's modules and schedulers are never modified);
* one sample (batch of 1) at a time in a plain Python loop; sample i uses prompt row ``i % P``;
* ``x_k`` is drawn ONCE at ``k`` and the SAME ``x_k`` is fed at ``k`` and ``k + dt`` (forward difference, integer
  ``k >= 0``, ``dt >= 1``, ``k + dt <= T - 1``);
* latents are UNPACKED ``(n, C, H, W)`` (``C`` = the VAE's latent_channels, ``H``, ``W`` even), the space lipscope
  works in: ``x0 = (vae.encode(image).latent_dist.mean - shift_factor) * scaling_factor``; the FD reference returns
  a float64 tensor of shape ``(n,)``.

Pipeline lines mirrored (diffusers 0.42.1, ``pipelines/flux/pipeline_flux.py`` unless named otherwise):

* The static methods ``FluxPipeline._prepare_latent_image_ids`` / ``_pack_latents`` / ``_unpack_latents``
  (507-543): copied verbatim below (dedented only), because ``FluxPipeline`` is a dummy class and its
  module does not import when ``transformers`` (not a lipscope dependency) is missing;
  ``check_against_flux_pipeline()`` asserts they equal the pipeline's own where ``transformers`` is installed.
* Height / width: the pipeline takes pixel ``height`` / ``width``; with ``vae_scale_factor = 2 **
  (len(vae.config.block_out_channels) - 1) if vae else 8`` (208) the pixel size of an ``H x W`` latent is ``H *
  vae_scale_factor``, which ``prepare_latents`` maps back to ``height = 2 * (int(height) // (vae_scale_factor *
  2))`` = H for even H (558), then ``latent_image_ids = self._prepare_latent_image_ids(batch_size, height // 2,
  width // 2, device, dtype)`` (564, the ``latents is not None`` branch: the pipeline takes given latents as
  already packed) and, after the loop, ``latents = self._unpack_latents(latents, height, width,
  self.vae_scale_factor)`` (961) with the same pixel height / width.
* ``num_channels_latents = self.transformer.config.in_channels // 4`` (810).
* Noising: FluxImg2ImgPipeline.prepare_latents (``pipeline_flux_img2img.py`` 658-659): ``latents =
  self.scheduler.scale_noise(image_latents, timestep, noise)`` on the UNPACKED latents, then ``latents =
  self._pack_latents(latents, batch_size, num_channels_latents, height, width)``. ``scale_noise`` runs on a copy
  holding exactly ``timesteps = [k]``, ``sigmas = [k / T, 0]`` (``reference_processes.flow_noising_scheduler``,
  built with ``shift=1.0`` and ``use_dynamic_shifting=False``: FLUX.1-dev's ``set_timesteps`` would pass the
  custom sigma through ``time_shift(mu, 1.0, sigmas)``). The dynamic shift (``mu = calculate_shift(image_seq_len,
  ...)``, 827-842) only changes which sigmas a sampler visits, never the sigma <-> timestep = sigma * T relation, so
  the network is fed ``sigma * T = k`` whatever the scheduler's shift settings.
* ``encode_prompt`` (386-387): ``dtype = self.text_encoder.dtype if self.text_encoder is not None else
  self.transformer.dtype``; ``text_ids = torch.zeros(prompt_embeds.shape[1], 3).to(device=device, dtype=dtype)``
  (no text encoder here: the transformer's dtype), and the same for ``negative_text_ids`` from
  ``negative_prompt_embeds`` (true-CFG branch: ``encode_prompt`` called on the negative prompt, 793-807).
* Guidance embedding (846-851): ``if self.transformer.config.guidance_embeds: guidance = torch.full([1],
  guidance_scale, device=device, dtype=torch.float32); guidance = guidance.expand(latents.shape[0])`` else ``guidance
  = None`` (``guidance_scale`` is then ignored, as by the pipeline).
* ``if self.joint_attention_kwargs is None: self._joint_attention_kwargs = {}`` (865-866).
* Denoising call (898-911): ``timestep = t.expand(latents.shape[0]).to(latents.dtype)`` (t: a float32 entry of
  ``scheduler.timesteps`` = ``sigma * T``); ``with self.transformer.cache_context("cond"): noise_pred =
  self.transformer(hidden_states=latents, timestep=timestep / 1000, guidance=guidance,
  pooled_projections=pooled_prompt_embeds, encoder_hidden_states=prompt_embeds, txt_ids=text_ids,
  img_ids=latent_image_ids, joint_attention_kwargs=self.joint_attention_kwargs, return_dict=False)[0]``.
* True CFG (913-929): the same call under ``cache_context("uncond")`` with ``pooled_projections =
  negative_pooled_prompt_embeds``, ``encoder_hidden_states = negative_prompt_embeds``, ``txt_ids =
  negative_text_ids`` (the SAME ``guidance``), then ``noise_pred = neg_noise_pred + true_cfg_scale * (noise_pred -
  neg_noise_pred)``. The pipeline does this only when ``do_true_cfg = true_cfg_scale > 1 and has_neg_prompt`` (771);
  here it is done whenever ``true_cfg_scale`` is given (any value), and ``true_cfg_scale=None`` means the
  conditional branch alone. As the pipeline (772-778), prompt and negative embeddings must share one shape.
* The output is the flow velocity v (trained toward noise - x0) in packed form; it is unpacked with
  ``_unpack_latents`` (a permutation: norms are unchanged), and with ``x = (1 - sigma) x0 + sigma eps``: ``eps = x +
  (1 - sigma) v``, applied to the (true-CFG-combined) v at the evaluation point's own exact ``sigma = k_eval / T``.

Float32 leaks that remain inside diffusers (measured on the tiny fixture, 3 samples, dt = 1, guidance 3.5, true CFG
2, by re-running with float64 versions of the two k-dependent ones patched in):

* ``get_timestep_embedding`` (``models/embeddings.py`` 57-63): the frequencies ``exp(exponent)`` are float32 and
  ``timesteps[:, None].float() * emb[None, :]`` is a float32 product, for ``1000 * timestep`` and ``1000 * guidance``
  alike. The argument ``1000 * (k / 1000)`` itself is exact for integer ``k`` (within an ulp of ``k`` in float64,
  rounded to ``k`` in float32), but ``k * freq`` is rounded to float32 (absolute error ~``6e-8 * k``; 1.1e-4 for
  the guidance argument 3500, the same at every k) and sin / cos are float32. The k-dependent part is rounding
  noise that grows with k: K moves by <= 4e-6 relative for k <= 100, 1.4e-5 at k = 500, 2.4e-5 at k = 900.
* ``apply_rotary_emb`` (``models/embeddings.py`` 997): ``out = (x.float() * cos + x_rotated.float() * sin).to(
  x.dtype)`` rounds every attention query and key to float32 before the rotation, in every block (k-dependent):
  K moves by <= 4e-7 relative.
* ``FluxPosEmbed.forward`` (``models/transformers/transformer_flux.py`` 511) casts the position ids to float32 (exact:
  small integers) and ``get_1d_rotary_pos_embed`` (``models/embeddings.py`` 938-939) returns float32 cos / sin
  tables: a fixed perturbation of the network, the same at every ``k``.
* FluxPipeline builds ``guidance`` in float32 (848): ``guidance_scale`` is rounded to float32 (the same at every k).
* ``FlowMatchEulerDiscreteScheduler`` stores its sigmas in float32 (``scheduling_flow_match_euler_discrete.py``
  372), so ``x_k`` uses ``float32(k / T)`` (the eps conversion uses the exact float64 ``k / T``).

All of these are deterministic functions of the float64 inputs, so a float64 lipscope run of the same network
reproduces them to far below the sizes above (only a last-bit difference can flip a float32 rounding).

Smoothness: eps is smooth in k (Richardson-extrapolated central differences at k + 1/2 with h = 1/2 and 1/4 agree to
<= 2.4e-4 relative at k = 0, 10, 100), but the timestep sinusoids run up to 1 rad per timestep unit, so eps varies
on the scale of ONE timestep: the dt = 1 quotient (= the central difference at k + 1/2) differs from the derivative
there by 3-5 %, and K(dt = 2) from K(dt = 1) by 6-22 % on the random-weight fixture. Compare at equal dt only.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from reference_families import _check_pair, _check_steps, _f64, _f64_copy, _fd  # shared helpers
from reference_processes import flow_noising_scheduler

F64 = torch.float64

_EMBED_KEYS = ("prompt_embeds", "pooled_prompt_embeds")
_NEGATIVE_KEYS = ("negative_prompt_embeds", "negative_pooled_prompt_embeds")


# --------------------------------------------------------------------------- FluxPipeline helpers, verbatim


def _prepare_latent_image_ids(batch_size, height, width, device, dtype):
    """``FluxPipeline._prepare_latent_image_ids`` (pipeline_flux.py 508-519), verbatim."""
    latent_image_ids = torch.zeros(height, width, 3)
    latent_image_ids[..., 1] = latent_image_ids[..., 1] + torch.arange(height)[:, None]
    latent_image_ids[..., 2] = latent_image_ids[..., 2] + torch.arange(width)[None, :]

    latent_image_id_height, latent_image_id_width, latent_image_id_channels = latent_image_ids.shape

    latent_image_ids = latent_image_ids.reshape(
        latent_image_id_height * latent_image_id_width, latent_image_id_channels
    )

    return latent_image_ids.to(device=device, dtype=dtype)


def _pack_latents(latents, batch_size, num_channels_latents, height, width):
    """``FluxPipeline._pack_latents`` (pipeline_flux.py 522-527), verbatim."""
    latents = latents.view(batch_size, num_channels_latents, height // 2, 2, width // 2, 2)
    latents = latents.permute(0, 2, 4, 1, 3, 5)
    latents = latents.reshape(batch_size, (height // 2) * (width // 2), num_channels_latents * 4)

    return latents


def _unpack_latents(latents, height, width, vae_scale_factor):
    """``FluxPipeline._unpack_latents`` (pipeline_flux.py 530-543), verbatim."""
    batch_size, num_patches, channels = latents.shape

    # VAE applies 8x compression on images but we must also account for packing which requires
    # latent height and width to be divisible by 2.
    height = 2 * (int(height) // (vae_scale_factor * 2))
    width = 2 * (int(width) // (vae_scale_factor * 2))

    latents = latents.view(batch_size, height // 2, width // 2, channels // 4, 2, 2)
    latents = latents.permute(0, 3, 1, 4, 2, 5)

    latents = latents.reshape(batch_size, channels // (2 * 2), height, width)

    return latents


def check_against_flux_pipeline() -> None:
    """Assert the verbatim copies above equal ``FluxPipeline``'s static methods (needs ``transformers``: without
    it ``diffusers.FluxPipeline`` is a dummy class). Run on a non-square, multi-channel latent batch."""
    from diffusers import FluxPipeline

    g = torch.Generator().manual_seed(0)
    b, c, h, w, vsf = 2, 3, 4, 6, 8
    x = torch.randn((b, c, h, w), generator=g, dtype=F64)
    packed = FluxPipeline._pack_latents(x, b, c, h, w)
    assert torch.equal(_pack_latents(x, b, c, h, w), packed)
    assert torch.equal(
        _unpack_latents(packed, h * vsf, w * vsf, vsf), FluxPipeline._unpack_latents(packed, h * vsf, w * vsf, vsf)
    )
    assert torch.equal(_unpack_latents(packed, h * vsf, w * vsf, vsf), x)
    ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, "cpu", F64)
    assert torch.equal(_prepare_latent_image_ids(b, h // 2, w // 2, "cpu", F64), ids)


# --------------------------------------------------------------------------- loading / checks


def _vae_scale_factor(vae_config) -> int:
    """FluxPipeline.__init__ (208): ``2 ** (len(self.vae.config.block_out_channels) - 1) if vae else 8``."""
    return 2 ** (len(vae_config["block_out_channels"]) - 1) if vae_config is not None else 8


def load_flux_components(folder_or_components):
    """(transformer, scheduler, vae_scale_factor) from a FluxPipeline folder (``transformer/``, ``scheduler/``,
    ``vae/config.json``; classes named in ``model_index.json``), a mapping with ``transformer`` / ``scheduler``
    (optional ``vae``) keys, or an object with those attributes (e.g. a FluxPipeline). No VAE -> 8, as the pipeline."""
    if isinstance(folder_or_components, (str, Path)):
        import diffusers

        root = Path(folder_or_components)
        index = json.loads((root / "model_index.json").read_text())
        transformer = getattr(diffusers, index["transformer"][1]).from_pretrained(root / "transformer")
        scheduler = getattr(diffusers, index["scheduler"][1]).from_pretrained(root / "scheduler")
        vae_config = None
        if index.get("vae", [None, None])[1] is not None:
            vae_config = getattr(diffusers, index["vae"][1]).load_config(root / "vae")
        return transformer, scheduler, _vae_scale_factor(vae_config)
    if isinstance(folder_or_components, Mapping):
        c = folder_or_components
        vae = c.get("vae")
        return c["transformer"], c["scheduler"], _vae_scale_factor(None if vae is None else vae.config)
    c = folder_or_components
    vae = getattr(c, "vae", None)
    return c.transformer, c.scheduler, _vae_scale_factor(None if vae is None else vae.config)


def _check_latents(name: str, x: torch.Tensor, transformer) -> None:
    if x.dim() != 4:
        raise ValueError(f"{name} must be unpacked (n, C, H, W) latents, got shape {tuple(x.shape)}")
    c, h, w = x.shape[1:]
    if transformer.config.in_channels != 4 * c:
        raise ValueError(
            f"{name} has {c} channels but the transformer packs 2x2 patches of in_channels // 4 = "
            f"{transformer.config.in_channels // 4}"
        )
    if h % 2 or w % 2:
        raise ValueError(f"{name} height and width must be even (2x2 packing), got {h} x {w}")


def _check_embeds(embeds: Mapping, true_cfg: bool) -> None:
    keys = _EMBED_KEYS + (_NEGATIVE_KEYS if true_cfg else ())
    missing = [key for key in keys if key not in embeds]
    if missing:
        raise ValueError(f"embeds is missing {missing} (needs {list(keys)})")
    p = embeds["prompt_embeds"].shape[0]
    for key, dim in zip(keys, (3, 2, 3, 2), strict=False):
        if embeds[key].dim() != dim or embeds[key].shape[0] != p:
            raise ValueError(f"embeds[{key!r}] must have {dim} dims and P={p} rows, got {tuple(embeds[key].shape)}")
    if true_cfg and embeds["prompt_embeds"].shape != embeds["negative_prompt_embeds"].shape:
        raise ValueError(  # FluxPipeline.__call__ 772-778
            "`prompt_embeds` and `negative_prompt_embeds` must have the same shape when passed directly, but got: "
            f"{tuple(embeds['prompt_embeds'].shape)} != {tuple(embeds['negative_prompt_embeds'].shape)}"
        )


# --------------------------------------------------------------------------- eps at one evaluation point


def _flux_eps_fn(transformer, scheduler, vae_scale_factor: int, embeds: Mapping, guidance_scale, true_cfg_scale):
    """``eps_at(x, k_eval, row)``: float64 eps (1, C, H, W) of the unpacked batch-1 latent ``x`` at ``k_eval``
    with prompt row ``row``, FluxPipeline's denoising call on a float64 eval-mode copy of ``transformer``."""
    T = scheduler.config.num_train_timesteps
    do_true_cfg = true_cfg_scale is not None
    _check_embeds(embeds, do_true_cfg)
    if transformer.config.guidance_embeds and guidance_scale is None:
        raise ValueError("this transformer embeds the guidance scale (guidance_embeds=True): pass guidance_scale")
    model = _f64_copy(transformer)
    prompt_embeds, pooled_prompt_embeds = (_f64(embeds[key]) for key in _EMBED_KEYS)
    dtype = model.dtype  # encode_prompt: no text encoder -> self.transformer.dtype
    text_ids = torch.zeros(prompt_embeds.shape[1], 3).to(dtype=dtype)
    if do_true_cfg:
        negative_prompt_embeds, negative_pooled_prompt_embeds = (_f64(embeds[key]) for key in _NEGATIVE_KEYS)
        negative_text_ids = torch.zeros(negative_prompt_embeds.shape[1], 3).to(dtype=dtype)
    joint_attention_kwargs = {}  # FluxPipeline: None -> {}
    num_channels_latents = model.config.in_channels // 4

    def eps_at(x: torch.Tensor, k_eval: float, row: int) -> torch.Tensor:
        batch_size, _, h, w = x.shape
        height, width = h * vae_scale_factor, w * vae_scale_factor  # the pixel size the pipeline is called with
        lat_h = 2 * (int(height) // (vae_scale_factor * 2))  # prepare_latents
        lat_w = 2 * (int(width) // (vae_scale_factor * 2))
        assert (lat_h, lat_w) == (h, w)
        latents = _pack_latents(x, batch_size, num_channels_latents, lat_h, lat_w)
        latent_image_ids = _prepare_latent_image_ids(batch_size, lat_h // 2, lat_w // 2, x.device, latents.dtype)
        if model.config.guidance_embeds:
            guidance = torch.full([1], guidance_scale, device=x.device, dtype=torch.float32)
            guidance = guidance.expand(latents.shape[0])
        else:
            guidance = None
        t = torch.tensor(
            float(k_eval), dtype=torch.float32
        )  # sigma * T with sigma = k_eval / T, as scheduler.timesteps
        timestep = t.expand(latents.shape[0]).to(latents.dtype)
        rows = slice(row, row + 1)
        with model.cache_context("cond"):
            noise_pred = model(
                hidden_states=latents,
                timestep=timestep / 1000,
                guidance=guidance,
                pooled_projections=pooled_prompt_embeds[rows],
                encoder_hidden_states=prompt_embeds[rows],
                txt_ids=text_ids,
                img_ids=latent_image_ids,
                joint_attention_kwargs=joint_attention_kwargs,
                return_dict=False,
            )[0]
        if do_true_cfg:
            with model.cache_context("uncond"):
                neg_noise_pred = model(
                    hidden_states=latents,
                    timestep=timestep / 1000,
                    guidance=guidance,
                    pooled_projections=negative_pooled_prompt_embeds[rows],
                    encoder_hidden_states=negative_prompt_embeds[rows],
                    txt_ids=negative_text_ids,
                    img_ids=latent_image_ids,
                    joint_attention_kwargs=joint_attention_kwargs,
                    return_dict=False,
                )[0]
            noise_pred = neg_noise_pred + true_cfg_scale * (noise_pred - neg_noise_pred)
        v = _unpack_latents(noise_pred, height, width, vae_scale_factor)
        sigma = k_eval / T
        return x + (1.0 - sigma) * v

    return eps_at


def flux_noised_reference(folder_or_components, latents: torch.Tensor, noise: torch.Tensor, k: int) -> torch.Tensor:
    """float64 unpacked ``x_k = scale_noise(latents, k, noise)`` = ``(1 - sigma) latents + sigma noise``, sigma =
    float32(k / T), on ``flow_noising_scheduler(scheduler, k)`` (FluxImg2ImgPipeline noises the unpacked latents)."""
    transformer, scheduler, _ = load_flux_components(folder_or_components)
    T = scheduler.config.num_train_timesteps
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= T - 1:
        raise ValueError(f"k must be a Python int in [0, {T - 1}], got {k!r}")
    _check_pair(latents, noise)
    _check_latents("latents", latents, transformer)
    noiser = flow_noising_scheduler(scheduler, k)
    latents, noise = _f64(latents), _f64(noise)
    timestep = torch.tensor([float(k)], dtype=F64)
    with torch.no_grad():
        rows = [noiser.scale_noise(latents[i : i + 1], timestep, noise[i : i + 1]) for i in range(latents.shape[0])]
    return torch.cat(rows)


def flux_eps_reference(
    folder_or_components,
    x: torch.Tensor,
    k: float,
    embeds: Mapping[str, torch.Tensor],
    guidance_scale: float | None = 3.5,
    true_cfg_scale: float | None = None,
) -> torch.Tensor:
    """float64 eps ``(n, C, H, W)`` of the UNPACKED noisy latents ``x`` (n, C, H, W) at evaluation point ``k``
    (``0 <= k <= T - 1``; a float is allowed, fed as the float32 timestep ``float32(k)``, exact for integers and
    dyadic fractions), as FluxPipeline's denoising call gives it: ``eps = x + (1 - k / T) * v``.

    ``embeds``: ``prompt_embeds`` (P, L, D), ``pooled_prompt_embeds`` (P, pooled_dim) and, with ``true_cfg_scale``,
    ``negative_prompt_embeds`` / ``negative_pooled_prompt_embeds`` of the same shapes; sample i uses row ``i % P``.
    ``guidance_scale`` is embedded when ``transformer.config.guidance_embeds`` (ignored otherwise).
    """
    transformer, scheduler, vae_scale_factor = load_flux_components(folder_or_components)
    T = scheduler.config.num_train_timesteps
    if isinstance(k, bool) or not 0 <= k <= T - 1:
        raise ValueError(f"need 0 <= k <= {T - 1}, got {k!r}")
    _check_latents("x", x, transformer)
    eps_at = _flux_eps_fn(transformer, scheduler, vae_scale_factor, embeds, guidance_scale, true_cfg_scale)
    p = embeds["prompt_embeds"].shape[0]
    x = _f64(x)
    with torch.no_grad():
        return torch.cat([eps_at(x[i : i + 1], k, i % p) for i in range(x.shape[0])])


def flux_fd_reference(
    folder_or_components,
    latents: torch.Tensor,
    noise: torch.Tensor,
    k: int,
    dt: int,
    embeds: Mapping[str, torch.Tensor],
    guidance_scale: float | None = 3.5,
    true_cfg_scale: float | None = None,
) -> torch.Tensor:
    """FluxPipeline: sigma = k / T, x_k = ``scale_noise(latents, k, noise)`` = (1 - sigma) latents + sigma noise on
    the UNPACKED (n, C, H, W) latents; at each evaluation point k_e in (k, k + dt) the packed x_k is fed with
    ``timestep = float32(k_e) / 1000`` (and the float32 ``guidance`` when the transformer embeds it), the packed
    velocity is true-CFG-combined when ``true_cfg_scale`` is given and unpacked, then ``eps = x_k + (1 - k_e / T) *
    v``. Returns float64 ``(n,)``: ``||eps(x_k, k + dt) - eps(x_k, k)|| / (dt / T)``.

    ``embeds`` as for ``flux_eps_reference`` (e.g. ``safetensors.torch.load_file`` of ``save_flux_embeds``); sample i
    uses prompt row ``i % P``.
    """
    transformer, scheduler, vae_scale_factor = load_flux_components(folder_or_components)
    T = scheduler.config.num_train_timesteps
    _check_steps(k, dt, T - 1)
    _check_pair(latents, noise)
    _check_latents("latents", latents, transformer)
    eps_at = _flux_eps_fn(transformer, scheduler, vae_scale_factor, embeds, guidance_scale, true_cfg_scale)
    p = embeds["prompt_embeds"].shape[0]
    noiser = flow_noising_scheduler(scheduler, k)
    latents, noise = _f64(latents), _f64(noise)
    n = latents.shape[0]
    out = torch.empty(n, dtype=F64)
    with torch.no_grad():
        for i in range(n):
            x_k = noiser.scale_noise(latents[i : i + 1], torch.tensor([float(k)], dtype=F64), noise[i : i + 1])
            eps = [eps_at(x_k, kk, i % p) for kk in (k, k + dt)]
            out[i] = _fd(eps[0], eps[1], dt, T)
    return out


# --------------------------------------------------------------------------- VAE encoding


def encode_latents_reference(folder_or_components, images: torch.Tensor) -> torch.Tensor:
    """float64 unpacked latents ``(n, C, H / f, W / f)`` of pixel ``images`` (n, 3, H, W) in [-1, 1]:
    ``(vae.encode(image).latent_dist.mode() - shift_factor) * scaling_factor`` on a float64 copy of the folder's
    VAE, one image at a time.

    FluxImg2ImgPipeline._encode_vae_image (``pipeline_flux_img2img.py`` 464-476) does ``image_latents =
    retrieve_latents(self.vae.encode(image), generator=generator)`` then ``(image_latents -
    self.vae.config.shift_factor) * self.vae.config.scaling_factor``; the training scripts
    (examples/dreambooth/train_dreambooth_flux.py) use ``latent_dist.sample()`` and the same normalisation. Here the
    deterministic mode is taken, ``retrieve_latents(..., sample_mode="argmax")`` = ``latent_dist.mode()`` =
    ``latent_dist.mean`` (``models/autoencoders/vae.py`` 742-743): the x0 of lipscope's latent space is the
    posterior mean, and a sampled latent would make the reference random. ``latent_dist.mode()`` is called directly
    (not ``retrieve_latents``, whose module needs ``transformers``).
    """
    if isinstance(folder_or_components, (str, Path)):
        import diffusers

        root = Path(folder_or_components)
        index = json.loads((root / "model_index.json").read_text())
        vae = getattr(diffusers, index["vae"][1]).from_pretrained(root / "vae")
    elif isinstance(folder_or_components, Mapping):
        vae = folder_or_components["vae"]
    else:
        vae = folder_or_components.vae
    if vae.config.shift_factor is None:
        raise ValueError("this VAE has no shift_factor: FLUX.1 VAEs have one (FluxPipeline decodes with it)")
    if images.dim() != 4 or images.min() < -1 or images.max() > 1:
        raise ValueError(f"images must be (n, 3, H, W) in [-1, 1], got shape {tuple(images.shape)}")
    model = _f64_copy(vae)
    images = _f64(images)
    with torch.no_grad():
        z = torch.cat([model.encode(images[i : i + 1]).latent_dist.mode() for i in range(images.shape[0])])
    return (z - vae.config.shift_factor) * vae.config.scaling_factor


# --------------------------------------------------------------------------- self-test


if __name__ == "__main__":
    import sys
    import tempfile

    from diffusers.utils import is_transformers_available
    from safetensors.torch import load_file

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from family_fixtures3 import FLUX_LATENT_SHAPE, save_flux_embeds, save_flux_folder  # noqa: E402

    torch.set_printoptions(precision=6)
    N, K, DT = 3, 10, 1
    g = torch.Generator().manual_seed(0)
    latents = torch.randn((N, *FLUX_LATENT_SHAPE), generator=g, dtype=F64)
    noise = torch.randn((N, *FLUX_LATENT_SHAPE), generator=g, dtype=F64)

    def show(name: str, vals: torch.Tensor) -> None:
        finite = bool(torch.isfinite(vals).all())
        assert finite and vals.dtype == F64 and vals.shape == (N,), (name, vals)
        print(f"{name:32s} k={K} dt={DT}: {vals.tolist()}  finite={finite}")

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        dev, schnell = save_flux_folder(root / "dev"), save_flux_folder(root / "schnell", guidance_embeds=False)
        embeds = load_file(save_flux_embeds(root / "flux.safetensors", prompts=2))
        show("flux dev guidance=3.5", flux_fd_reference(dev, latents, noise, K, DT, embeds, guidance_scale=3.5))
        show("flux dev guidance=3.5 true_cfg=2", flux_fd_reference(dev, latents, noise, K, DT, embeds, 3.5, 2.0))
        show("flux schnell (no guidance embeds)", flux_fd_reference(schnell, latents, noise, K, DT, embeds, None))
        # sample i uses prompt row i % P: the same x0 / noise in every row gives rows 0 == 2 != 1
        same = flux_fd_reference(dev, latents[:1].repeat(N, 1, 1, 1), noise[:1].repeat(N, 1, 1, 1), K, DT, embeds)
        assert same[0] == same[2] != same[1], same
        print(f"prompt rows 0, 1, 0 on one x0 / noise: {same.tolist()}")
        if is_transformers_available():
            from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

            check_against_flux_pipeline()
            # FluxPipeline.__call__ itself, one Euler step from sigma = k / T on an un-shifted copy of the scheduler:
            # its output latents - sigma * v recover the pipeline's v (the step runs in float32)
            nulls = dict.fromkeys(("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"))
            pipe = FluxPipeline.from_pretrained(dev, **nulls)
            pipe.set_progress_bar_config(disable=True)
            pipe.transformer.double()
            cfg = pipe.scheduler.config
            pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(cfg, use_dynamic_shifting=False, shift=1.0)
            k_pipe, (c, h, w), vsf = 500, FLUX_LATENT_SHAPE, pipe.vae_scale_factor
            x_k = flux_noised_reference(dev, latents[:1], noise[:1], k_pipe)
            row = {key: value[:1].double() for key, value in embeds.items()}
            packed = _pack_latents(x_k, 1, c, h, w)
            out = pipe(
                height=h * vsf,
                width=w * vsf,
                num_inference_steps=1,
                sigmas=[k_pipe / 1000],
                guidance_scale=3.5,
                true_cfg_scale=2.0,
                latents=packed,
                output_type="latent",
                return_dict=False,
                **row,
            )[0]
            v = _unpack_latents((packed - out.double()) / (k_pipe / 1000), h * vsf, w * vsf, vsf)
            eps_pipe = x_k + (1 - k_pipe / 1000) * v
            eps_ref = flux_eps_reference(dev, x_k, k_pipe, row, guidance_scale=3.5, true_cfg_scale=2.0)
            rel = ((eps_ref - eps_pipe).norm() / eps_ref.norm()).item()
            assert rel < 1e-6, rel
            print(f"FluxPipeline.__call__ one step (k={k_pipe}, true CFG 2): eps agrees to {rel:.1e} relative")
        else:
            print("transformers not installed: FluxPipeline cross-check skipped")
