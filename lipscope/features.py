"""Feature spaces for sample quality (FD, KID): the built-in digits classifier or a user's extractor by path.

``load_features(spec)`` accepts

* ``digits``: the built-in digits classifier (:mod:`lipscope.zoo`), its 64-d penultimate layer;
* a local folder holding a Hugging Face transformers vision model (``config.json`` + weights: DINOv2,
  CLIP, SigLIP, ViT, …), loaded offline with ``local_files_only`` and never with remote code;
* ``py:module:factory``: ``factory()`` returns a callable ``images → (N, d)`` features.

Every :class:`FeatureSpace` carries the sha256 of the bytes its weights come from (the weight files;
for ``py:`` the module file), so two runs can tell whether they measured in the same space.

Transformers preprocessing, in torch on tensors (no PIL): images in [−1, 1] → [0, 1] (the processor's
rescale of 8-bit pixels), grey → 3 channels, bicubic antialiased resize (``shortest_edge``: the short side
to that size; ``height``/``width``: to that size), clamp to [0, 1] (as 8-bit pixels are), centre crop when
the processor crops, then (x − mean)/std. Without ``preprocessor_config.json``: resize to
``config.image_size``, mean/std of CLIP for CLIP models, of ImageNet otherwise.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .devices import resolve_device
from .errors import InputError, short_error
from .pyspec import import_factory
from .zoo import CLASSIFIER_ASSET, digits_features, load_digits_classifier

ACCEPTED = (
    "use digits, a local folder with a transformers vision model (config.json + weights, e.g. DINOv2 or CLIP) "
    "or py:module:factory"
)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
# model types whose pooler_output is the image feature (layer-normed CLS, or SigLIP's attention pool)
POOLED = frozenset({"dinov2", "dinov2_with_registers", "clip_vision_model", "siglip_vision_model"})
PICKLES = (".bin", ".pt", ".pth")
CHUNK = 64  # images per forward of a transformers extractor


@dataclass(frozen=True)
class FeatureSpace:
    """A feature extractor: ``space(images)`` maps float images (N, C, H, W) in [−1, 1] to float64 (N, d)."""

    name: str  # names the metric columns: fd_<name>, kid_<name>
    kind: str  # what the feature is (network, output field)
    dimension: int | None  # d; None when only a call can tell (a py: factory without a `dimension`)
    sha256: str | None  # of the weight files' bytes (py: the module file); None when there is no file
    spec: str = ""
    preprocessing: str = ""
    fn: Callable[[torch.Tensor], Any] = field(default=lambda x: x, repr=False, compare=False)

    def __call__(self, images: torch.Tensor) -> np.ndarray:
        x = torch.as_tensor(images).detach().to("cpu", torch.float32)
        if x.ndim != 4:
            raise InputError(f"`features` {self.spec}: images must be (N, C, H, W), got shape {tuple(x.shape)}")
        try:
            with torch.no_grad():
                out = self.fn(x.clamp(-1, 1))
        except InputError:
            raise
        except Exception as e:  # the extractor's own failure: one line
            raise InputError(f"`features` {self.spec}: the extractor raised {short_error(e)}; fix it") from e
        try:
            if isinstance(out, torch.Tensor) and (out.is_complex() or out.dtype == torch.bool):
                raise TypeError(f"a {out.dtype} tensor")
            f = out.detach().cpu().double().numpy() if isinstance(out, torch.Tensor) else np.asarray(out, np.float64)
        except (TypeError, ValueError, RuntimeError) as e:  # strings, ragged lists, complex or boolean tensors …
            raise InputError(
                f"`features` {self.spec}: the extractor returned {type(out).__name__} that is no array of real "
                f"numbers ({short_error(e)[:100]}); return a float tensor (N, d)"
            ) from e
        if f.ndim < 1 or len(f) != len(x):
            raise InputError(
                f"`features` {self.spec}: {len(x)} images gave features of shape {f.shape}; return one row per image"
            )
        f = f.reshape(len(x), -1)
        if f.shape[1] == 0:  # FD of empty features is 0: a perfect score from no measurement
            raise InputError(
                f"`features` {self.spec}: the extractor returned empty features {f.shape}; return (N, d ≥ 1)"
            )
        if self.dimension is not None and f.shape[1] != self.dimension:
            raise InputError(f"`features` {self.spec}: features of dimension {f.shape[1]}, expected {self.dimension}")
        if not np.isfinite(f).all():
            raise InputError(f"`features` {self.spec}: the extractor returned NaN or inf; fix it")
        return f


def file_sha256(paths: Iterable[Path]) -> str:
    """sha256 of the files' bytes, read in the given order (one file: its plain sha256)."""
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def load_features(spec: str, trust_pickle: bool = False, device: str | torch.device = "cpu") -> FeatureSpace:
    """The feature space named by ``spec`` (``digits``, a transformers folder, ``py:module:factory``)."""
    spec = str(spec).strip()
    if spec == "digits":
        return digits_space()
    if spec.startswith("py:"):
        return _py_space(spec)
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise InputError(f"`features` {spec}: the folder has no config.json; {ACCEPTED}")
        return _transformers_space(path, spec, trust_pickle, resolve_device(device))
    if path.exists():
        raise InputError(f"`features` {spec} is a file, not a model folder; {ACCEPTED}")
    raise InputError(f"`features` {spec!r}: not a feature space nor an existing folder; {ACCEPTED}")


