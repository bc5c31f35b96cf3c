"""The resolution of a network's time input, and which FD steps it can see (docs/probe.md, "Precision").

A network is fed u = c(t): the model step (VP, flow, ``py:`` callables), σ (VE) or ¼ ln σ (EDM)
(:meth:`lipscope.schedules.NoiseProcess.condition`), and resolves it only to the precision its time embedding
computes in: diffusers' ``get_timestep_embedding`` multiplies ``t.float()`` by its frequencies in float32 whatever
the weights' dtype, some transformers cast t to the weights' dtype first (Flux: bfloat16 in a bfloat16 run), and
lipscope feeds float32 t to any network that is not float64 (:func:`lipscope.models.as_timesteps`). The two
points of an FD pair then reach the embedding rounded: u itself by half a unit in the last place (ulp), the
product u·f of a sinusoidal embedding (f ≤ 1) by up to one ulp of u, and sin/cos by half an ulp of 1, so each
point's time is off by up to about 2·ulp(max(|u|, 1)) and K by up to

    fd_time_rel = 2·(ulp(max(|u_a|, 1)) + ulp(max(|u_b|, 1))) / |u_b − u_a|

(≥ 1: the two points may be fed as one, K = 0). Measured against the JVP on ``builtin:digits-ddpm`` in float64
(t = 3…900, Δt = 10⁻²…3·10⁻⁵): |K_FD − K_JVP|/K_JVP stayed within this bound (at most 0.52 of it) wherever the
truncation was negligible (docs/probe.md). :func:`time_resolution` finds the coarsest precision the network rounds
its time input to by probing it (its output moves in steps of that precision's ulp in u), and
:func:`check_time_resolution` flags the FD rows above :data:`TIME_LIMIT` and refuses a run where every row is.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import torch

from .errors import InputError
from .models import EpsModel

log = logging.getLogger("lipscope")

CANDIDATES = (torch.bfloat16, torch.float16, torch.float32)  # coarse to fine
TIME_LIMIT = 0.1  # as the rounding-noise flag (points.NOISE_LIMIT): a row whose K may be off by more is unusable
PROBE_POINT = 0.64  # where the probe looks, as a fraction of the model-step axis
STEPS = 32  # probe inputs per ulp
CHUNK = 8  # probe inputs per network call (a large network's batch of 66 may not fit)


def _name(dtype: torch.dtype | None) -> str:
    return "float64" if dtype is None else str(dtype).removeprefix("torch.")


def spacing(u: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """The ulp of float64 values ``u`` in ``dtype`` (None: float64): eps·2^⌊log₂|u|⌋, at least the subnormal
    spacing (for u = 0 too)."""
    fi = torch.finfo(torch.float64 if dtype is None else dtype)
    a = u.abs().to(torch.float64)
    e = torch.floor(torch.log2(torch.where(a > 0, a, 1.0)))
    return torch.clamp(fi.eps * torch.exp2(e), min=fi.eps * fi.smallest_normal)


def network_input(model: EpsModel, c: torch.Tensor) -> torch.Tensor:
    """What the network is fed for condition c (float64): c itself for callables (``fed_steps``) and VP/flow,
    σ(c) for VE, ¼ ln σ(c) for EDM."""
    c = c.to(torch.float64)
    return c if model.fed_steps else model.schedule.condition(c).to(torch.float64)


def _preimage(model: EpsModel, u: torch.Tensor) -> torch.Tensor:
    """c with network_input(c) = u (float64 bisection on [0, T−1]; every process feeds a monotone c(t))."""
    lo, hi = torch.zeros_like(u), torch.full_like(u, float(model.T - 1))
    up = bool(network_input(model, hi[:1]) >= network_input(model, lo[:1]))
    for _ in range(64):
        mid = (lo + hi) / 2
        below = (network_input(model, mid) < u) == up
        lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
    return (lo + hi) / 2


def _rounding(model: EpsModel, x: torch.Tensor, candidates: tuple[torch.dtype, ...]) -> torch.dtype | None:
    """The coarsest of ``candidates`` the network rounds its time input to: for each, over one ulp in 32 steps (from
    a value it holds, at 0.64·T) the output changes at most 3 times (a network that rounds to it changes once, or up
    to 3 times after its own scaling of t by up to a factor 2, as Flux's t/1000; one that resolves 4× finer changes
    at least 4 times, float16 against bfloat16 8 times), while 4 ulp away it differs (it depends on t at all).
    Candidates the network's input overflows are skipped."""
    if not candidates:
        return None
    c0 = torch.tensor([PROBE_POINT * (model.T - 1)], dtype=torch.float64)
    steps = torch.cat([torch.arange(STEPS, dtype=torch.float64) / STEPS, torch.tensor([4.0])])
    held = {d: network_input(model, c0).to(d).to(torch.float64) for d in candidates}  # held exactly by d
    held = {d: u0 for d, u0 in held.items() if bool(torch.isfinite(u0).all())}
    if not held:
        return None
    c = _preimage(model, torch.cat([u0 + steps * spacing(u0, d) for d, u0 in held.items()]))
    xs, outs = x.repeat(CHUNK, *([1] * (x.ndim - 1))), []
    with torch.no_grad():  # one true t: only the condition differs
        for i in range(0, len(c), CHUNK):
            ci = c[i : i + CHUNK]
            rows = torch.zeros(len(ci), dtype=torch.long)
            outs.append(model.at_condition(xs[: len(ci)], ci, c0.expand(len(ci)), rows).reshape(len(ci), -1))
    for d, row in zip(held, torch.cat(outs).reshape(len(held), len(steps), -1), strict=True):
        changes = sum(not torch.equal(row[k], row[k + 1]) for k in range(STEPS - 1))
        if changes <= 3 and not torch.equal(row[0], row[-1]):
            return d
    return None


