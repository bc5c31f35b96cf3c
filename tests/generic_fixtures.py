"""Tiny random-weight pipelines for the generic adapter, saved as real folders with each pipeline's own
``save_pretrained``: Flux.2, Qwen-Image, Z-Image, Chroma, Sana, Lumina 2, AuraFlow, CogView4, HiDream, Wan (T2V),
HunyuanVideo, LTX-Video, CogVideoX, DeepFloyd IF stage I and DanceDiffusion (UNet1DModel).

Denoiser, autoencoder and scheduler configs are those of diffusers' own ``get_dummy_components``
(tests/pipelines/<name>/ in the diffusers repository), checked against the installed diffusers 0.42.1, with these
changes, each for a reason:

* text encoders that need a hub tokenizer (Mistral 3, Qwen 2.5-VL, Qwen 3, Gemma 2, GLM, Llama, CLIP) are left out
  (``null`` in model_index.json): those pipelines are conditioned on precomputed embeddings passed to ``__call__``
  (``embeds``, random normal, shaped as their ``encode_prompt`` returns them). The T5 / UMT5 ones (Chroma, AuraFlow,
  Wan, LTX, CogVideoX, IF) get tests/text_fixtures.py's tiny offline T5 tokenizer and a tiny encoder, and are
  conditioned on prompts, encoded by the pipeline itself;
* autoencoder normalisations are made non-trivial where the dummy ones are identities (Qwen-Image's latents_mean /
  latents_std), so that the identified map to ``vae.decode`` is checked on something;
* CogVideoX uses ``CogVideoXDDIMScheduler`` (v-prediction, zero-terminal-SNR, SNR shift 3: the published one), so
  the VP schedule is read from a scheduler lipscope has no config reader for;
* every denoiser's weights get N(0, 0.02²) added once: several diffusers blocks start some projections at zero
  (adaLN-zero, gates), which would make a random model's output blind to t.

Each ``Tiny`` lists what lipscope's capture is asked for: the ``__call__`` sizes (``call_args``, as ``model_args``),
prompts or the embedding file, and the guidance scale at which the pipeline runs classifier-free guidance (None for
guidance-distilled or unconditional pipelines). Weights are drawn under ``torch.manual_seed(0)`` inside
``torch.random.fork_rng``. Independent of lipscope on purpose: these folders feed tests/reference_generic.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import diffusers as d
import torch
from safetensors.torch import save_file
from text_fixtures import t5_encoder, t5_tokenizer


@dataclass(frozen=True)
class Tiny:
    pipeline: str  # the pipeline class (the registry key)
    component: str  # the denoiser's component
    build: Callable[[], dict[str, Any]]  # components
    call_args: dict[str, Any]
    embeds: Callable[[int], dict[str, torch.Tensor]] | None = None  # P → __call__'s embedding tensors
    prompts: tuple[str, ...] = ()
    guidance: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # pipeline __init__ arguments that are not modules


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _rand(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(shape, generator=_g(seed))


def _pair(p: int, **shapes: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """Embeddings and their negative twins (seeds differ), P rows each; masks all ones (int64)."""
    out = {}
    for i, (k, s) in enumerate(shapes.items()):
        if k.endswith("mask"):
            out[k] = torch.ones((p, *s), dtype=torch.int64)
        elif k.startswith("llama"):  # HiDream: (layers, P, seq, dim)
            out[k.removeprefix("llama:")] = _rand(s[0], p, *s[1:], seed=10 + i)
        else:
            out[k] = _rand(p, *s, seed=10 + i)
    return out


def _lists(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Z-Image takes a list of per-prompt embeddings (lengths may differ): keys name.0, name.1, … (the last prompt
    one token shorter, as after its attention mask)."""
    out = {}
    for k, v in t.items():
        for i in range(v.shape[0]):
            out[f"{k}.{i}"] = v[i, : v.shape[1] - (i == v.shape[0] - 1)]
    return out


def _umt5(d_model: int = 32):
    from transformers import UMT5Config, UMT5EncoderModel

    cfg = UMT5Config(vocab_size=len(t5_tokenizer()), d_model=d_model, d_kv=d_model // 2, d_ff=2 * d_model,
                     num_layers=2, num_heads=2, relative_attention_num_buckets=8, dropout_rate=0.0,
                     feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False)  # fmt: skip
    return UMT5EncoderModel(cfg).eval()


def _kl(**kw) -> d.AutoencoderKL:
    base = dict(in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1, latent_channels=4,
                norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False, sample_size=32)  # fmt: skip
    return d.AutoencoderKL(**{**base, **kw})


