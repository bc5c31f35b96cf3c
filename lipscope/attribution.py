"""Where t enters the network: ∂εθ/∂t split over the consumers of the time embedding (DESIGN.md, "Attribution").

t reaches a network only through its time embedding e(t), consumed at known places (a UNet's ResNet blocks, a DiT's
adaLN blocks and final modulation, an MMDiT's blocks and ``norm_out``). By the chain rule

    ∂εθ/∂t = Σ_c (∂εθ/∂e_c)(∂e_c/∂t) + (the paths that avoid every consumer),

exactly, so a JVP with the tangent ∂e_c/∂t injected at one consumer group alone gives that group's part. The last
part, ``outside``, holds every other path: the conversion of the output to ε (α(t), σ(t)),
EDM's input scaling, a network's direct use of t (the Fourier UNet's division by σ); it is 0 for an ε-predicting
network whose consumers are all listed. The parts sum to the full JVP per sample.

All parts come from ONE forward-AD call on P + 1 copies of the batch (P groups): copy 0 carries the tangent dt = 1
(and so ``outside``); at each consumer of group c, a hook moves the tangent that copy 0's rows bring to that input
into copy c's rows and zeroes it elsewhere. So attribution costs one JVP of (P + 1)× the batch, packed by the
batched runner like every method.

``share`` of a part = Σ⟨J_c, J⟩ / Σ‖J‖² over samples (J the full derivative), so the shares of a row sum to 1.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
import torch.autograd.forward_ad as fwad_api
from torch import nn

from .batching import RunStats, check_finite, run_batched
from .errors import InputError
from .families import family_of_model
from .fwad import forward_ad_patches, refuse_learned_embedding
from .journal import Journal
from .models import EpsModel
from .points import noisy_inputs

GRANULARITIES = ("blocks", "layers")
OUTSIDE = "outside"


@dataclass(frozen=True)
class Consumer:
    """A place the time embedding enters: ``module``'s input ``arg`` (name or position), or its output ``out``."""

    name: str
    group: str
    module: nn.Module
    arg: str | int | None = None
    out: int | None = None


# ---- where each family's embedding is consumed -------------------------------------------------------------------


def _unet(module: nn.Module, granularity: str) -> list[Consumer]:
    """UNets (UNet2DModel, UNet2DConditionModel): every ResNet block's ``temb`` (time_emb_proj, or the ada/spatial
    norms of ResnetBlockCondNorm2D); blocks: grouped by down_blocks.i / mid_block / up_blocks.i."""
    out = []
    for name, mod in module.named_modules():
        if type(mod).__name__.startswith("ResnetBlock"):
            parts = name.split(".")
            group = ".".join(parts[:2]) if parts[0] in ("down_blocks", "up_blocks") else parts[0]
            out.append(Consumer(name, group if granularity == "blocks" else name, mod, "temb"))
    return out


def _arg(mod: nn.Module, names: tuple[str, ...]) -> str | None:
    """The first of ``names`` that ``mod.forward`` takes."""
    params = inspect.signature(mod.forward).parameters
    return next((n for n in names if n in params), None)


def _transformer(module: nn.Module, granularity: str, fine: tuple[str, ...]) -> list[Consumer]:
    """Transformers: each block's embedding argument (``timestep`` for DiT/PixArt, ``temb`` for SD3/Flux); layers:
    the norms inside a block that take it (``fine``: their names; the argument ``emb`` or ``conditioning_embedding``,
    as AdaLayerNormZero and AdaLayerNormContinuous name it)."""
    out = []
    for name, mod in module.named_modules():
        if not re.fullmatch(r"(single_)?transformer_blocks\.\d+", name):
            continue
        kids = [(f"{name}.{c}", getattr(mod, c)) for c in fine if isinstance(getattr(mod, c, None), nn.Module)]
        if granularity == "layers" and kids:
            out += [Consumer(n, n, m, _arg(m, ("emb", "conditioning_embedding"))) for n, m in kids]
        else:
            out.append(Consumer(name, name, mod, _arg(mod, ("temb", "timestep"))))
    return out


