"""Brute-force per-sample references for ``||eps(x_k, k + dt) - eps(x_k, k)|| / (dt / T)`` for the DiT, Stable
Diffusion and SDXL families, written from the pipelines' own denoising calls.

Written only from diffusers' scheduler / model calls and plain torch (lipscope is deliberately NOT imported: this
module is the independent reference lipscope is tested against), in the style of ``tests/reference_processes.py``:

* float64 throughout: inputs are cast with ``.to(torch.float64)`` and every module is evaluated as a ``.double()``
  eval-mode deep copy (the caller's modules and schedulers are never modified);
* one sample (batch of 1) at a time in a plain Python loop, each with its own conditioning row;
* ``x_k = scheduler.add_noise(latents, noise, k)`` is drawn ONCE at ``k`` and the SAME ``x_k`` is fed at ``k`` and
  ``k + dt`` (forward difference, integer ``k``, ``dt >= 1``, ``k + dt <= T - 1``);
* each returns a float64 tensor of shape ``(n,)``.

Pipeline lines mirrored (diffusers 0.42.1):

* DiTPipeline.__call__: ``timesteps = t[None]`` (t: an int64 0-d entry of ``scheduler.timesteps``) expanded to the
  batch; ``noise_pred = self.transformer(latent_model_input, timestep=timesteps,
  class_labels=class_labels_input).sample``; with guidance, ``eps, rest = noise_pred[:, :latent_channels],
  noise_pred[:, latent_channels:]``, ``cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)`` (conditional
  FIRST: ``class_labels_input = torch.cat([class_labels, class_null], 0)``), ``half_eps = uncond_eps +
  guidance_scale * (cond_eps - uncond_eps)``; learned sigma: ``if self.transformer.config.out_channels // 2 ==
  latent_channels: model_output, _ = torch.split(noise_pred, latent_channels, dim=1)``.
  The pipeline hard-codes ``class_null = torch.tensor([1000] * batch_size)``: right for the 1000-class ImageNet DiT,
  out of range for any other. The null class the model actually has is ``LabelEmbedding.num_classes`` =
  ``num_embeds_ada_norm`` (``token_drop``: ``torch.where(drop_ids, self.num_classes, labels)``, table of
  ``num_classes + 1`` rows since DiT's ``class_dropout_prob=0.1 > 0``), which equals 1000 for ImageNet DiT; that
  index is used here.
* StableDiffusion(XL)Pipeline.__call__: ``prompt_embeds = torch.cat([negative_prompt_embeds, prompt_embeds])``
  (unconditional FIRST), ``noise_pred = self.unet(latent_model_input, t, encoder_hidden_states=prompt_embeds,
  timestep_cond=timestep_cond, cross_attention_kwargs=..., added_cond_kwargs=added_cond_kwargs,
  return_dict=False)[0]``, ``noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)``, ``noise_pred =
  noise_pred_uncond + self.guidance_scale * (noise_pred_text - noise_pred_uncond)`` (``guidance_rescale`` 0).
  SDXL: ``added_cond_kwargs = {"text_embeds": add_text_embeds, "time_ids": add_time_ids}`` with
  ``add_text_embeds = torch.cat([negative_pooled_prompt_embeds, pooled_prompt_embeds])`` and
  ``add_time_ids = torch.cat([negative_add_time_ids, add_time_ids])`` (``negative_add_time_ids = add_time_ids``
  unless negative sizes are given). The branches are evaluated here as two batch-1 calls (the UNet has no
  cross-sample interaction in eval mode), combined with the identical formula.
* v-prediction -> eps: ``DDIMScheduler.step``, ``prediction_type == "v_prediction"`` branch:
  ``pred_epsilon = (alpha_prod_t**0.5) * model_output + (beta_prod_t**0.5) * sample`` with
  ``alpha_prod_t = self.alphas_cumprod[timestep]``, ``beta_prod_t = 1 - alpha_prod_t``, applied to the guided
  output at the evaluation point's own timestep.

Guidance: both pipelines only guide when ``guidance_scale > 1`` (``do_classifier_free_guidance``); here the CFG
combination is applied whenever ``guidance_scale`` is given (the field a sampler integrates at that scale), and
``guidance_scale=None`` means the conditional branch alone.

Float32 leaks that remain inside diffusers: ``get_timestep_embedding`` computes the sinusoids in float32 (exact for
integer timesteps, and for SDXL's integer-valued time ids); ``DDIMScheduler.alphas_cumprod`` is a float32 product.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

F64 = torch.float64


# --------------------------------------------------------------------------- helpers


def _f64(x: torch.Tensor) -> torch.Tensor:
    return x.detach().to(F64)


def _f64_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A float64, eval-mode deep copy (the caller's module keeps its dtype and mode)."""
    return copy.deepcopy(module).double().eval()


