"""The one place a network is called.

``load_model(spec)`` resolves a model spec into an :class:`EpsModel`: a callable ``eps(x, t)`` with
``t`` a float tensor of shape (B,) in model steps (fractional allowed), returning ε whatever the
network predicts (ε, v or x0; DESIGN.md "Models that predict v or x0").

Specs:
  * a Hugging Face hub id (``google/ddpm-cifar10-32``), resolved through the HF cache; offline when
    ``offline=True`` or ``HF_HUB_OFFLINE`` is set;
  * a local pipeline folder (``model_index.json`` with ``unet/`` and ``scheduler/``) or a unet folder;
  * a single weights file (``.safetensors``, ``.bin``, ``.pt``, ``.pth``, ``.ckpt``) with ``config=``;
  * ``py:package.module:factory``: a function returning an ``EpsModel``, an ``nn.Module`` or any
    callable ``eps(x, t)``;
  * ``builtin:NAME`` (see ``lipscope.builtins``).
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import json
import logging
import os
import pickle
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import InputError
from .schedules import DEFAULT_SCHEDULER_CONFIG, Schedule, schedule_from_config

log = logging.getLogger("lipscope")

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
SUPPORTED_CLASSES = ("UNet2DModel", "ETSDMUNet2DModel")
DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}

NetFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class EpsModel:
    """A noise predictor ε(x, t) with its schedule: the object every estimator works on.

    ``net(x, t)`` is the raw network (output in its own parameterisation); calling the EpsModel
    feeds ``timestep_map(t)`` (identity unless E-TSDM) to the network and converts the output to ε
    with α, σ at the true ``t``.
    """

    net: NetFn
    schedule: Schedule
    name: str = "model"
    sample_shape: tuple[int, ...] | None = None
    prediction_type: str = "epsilon"
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    config: dict[str, Any] = field(default_factory=dict)
    scheduler_config: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_SCHEDULER_CONFIG))
    module: nn.Module | None = None
    timestep_map: Callable[[torch.Tensor], torch.Tensor] | None = None
    etsdm: dict[str, float] | None = None  # {"t_tilde": …, "n": …} for E-TSDM models

    @property
    def T(self) -> int:  # noqa: N802
        return self.schedule.T

    @property
    def config_hash(self) -> str:
        """sha256 (first 16 hex) of the model and scheduler configs."""
        blob = json.dumps({"model": self.config, "scheduler": self.scheduler_config}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def network_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """The condition the network is fed for true step ``t`` (E-TSDM map when set)."""
        return self.timestep_map(t) if self.timestep_map is not None else t

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """ε(x, t) for x (B, …) and float t (B,) in model steps."""
        x = x.to(device=self.device, dtype=self.dtype)
        t = _as_timesteps(t, x.shape[0], self.device, self.dtype)
        return self.at_condition(x, self.network_timesteps(t), t)

    def at_condition(self, x: torch.Tensor, c: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """ε from the network fed condition c directly (no map), converted with α, σ at true step t."""
        x = x.to(device=self.device, dtype=self.dtype)
        c = _as_timesteps(c, x.shape[0], self.device, self.dtype)
        return to_epsilon(self.net(x, c), x, t, self.schedule, self.prediction_type)


def _as_timesteps(t: torch.Tensor | float, batch: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Timesteps as a float tensor of shape (B,): diffusers truncates Python floats to long."""
    tt = torch.as_tensor(t, device=device)
    if not tt.is_floating_point():
        tt = tt.to(torch.float32)
    tdtype = torch.float64 if dtype == torch.float64 else torch.float32
    tt = tt.to(tdtype)
    if tt.ndim == 0:
        tt = tt.expand(batch)
    if tt.shape != (batch,):
        raise InputError(f"timesteps must have shape ({batch},), got {tuple(tt.shape)}")
    return tt.contiguous()


def to_epsilon(
    out: torch.Tensor, x: torch.Tensor, t: torch.Tensor, schedule: Schedule, prediction_type: str
) -> torch.Tensor:
    """Convert a network output to ε with α, σ at step t (ε = αv + σx; ε = (x − αx̂0)/σ)."""
    if out.shape[1] == 2 * x.shape[1] and out.shape[2:] == x.shape[2:]:
        out = out[:, : x.shape[1]]  # learned-variance models: first half is the mean prediction
    if prediction_type == "epsilon":
        return out
    shape = (-1,) + (1,) * (x.ndim - 1)
    a = schedule.alpha(t.detach().double().cpu()).to(x.device, x.dtype).reshape(shape)
    s = schedule.sigma(t.detach().double().cpu()).to(x.device, x.dtype).reshape(shape)
    if prediction_type == "v_prediction":
        return a * out + s * x
    if prediction_type == "sample":
        return (x - a * out) / s
    raise InputError(f"prediction_type {prediction_type!r} not supported; use epsilon, v_prediction or sample")


