"""Model specs → EpsModel: every kind of spec lipscope loads, in one module.

Specs:
  * a Hugging Face hub id (``google/ddpm-cifar10-32``), resolved through the HF cache; offline when
    ``offline=True`` or ``HF_HUB_OFFLINE`` is set;
  * a local pipeline folder (``model_index.json`` with ``unet/`` and ``scheduler/``), a unet folder,
    or a lipscope train/finetune run folder (its ``pipeline/``);
  * a single weights file (``.safetensors``, ``.bin``, ``.pt``, ``.pth``, ``.ckpt``) with ``config=``;
  * ``py:package.module:factory``: a function returning an ``EpsModel``, an ``nn.Module`` or any
    callable ``eps(x, t)``;
  * ``builtin:NAME``: the zoo's pipeline folders (:mod:`lipscope.zoo`) and the closed-form
    ``digits-gaussian`` (:mod:`lipscope.gaussian`).

The scheduler config is searched for in one way for every spec (:func:`find_scheduler_config`).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import os
import pickle
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from . import zoo
from .data import digits_array
from .errors import InputError
from .etsdm import ETSDMUNet2DModel
from .gaussian import GaussianMixture, gaussian_eps_model
from .models import SUPPORTED_CLASSES, EpsModel, from_callable, from_unet, resolve_device, resolve_dtype
from .schedules import Schedule

if TYPE_CHECKING:
    from diffusers import UNet2DModel

log = logging.getLogger("lipscope")

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
# where a scheduler config sits relative to a model root, in the order they are tried
SCHEDULER_CONFIG_FILES = ("scheduler/scheduler_config.json", "scheduler_config.json")


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
    sched_cfg = read_scheduler_config(scheduler_config) if scheduler_config is not None else None
    if spec.startswith("builtin:"):
        return _load_builtin(spec.split(":", 1)[1], dev, dt)
    if spec.startswith("py:"):
        return _load_py(spec, sched_cfg, dev, dt)
    path = Path(spec).expanduser()
    if path.exists():
        if path.is_file():
            return _load_weights_file(path, config, sched_cfg, trust_pickle, dev, dt)
        return _load_folder(path, subfolder, sched_cfg, dev, dt)
    if _looks_like_path(spec):
        raise InputError(f"`model` {spec}: no such file or folder; check the path")
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


def _load_builtin(name: str, dev: torch.device, dt: torch.dtype) -> EpsModel:
    if name in zoo.CLOSED_FORMS:
        g = GaussianMixture.fit(torch.from_numpy(digits_array()))
        # closed forms are cheap and exact in float64 on the CPU, whatever device/dtype was asked for
        return gaussian_eps_model(g, name=f"builtin:{name}")
    m = _load_folder(zoo.folder(name), None, None, dev, dt)
    return dataclasses.replace(m, name=f"builtin:{name}")


def read_json(path: Path, what: str) -> dict[str, Any]:
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


def find_scheduler_config(
    roots: Iterable[str | Path], fetch: Callable[[str], str | Path | None] | None = None
) -> dict[str, Any] | None:
    """The first scheduler config found under ``roots`` (each tried with :data:`SCHEDULER_CONFIG_FILES`).

    Local roots are folders; with ``fetch`` the roots are repo-relative prefixes and ``fetch(name)``
    returns a local copy of a repo file or None (the hub).
    """
    for root in roots:
        for name in SCHEDULER_CONFIG_FILES:
            if fetch is None:
                local = Path(root) / name
                cand: str | Path | None = local if local.is_file() else None
            else:
                cand = fetch(f"{root}/{name}" if str(root) else name)
            if cand:
                return read_json(Path(cand), "scheduler config")
    return None


def read_scheduler_config(src: str | os.PathLike | dict) -> dict[str, Any]:
    """A scheduler config given as a dict, a JSON file, or a folder holding one."""
    if isinstance(src, dict):
        return dict(src)
    p = Path(src)
    if p.is_dir():
        found = find_scheduler_config([p])
        if found is None:
            raise InputError(f"scheduler config: no scheduler_config.json in {p}; pass the file itself")
        return found
    return read_json(p, "scheduler config")


def unet_class(cfg: dict[str, Any]) -> type[UNet2DModel]:
    """The diffusers class a UNet config names (ETSDMUNet2DModel or UNet2DModel)."""
    from diffusers import UNet2DModel

    return ETSDMUNet2DModel if cfg.get("_class_name") == "ETSDMUNet2DModel" else UNet2DModel


def _check_class(cfg: dict[str, Any], where: str) -> None:
    cls = cfg.get("_class_name", "UNet2DModel")
    if cls not in SUPPORTED_CLASSES:
        raise InputError(
            f"{where}: model class {cls} is not supported yet (supported: {', '.join(SUPPORTED_CLASSES)}); "
            "wrap it as a callable eps(x, t) and pass it with `model` py:module:factory"
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
            f"`model` {path}: no config.json in {unet_dir}; pass a diffusers pipeline or unet folder "
            "(or a weights file with its config as `config`)"
        )
    ucfg = read_json(cfg_path, "model config")
    _check_class(ucfg, str(path))
    if sched_cfg is None:
        sched_cfg = find_scheduler_config(dict.fromkeys([path, unet_dir, unet_dir.parent]))
    try:
        unet = unet_class(ucfg).from_pretrained(unet_dir)
    except (OSError, ValueError, RuntimeError) as e:
        raise InputError(
            f"`model` {path}: could not load the UNet ({_short(e)}); weights corrupt or not matching config.json"
        ) from e
    except Exception as e:  # safetensors' own error type, among others
        if "safetensor" in type(e).__name__.lower() or "header" in str(e).lower():
            raise InputError(f"`model` {path}: weights file is corrupt ({_short(e)})") from e
        raise
    return from_unet(unet, sched_cfg, name=str(path), device=dev, dtype=dt)


def _load_state_dict(path: Path, trust_pickle: bool) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:  # SafetensorError is not exported under a stable name
            raise InputError(
                f"`model` {path}: not a readable safetensors file ({_short(e)}); the file may be corrupt"
            ) from e
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only load failed" not in str(e).lower():
            raise InputError(f"`model` {path}: not a readable checkpoint ({_short(e)}); the file may be corrupt") from e
        if not trust_pickle:
            raise InputError(
                f"`model` {path}: this checkpoint needs full unpickling, which can run arbitrary code; "
                "pass `trust_pickle` only if you trust its source (or convert it to .safetensors)"
            ) from e
        obj = torch.load(str(path), map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise InputError(f"`model` {path}: not a readable checkpoint ({_short(e)}); the file may be corrupt") from e
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    if isinstance(obj, dict):
        for key in ("ema", "ema_model", "state_dict", "model"):
            if key in obj and isinstance(obj[key], dict):
                log.info("using the %r entry of %s", key, path)
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise InputError(f"`model` {path}: checkpoint does not hold a state dict of tensors")
    return obj


def _load_weights_file(path: Path, config, sched_cfg: dict | None, trust_pickle: bool, dev, dt) -> EpsModel:
    if path.suffix not in WEIGHT_SUFFIXES:
        raise InputError(
            f"`model` {path}: unknown file type; use a folder, "
            f"or a {'/'.join(WEIGHT_SUFFIXES)} file with its config as `config`"
        )
    if config is None:
        raise InputError(f"`model` {path} is a weights file: pass its UNet config.json as `config`")
    cpath = Path(config)
    if cpath.is_dir():
        cpath = cpath / "config.json"
    cfg = read_json(cpath, "model config")
    _check_class(cfg, str(cpath))
    sd = _load_state_dict(path, trust_pickle)
    try:
        unet = unet_class(cfg).from_config(cfg)
    except (TypeError, ValueError, KeyError) as e:
        raise InputError(f"`config` {cpath}: not a valid UNet2DModel config ({_short(e)})") from e
    _check_state_dict(unet, sd, path, cpath)
    unet.load_state_dict(sd, strict=True)
    if sched_cfg is None:
        sched_cfg = find_scheduler_config(dict.fromkeys([path.parent, cpath.parent]))
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
            f"`model` {path} does not match `config` {cpath}: {'; '.join(parts)} tensors; "
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
                f"`model` {repo}: could not reach it on the Hugging Face hub ({_short(e)}); "
                "check the id, or use `offline` with a cached copy"
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
                f"`model` {repo} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and offline mode is on; "
                "download it once with network access, set HF_HUB_CACHE, or point `model` at a local folder"
            )
        raise InputError(
            f"`model` {repo}: no UNet config.json found in the repo (tried {subs}); "
            "pass the folder that holds it as `subfolder`"
        )
    ucfg = read_json(Path(cfg_file), "model config")
    _check_class(ucfg, repo)
    if sched_cfg is None:
        sched_cfg = find_scheduler_config([""], fetch)
    try:
        unet = unet_class(ucfg).from_pretrained(
            repo, subfolder=unet_sub or None, revision=revision, local_files_only=local_only
        )
    except (OSError, ValueError, RuntimeError) as e:
        raise InputError(f"`model` {repo}: could not load the UNet ({_short(e)})") from e
    name = repo if revision is None else f"{repo}@{revision}"
    return from_unet(unet, sched_cfg, name=name, device=dev, dtype=dt)


def _load_py(spec: str, sched_cfg: dict | None, dev, dt) -> EpsModel:
    target = spec[3:]
    mod_name, _, fn_name = target.partition(":")
    if not mod_name or not fn_name:
        raise InputError(f"`model` {spec}: use py:package.module:factory")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise InputError(f"`model` {spec}: cannot import {mod_name} ({_short(e)}); is it on PYTHONPATH?") from e
    factory = getattr(mod, fn_name, None)
    if factory is None or not callable(factory):
        raise InputError(f"`model` {spec}: {mod_name} has no callable {fn_name}")
    obj = factory()
    if isinstance(obj, EpsModel):
        return obj
    if not callable(obj):
        raise InputError(f"`model` {spec}: the factory returned {type(obj).__name__}, not a callable eps(x, t)")
    schedule = getattr(obj, "schedule", None)
    return from_callable(
        obj,
        schedule if isinstance(schedule, Schedule) else None,
        name=spec,
        scheduler_config=sched_cfg,
        device=dev,
        dtype=dt,
    )
