"""Tiny random-weight pipeline folders WITH tokenizers and text encoders (SD, SDXL, SD3, PixArt-alpha), built offline.

The same conventions as ``tests/family_fixtures.py`` / ``tests/family_fixtures2.py``, whose denoiser / VAE /
scheduler configs are reused: every folder builder takes the path to create, writes it with the real pipeline class's
``save_pretrained`` (so ``model_index.json`` names every component with its real class) and returns it; weights are
drawn under ``torch.manual_seed(0)`` inside ``torch.random.fork_rng`` so the builders are deterministic and leave the
caller's global RNG state untouched. The denoiser and VAE are drawn first, in their own seeded block, exactly as the
text-free folders draw them, so a text folder's ``unet/`` / ``transformer/`` / ``vae/`` weights equal those of
``save_sd_pipeline`` / ``save_sd3_folder`` / ``save_pixart_folder``; the text encoders come from a second seeded block.

Tokenizers are made from scratch (nothing is downloaded):

* CLIP (``CLIPTokenizer``): a byte-level BPE ``vocab.json`` + ``merges.txt`` laid out as OpenAI CLIP's (256 byte
  symbols, the same 256 with the ``</w>`` end-of-word suffix, one entry per merge, then ``<|startoftext|>`` /
  ``<|endoftext|>``), so ANY text tokenizes without an unknown token; a handful of merges make common words single
  tokens. ``model_max_length = CLIP_MAX_LENGTH`` (CLIP pads to it: ``padding="max_length"``); pad = eos =
  ``<|endoftext|>`` as SD's tokenizer.
* T5 (``T5Tokenizer``; in transformers 5 ``T5TokenizerFast`` is the same class, so ``model_index.json`` says
  ``T5Tokenizer``): a tokenizers-library Unigram vocabulary (``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2, ``▁``, every
  printable ASCII character, a few whole words), no sentinel ``<extra_id_*>`` tokens. ``model_max_length =
  T5_MAX_LENGTH`` is nominal: SD3 / PixArt pass ``max_length=max_sequence_length`` (256 / 120 by default) to the
  tokenizer explicitly, which pads / truncates to that length regardless, and T5's relative position buckets take
  any length.

Independent of lipscope on purpose (do not import it here): these folders feed ``tests/reference_prompts.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    PixArtAlphaPipeline,
    PixArtTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from family_fixtures import (
    _TINY_COND_UNET,
    _TINY_VAE,
    SD_CROSS_ATTENTION_DIM,
    SDXL_ADDITION_TIME_EMBED_DIM,
    SDXL_POOLED_DIM,
    SDXL_PROJECTION_DIM,
    _seeded,
    sd_scheduler,
)
from family_fixtures2 import (
    _TINY_PIXART,
    _TINY_SD3,
    PIXART_CAPTION_CHANNELS,
    SD3_JOINT_ATTENTION_DIM,
    SD3_POOLED_DIM,
    SD3_VAE_SHIFT_FACTOR,
    pixart_scheduler,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

CLIP_MAX_LENGTH = 16  # CLIP tokenizer model_max_length = text encoder max_position_embeddings (77 in real CLIP)
T5_MAX_LENGTH = 16  # nominal: the T5 pipelines pass max_sequence_length (SD3 256, PixArt 120) explicitly

# Common words that the tokenizers keep whole (everything else falls back to characters / bytes).
_WORDS = ("a", "an", "the", "photo", "painting", "of", "in", "cat", "dog", "car", "red", "blue", "green", "house")

# Text encoder widths. Each must fit what the tiny denoiser of family_fixtures(2) expects:
# * SD: last_hidden_state (CLIPTextModel) -> encoder_hidden_states: hidden = cross_attention_dim.
# * SDXL: concat(text_encoder.hidden_states[-2], text_encoder_2.hidden_states[-2]) -> cross_attention_dim, so the
#   hidden sizes add up to it (4 + 12 = 16; unequal so a swapped / dropped encoder is a shape error), and
#   text_encoder_2's projection (text_embeds, the pooled prompt) = SDXL_POOLED_DIM.
# * SD3: concat(clip_1, clip_2 penultimate hidden) is zero-padded to T5's d_model = joint_attention_dim (4 + 8 = 12 ->
#   16: the padding is exercised, as real SD3 pads 768 + 1280 to 4096); pooled = concat(text_embeds_1, text_embeds_2)
#   = pooled_projection_dim (4 + 4 = 8).
# * PixArt: T5 d_model = caption_channels.
SD_CLIP_HIDDEN = SD_CROSS_ATTENTION_DIM
SDXL_CLIP_HIDDEN = (4, SD_CROSS_ATTENTION_DIM - 4)
SD3_CLIP_HIDDEN = (4, 8)
SD3_CLIP_PROJECTION = (4, SD3_POOLED_DIM - 4)
SD3_T5_DIM = SD3_JOINT_ATTENTION_DIM
PIXART_T5_DIM = PIXART_CAPTION_CHANNELS
assert sum(SDXL_CLIP_HIDDEN) == SD_CROSS_ATTENTION_DIM and sum(SD3_CLIP_HIDDEN) <= SD3_T5_DIM


# --------------------------------------------------------------------------- tokenizers


def _bytes_to_unicode() -> list[str]:
    """GPT-2 / CLIP's byte -> printable-unicode table in CLIP's vocabulary order (``bytes_to_unicode().values()``): the
    188 printable Latin-1 bytes as themselves, then the other 68 shifted to U+0100, U+0101, ..."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = list(bs)
    n = 0
    for b in range(256):
        if b not in bs:  # the 68 non-printable bytes map to U+0100, U+0101, ...
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def clip_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    """(vocab, merges) of the tiny byte-level BPE: 256 byte symbols, the same with ``</w>``, one token per merge (each
    word of ``_WORDS`` is merged left to right into one ``word</w>`` token), then ``<|startoftext|>``,
    ``<|endoftext|>`` (CLIP's layout)."""
    symbols = _bytes_to_unicode()
    merges: list[str] = []
    for word in _WORDS:
        parts = [*word[:-1], word[-1] + "</w>"]
        while len(parts) > 1:
            pair = f"{parts[0]} {parts[1]}"
            if pair not in merges:
                merges.append(pair)
            parts = [parts[0] + parts[1], *parts[2:]]
    tokens = [*symbols, *(s + "</w>" for s in symbols), *(m.replace(" ", "") for m in merges)]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    assert len(set(tokens)) == len(tokens)
    return {tok: i for i, tok in enumerate(tokens)}, merges