def _flux2():
    return dict(
        transformer=d.Flux2Transformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                              attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16,
                                              timestep_guidance_channels=256, axes_dims_rope=[4, 4, 4, 4]),
        vae=d.AutoencoderKLFlux2(sample_size=32, in_channels=3, out_channels=3,
                                 down_block_types=("DownEncoderBlock2D",),
                                 up_block_types=("UpDecoderBlock2D",), block_out_channels=(4,), layers_per_block=1,
                                 latent_channels=1, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False),
        scheduler=d.FlowMatchEulerDiscreteScheduler(), text_encoder=None, tokenizer=None,
    )  # fmt: skip


def _qwen():
    return dict(
        transformer=d.QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=2,
                                                  attention_head_dim=16, num_attention_heads=3, joint_attention_dim=16,
                                                  guidance_embeds=False, axes_dims_rope=(8, 4, 4)),
        vae=d.AutoencoderKLQwenImage(base_dim=24, z_dim=4, dim_mult=[1, 2, 4], num_res_blocks=1,
                                     temperal_downsample=[False, True], latents_mean=[0.25, -0.5, 0.125, 0.0],
                                     latents_std=[0.5, 2.0, 1.0, 1.5]),
        scheduler=d.FlowMatchEulerDiscreteScheduler(), text_encoder=None, tokenizer=None,
    )  # fmt: skip


def _zimage():
    tr = d.ZImageTransformer2DModel(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=32, n_layers=2,
                                    n_refiner_layers=1, n_heads=2, n_kv_heads=2, norm_eps=1e-5, qk_norm=True,
                                    cap_feat_dim=16, rope_theta=256.0, t_scale=1000.0, axes_dims=[8, 4, 4],
                                    axes_lens=[256, 32, 32])  # fmt: skip
    with torch.no_grad():  # torch.empty in the constructor (diffusers' test fixes them the same way)
        tr.x_pad_token.copy_(torch.ones_like(tr.x_pad_token))
        tr.cap_pad_token.copy_(torch.ones_like(tr.cap_pad_token))
    vae = _kl(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
              up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=16, norm_num_groups=4, scaling_factor=0.3611,
              shift_factor=0.1159, use_quant_conv=True, use_post_quant_conv=True)  # fmt: skip
    return dict(transformer=tr, vae=vae, scheduler=d.FlowMatchEulerDiscreteScheduler(), text_encoder=None,
                tokenizer=None)  # fmt: skip


def _chroma():
    return dict(
        transformer=d.ChromaTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                               attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                               axes_dims_rope=[4, 4, 8], approximator_hidden_dim=32,
                                               approximator_layers=1, approximator_num_channels=16),
        vae=_kl(latent_channels=1, shift_factor=0.0609, scaling_factor=1.5035),
        scheduler=d.FlowMatchEulerDiscreteScheduler(), text_encoder=t5_encoder(32), tokenizer=t5_tokenizer(),
        image_encoder=None, feature_extractor=None,
    )  # fmt: skip


def _sana():
    return dict(
        transformer=d.SanaTransformer2DModel(patch_size=1, in_channels=4, out_channels=4, num_layers=1,
                                             num_attention_heads=2, attention_head_dim=4, num_cross_attention_heads=2,
                                             cross_attention_head_dim=4, cross_attention_dim=8, caption_channels=8,
                                             sample_size=32),
        vae=d.AutoencoderDC(in_channels=3, latent_channels=4, attention_head_dim=2,
                            encoder_block_types=("ResBlock", "EfficientViTBlock"),
                            decoder_block_types=("ResBlock", "EfficientViTBlock"), encoder_block_out_channels=(8, 8),
                            decoder_block_out_channels=(8, 8), encoder_qkv_multiscales=((), (5,)),
                            decoder_qkv_multiscales=((), (5,)), encoder_layers_per_block=(1, 1),
                            decoder_layers_per_block=[1, 1], downsample_block_type="conv",
                            upsample_block_type="interpolate", decoder_norm_types="rms_norm", decoder_act_fns="silu",
                            scaling_factor=0.41407),
        scheduler=d.FlowMatchEulerDiscreteScheduler(shift=7.0), text_encoder=None, tokenizer=None,
    )  # fmt: skip