def _check_steps(k: int, dt: int, k_max: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or isinstance(dt, bool) or not isinstance(dt, int):
        raise TypeError(f"k and dt must be Python ints, got {type(k).__name__} and {type(dt).__name__}")
    if dt < 1 or k < 0 or k + dt > k_max:
        raise ValueError(f"need 0 <= k < k + dt <= {k_max}, got k={k}, dt={dt}")


def _check_pair(latents: torch.Tensor, noise: torch.Tensor) -> None:
    if latents.shape != noise.shape or latents.dim() != 4:
        raise ValueError(
            f"latents and noise must share one (n, C, H, W) shape, got {tuple(latents.shape)}, {tuple(noise.shape)}"
        )


def _fd(eps_a: torch.Tensor, eps_b: torch.Tensor, dt: int, T: int) -> float:
    return (torch.linalg.vector_norm(eps_b - eps_a) / (dt / T)).item()


def _cfg(uncond: torch.Tensor, cond: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """The pipelines' classifier-free guidance combination, verbatim."""
    return uncond + guidance_scale * (cond - uncond)


# --------------------------------------------------------------------------- DiT


def dit_null_class(transformer) -> int:
    """Index of the null (unconditional) class embedding: ``LabelEmbedding.num_classes`` (= num_embeds_ada_norm).

    DiTPipeline hard-codes 1000 (ImageNet DiT's ``num_embeds_ada_norm``); the model's own table row is used here.
    """
    embedder = transformer.transformer_blocks[0].norm1.emb.class_embedder
    null = embedder.num_classes
    assert null == transformer.config.num_embeds_ada_norm
    if embedder.embedding_table.num_embeddings <= null:
        raise ValueError(f"the class embedding has no null row (dropout_prob={embedder.dropout_prob})")
    return null


def dit_fd_reference(
    pipe,
    latents: torch.Tensor,
    noise: torch.Tensor,
    class_labels: Sequence[int],
    k: int,
    dt: int,
    guidance_scale: float | None = None,
) -> torch.Tensor:
    """DiTPipeline: x_k = ``pipe.scheduler.add_noise(latents, noise, k)``; eps = the first ``in_channels`` channels
    of ``transformer(x, timestep=tensor([t]) (int64), class_labels=tensor([label])).sample`` (learned sigma split),
    CFG-combined with the null class when ``guidance_scale`` is given (see the module docstring).

    ``pipe``: a ``DiTPipeline`` (``.transformer``, ``.scheduler``); ``class_labels``: one label per sample.
    """
    transformer, scheduler = pipe.transformer, pipe.scheduler
    T = scheduler.config.num_train_timesteps
    _check_steps(k, dt, T - 1)
    _check_pair(latents, noise)
    n = latents.shape[0]
    if len(class_labels) != n:
        raise ValueError(f"need one class label per sample: {len(class_labels)} labels for {n} samples")
    latent_channels = transformer.config.in_channels
    learned_sigma = transformer.config.out_channels // 2 == latent_channels
    null = dit_null_class(transformer)
    sched = copy.deepcopy(scheduler)  # add_noise moves its alphas_cumprod; keep the caller's untouched
    model = _f64_copy(transformer)
    latents, noise = _f64(latents), _f64(noise)

    def eps_at(x: torch.Tensor, kk: int, label: int) -> torch.Tensor:
        t = torch.tensor(kk)  # an int64 0-d entry, as scheduler.timesteps holds
        timesteps = t[None].expand(x.shape[0])
        x = sched.scale_model_input(x, t)
        if guidance_scale is None:
            noise_pred = model(x, timestep=timesteps, class_labels=torch.tensor([label])).sample
        else:
            noise_pred_cond = model(x, timestep=timesteps, class_labels=torch.tensor([label])).sample
            noise_pred_null = model(x, timestep=timesteps, class_labels=torch.tensor([null])).sample
            cond_eps, rest = noise_pred_cond[:, :latent_channels], noise_pred_cond[:, latent_channels:]
            uncond_eps = noise_pred_null[:, :latent_channels]
            half_eps = _cfg(uncond_eps, cond_eps, guidance_scale)
            noise_pred = torch.cat([half_eps, rest], dim=1)
        if learned_sigma:
            model_output, _ = torch.split(noise_pred, latent_channels, dim=1)
        else:
            model_output = noise_pred
        return model_output

    out = torch.empty(n, dtype=F64)
    with torch.no_grad():
        for i in range(n):
            label = int(class_labels[i])
            x_k = sched.add_noise(latents[i : i + 1], noise[i : i + 1], torch.tensor([k]))
            eps = [eps_at(x_k, kk, label) for kk in (k, k + dt)]
            out[i] = _fd(eps[0], eps[1], dt, T)
    return out


# --------------------------------------------------------------------------- Stable Diffusion / SDXL


def sdxl_time_ids(height: int, width: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """StableDiffusionXLPipeline._get_add_time_ids for ``original_size = target_size = (height, width)`` and
    ``crops_coords_top_left = (0, 0)``: ``list(original_size + crops_coords_top_left + target_size)`` as a (6,)
    tensor (the pipeline makes it ``torch.tensor([add_time_ids], dtype=prompt_embeds.dtype)``, shape (1, 6), and
    repeats it over the batch). ``height`` / ``width`` are PIXEL sizes (the pipeline's defaults are
    ``unet.config.sample_size * vae_scale_factor``)."""
    original_size, crops_coords_top_left, target_size = (height, width), (0, 0), (height, width)
    return torch.tensor(list(original_size + crops_coords_top_left + target_size), dtype=dtype)


def load_sd_components(pipe_dir_or_components):
    """(unet, scheduler) from a pipeline folder (``unet/``, ``scheduler/``; the scheduler class named in
    ``model_index.json``), a mapping with ``unet`` / ``scheduler`` keys, or an object with those attributes."""
    if isinstance(pipe_dir_or_components, (str, Path)):
        import diffusers

        root = Path(pipe_dir_or_components)
        index = json.loads((root / "model_index.json").read_text())
        scheduler_cls = getattr(diffusers, index["scheduler"][1])
        unet_cls = getattr(diffusers, index["unet"][1])
        return unet_cls.from_pretrained(root / "unet"), scheduler_cls.from_pretrained(root / "scheduler")
    if isinstance(pipe_dir_or_components, Mapping):
        return pipe_dir_or_components["unet"], pipe_dir_or_components["scheduler"]
    return pipe_dir_or_components.unet, pipe_dir_or_components.scheduler


def _row(kwargs: Mapping[str, torch.Tensor] | None, i: int) -> dict[str, torch.Tensor] | None:
    if kwargs is None:
        return None
    return {name: _f64(v)[i : i + 1] for name, v in kwargs.items()}


def sd_fd_reference(
    pipe_dir_or_components,
    latents: torch.Tensor,
    noise: torch.Tensor,
    prompt_embeds: torch.Tensor,
    negative_prompt_embeds: torch.Tensor | None,
    k: int,
    dt: int,
    guidance_scale: float | None = None,
    added_cond_kwargs: Mapping[str, torch.Tensor] | None = None,
    negative_added_cond_kwargs: Mapping[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """StableDiffusion(XL)Pipeline: x_k = ``scheduler.add_noise(latents, noise, k)``; the UNet output
    ``unet(x, t, encoder_hidden_states=..., added_cond_kwargs=...).sample`` (t an int64 0-d tensor, as the
    pipeline's loop feeds it), CFG-combined as ``noise_pred_uncond + guidance_scale * (noise_pred_text -
    noise_pred_uncond)`` when ``guidance_scale`` is given, then converted to eps by the scheduler's
    ``prediction_type`` ("epsilon": as is; "v_prediction": ``sqrt(abar_t) * v + sqrt(1 - abar_t) * x``).

    Per-sample conditioning (row i for sample i): ``prompt_embeds`` / ``negative_prompt_embeds`` (n, L, D);
    for SDXL ``added_cond_kwargs = {"text_embeds": (n, pooled), "time_ids": (n, 6)}`` and, for CFG,
    ``negative_added_cond_kwargs = {"text_embeds": (n, pooled)[, "time_ids": (n, 6)]}`` (negative time ids default
    to the positive ones, as the pipeline's ``negative_add_time_ids = add_time_ids``).
    """
    unet, scheduler = load_sd_components(pipe_dir_or_components)
    T = scheduler.config.num_train_timesteps
    _check_steps(k, dt, T - 1)
    _check_pair(latents, noise)
    n = latents.shape[0]
    prediction_type = scheduler.config.prediction_type
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"only epsilon / v_prediction models are covered, got {prediction_type!r}")
    if prompt_embeds.dim() != 3 or prompt_embeds.shape[0] != n:
        raise ValueError(f"prompt_embeds must be (n={n}, L, D), got {tuple(prompt_embeds.shape)}")
    xl = unet.config.addition_embed_type == "text_time"
    if xl and added_cond_kwargs is None:
        raise ValueError("an SDXL UNet (addition_embed_type='text_time') needs added_cond_kwargs text_embeds/time_ids")
    if guidance_scale is not None:
        if negative_prompt_embeds is None or negative_prompt_embeds.shape[0] != n:
            raise ValueError("guidance needs negative_prompt_embeds with one row per sample")
        if xl:
            if negative_added_cond_kwargs is None or "text_embeds" not in negative_added_cond_kwargs:
                raise ValueError("SDXL guidance needs negative_added_cond_kwargs['text_embeds'] (negative pooled)")
            negative_added_cond_kwargs = {"time_ids": added_cond_kwargs["time_ids"], **negative_added_cond_kwargs}
    sched = copy.deepcopy(scheduler)  # add_noise moves its alphas_cumprod; keep the caller's untouched
    model = _f64_copy(unet)
    abar = scheduler.alphas_cumprod.detach().to(device="cpu", dtype=F64)
    latents, noise = _f64(latents), _f64(noise)
    prompt_embeds = _f64(prompt_embeds)
    if negative_prompt_embeds is not None:
        negative_prompt_embeds = _f64(negative_prompt_embeds)

    def eps_at(x: torch.Tensor, kk: int, i: int) -> torch.Tensor:
        t = torch.tensor(kk)  # an int64 0-d entry, as scheduler.timesteps holds
        latent_model_input = sched.scale_model_input(x, t)
        noise_pred = model(
            latent_model_input,
            t,
            encoder_hidden_states=prompt_embeds[i : i + 1],
            timestep_cond=None,
            added_cond_kwargs=_row(added_cond_kwargs, i),
            return_dict=False,
        )[0]
        if guidance_scale is not None:
            noise_pred_text = noise_pred
            noise_pred_uncond = model(
                latent_model_input,
                t,
                encoder_hidden_states=negative_prompt_embeds[i : i + 1],
                timestep_cond=None,
                added_cond_kwargs=_row(negative_added_cond_kwargs, i),
                return_dict=False,
            )[0]
            noise_pred = _cfg(noise_pred_uncond, noise_pred_text, guidance_scale)
        if prediction_type == "v_prediction":
            alpha_prod_t = abar[kk]
            beta_prod_t = 1 - alpha_prod_t
            noise_pred = (alpha_prod_t**0.5) * noise_pred + (beta_prod_t**0.5) * x
        return noise_pred

    out = torch.empty(n, dtype=F64)
    with torch.no_grad():
        for i in range(n):
            x_k = sched.add_noise(latents[i : i + 1], noise[i : i + 1], torch.tensor([k]))
            eps = [eps_at(x_k, kk, i) for kk in (k, k + dt)]
            out[i] = _fd(eps[0], eps[1], dt, T)
    return out


# --------------------------------------------------------------------------- self-test


if __name__ == "__main__":
    import sys
    import tempfile

    from diffusers import DiTPipeline
    from safetensors.torch import load_file

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from family_fixtures import (  # noqa: E402
        DIT_NUM_CLASSES,
        IMAGE_SHAPE,
        LATENT_SHAPE,
        save_dit_pipeline,
        save_prompt_embeds,
        save_sd_pipeline,
    )

    torch.set_printoptions(precision=6)
    N, K, DT = 2, 10, 1
    g = torch.Generator().manual_seed(0)
    latents = torch.randn((N, *LATENT_SHAPE), generator=g, dtype=F64)
    noise = torch.randn((N, *LATENT_SHAPE), generator=g, dtype=F64)

    def show(name: str, vals: torch.Tensor) -> None:
        finite = bool(torch.isfinite(vals).all())
        assert finite and vals.dtype == F64 and vals.shape == (N,), (name, vals)
        print(f"{name:24s} k={K} dt={DT}: {vals.tolist()}  finite={finite}")

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)

        dit = DiTPipeline.from_pretrained(save_dit_pipeline(root / "dit"))
        dit.set_progress_bar_config(disable=True)
        image = dit(class_labels=[1], num_inference_steps=2, guidance_scale=1.0, output_type="np").images
        print(f"DiT: sampled {image.shape} at guidance_scale=1; null class = {dit_null_class(dit.transformer)}")
        try:
            dit(class_labels=[1], num_inference_steps=2, output_type="np")
        except IndexError as e:
            print(f"DiT: default guidance_scale=4 (class_null=1000) fails on {DIT_NUM_CLASSES} classes: {e}")
        labels = [1, 7]
        show("dit", dit_fd_reference(dit, latents, noise, labels, K, DT))
        show("dit cfg=3", dit_fd_reference(dit, latents, noise, labels, K, DT, guidance_scale=3.0))

        for xl in (False, True):
            for prediction_type in ("epsilon", "v_prediction"):
                folder = save_sd_pipeline(root / f"sd_{xl}_{prediction_type}", xl=xl, prediction_type=prediction_type)
                embeds = load_file(save_prompt_embeds(root / f"embeds_{xl}.safetensors", xl=xl, prompts=N))
                added = negative_added = None
                if xl:
                    ids = sdxl_time_ids(*IMAGE_SHAPE[1:]).expand(N, 6)
                    added = {"text_embeds": embeds["pooled_prompt_embeds"], "time_ids": ids}
                    negative_added = {"text_embeds": embeds["negative_pooled_prompt_embeds"]}
                name = f"{'sdxl' if xl else 'sd'} {prediction_type}"
                for gs in (None, 3.0):
                    vals = sd_fd_reference(
                        folder,
                        latents,
                        noise,
                        embeds["prompt_embeds"],
                        embeds["negative_prompt_embeds"],
                        K,
                        DT,
                        guidance_scale=gs,
                        added_cond_kwargs=added,
                        negative_added_cond_kwargs=negative_added,
                    )
                    show(name + ("" if gs is None else f" cfg={gs:g}"), vals)
        print(f"sdxl_time_ids(16, 16) = {sdxl_time_ids(16, 16).tolist()}")
