"""Model specs → EpsModel: every kind of spec lipscope loads, in one module.

Specs:
  * a Hugging Face hub id (``google/ddpm-cifar10-32``), resolved through the HF cache; offline when
    ``offline=True`` or ``HF_HUB_OFFLINE`` is set, or when the hub does not answer within 3 s;
  * a local pipeline folder (``model_index.json`` naming a supported unet; ``unet/``, ``scheduler/``), a unet folder,
    or a lipscope train/finetune run folder (its ``pipeline/``);
  * a single weights file (``.safetensors``, ``.bin``, ``.pt``, ``.pth``, ``.ckpt``) with ``config=``;
  * ``py:package.module:factory``: a function (called with ``model_args``) returning an ``EpsModel``,
    an ``nn.Module`` or any callable ``eps(x, t)`` (:mod:`lipscope.pyspec`);
  * ``builtin:NAME``: the zoo's pipeline folders (:mod:`lipscope.zoo`) and the closed-form
    ``digits-gaussian`` (:mod:`lipscope.gaussian`).

The scheduler config is searched for in one way for every spec (:func:`find_scheduler_config`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import threading
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit
from urllib.request import getproxies

import torch

from . import zoo
from .data import digits_array
from .errors import InputError
from .errors import short_error as _short
from .etsdm import ETSDMUNet2DModel, load_etsdm_lora
from .families import family_of_class, family_of_model, load_denoiser, no_call_args, pipeline_denoiser
from .gaussian import GaussianMixture, gaussian_eps_model
from .latents import load_codec, vae_component
from .lora import lora_run_base
from .models import SUPPORTED_CLASSES, EpsModel, from_unet, resolve_device, resolve_dtype
from .pyspec import load_py, parse_model_args
from .weights import read_state_dict

if TYPE_CHECKING:
    from diffusers import UNet2DModel

log = logging.getLogger("lipscope")

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
# where a scheduler config sits relative to a model root, in the order they are tried
SCHEDULER_CONFIG_FILES = ("scheduler/scheduler_config.json", "scheduler_config.json")
HUB_TIMEOUT_S = 3.0  # without an answer from the hub in this time, there is no network


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
    model_args: Mapping[str, Any] | Iterable[str] | None = None,
) -> EpsModel:
    """Resolve a model spec (hub id, folder, weights file + config, ``py:``, ``builtin:``) to an EpsModel.

    ``model_args``: keyword arguments of a ``py:`` factory (a mapping, or ``key=value`` strings)."""
    dev, dt = resolve_device(device), resolve_dtype(dtype)
    kwargs = parse_model_args(model_args)
    sched_cfg = read_scheduler_config(scheduler_config) if scheduler_config is not None else None
    if spec.startswith("py:"):
        return load_py(spec, sched_cfg, dev, dt, kwargs)
    path = Path(spec).expanduser()
    no_call_args(kwargs if spec.startswith("builtin:") or path.is_file() else None, spec)
    if spec.startswith("builtin:"):
        return _load_builtin(spec.split(":", 1)[1], dev, dt)
    if path.exists():
        if path.is_file():
            return _load_weights_file(path, config, sched_cfg, trust_pickle, dev, dt)
        if not subfolder and (base := lora_run_base(path)) is not None:  # a `finetune --lora` run folder
            return _load_lora_run(path, base, sched_cfg, offline, dev, dt)
        return _load_folder(path, subfolder, sched_cfg, dev, dt, trust_pickle, kwargs)
    if _looks_like_path(spec):
        raise InputError(f"`model` {spec}: no such file or folder; check the path")
    return _load_hub(spec, revision, subfolder, sched_cfg, offline, dev, dt, kwargs)


def _load_lora_run(run: Path, base: tuple[str, str | None], sched_cfg: dict | None, offline, dev, dt) -> EpsModel:
    """A LoRA run: its base model (spec, revision) with the adapter and E-TSDM map of ``run/lora`` loaded."""
    m = load_model(base[0], scheduler_config=sched_cfg, revision=base[1], offline=offline, device=dev, dtype=dt)
    fam = family_of_model(m)
    built = fam.build(load_etsdm_lora(m.module, run / "lora", fam.component), m.scheduler_config, str(run), dev, dt)  # type: ignore[union-attr]
    return dataclasses.replace(built, latent=m.latent)


def _looks_like_path(spec: str) -> bool:
    return (
        spec.startswith((".", "/", "~"))
        or spec.endswith(WEIGHT_SUFFIXES)
        or spec.endswith(".json")
        or spec.count("/") != 1
        or Path(spec.split("/")[0]).is_dir()  # runs/my-typo with ./runs here: a path, not a hub id
        or os.sep == "\\"
        and "\\" in spec
    )


def _load_builtin(name: str, dev: torch.device, dt: torch.dtype) -> EpsModel:
    if name in zoo.CLOSED_FORMS:
        g = GaussianMixture.fit(torch.from_numpy(digits_array()))
        # closed forms are cheap and exact in float64 on the CPU, whatever device/dtype was asked for
        # a Gaussian fitted to the digits in [−1, 1]: its data range is theirs
        return dataclasses.replace(gaussian_eps_model(g, name=f"builtin:{name}"), data_range=(-1.0, 1.0))
    m = _load_folder(zoo.folder(name), None, None, dev, dt)
    return dataclasses.replace(m, name=f"builtin:{name}")


def read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        raw = path.read_bytes()
        data = json.loads(raw)
    except FileNotFoundError as e:
        raise InputError(f"{what} {path} not found; check the path") from e
    except OSError as e:  # a folder, no permission
        raise InputError(f"{what} {path} cannot be read ({_short(e)}); pass a readable JSON file") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        empty = "is empty" if not raw.strip() else f"is not valid JSON ({e.__class__.__name__})"
        raise InputError(f"{what} {path} {empty}; pass a diffusers config JSON file") from e
    if not isinstance(data, dict):
        raise InputError(f"{what} {path} must hold a JSON object, not a JSON {type(data).__name__}")
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


def check_unet_config(cfg: dict[str, Any], where: str) -> None:
    """Refuse a config that is not a supported UNet2DModel config, before anything is built (``where``: its source)."""
    if not isinstance(cfg, dict):
        raise InputError(f"{where}: a UNet config must be a JSON object, not {type(cfg).__name__}")
    cls = cfg.get("_class_name", "UNet2DModel")
    if cls not in SUPPORTED_CLASSES:
        raise InputError(
            f"{where}: model class {cls} is not supported yet (supported: {', '.join(SUPPORTED_CLASSES)}); "
            "pass a UNet2DModel config.json (to probe another network, wrap it as `model` py:module:factory)"
        )
    if cfg.get("in_channels") is None or cfg.get("sample_size") is None:
        raise InputError(f"{where}: config lacks in_channels/sample_size; pass a diffusers UNet2DModel config.json")
    s = cfg["sample_size"]
    sizes = [s] if isinstance(s, int) else s if isinstance(s, list | tuple) and len(s) == 2 else [None]
    for key, vals in (("in_channels", [cfg["in_channels"]]), ("sample_size", sizes)):
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in vals):
            raise InputError(f"{where}: {key} must be a positive integer (or a pair for sample_size), got {cfg[key]!r}")


def _load_folder(path: Path, subfolder: str | None, sched_cfg: dict | None, dev, dt, trust_pickle=False,
                 call_args: dict | None = None) -> EpsModel:  # fmt: skip
    if not subfolder and not (path / "config.json").exists() and (path / "pipeline" / "model_index.json").exists():
        path = path / "pipeline"  # a lipscope train/finetune run folder
    index = read_json(path / "model_index.json", "model_index.json") if (path / "model_index.json").is_file() else {}
    fam, comp = pipeline_denoiser(index, str(path)) if not subfolder and index else (None, None)
    if fam is None and (cfg := path / (subfolder or "") / "config.json").is_file():  # a bare denoiser folder
        fam, comp = family_of_class(read_json(cfg, "model config").get("_class_name")), subfolder
    if fam is not None and fam.name != "unet2d":
        sched_cfg = sched_cfg if sched_cfg is not None else find_scheduler_config([path])
        model = load_denoiser(fam, str(path), comp, sched_cfg, str(path), dev, dt, call_args, index)
    else:
        no_call_args(call_args, path)
        model = _load_unet_folder(path, subfolder, sched_cfg, dev, dt, trust_pickle)
    return _with_codec(model, path, index, dev, dt)


def _with_codec(model: EpsModel, root, index: dict, dev, dt, **hub) -> EpsModel:
    """A latent pipeline's model carries its autoencoder (:mod:`lipscope.latents`; a generic one's: its capture)."""
    if not vae_component(index) or model.config.get("lipscope_adapter"):
        return model
    codec = load_codec(root, index, dev, dt, **hub)
    log.info("%s: latent pipeline; image data is encoded with its %s (%s)", model.name, codec.kind, codec.component)
    if model.config.get("sample_size") is None and model.sample_shape is not None:  # Flux: the autoencoder's size
        hw = (codec.pixel_shape[1] // codec.downsample, codec.pixel_shape[2] // codec.downsample)
        model = dataclasses.replace(model, sample_shape=(model.sample_shape[0], *hw))
    return dataclasses.replace(model, latent=codec)


def _load_unet_folder(path: Path, subfolder: str | None, sched_cfg: dict | None, dev, dt, trust_pickle) -> EpsModel:
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
    check_unet_config(ucfg, str(path))
    if sched_cfg is None:
        sched_cfg = find_scheduler_config(dict.fromkeys([path, unet_dir, unet_dir.parent]))
    pt = unet_dir / "diffusion_pytorch_model.bin"
    if not (unet_dir / "diffusion_pytorch_model.safetensors").exists() and pt.is_file():
        # a pickle: read it here (weights only, full unpickling only with trust_pickle), not in from_pretrained
        unet = _unet_from_state_dict(ucfg, read_state_dict(pt, trust_pickle), pt, str(cfg_path))
        return from_unet(unet, sched_cfg, name=str(path), device=dev, dtype=dt)
    try:
        unet = unet_class(ucfg).from_pretrained(unet_dir)
    except (OSError, ValueError, RuntimeError) as e:
        raise InputError(
            f"`model` {path}: could not load the UNet ({_short(e)}); weights corrupt or not matching config.json"
        ) from e
    except Exception as e:  # safetensors' own error type, among others
        if "safetensor" in type(e).__name__.lower() or "header" in str(e).lower():
            raise InputError(f"`model` {path}: weights file is corrupt ({_short(e)}); re-download or re-save it") from e
        raise
    return from_unet(unet, sched_cfg, name=str(path), device=dev, dtype=dt)


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
    check_unet_config(cfg, f"`config` {cpath}")
    unet = _unet_from_state_dict(cfg, read_state_dict(path, trust_pickle), path, f"`config` {cpath}")
    if sched_cfg is None:
        sched_cfg = find_scheduler_config(dict.fromkeys([path.parent, cpath.parent]))
    return from_unet(unet, sched_cfg, name=str(path), device=dev, dtype=dt)


def _unet_from_state_dict(cfg: dict[str, Any], sd: dict[str, torch.Tensor], path: Path, where: str) -> UNet2DModel:
    """Build the UNet of ``cfg`` (checked) and load ``sd`` into it; ``where`` names the config in messages."""
    try:
        unet = unet_class(cfg).from_config(cfg)
    except (TypeError, ValueError, KeyError, AttributeError, IndexError, RuntimeError, AssertionError) as e:
        raise InputError(f"{where}: not a valid UNet2DModel config ({_short(e)})") from e
    own = unet.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shape = [k for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shape:
        parts = [f"{len(v)} {w} (e.g. {v[0]})" for v, w in ((missing, "missing"), (unexpected, "unexpected")) if v]
        if shape:
            k = shape[0]
            parts.append(f"{len(shape)} with wrong shape (e.g. {k}: {tuple(sd[k].shape)} vs {tuple(own[k].shape)})")
        raise InputError(
            f"`model` {path} does not match {where}: {'; '.join(parts)} tensors; "
            "pass the config these weights were trained with"
        )
    unet.load_state_dict(sd, strict=True)
    return unet


def _load_hub(repo: str, revision, subfolder, sched_cfg: dict | None, offline: bool | None, dev, dt,
              call_args: dict | None = None) -> EpsModel:  # fmt: skip
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    local_only, no_network = hub_local_only(repo, offline)

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

    index_file = None if subfolder else fetch("model_index.json")
    index = read_json(Path(index_file), "model_index.json") if index_file else {}
    hub = {"revision": revision, "local_files_only": local_only}
    name = repo if revision is None else f"{repo}@{revision}"
    if index and (fam := pipeline_denoiser(index, repo)[0]).name != "unet2d":
        sched_cfg = sched_cfg if sched_cfg is not None else find_scheduler_config([""], fetch)
        comp = pipeline_denoiser(index, repo)[1]
        model = load_denoiser(fam, repo, comp, sched_cfg, name, dev, dt, call_args, index, **hub)
        return _with_codec(model, repo, index, dev, dt, **hub)
    no_call_args(call_args, repo)
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

            why = f"{no_network}, and it" if no_network else "offline mode is on and it"
            raise InputError(
                f"`model` {repo}: {why} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}); download it "
                "once with network access, set HF_HUB_CACHE, or point `model` at a local folder"
            )
        raise InputError(
            f"`model` {repo}: no UNet config.json found in the repo (tried {subs}); "
            "pass the folder that holds it as `subfolder`"
        )
    ucfg = read_json(Path(cfg_file), "model config")
    check_unet_config(ucfg, repo)
    if sched_cfg is None:
        sched_cfg = find_scheduler_config([""], fetch)
    try:
        unet = unet_class(ucfg).from_pretrained(
            repo, subfolder=unet_sub or None, revision=revision, local_files_only=local_only
        )
    except (OSError, ValueError, RuntimeError) as e:
        raise InputError(
            f"`model` {repo}: could not load the UNet ({_short(e)}); check the repo id and its files"
        ) from e
    return _with_codec(from_unet(unet, sched_cfg, name=name, device=dev, dtype=dt), repo, index, dev, dt, **hub)


def hub_local_only(repo: str, offline: bool | None) -> tuple[bool, str | None]:
    """(whether to read ``repo`` from the local Hugging Face cache only, why the hub is unreachable): ``offline``,
    else HF_HUB_OFFLINE, else when the hub cannot be reached (said once, as a warning)."""
    env_offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    local_only = offline if offline is not None else env_offline
    no_network = None if local_only else _no_network()
    if no_network:
        log.warning("%s: looking for %s in the local Hugging Face cache", no_network, repo)
    return bool(local_only or no_network), no_network


def _no_network(timeout: float = HUB_TIMEOUT_S) -> str | None:
    """None when the hub (``HF_ENDPOINT``, or its proxy) accepts a connection within ``timeout`` s, else why not."""
    url = urlsplit(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")  # as huggingface_hub reads it
    to = proxy if (proxy := urlsplit(getproxies().get(url.scheme, ""))).hostname else url
    host, port = to.hostname or "huggingface.co", to.port or (443 if to.scheme == "https" else 80)
    why: list[str] = []

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            why.append("")
        except Exception as e:  # OSError, socket.timeout, DNS failures, a sandbox's guard
            why.append(_short(e))

    th = threading.Thread(target=connect, daemon=True)  # DNS lookups have no timeout of their own
    th.start()
    th.join(timeout + 0.5)
    if why and not why[0]:
        return None
    return f"no network: cannot reach {host}:{port} ({why[0] if why else f'no answer within {timeout:g} s'})"