def _lumina2():
    return dict(
        transformer=d.Lumina2Transformer2DModel(sample_size=4, patch_size=2, in_channels=4, hidden_size=8, num_layers=2,
                                                num_attention_heads=1, num_kv_heads=1, multiple_of=16,
                                                ffn_dim_multiplier=None, norm_eps=1e-5, scaling_factor=1.0,
                                                axes_dim_rope=[4, 2, 2], cap_feat_dim=8),
        vae=_kl(shift_factor=0.0609, scaling_factor=1.5035),
        scheduler=d.FlowMatchEulerDiscreteScheduler(), text_encoder=None, tokenizer=None,
    )  # fmt: skip


def _auraflow():
    return dict(
        transformer=d.AuraFlowTransformer2DModel(sample_size=32, patch_size=2, in_channels=4, num_mmdit_layers=1,
                                                 num_single_dit_layers=1, attention_head_dim=8, num_attention_heads=4,
                                                 caption_projection_dim=32, joint_attention_dim=32, out_channels=4,
                                                 pos_embed_max_size=256),
        vae=_kl(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4, scaling_factor=0.13025),
        scheduler=d.FlowMatchEulerDiscreteScheduler(), text_encoder=_umt5(32), tokenizer=t5_tokenizer(),
    )  # fmt: skip


def _cogview4():
    return dict(
        transformer=d.CogView4Transformer2DModel(patch_size=2, in_channels=4, num_layers=2, attention_head_dim=4,
                                                 num_attention_heads=4, out_channels=4, text_embed_dim=32,
                                                 time_embed_dim=8, condition_dim=4),
        vae=_kl(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4, scaling_factor=0.3),
        scheduler=d.FlowMatchEulerDiscreteScheduler(base_shift=0.25, max_shift=0.75, base_image_seq_len=256,
                                                    use_dynamic_shifting=True, time_shift_type="linear"),
        text_encoder=None, tokenizer=None,
    )  # fmt: skip


def _hidream():
    return dict(
        transformer=d.HiDreamImageTransformer2DModel(patch_size=2, in_channels=4, out_channels=4, num_layers=1,
                                                     num_single_layers=1, attention_head_dim=8, num_attention_heads=4,
                                                     caption_channels=[32, 16], text_emb_dim=64, num_routed_experts=4,
                                                     num_activated_experts=2, axes_dims_rope=(4, 2, 2),
                                                     max_resolution=(32, 32), llama_layers=(0, 1)).eval(),
        vae=_kl(scaling_factor=0.3611, shift_factor=0.1159),
        scheduler=d.FlowMatchEulerDiscreteScheduler(),
        **{f"{k}{s}": None for k in ("text_encoder", "tokenizer") for s in ("", "_2", "_3", "_4")},
    )  # fmt: skip


def _wan():
    return dict(
        transformer=d.WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                                            in_channels=16, out_channels=16, text_dim=32, freq_dim=256, ffn_dim=32,
                                            num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                            rope_max_seq_len=32),
        vae=d.AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                               temperal_downsample=[False, True, True]),
        scheduler=d.FlowMatchEulerDiscreteScheduler(shift=7.0), text_encoder=_umt5(32), tokenizer=t5_tokenizer(),
        transformer_2=None,
    )  # fmt: skip


def _hunyuan():
    blocks = ("HunyuanVideoDownBlock3D",) * 4
    return dict(
        transformer=d.HunyuanVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2,
                                                     attention_head_dim=10, num_layers=1, num_single_layers=1,
                                                     num_refiner_layers=1, patch_size=1, patch_size_t=1,
                                                     guidance_embeds=True, text_embed_dim=16, pooled_projection_dim=8,
                                                     rope_axes_dim=(2, 4, 4)),
        vae=d.AutoencoderKLHunyuanVideo(in_channels=3, out_channels=3, latent_channels=4, down_block_types=blocks,
                                        up_block_types=("HunyuanVideoUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8),
                                        layers_per_block=1, act_fn="silu", norm_num_groups=4, scaling_factor=0.476986,
                                        spatial_compression_ratio=8, temporal_compression_ratio=4,
                                        mid_block_add_attention=True),
        scheduler=d.FlowMatchEulerDiscreteScheduler(shift=7.0),
        text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
    )  # fmt: skip