def digits_space() -> FeatureSpace:
    """The built-in digits classifier: grey 8×8 (antialiased resize), 64-d penultimate layer."""
    net = load_digits_classifier()
    return FeatureSpace(
        name="digits",
        kind="digits classifier, 64-d penultimate layer (SiLU MLP)",
        dimension=64,
        sha256=file_sha256([CLASSIFIER_ASSET]),
        spec="digits",
        preprocessing="channel mean, antialiased bilinear resize to 8×8",
        fn=lambda x: digits_features(x, net),
    )


# ---- py:module:factory -------------------------------------------------------------------------------


def _py_space(spec: str) -> FeatureSpace:
    usage = "py:package.module:factory (factory() returns images → features)"
    mod, mod_name, fn_name, factory = import_factory(spec, "features", usage, "returns the feature extractor")
    try:
        obj = factory()
    except InputError:
        raise
    except (Exception, SystemExit) as e:
        raise InputError(f"`features` {spec}: {mod_name}:{fn_name}() raised {short_error(e)}; fix the factory") from e
    if isinstance(obj, FeatureSpace):
        return obj
    if not callable(obj):
        raise InputError(
            f"`features` {spec}: the factory returned {type(obj).__name__}; return a callable images → features"
        )
    if isinstance(obj, torch.nn.Module):
        obj.eval()
    file = getattr(mod, "__file__", None)
    dim = getattr(obj, "dimension", None)
    return FeatureSpace(
        name=_column_name(str(getattr(obj, "name", None) or fn_name)),
        kind=f"py factory {mod_name}:{fn_name} ({type(obj).__name__})",
        dimension=int(dim) if isinstance(dim, (int, np.integer)) else None,
        sha256=file_sha256([Path(file)]) if file and Path(file).is_file() else None,
        spec=spec,
        preprocessing="none (the factory gets float32 CPU images in [−1, 1])",
        fn=obj,
    )


def _column_name(s: str) -> str:
    """A metric-column-safe name: lower case, [a-z0-9_]; ``pixel`` (taken by fd_pixel) gets a suffix."""
    name = re.sub(r"[^a-z0-9]+", "_", s.lower()).strip("_") or "features"
    return "pixel_features" if name == "pixel" else name


# ---- transformers folders ----------------------------------------------------------------------------


def _weight_files(path: Path, spec: str, trust_pickle: bool) -> tuple[list[Path], bool]:
    """The folder's weight files (sorted; safetensors first) and whether they are safetensors."""
    safe = sorted(path.glob("*.safetensors"))
    if safe:
        return safe, True
    pickles = sorted(p for p in path.iterdir() if p.suffix in PICKLES and p.is_file())
    if not pickles:
        raise InputError(
            f"`features` {spec}: no weight files (*.safetensors, *.bin) in the folder; save the model there"
        )
    if not trust_pickle:
        raise InputError(
            f"`features` {spec}: only pickled weights ({pickles[0].name}), whose loading can run code; pass "
            "`trust_pickle` if you trust their source (or save the model with safetensors)"
        )
    return pickles, False