def time_resolution(model: EpsModel, x: torch.Tensor) -> tuple[torch.dtype | None, str]:
    """(the precision the network resolves its time input to, how that was found): the coarsest of bfloat16,
    float16, float32 it rounds to on input ``x`` (one sample), at least float32 where lipscope feeds float32 t;
    None: float64."""
    floor = None if model.dtype == torch.float64 else torch.float32
    if model.rounds_timesteps:  # found at load; FD pairs are then whole steps (models.check_fractional_dt)
        return floor, "not probed: the adapter rounds t to whole steps, and the FD pairs are whole steps"
    cands = CANDIDATES[: CANDIDATES.index(floor)] if floor is not None else CANDIDATES
    found = _rounding(model, x[:1], cands)
    if found is not None:
        return found, f"probed: the network's output moves in steps of one ulp of {_name(found)} in its time input"
    if floor is not None:
        return floor, "lipscope feeds float32 t to a network that is not float64"
    return None, "probed: the network resolves float64 time inputs"


def time_rel(model: EpsModel, t_a: np.ndarray, t_b: np.ndarray, conditions: bool, dtype: torch.dtype | None):
    """Per FD row, 2·(ulp(max(|u_a|, 1)) + ulp(max(|u_b|, 1)))/|u_b − u_a| of the network inputs u at t_a, t_b in
    ``dtype`` (E-TSDM map applied in time space; 0 where the map feeds both points one condition: no rounding can
    tell them apart)."""
    ta, tb = (torch.as_tensor(v, dtype=torch.float64) for v in (t_a, t_b))
    if not conditions:
        ta, tb = model.network_timesteps(ta), model.network_timesteps(tb)
    ua, ub = network_input(model, ta), network_input(model, tb)
    err = 2 * (spacing(ua.abs().clamp_min(1.0), dtype) + spacing(ub.abs().clamp_min(1.0), dtype))
    d = (ub - ua).abs()
    rel = torch.where(d > 0, err / torch.where(d > 0, d, 1.0), torch.where(ta == tb, 0.0, math.inf))
    return rel.numpy()


def check_time_resolution(
    model: EpsModel, x: torch.Tensor, t_a: np.ndarray, t_b: np.ndarray, conditions: bool = False
) -> dict[str, Any]:
    """What run.json records about the time resolution, with ``rel`` per FD row (:func:`time_rel`). Refuses a run
    whose every FD row is above :data:`TIME_LIMIT`; warns, naming the smallest usable `dt`, where some are."""
    dtype, how = time_resolution(model, x)
    rel = time_rel(model, t_a, t_b, conditions, dtype)
    bad = rel > TIME_LIMIT
    info: dict[str, Any] = {"dtype": _name(dtype), "how": how, "limit": TIME_LIMIT, "rows_limited": int(bad.sum())}
    if bad.any():
        dt = np.asarray(t_b - t_a, dtype=np.float64)
        need = float(np.max(dt * rel / TIME_LIMIT))  # rel scales as 1/dt: the dt that brings every row under
        q = 10.0 ** (math.floor(math.log10(need)) - 1)
        need = math.ceil(need / q) * q  # two digits, rounded up
        j = int(np.argmax(rel))
        what = (
            f"`dt` {float(dt[j]):g} is below the time resolution of `model` {model.name}: it sees its time input in "
            f"{_name(dtype)}, so at t = {float(t_a[j]):g} K may be off by {100 * float(rel[j]):.3g} %"
        )
        if bad.all():
            raise InputError(f"{what} (every FD row: no usable one); use `dt` ≥ {need:.3g}, or `method` jvp")
        log.warning("%s; %d of %d FD rows are flagged (fd_time_limited) and left out of the summary; use `dt` ≥ "
                    "%.3g, or `method` jvp", what, int(bad.sum()), len(rel), need)  # fmt: skip
    return {**info, "rel": rel}