# ---------------------------------------------------------------------------------------------
# devices and dtypes
# ---------------------------------------------------------------------------------------------


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` picks cuda, then mps, then cpu."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise InputError(f"--device {device!r} not understood; use auto, cpu, cuda, cuda:N or mps") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {device} asked for but CUDA is not available; use --device cpu or auto")
    return dev


def resolve_dtype(dtype: str | torch.dtype = "float32") -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise InputError(f"--dtype {dtype!r} not supported; use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


# ---------------------------------------------------------------------------------------------
# wrappers
# ---------------------------------------------------------------------------------------------


def from_unet(
    unet: nn.Module,
    scheduler_config: dict[str, Any] | None = None,
    name: str = "unet",
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = "float32",
) -> EpsModel:
    """Wrap a diffusers ``UNet2DModel`` (eval mode, moved to device/dtype) as an EpsModel."""
    dev, dt = resolve_device(device), resolve_dtype(dtype)
    cls = type(unet).__name__
    if cls not in SUPPORTED_CLASSES:
        raise InputError(
            f"model class {cls} is not supported yet (supported: {', '.join(SUPPORTED_CLASSES)}); "
            "wrap it as a callable eps(x, t) and pass it with --model py:module:factory"
        )
    if scheduler_config is None:
        log.warning("no scheduler config found for %s: using the DDPM default (linear 1e-4..0.02, T=1000)", name)
        scheduler_config = dict(DEFAULT_SCHEDULER_CONFIG)
    schedule = schedule_from_config(scheduler_config)
    unet = unet.to(dev).eval()
    if unet.dtype != dt:
        unet = unet.to(dt)
    cfg = dict(unet.config)
    c, s = int(cfg["in_channels"]), cfg["sample_size"]
    hw = (s, s) if isinstance(s, int) else tuple(int(v) for v in s)

    from .etsdm import is_etsdm

    etsdm = None
    if is_etsdm(unet):
        etsdm = {"t_tilde": float(unet.config.etsdm_t_tilde), "n": int(unet.config.etsdm_n)}

        def net(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return unet.forward_condition(x, t).sample

    else:

        def net(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return unet(x, t).sample

    return EpsModel(
        net=net,
        schedule=schedule,
        name=name,
        sample_shape=(c, *hw),
        prediction_type=schedule.prediction_type,
        device=dev,
        dtype=dt,
        config={k: v for k, v in cfg.items() if not k.startswith("_") or k == "_class_name"},
        scheduler_config=dict(scheduler_config),
        module=unet,
        timestep_map=unet.condition if etsdm else None,
        etsdm=etsdm,
    )


def from_callable(
    fn: NetFn | nn.Module,
    schedule: Schedule | None = None,
    *,
    sample_shape: tuple[int, ...] | None = None,
    name: str = "callable",
    prediction_type: str | None = None,
    scheduler_config: dict[str, Any] | None = None,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = "float32",
) -> EpsModel:
    """Wrap any ``eps(x, t)`` (t: float tensor (B,) in model steps) as an EpsModel.

    Example — a researcher's own network::

        model = lipscope.from_callable(lambda x, t: my_net(x, t), sample_shape=(3, 32, 32))
        df = lipscope.probe(model, data="x0.npz")
    """
    dev, dt = resolve_device(device), resolve_dtype(dtype)
    if schedule is None:
        if scheduler_config is None:
            log.warning("%s: no schedule given, using the DDPM default (linear 1e-4..0.02, T=1000)", name)
            scheduler_config = dict(DEFAULT_SCHEDULER_CONFIG)
        schedule = schedule_from_config(scheduler_config)
    module = fn if isinstance(fn, nn.Module) else None
    if module is not None:
        module.to(device=dev, dtype=dt).eval()
    if sample_shape is None:
        sample_shape = getattr(fn, "sample_shape", None)
    return EpsModel(
        net=fn,
        schedule=schedule,
        name=name,
        sample_shape=tuple(sample_shape) if sample_shape is not None else None,
        prediction_type=prediction_type or schedule.prediction_type,
        device=dev,
        dtype=dt,
        config={"callable": name},
        scheduler_config=dict(scheduler_config or {"log_alpha_bar_sha": _tensor_hash(schedule.log_alpha_bar)}),
        module=module,
    )


def _tensor_hash(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().numpy().tobytes()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# load_model
# ---------------------------------------------------------------------------------------------


def load_model(
    spec: str,
    *,
    config: str | os.PathLike | None = None,
    scheduler_config: str | os.PathLike | dict | None = None,
    revision: str | None = None,
    subfolder: str | None = None,
    offline: bool | None = None,
    trust_pickle: bool = False,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = "float32",
) -> EpsModel:
    """Resolve a model spec (hub id, folder, weights file + config, ``py:``, ``builtin:``) to an EpsModel."""
    dev, dt = resolve_device(device), resolve_dtype(dtype)
    sched_cfg = _read_scheduler_config(scheduler_config) if scheduler_config is not None else None
    if spec.startswith("builtin:"):
        from .builtins import load_builtin

        return load_builtin(spec.split(":", 1)[1], device=dev, dtype=dt)
    if spec.startswith("py:"):
        return _load_py(spec, sched_cfg, dev, dt)
    path = Path(spec).expanduser()
    if path.exists():
        if path.is_file():
            return _load_weights_file(path, config, sched_cfg, trust_pickle, dev, dt)
        return _load_folder(path, subfolder, sched_cfg, dev, dt)
    if _looks_like_path(spec):
        raise InputError(f"--model {spec}: no such file or folder; check the path")
    return _load_hub(spec, revision, subfolder, sched_cfg, offline, dev, dt)


def _looks_like_path(spec: str) -> bool:
    return (
        spec.startswith((".", "/", "~"))
        or spec.endswith(WEIGHT_SUFFIXES)
        or spec.endswith(".json")
        or spec.count("/") != 1
        or os.sep == "\\"
        and "\\" in spec
    )


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise InputError(f"{what} {path} not found; check the path") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(
            f"{what} {path} is not valid JSON ({e.__class__.__name__}); pass a diffusers config.json"
        ) from e
    if not isinstance(data, dict):
        raise InputError(f"{what} {path} must hold a JSON object")
    return data


def _read_scheduler_config(src: str | os.PathLike | dict) -> dict[str, Any]:
    if isinstance(src, dict):
        return dict(src)
    p = Path(src)
    if p.is_dir():
        for cand in (p / "scheduler_config.json", p / "scheduler" / "scheduler_config.json"):
            if cand.exists():
                p = cand
                break
    return _read_json(p, "scheduler config")


def _unet_class(cfg: dict[str, Any]):
    from diffusers import UNet2DModel

    from .etsdm import ETSDMUNet2DModel

    return ETSDMUNet2DModel if cfg.get("_class_name") == "ETSDMUNet2DModel" else UNet2DModel


def _check_class(cfg: dict[str, Any], where: str) -> None:
    cls = cfg.get("_class_name", "UNet2DModel")
    if cls not in SUPPORTED_CLASSES:
        raise InputError(
            f"{where}: model class {cls} is not supported yet (supported: {', '.join(SUPPORTED_CLASSES)}); "
            "wrap it as a callable eps(x, t) and pass --model py:module:factory"
        )
    if cfg.get("in_channels") is None or cfg.get("sample_size") is None:
        raise InputError(f"{where}: config lacks in_channels/sample_size; is it a diffusers UNet2DModel config?")


def _short(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return (msg[0] if msg else e.__class__.__name__)[:300]


def _load_folder(path: Path, subfolder: str | None, sched_cfg: dict | None, dev, dt) -> EpsModel:
    if not subfolder and not (path / "config.json").exists() and (path / "pipeline" / "model_index.json").exists():
        path = path / "pipeline"  # a lipscope train/finetune run folder
    if subfolder:
        unet_dir = path / subfolder
    elif (path / "unet" / "config.json").exists():
        unet_dir = path / "unet"
    else:
        unet_dir = path
    cfg_path = unet_dir / "config.json"
    if not cfg_path.exists():
        raise InputError(
            f"--model {path}: no config.json in {unet_dir}; pass a diffusers pipeline or unet folder "
            "(or a weights file with --config)"
        )
    ucfg = _read_json(cfg_path, "model config")
    _check_class(ucfg, str(path))
    if sched_cfg is None:
        for cand in (
            path / "scheduler" / "scheduler_config.json",
            path / "scheduler_config.json",
            unet_dir / "scheduler_config.json",
            unet_dir.parent / "scheduler" / "scheduler_config.json",
        ):
            if cand.exists():
                sched_cfg = _read_json(cand, "scheduler config")
                break
    try:
        unet = _unet_class(ucfg).from_pretrained(unet_dir)
    except (OSError, ValueError, RuntimeError) as e:
        raise InputError(
            f"--model {path}: could not load the UNet ({_short(e)}); weights corrupt or not matching config.json"
        ) from e
    except Exception as e:  # safetensors' own error type, among others
        if "safetensor" in type(e).__name__.lower() or "header" in str(e).lower():
            raise InputError(f"--model {path}: weights file is corrupt ({_short(e)})") from e
        raise
    return from_unet(unet, sched_cfg, name=str(path), device=dev, dtype=dt)


def _load_state_dict(path: Path, trust_pickle: bool) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:  # SafetensorError is not exported under a stable name
            raise InputError(
                f"--model {path}: not a readable safetensors file ({_short(e)}); the file may be corrupt"
            ) from e
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only load failed" not in str(e).lower():
            raise InputError(f"--model {path}: not a readable checkpoint ({_short(e)}); the file may be corrupt") from e
        if not trust_pickle:
            raise InputError(
                f"--model {path}: this checkpoint needs full unpickling, which can run arbitrary code; "
                "pass --trust-pickle only if you trust its source (or convert it to .safetensors)"
            ) from e
        obj = torch.load(str(path), map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise InputError(f"--model {path}: not a readable checkpoint ({_short(e)}); the file may be corrupt") from e
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    if isinstance(obj, dict):
        for key in ("ema", "ema_model", "state_dict", "model"):
            if key in obj and isinstance(obj[key], dict):
                log.info("using the %r entry of %s", key, path)
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise InputError(f"--model {path}: checkpoint does not hold a state dict of tensors")
    return obj


def _load_weights_file(path: Path, config, sched_cfg: dict | None, trust_pickle: bool, dev, dt) -> EpsModel:
    if path.suffix not in WEIGHT_SUFFIXES:
        raise InputError(
            f"--model {path}: unknown file type; use a folder, or a {'/'.join(WEIGHT_SUFFIXES)} file with --config"
        )
    if config is None:
        raise InputError(f"--model {path} is a weights file: pass its UNet config with --config config.json")
    cpath = Path(config)
    if cpath.is_dir():
        cpath = cpath / "config.json"
    cfg = _read_json(cpath, "model config")
    _check_class(cfg, str(cpath))
    sd = _load_state_dict(path, trust_pickle)
    try:
        unet = _unet_class(cfg).from_config(cfg)
    except (TypeError, ValueError, KeyError) as e:
        raise InputError(f"--config {cpath}: not a valid UNet2DModel config ({_short(e)})") from e
    _check_state_dict(unet, sd, path, cpath)
    unet.load_state_dict(sd, strict=True)
    if sched_cfg is None:
        for cand in (path.parent / "scheduler_config.json", cpath.parent / "scheduler_config.json"):
            if cand.exists():
                sched_cfg = _read_json(cand, "scheduler config")
                break
    return from_unet(unet, sched_cfg, name=str(path), device=dev, dtype=dt)


def _check_state_dict(unet: nn.Module, sd: dict[str, torch.Tensor], path: Path, cpath: Path) -> None:
    own = unet.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shape = [k for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shape:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if shape:
            k = shape[0]
            parts.append(f"{len(shape)} with wrong shape (e.g. {k}: {tuple(sd[k].shape)} vs {tuple(own[k].shape)})")
        raise InputError(
            f"--model {path} does not match --config {cpath}: {'; '.join(parts)} tensors; "
            "pass the config these weights were trained with"
        )


def _offline(offline: bool | None) -> bool:
    if offline is not None:
        return offline
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _load_hub(repo: str, revision, subfolder, sched_cfg: dict | None, offline: bool | None, dev, dt) -> EpsModel:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    local_only = _offline(offline)

    def fetch(filename: str) -> str | None:
        try:
            return hf_hub_download(repo, filename, revision=revision, local_files_only=local_only)
        except (EntryNotFoundError, LocalEntryNotFoundError):
            return None
        except Exception as e:  # repo not found, gated, network down
            if local_only:
                return None
            raise InputError(
                f"--model {repo}: could not reach it on the Hugging Face hub ({_short(e)}); "
                "check the id or use --offline with a cached copy"
            ) from e

    subs = [subfolder] if subfolder else ["unet", ""]
    unet_sub, cfg_file = None, None
    for s in subs:
        cfg_file = fetch(f"{s}/config.json" if s else "config.json")
        if cfg_file:
            unet_sub = s
            break
    if cfg_file is None:
        if local_only:
            from huggingface_hub import constants

            raise InputError(
                f"--model {repo} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and offline mode is on; "
                "download it once with network access, set HF_HUB_CACHE, or point --model at a local folder"
            )
        raise InputError(f"--model {repo}: no UNet config.json found in the repo (tried {subs}); pass --subfolder")
    ucfg = _read_json(Path(cfg_file), "model config")
    _check_class(ucfg, repo)
    if sched_cfg is None:
        for cand in ("scheduler/scheduler_config.json", "scheduler_config.json"):
            f = fetch(cand)
            if f:
                sched_cfg = _read_json(Path(f), "scheduler config")
                break
    try:
        unet = _unet_class(ucfg).from_pretrained(
            repo, subfolder=unet_sub or None, revision=revision, local_files_only=local_only
        )
    except (OSError, ValueError, RuntimeError) as e:
        raise InputError(f"--model {repo}: could not load the UNet ({_short(e)})") from e
    name = repo if revision is None else f"{repo}@{revision}"
    return from_unet(unet, sched_cfg, name=name, device=dev, dtype=dt)


def _load_py(spec: str, sched_cfg: dict | None, dev, dt) -> EpsModel:
    target = spec[3:]
    mod_name, _, fn_name = target.partition(":")
    if not mod_name or not fn_name:
        raise InputError(f"--model {spec}: use py:package.module:factory")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise InputError(f"--model {spec}: cannot import {mod_name} ({_short(e)}); is it on PYTHONPATH?") from e
    factory = getattr(mod, fn_name, None)
    if factory is None or not callable(factory):
        raise InputError(f"--model {spec}: {mod_name} has no callable {fn_name}")
    obj = factory()
    if isinstance(obj, EpsModel):
        return obj
    if not callable(obj):
        raise InputError(f"--model {spec}: the factory returned {type(obj).__name__}, not a callable eps(x, t)")
    schedule = getattr(obj, "schedule", None)
    return from_callable(
        obj,
        schedule if isinstance(schedule, Schedule) else None,
        name=spec,
        scheduler_config=sched_cfg,
        device=dev,
        dtype=dt,
    )


# ---------------------------------------------------------------------------------------------
# forward-mode AD patches (DESIGN.md, "Exact derivative")
# ---------------------------------------------------------------------------------------------


def _group_norm_forward(mod: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    """GroupNorm from reshape/mean/var: same maths as the fused kernel, with a forward-AD formula
    that accepts the non-contiguous tangents the native one rejects."""
    b = x.shape[0]
    xg = x.reshape(b, mod.num_groups, -1)
    mean = xg.mean(-1, keepdim=True)
    var = xg.var(-1, unbiased=False, keepdim=True)
    y = ((xg - mean) * torch.rsqrt(var + mod.eps)).reshape(x.shape)
    if mod.affine:
        shape = (1, -1) + (1,) * (x.ndim - 2)
        y = y * mod.weight.reshape(shape) + mod.bias.reshape(shape)
    return y


@contextmanager
def forward_ad_patches(module: nn.Module | None) -> Iterator[None]:
    """Make a diffusers UNet differentiable with forward-mode AD, and restore it exactly afterwards.

    Two known blockers: SDPA attention kernels have no forward-AD formula (swap each diffusers
    ``Attention``'s processor for the plain ``AttnProcessor``), and the native GroupNorm's forward
    AD fails on non-contiguous tangents (give each GroupNorm instance a functional forward).
    """
    if module is None:
        yield
        return
    from diffusers.models.attention_processor import Attention, AttnProcessor

    saved_proc: list[tuple[nn.Module, Any]] = []
    patched_gn: list[nn.Module] = []
    try:
        for mod in module.modules():
            if isinstance(mod, Attention):
                saved_proc.append((mod, mod.processor))
                mod.processor = AttnProcessor()
            elif isinstance(mod, nn.GroupNorm) and "forward" not in mod.__dict__:
                mod.forward = functools.partial(_group_norm_forward, mod)
                patched_gn.append(mod)
        yield
    finally:
        for mod, proc in saved_proc:
            mod.processor = proc
        for mod in patched_gn:
            del mod.forward