def _ltx():
    vae = d.AutoencoderKLLTXVideo(in_channels=3, out_channels=3, latent_channels=8, block_out_channels=(8, 8, 8, 8),
                                  decoder_block_out_channels=(8, 8, 8, 8), layers_per_block=(1, 1, 1, 1, 1),
                                  decoder_layers_per_block=(1, 1, 1, 1, 1),
                                  spatio_temporal_scaling=(True, True, False, False),
                                  decoder_spatio_temporal_scaling=(True, True, False, False),
                                  decoder_inject_noise=(False, False, False, False, False),
                                  upsample_residual=(False, False, False, False), upsample_factor=(1, 1, 1, 1),
                                  timestep_conditioning=False, patch_size=1, patch_size_t=1, encoder_causal=True,
                                  decoder_causal=False)  # fmt: skip
    vae.use_framewise_encoding = vae.use_framewise_decoding = False
    return dict(
        transformer=d.LTXVideoTransformer3DModel(in_channels=8, out_channels=8, patch_size=1, patch_size_t=1,
                                                 num_attention_heads=4, attention_head_dim=8, cross_attention_dim=32,
                                                 num_layers=1, caption_channels=32),
        vae=vae, scheduler=d.FlowMatchEulerDiscreteScheduler(), text_encoder=t5_encoder(32), tokenizer=t5_tokenizer(),
    )  # fmt: skip


def _cogvideox():
    blocks = ("CogVideoXDownBlock3D",) * 4
    return dict(
        transformer=d.CogVideoXTransformer3DModel(num_attention_heads=4, attention_head_dim=8, in_channels=4,
                                                  out_channels=4, time_embed_dim=2, text_embed_dim=32, num_layers=1,
                                                  sample_width=2, sample_height=2, sample_frames=9, patch_size=2,
                                                  temporal_compression_ratio=4, max_text_seq_length=16),
        vae=d.AutoencoderKLCogVideoX(in_channels=3, out_channels=3, down_block_types=blocks,
                                     up_block_types=("CogVideoXUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8),
                                     latent_channels=4, layers_per_block=1, norm_num_groups=2,
                                     temporal_compression_ratio=4),
        scheduler=d.CogVideoXDDIMScheduler(prediction_type="v_prediction", rescale_betas_zero_snr=True,
                                           snr_shift_scale=3.0, timestep_spacing="trailing",
                                           beta_schedule="scaled_linear",
                                           beta_start=0.00085, beta_end=0.012, clip_sample=False,
                                           set_alpha_to_one=True),
        text_encoder=t5_encoder(32), tokenizer=t5_tokenizer(),
    )  # fmt: skip


def _if():
    unet = d.UNet2DConditionModel(sample_size=16, layers_per_block=1, block_out_channels=[16, 32],
                                  down_block_types=["ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"],
                                  mid_block_type="UNetMidBlock2DSimpleCrossAttn",
                                  up_block_types=["SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"], in_channels=3,
                                  out_channels=6, cross_attention_dim=32, encoder_hid_dim=32, attention_head_dim=8,
                                  addition_embed_type="text", addition_embed_type_num_heads=2,
                                  cross_attention_norm="group_norm", resnet_time_scale_shift="scale_shift",
                                  act_fn="gelu", norm_num_groups=8)  # fmt: skip
    sched = d.DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", beta_start=0.0001,
                            beta_end=0.02, thresholding=True, dynamic_thresholding_ratio=0.95, sample_max_value=1.0,
                            prediction_type="epsilon", variance_type="learned_range")  # fmt: skip
    return dict(unet=unet, scheduler=sched, text_encoder=t5_encoder(32), tokenizer=t5_tokenizer(), safety_checker=None,
                feature_extractor=None, watermarker=None)  # fmt: skip


def _dance():
    unet = d.UNet1DModel(block_out_channels=(32, 32, 64), extra_in_channels=16, sample_size=512, sample_rate=16_000,
                         time_embedding_dim=16,  # the dummy's fourier width before diffusers tied it to block_out
                         in_channels=2, out_channels=2, flip_sin_to_cos=True, use_timestep_embedding=False,
                         time_embedding_type="fourier", mid_block_type="UNetMidBlock1D",
                         down_block_types=("DownBlock1DNoSkip", "DownBlock1D", "AttnDownBlock1D"),
                         up_block_types=("AttnUpBlock1D", "UpBlock1D", "UpBlock1DNoSkip"))  # fmt: skip
    return dict(unet=unet, scheduler=d.IPNDMScheduler())