def save_clip_tokenizer(path: Path, model_max_length: int = CLIP_MAX_LENGTH) -> Path:
    """Write a ``CLIPTokenizer`` folder from scratch: ``vocab.json``, ``merges.txt`` (``#version: 0.2`` header, as
    CLIP's) and ``tokenizer_config.json`` (class, special tokens, ``model_max_length``). Loads with
    ``CLIPTokenizer.from_pretrained(path)``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    vocab, merges = clip_vocab_and_merges()
    (path / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False) + "\n", encoding="utf-8")
    (path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "model_max_length": model_max_length,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return path


def clip_tokenizer(model_max_length: int = CLIP_MAX_LENGTH) -> CLIPTokenizer:
    """The tiny ``CLIPTokenizer`` built in memory from ``clip_vocab_and_merges()`` (what ``save_clip_tokenizer`` writes
    loads to the same ids)."""
    vocab, merges = clip_vocab_and_merges()
    pairs = [tuple(m.split(" ")) for m in merges]  # the tokenizers BPE model takes (a, b) pairs in memory
    return CLIPTokenizer(vocab=vocab, merges=pairs, model_max_length=model_max_length)


def t5_vocab() -> list[tuple[str, float]]:
    """The tiny Unigram vocabulary (piece, log-prob score): ``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2 (T5's ids), ``▁`` 3,
    then ``▁word`` for each of ``_WORDS`` (score -5: a whole word beats spelling it out), then every printable ASCII
    character (score -10), so any ASCII text tokenizes without ``<unk>``."""
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [("▁" + word, -5.0) for word in _WORDS]
    vocab += [(chr(c), -10.0) for c in range(ord("!"), ord("~") + 1)]
    return vocab


def t5_tokenizer(model_max_length: int = T5_MAX_LENGTH) -> T5Tokenizer:
    """The tiny ``T5Tokenizer`` (tokenizers-library Unigram on ``t5_vocab()``, no ``<extra_id_*>`` sentinels)."""
    return T5Tokenizer(vocab=t5_vocab(), extra_ids=0, model_max_length=model_max_length)


def save_t5_tokenizer(path: Path, model_max_length: int = T5_MAX_LENGTH) -> Path:
    """Write ``t5_tokenizer()`` with its own ``save_pretrained`` (``tokenizer.json`` + ``tokenizer_config.json``)."""
    path = Path(path)
    t5_tokenizer(model_max_length).save_pretrained(path)
    return path


# --------------------------------------------------------------------------- text encoders


def clip_text_encoder(
    hidden: int,
    projection_dim: int | None = None,
    max_position_embeddings: int = CLIP_MAX_LENGTH,
) -> CLIPTextModel | CLIPTextModelWithProjection:
    """A tiny eval-mode CLIP text encoder for ``clip_tokenizer()``: 2 layers (so SDXL / SD3's penultimate
    ``hidden_states[-2]`` has been through one attention layer), 2 heads, MLP width ``2 * hidden``, vocabulary and
    bos / eos / pad ids of the tiny tokenizer (eos != 2, so the pooled output is taken at the first ``<|endoftext|>``).
    ``CLIPTextModelWithProjection`` (``text_embeds`` of width ``projection_dim``) when ``projection_dim`` is given,
    else ``CLIPTextModel``.

    Weights come from the global torch RNG: call it inside ``family_fixtures._seeded`` for determinism."""
    tok = clip_tokenizer()
    config = CLIPTextConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        projection_dim=projection_dim if projection_dim is not None else hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    cls = CLIPTextModel if projection_dim is None else CLIPTextModelWithProjection
    return cls(config).eval()


def t5_encoder(d_model: int) -> T5EncoderModel:
    """A tiny eval-mode ``T5EncoderModel`` (T5 v1.1 style, as SD3 / PixArt / Flux use: ``gated-gelu``) for
    ``t5_tokenizer()``: 2 layers, 2 heads of ``d_model // 2``, ``d_ff = 2 * d_model``, 8 relative-position buckets,
    dropout 0. Weights come from the global torch RNG: call it inside ``family_fixtures._seeded``."""
    config = T5Config(
        vocab_size=len(t5_tokenizer()),
        d_model=d_model,
        d_kv=d_model // 2,
        d_ff=2 * d_model,
        num_layers=2,
        num_heads=2,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        dropout_rate=0.0,
        feed_forward_proj="gated-gelu",
        is_encoder_decoder=False,
        use_cache=False,
    )
    return T5EncoderModel(config).eval()


# --------------------------------------------------------------------------- pipeline folders


def save_sd_text_pipeline(path: Path, xl: bool = False, prediction_type: str = "epsilon") -> Path:
    """A full ``StableDiffusionPipeline`` (``xl=False``) / ``StableDiffusionXLPipeline`` (``xl=True``) folder.

    ``unet/`` / ``vae/`` / ``scheduler/`` as ``family_fixtures.save_sd_pipeline(path, xl, prediction_type)`` (same
    weights). SD: ``tokenizer`` (CLIPTokenizer) + ``text_encoder`` (CLIPTextModel, hidden SD_CLIP_HIDDEN);
    ``safety_checker`` / ``feature_extractor`` / ``image_encoder`` None, ``requires_safety_checker=False``. SDXL:
    ``tokenizer`` / ``tokenizer_2`` (CLIPTokenizer), ``text_encoder`` (CLIPTextModel, hidden SDXL_CLIP_HIDDEN[0]),
    ``text_encoder_2`` (CLIPTextModelWithProjection, hidden SDXL_CLIP_HIDDEN[1], projection SDXL_POOLED_DIM),
    ``force_zeros_for_empty_prompt=True`` (the default), ``add_watermarker=False`` (not saved to the folder)."""
    path = Path(path)
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', got {prediction_type!r}")
    unet_kwargs = dict(_TINY_COND_UNET)
    if xl:  # as family_fixtures.save_sd_pipeline
        unet_kwargs.update(
            addition_embed_type="text_time",
            addition_time_embed_dim=SDXL_ADDITION_TIME_EMBED_DIM,
            projection_class_embeddings_input_dim=SDXL_PROJECTION_DIM,
        )
    unet, vae = _seeded(lambda: (UNet2DConditionModel(**unet_kwargs), AutoencoderKL(**_TINY_VAE)))
    scheduler = sd_scheduler(prediction_type)
    if xl:
        encoders = _seeded(
            lambda: (clip_text_encoder(SDXL_CLIP_HIDDEN[0]), clip_text_encoder(SDXL_CLIP_HIDDEN[1], SDXL_POOLED_DIM))
        )
        pipe = StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=encoders[0],
            text_encoder_2=encoders[1],
            tokenizer=clip_tokenizer(),
            tokenizer_2=clip_tokenizer(),
            unet=unet,
            scheduler=scheduler,
            force_zeros_for_empty_prompt=True,
            add_watermarker=False,
        )
    else:
        pipe = StableDiffusionPipeline(
            vae=vae,
            text_encoder=_seeded(lambda: clip_text_encoder(SD_CLIP_HIDDEN)),
            tokenizer=clip_tokenizer(),
            unet=unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    pipe.save_pretrained(path)
    return path


def save_sd3_text_pipeline(path: Path, with_t5: bool = True, shift: float = 3.0) -> Path:
    """A full ``StableDiffusion3Pipeline`` folder: ``transformer/`` / ``vae/`` / ``scheduler/`` as
    ``family_fixtures2.save_sd3_folder(path, shift)`` (same weights); ``tokenizer`` / ``tokenizer_2`` (CLIPTokenizer),
    ``text_encoder`` / ``text_encoder_2`` (CLIPTextModelWithProjection, hidden SD3_CLIP_HIDDEN, projection
    SD3_CLIP_PROJECTION), ``tokenizer_3`` (T5Tokenizer) + ``text_encoder_3`` (T5EncoderModel, d_model SD3_T5_DIM).

    ``with_t5=False`` saves ``tokenizer_3`` / ``text_encoder_3`` as None (``[null, null]``), SD3's documented
    "drop T5" setup: ``encode_prompt`` then uses zeros of (max_sequence_length, joint_attention_dim) for the T5 part."""
    path = Path(path)

    def denoiser():
        return SD3Transformer2DModel(**_TINY_SD3), AutoencoderKL(**dict(_TINY_VAE, shift_factor=SD3_VAE_SHIFT_FACTOR))

    def encoders():
        clip_1 = clip_text_encoder(SD3_CLIP_HIDDEN[0], SD3_CLIP_PROJECTION[0])
        clip_2 = clip_text_encoder(SD3_CLIP_HIDDEN[1], SD3_CLIP_PROJECTION[1])
        return clip_1, clip_2, t5_encoder(SD3_T5_DIM) if with_t5 else None

    transformer, vae = _seeded(denoiser)
    clip_1, clip_2, t5 = _seeded(encoders)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift),
        vae=vae,
        text_encoder=clip_1,
        tokenizer=clip_tokenizer(),
        text_encoder_2=clip_2,
        tokenizer_2=clip_tokenizer(),
        text_encoder_3=t5,
        tokenizer_3=t5_tokenizer() if with_t5 else None,
    )
    pipe.save_pretrained(path)
    return path


def save_pixart_text_pipeline(path: Path) -> Path:
    """A full ``PixArtAlphaPipeline`` folder: ``transformer/`` / ``vae/`` / ``scheduler/`` as
    ``family_fixtures2.save_pixart_folder(path)`` (same weights); ``tokenizer`` (T5Tokenizer) + ``text_encoder``
    (T5EncoderModel, d_model PIXART_T5_DIM = caption_channels).

    As the text-free folder, it samples only with ``use_resolution_binning=False`` (sample_size 4)."""
    path = Path(path)
    transformer, vae = _seeded(lambda: (PixArtTransformer2DModel(**_TINY_PIXART), AutoencoderKL(**_TINY_VAE)))
    pipe = PixArtAlphaPipeline(
        tokenizer=t5_tokenizer(),
        text_encoder=_seeded(lambda: t5_encoder(PIXART_T5_DIM)),
        vae=vae,
        transformer=transformer,
        scheduler=pixart_scheduler(),
    )
    pipe.save_pretrained(path)
    return path


def save_flux_text_pipeline(path: Path, guidance_embeds: bool = True) -> Path:
    """``tests/family_fixtures3.save_flux_folder`` (transformer, VAE, FLUX.1-dev scheduler: same weights) plus a CLIP
    text encoder (pooled width ``FLUX_POOLED_DIM``) and a T5 encoder (``FLUX_JOINT_ATTENTION_DIM``), saved with
    ``FluxPipeline.save_pretrained``."""
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from family_fixtures3 import FLUX_JOINT_ATTENTION_DIM, FLUX_POOLED_DIM, save_flux_folder

    path = Path(path)
    save_flux_folder(path, guidance_embeds=guidance_embeds)
    clip, t5 = _seeded(lambda: (clip_text_encoder(FLUX_POOLED_DIM), t5_encoder(FLUX_JOINT_ATTENTION_DIM)))
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(path, subfolder="scheduler"),
        vae=AutoencoderKL.from_pretrained(path, subfolder="vae"),
        transformer=FluxTransformer2DModel.from_pretrained(path, subfolder="transformer"),
        text_encoder=clip,
        tokenizer=clip_tokenizer(),
        text_encoder_2=t5,
        tokenizer_2=t5_tokenizer(),
    )
    pipe.save_pretrained(path)
    return path