def _transformers_space(path: Path, spec: str, trust_pickle: bool, dev: torch.device) -> FeatureSpace:
    try:
        import transformers
        from transformers.utils import logging as tlog
    except ImportError:
        raise InputError(
            f"`features` {spec}: a transformers folder needs transformers: pip install transformers"
        ) from None
    files, safe = _weight_files(path, spec, trust_pickle)
    try:
        cfg = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"`features` {spec}: config.json is not readable JSON ({short_error(e)})") from e
    archs = cfg.get("architectures") or []
    projected = bool({"CLIPModel", "CLIPVisionModelWithProjection"} & set(archs))
    cls: Any = transformers.CLIPVisionModelWithProjection if projected else transformers.AutoModel
    kw: dict[str, Any] = {} if projected else {"trust_remote_code": False}  # (Auto classes only: never remote code)
    verbosity, bar = tlog.get_verbosity(), tlog.is_progress_bar_enabled()
    tlog.set_verbosity_error()  # load reports and progress bars would be many lines
    tlog.disable_progress_bar()
    try:
        model, info = cls.from_pretrained(
            str(path), local_files_only=True, use_safetensors=safe, output_loading_info=True, **kw
        )
        proc = _processor(path, spec)
    except InputError:
        raise
    except Exception as e:
        raise InputError(f"`features` {spec}: transformers cannot load it ({short_error(e)}); {ACCEPTED}") from e
    finally:
        tlog.set_verbosity(verbosity)
        if bar:
            tlog.enable_progress_bar()
    if "Vision" not in type(model).__name__ and hasattr(model, "vision_model"):
        model = model.vision_model  # a two-tower model (SigLIP, …): its image tower
    model = model.to(dev, torch.float32).eval()
    mcfg = model.config
    model_type = str(getattr(mcfg, "model_type", "") or cfg.get("model_type", "model"))
    size, crop, mean, std, how = proc if proc is not None else _default_preprocessing(mcfg, model_type)

    def prep(x: torch.Tensor) -> torch.Tensor:
        return preprocess(x, size, crop, mean, std)

    probe = model(pixel_values=prep(torch.zeros(1, 3, 8, 8)).to(dev))
    out_field = _output_field(probe, model_type, spec)
    missing = [k for k in info.get("missing_keys", []) if out_field != "pooler_output" or not k.startswith("pooler")]
    if missing:
        raise InputError(
            f"`features` {spec}: {len(missing)} weights missing from the folder (e.g. {missing[0]}); they would be "
            "random: save the full model"
        )

    def fn(x: torch.Tensor) -> torch.Tensor:
        parts = [
            _pick(model(pixel_values=prep(x[i : i + CHUNK]).to(dev)), out_field).float().cpu()
            for i in range(0, len(x), CHUNK)
        ]
        return torch.cat(parts)

    name = model_type.removesuffix("_vision_model")
    what = {"image_embeds": "image_embeds (projected CLS)", "cls": "last_hidden_state[:, 0] (CLS token)"}
    kind = f"transformers {type(model).__name__} {what.get(out_field, 'pooler_output (its pooled image token)')}"
    return FeatureSpace(
        name=_column_name(name),
        kind=kind,
        dimension=int(_pick(probe, out_field).reshape(1, -1).shape[1]),
        sha256=file_sha256(files),
        spec=spec,
        preprocessing=how,
        fn=fn,
    )


def _processor(path: Path, spec: str) -> tuple | None:
    """(size, crop, mean, std, description) from the folder's image processor, or None without one."""
    if not (path / "preprocessor_config.json").is_file():
        return None
    from transformers import AutoImageProcessor

    p = AutoImageProcessor.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    size = _size(getattr(p, "size", None)) if getattr(p, "do_resize", True) else None
    crop = _size(getattr(p, "crop_size", None)) if getattr(p, "do_center_crop", False) else None
    if getattr(p, "do_normalize", True):
        mean, std = tuple(_triple(p.image_mean)), tuple(_triple(p.image_std))
    else:
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    if size is None and crop is None:
        raise InputError(f"`features` {spec}: the image processor neither resizes nor crops; give it a size")
    how = f"{type(p).__name__}: resize {_say(size)}, crop {_say(crop)}, mean {mean}, std {std} (bicubic, antialiased)"
    return size, crop, mean, std, how