TINY: dict[str, Tiny] = {t.pipeline: t for t in (
    Tiny("Flux2Pipeline", "transformer", _flux2, dict(height=16, width=16, max_sequence_length=8),
         embeds=lambda p: _pair(p, prompt_embeds=(6, 16))),
    Tiny("QwenImagePipeline", "transformer", _qwen, dict(height=32, width=32, max_sequence_length=16),
         embeds=lambda p: _pair(p, prompt_embeds=(7, 16), prompt_embeds_mask=(7,), negative_prompt_embeds=(5, 16),
                                negative_prompt_embeds_mask=(5,)), guidance=4.0),
    Tiny("ZImagePipeline", "transformer", _zimage, dict(height=32, width=32, max_sequence_length=16),
         embeds=lambda p: _lists(_pair(p, prompt_embeds=(6, 16), negative_prompt_embeds=(6, 16))), guidance=3.0),
    Tiny("ChromaPipeline", "transformer", _chroma, dict(height=8, width=8, max_sequence_length=8),
         prompts=("a red car", "a cat in the house"), guidance=5.0, extra={}),
    Tiny("SanaPipeline", "transformer", _sana, dict(height=32, width=32, use_resolution_binning=False,
                                                    max_sequence_length=16),
         embeds=lambda p: _pair(p, prompt_embeds=(6, 8), prompt_attention_mask=(6,), negative_prompt_embeds=(6, 8),
                                negative_prompt_attention_mask=(6,)), guidance=4.5),
    Tiny("Lumina2Pipeline", "transformer", _lumina2, dict(height=32, width=32),
         embeds=lambda p: _pair(p, prompt_embeds=(6, 8), prompt_attention_mask=(6,), negative_prompt_embeds=(6, 8),
                                negative_prompt_attention_mask=(6,)), guidance=4.0),
    Tiny("AuraFlowPipeline", "transformer", _auraflow, dict(height=32, width=32, max_sequence_length=8),
         prompts=("a red car", "a cat"), guidance=3.5),
    Tiny("CogView4Pipeline", "transformer", _cogview4, dict(height=16, width=16),
         embeds=lambda p: _pair(p, prompt_embeds=(16, 32), negative_prompt_embeds=(16, 32)), guidance=5.0),
    Tiny("HiDreamImagePipeline", "transformer", _hidream, dict(height=32, width=32),
         embeds=lambda p: _pair(p, prompt_embeds_t5=(8, 32), negative_prompt_embeds_t5=(8, 32),
                                **{"llama:prompt_embeds_llama3": (2, 8, 16),
                                   "llama:negative_prompt_embeds_llama3": (2, 8, 16)},
                                pooled_prompt_embeds=(64,), negative_pooled_prompt_embeds=(64,)), guidance=5.0),
    Tiny("WanPipeline", "transformer", _wan, dict(height=16, width=16, num_frames=9, max_sequence_length=8),
         prompts=("a red car", "a cat"), guidance=5.0, extra={"boundary_ratio": None, "expand_timesteps": False}),
    Tiny("HunyuanVideoPipeline", "transformer", _hunyuan, dict(height=16, width=16, num_frames=9),
         embeds=lambda p: _pair(p, prompt_embeds=(6, 16), pooled_prompt_embeds=(8,), prompt_attention_mask=(6,),
                                negative_prompt_embeds=(6, 16), negative_pooled_prompt_embeds=(8,),
                                negative_prompt_attention_mask=(6,)), guidance=3.0),
    Tiny("LTXPipeline", "transformer", _ltx, dict(height=32, width=32, num_frames=9, max_sequence_length=8),
         prompts=("a red car", "a cat"), guidance=3.0),
    Tiny("CogVideoXPipeline", "transformer", _cogvideox, dict(height=16, width=16, num_frames=9,
                                                             max_sequence_length=16),
         prompts=("a red car", "a cat"), guidance=6.0),
    Tiny("IFPipeline", "unet", _if, dict(height=16, width=16), prompts=("a red car", "a cat"), guidance=7.0,
         extra={"requires_safety_checker": False}),
    Tiny("DanceDiffusionPipeline", "unet", _dance, dict(audio_length_in_s=64 / 16_000)),
)}  # fmt: skip


def _perturb(module: torch.nn.Module) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.02 * torch.randn_like(p))


def build_pipeline(name: str) -> Any:
    """The tiny pipeline ``name`` (weights drawn under seed 0, caller's RNG untouched)."""
    tiny = TINY[name]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        comps = tiny.build()
        _perturb(comps[tiny.component])
    return getattr(d, name)(**comps, **tiny.extra)


def save_tiny(name: str, path: Path) -> Path:
    """Write the tiny pipeline ``name`` to ``path`` with its own save_pretrained."""
    build_pipeline(name).save_pretrained(Path(path))
    return Path(path)


def save_embeds(name: str, path: Path, prompts: int = 2) -> Path | None:
    """The pipeline's embedding tensors for ``prompts`` conditions as a safetensors file (None: prompt-encoded)."""
    tiny = TINY[name]
    if tiny.embeds is None:
        return None
    save_file({k: v.contiguous() for k, v in tiny.embeds(prompts).items()}, str(path))
    return Path(path)