def consumers(model: EpsModel, granularity: str = "blocks") -> list[Consumer]:
    """The time-embedding consumers of ``model``'s network, grouped by ``blocks`` or ``layers``."""
    if granularity not in GRANULARITIES:
        raise InputError(f"`attribute` {granularity!r}: use blocks or layers")
    mod = model.module
    declared = getattr(mod, "time_consumers", None) if mod is not None else None
    if mod is not None and declared is not None:  # a py: network that declares them: "path" or "path:arg"
        out = []
        for spec in declared:
            path, _, arg = str(spec).partition(":")
            try:
                m = mod.get_submodule(path)
            except AttributeError as e:
                raise InputError(f"`model` {model.name}: time_consumers names {path!r}, which is no submodule") from e
            out.append(Consumer(path, path, m, int(arg) if arg.isdigit() else (arg or 0)))
        return out
    fam = family_of_model(model) if not model.fed_steps else None  # fed_steps: a py: callable or a closed form
    if mod is None or fam is None:
        raise InputError(
            f"`attribute` needs to know where {model.name} consumes its time embedding: declare it on the network "
            "(an attribute time_consumers = ['block.proj', 'head:emb']: submodule paths and their input) or leave "
            "`attribute` out"
        )
    if fam.name in ("unet2d", "sd"):
        return _unet(mod, granularity)
    if fam.name not in ("dit", "pixart", "sd3", "flux"):
        raise InputError(
            f"`attribute`: where {fam.name} networks consume their time embedding is not known to lipscope; declare "
            "a time_consumers attribute on the network (submodule paths and their input) or leave `attribute` out"
        )
    found = _transformer(mod, granularity, ("norm1", "norm1_context", "norm") if fam.name in ("sd3", "flux") else ())
    if fam.name == "dit":
        found.append(Consumer("proj_out_1", "proj_out_1", mod.get_submodule("proj_out_1"), 0))
    elif fam.name == "pixart":
        found.append(Consumer("output modulation", "output modulation", mod.get_submodule("adaln_single"), out=1))
    else:
        found.append(Consumer("norm_out", "norm_out", mod.get_submodule("norm_out"), 1))
    return found


def embeddings(model: EpsModel) -> dict[str, nn.Module]:
    """The modules that compute the time embedding (its Fourier/sinusoidal features and the MLP after them):
    ‖∂e/∂t‖ is reported for each."""
    mod = model.module
    if mod is None:
        return {}
    declared = getattr(mod, "time_embeddings", None)
    if declared is not None:
        return {p: mod.get_submodule(p) for p in declared}
    out: dict[str, nn.Module] = {}
    for name, m in mod.named_modules():
        for key in ("time_proj", "timestep_embedder", "time_embedding"):
            if name.split(".")[-1] == key and key not in {k.split(".")[-1] for k in out}:
                out[name] = m
    return out


# ---- the injection ----------------------------------------------------------------------------------------------