def _default_preprocessing(mcfg: Any, model_type: str) -> tuple:
    s = getattr(mcfg, "image_size", None)
    if s is None:
        raise InputError(f"`features`: {model_type} has no image_size and the folder no preprocessor_config.json")
    hw = (int(s), int(s)) if isinstance(s, (int, np.integer)) else (int(s[0]), int(s[1]))
    mean, std = (CLIP_MEAN, CLIP_STD) if "clip" in model_type else (IMAGENET_MEAN, IMAGENET_STD)
    how = f"default (no preprocessor_config.json): resize to {hw[0]}×{hw[1]} (bicubic), mean {mean}, std {std}"
    return ("hw", hw), None, mean, std, how


def _size(s: Any) -> tuple[str, Any] | None:
    """A processor size → ("short", n) or ("hw", (h, w)); None when not given."""
    if s is None:
        return None
    if isinstance(s, int):
        return ("hw", (s, s))
    get = s.get if isinstance(s, dict) else lambda k: getattr(s, k, None)
    h, w, short = get("height"), get("width"), get("shortest_edge")
    if h and w:
        return ("hw", (int(h), int(w)))
    if short:
        return ("short", int(short))
    raise InputError(f"`features`: image-processor size {s} is not supported; use shortest_edge or height/width")


def _say(size: tuple[str, Any] | None) -> str:
    if size is None:
        return "none"
    return f"shortest edge {size[1]}" if size[0] == "short" else f"{size[1][0]}×{size[1][1]}"


def _triple(v: Any) -> list[float]:
    v = [float(a) for a in (v if isinstance(v, (list, tuple)) else [v])]
    return v * 3 if len(v) == 1 else v


def preprocess(
    x: torch.Tensor,
    size: tuple[str, Any] | None,
    crop: tuple[str, Any] | None,
    mean: tuple[float, ...],
    std: tuple[float, ...],
) -> torch.Tensor:
    """Images in [−1, 1] → the model's pixel_values (see the module docstring)."""
    x = (x.float().clamp(-1, 1) + 1) / 2
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if size is not None:
        h, w = x.shape[-2:]
        if size[0] == "short":
            s = size[1]
            hw = (s, int(s * w / h)) if h <= w else (int(s * h / w), s)
        else:
            hw = size[1]
        if tuple(hw) != (h, w):
            x = F.interpolate(x, size=tuple(hw), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
    if crop is not None:
        ch, cw = crop[1] if crop[0] == "hw" else (crop[1], crop[1])
        h, w = x.shape[-2:]
        if ch > h or cw > w:  # pad with zeros around, as the processors do
            ph, pw = max(ch - h, 0), max(cw - w, 0)
            x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
            h, w = x.shape[-2:]
        top, left = (h - ch) // 2, (w - cw) // 2
        x = x[..., top : top + ch, left : left + cw]
    m = torch.tensor(mean, dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(1, -1, 1, 1)
    return (x - m) / s


def _output_field(o: Any, model_type: str, spec: str) -> str:
    if getattr(o, "image_embeds", None) is not None:
        return "image_embeds"
    pooled = getattr(o, "pooler_output", None)
    if model_type in POOLED and pooled is not None:
        return "pooler_output"
    last = getattr(o, "last_hidden_state", None)
    if last is not None and last.ndim == 3:
        return "cls"
    if pooled is not None:
        return "pooler_output"
    raise InputError(
        f"`features` {spec}: the model returns no image_embeds, pooler_output or hidden states; {ACCEPTED}"
    )


def _pick(o: Any, out_field: str) -> torch.Tensor:
    t = o.last_hidden_state[:, 0] if out_field == "cls" else getattr(o, out_field)
    return t.reshape(len(t), -1)