def _move(e: torch.Tensor, copies: int, index: int, m: int, name: str) -> torch.Tensor:
    """``e`` with the tangent of copy 0's rows moved to copy ``index``'s rows (rows: branches × copies × m items)."""
    primal, tangent = fwad_api.unpack_dual(e)
    if tangent is None:
        return e
    if e.ndim == 0 or e.shape[0] % (copies * m):
        raise InputError(f"the time-embedding consumer {name} takes {tuple(e.shape)}, not one row per input")
    t = tangent.reshape(e.shape[0] // (copies * m), copies, m, *e.shape[1:])
    new = torch.zeros_like(t)
    new[:, index] = t[:, 0]
    return fwad_api.make_dual(primal, new.reshape(e.shape))


def _hook(con: Consumer, copies: int, c: int, state: dict):
    if con.out is not None:

        def post(mod, args, output):
            output = list(output)
            output[con.out] = _move(output[con.out], copies, c, state["m"], con.name)
            return tuple(output)

        return con.module.register_forward_hook(post)
    names = [p for p in inspect.signature(con.module.forward).parameters if p not in ("args", "kwargs")]

    def pre(mod, args, kwargs):
        key = con.arg
        if isinstance(key, str) and key in kwargs:
            return args, {**kwargs, key: _move(kwargs[key], copies, c, state["m"], con.name)}
        pos = key if isinstance(key, int) else names.index(key) if key in names else None
        if pos is None or pos >= len(args):
            raise InputError(f"the time-embedding consumer {con.name} was called without its input {key!r}")
        return (*args[:pos], _move(args[pos], copies, c, state["m"], con.name), *args[pos + 1 :]), kwargs

    return con.module.register_forward_pre_hook(pre, with_kwargs=True)


@contextmanager
def injected(groups: list[list[Consumer]], emb: dict[str, nn.Module], state: dict) -> Iterator[None]:
    """Hooks that route the tangent at each consumer of group c (1-based) to copy c only, and record the first output
    tangent of each embedding module in ``state["seen"]``; removed afterwards."""
    copies, handles = len(groups) + 1, []

    def recorder(name: str):
        def record(mod, args, output):
            if name not in state["seen"] and isinstance(output, torch.Tensor):
                state["seen"][name] = fwad_api.unpack_dual(output).tangent

        return record

    try:
        handles += [_hook(con, copies, c, state) for c, group in enumerate(groups, start=1) for con in group]
        handles += [m.register_forward_hook(recorder(name)) for name, m in emb.items()]
        yield
    finally:
        for h in handles:
            h.remove()


def part_tangents(model: EpsModel, x: torch.Tensor, t: torch.Tensor, rows: torch.Tensor, groups: list[list[Consumer]],
                  emb: dict[str, nn.Module] | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:  # fmt: skip
    """(P + 1, m, …): ∂(model output)/∂t through each consumer group, then ``outside``, for inputs x (m, …) at steps
    t (m,), in one forward-AD call on P + 1 copies; and each embedding module's ∂e/∂t (m, …) (copy 0). Per step."""
    m, copies = x.shape[0], len(groups) + 1
    state: dict = {"m": m, "seen": {}}
    tan = torch.zeros(copies * m, dtype=t.dtype, device=t.device)
    tan[:m] = 1
    with injected(groups, emb or {}, state), torch.no_grad(), fwad_api.dual_level():
        xs = x.repeat(copies, *[1] * (x.ndim - 1))
        out = model(xs, fwad_api.make_dual(t.repeat(copies), tan), rows.repeat(copies))
        j = fwad_api.unpack_dual(out).tangent
        j = torch.zeros_like(out) if j is None else j
        seen = {}
        for name, v in state["seen"].items():
            v = torch.zeros(1) if v is None else v
            seen[name] = (
                v.reshape(-1, copies, m, *v.shape[1:])[0, 0] if v.ndim and v.shape[0] % (copies * m) == 0 else v
            )
    j = j.reshape(copies, m, *out.shape[1:])
    return torch.cat([j[1:], j[:1]]), seen


def attribution_norms(
    model: EpsModel, x0: torch.Tensor, noise: torch.Tensor, t: np.ndarray, granularity: str = "blocks",
    batch_size: int | str = "auto", progress: bool = False, stats: RunStats | None = None,
    journal: Journal | None = None,
) -> tuple[np.ndarray, list[str], list[str]]:  # fmt: skip
    """Per sample and grid point (n, G, W): ‖J_c‖ and ⟨J_c, J⟩ of every part (P groups, then ``outside``), ‖J‖ and
    ‖J‖² of their sum J = ∂εθ/∂τ, and ‖∂e/∂τ‖ of each embedding module; with the part and embedding names."""
    if model.rounds_timesteps:
        raise InputError(
            f"`model` {model.name} rounds t to whole steps: its derivative in t is 0; leave out `attribute`"
        )
    refuse_learned_embedding(model.name, model.config)
    cons = consumers(model, granularity)
    names = list(dict.fromkeys(c.group for c in cons))
    groups = [[c for c in cons if c.group == g] for g in names]
    emb = embeddings(model)
    n, G, T, P = x0.shape[0], len(t), model.T, len(names)
    t_x = torch.as_tensor(np.asarray(t, dtype=np.float64))
    tdtype = torch.float64 if model.dtype == torch.float64 else torch.float32

    def compute(idx: torch.Tensor) -> torch.Tensor:
        j, i = idx // n, idx % n
        m = idx.numel()
        x = noisy_inputs(model, x0[i], noise[i], t_x[j])
        parts, seen = part_tangents(model, x, t_x[j].to(model.device, tdtype), i, groups, emb)
        check_finite(list(parts), t_x[j], t_x[j], "t-derivative through the consumers")
        v = parts.reshape(P + 1, m, -1).double() * T
        total = v.sum(0)
        cols = [torch.linalg.vector_norm(v, dim=2).T, (v * total).sum(2).T]
        cols += [torch.linalg.vector_norm(total, dim=1)[:, None], (total * total).sum(1)[:, None]]
        cols += [torch.linalg.vector_norm(seen[e].reshape(m, -1).double(), dim=1)[:, None] * T if e in seen and
                 seen[e].numel() >= m else torch.zeros(m, 1, dtype=torch.float64) for e in emb]  # fmt: skip
        return torch.cat(cols, 1)

    with forward_ad_patches(model.module):
        out = run_batched(model, n * G, P + 1, compute, batch_size, progress, stats, "attribution", journal)
    return out.reshape(G, n, -1).transpose(0, 1).numpy(), [*names, OUTSIDE], list(emb)


def attribution_table(
    vals: np.ndarray, t: np.ndarray, parts: list[str], emb: list[str], granularity: str
) -> pd.DataFrame:
    """attribution.csv: per grid t, one row per part (``K_part`` = mean ‖J_c‖ per unit τ, ``share`` =
    Σ⟨J_c, J⟩/Σ‖J‖²), the ``total`` (= the JVP row, to rounding; share 1) and each embedding module's mean ‖∂e/∂τ‖
    (``kind`` embedding, share NaN). Shares are NaN where J = 0 (an E-TSDM network inside a sub-interval).
    ``attrs["share_samples"]``: the per-sample sums of the shares, for their bootstrap intervals."""
    P = len(parts)
    den = vals[:, :, 2 * P + 1].sum(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        shares = np.where(den > 0, vals[:, :, P : 2 * P].sum(0).T / np.where(den > 0, den, 1.0), np.nan).T  # (G, P)
    rows = []
    for j, tj in enumerate(np.asarray(t, dtype=np.float64)):
        for k, name in enumerate(parts):
            rows.append((tj, name, "outside" if name == OUTSIDE else "part", vals[:, j, k].mean(), shares[j, k]))
        rows.append((tj, "total", "total", vals[:, j, 2 * P].mean(), 1.0 if den[j] > 0 else np.nan))
        rows += [
            (tj, f"embedding {e}", "embedding", vals[:, j, 2 * P + 2 + q].mean(), np.nan) for q, e in enumerate(emb)
        ]
    df = pd.DataFrame(rows, columns=["t", "part", "kind", "K_part", "share"])
    df.insert(1, "method", "jvp")
    df["granularity"] = granularity
    df.attrs["share_samples"] = (vals[:, :, P : 2 * P], vals[:, :, 2 * P + 1])  # per sample ⟨J_c, J⟩, ‖J‖² (G, P)
    return df
