"""Where finite differences evaluate the model: FD points of a scheme, condition-space pairs, E-TSDM
boundary crossings and the valid t range; and how much rounding noise an FD difference carries
(no network calls; used by :mod:`lipscope.probe`)."""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from .errors import InputError
from .etsdm import Etsdm
from .models import EpsModel
from .schedules import parse_grid
from .targets import noisy

log = logging.getLogger("lipscope")

SCHEMES = ("forward", "central")


@dataclass
class FDPoints:
    """Where x_t is drawn (t) and the two points it is evaluated at (t_a < t_b), all in model steps.

    ``conditions=True``: t_a, t_b are conditions fed to the network directly (no E-TSDM map),
    as in ``space="condition"``; otherwise they are true timesteps (the map applies).
    """

    t: np.ndarray
    t_a: np.ndarray
    t_b: np.ndarray
    conditions: bool = False

    @property
    def dt(self) -> np.ndarray:
        return self.t_b - self.t_a


def check_dt(dt: float, T: int) -> None:
    """Δt must be a finite step > 0 that fits in the schedule (both FD points inside [0, T−1])."""
    if not (isinstance(dt, (int, float)) and math.isfinite(dt) and dt > 0):
        raise InputError(f"`dt` must be > 0 (got {dt}); it is the FD step in model steps, fractional allowed")
    if dt > T - 1:
        raise InputError(f"`dt` {dt:g} is longer than the whole schedule (T − 1 = {T - 1} steps); use a step < {T - 1}")


def fd_points(grid: np.ndarray, dt: float, scheme: str, T: int) -> FDPoints:
    """Evaluation points of the FD scheme; refuses any that fall outside [0, T−1]."""
    if not dt > 0 or not math.isfinite(dt):
        raise InputError(f"`dt` must be > 0 (got {dt}); it is the FD step in model steps, fractional allowed")
    if scheme not in SCHEMES:
        raise InputError(f"`scheme` {scheme!r} not known; use {' or '.join(SCHEMES)}")
    g = np.asarray(grid, dtype=np.float64)
    ta, tb = (g, g + dt) if scheme == "forward" else (g - dt / 2, g + dt / 2)
    bad = (ta < 0) | (tb > T - 1)
    if bad.any():
        k = float(g[bad][0])
        raise InputError(
            f"timestep {k:g} with `dt` {dt:g} ({scheme}) needs the model at [{ta[bad][0]:g}, {tb[bad][0]:g}], "
            f"outside [0, {T - 1}]; drop it from `timesteps` or change `dt`/`scheme`"
        )
    return FDPoints(t=g, t_a=ta, t_b=tb)


def condition_points(grid: np.ndarray, dt: float, T: int, etsdm: Etsdm | None) -> FDPoints:
    """``space="condition"``: K between consecutive conditions the network is actually fed.

    Plain model: (t, t + Δt) as in time space. E-TSDM: a grid step t < t̃ becomes its sub-interval
    start c = f(t), paired with the next condition c + t̃/n (x drawn at t = c; duplicates dropped);
    t ≥ t̃ keeps (t, t + Δt).
    """
    g = np.asarray(grid, dtype=np.float64)
    if etsdm is None:
        pts = fd_points(g, dt, "forward", T)
        return FDPoints(pts.t, pts.t_a, pts.t_b, conditions=True)
    tt, w = etsdm.t_tilde, etsdm.width
    low = np.unique(np.floor(g[g < tt] / w) * w)
    high = fd_points(g[g >= tt], dt, "forward", T) if (g >= tt).any() else FDPoints(g[:0], g[:0], g[:0])
    return FDPoints(
        np.concatenate([low, high.t]),
        np.concatenate([low, high.t_a]),
        np.concatenate([np.minimum(low + w, tt), high.t_b]),
        conditions=True,
    )


def generated_grid(
    spec: str | None, T: int, lo: float, hi: float, etsdm: Etsdm | None, dt: float, s: float
) -> np.ndarray:
    """The probe's grid: a generated one (``default``, ``all``, ``linear:N``, ``log:N``) cut to [lo, hi], an explicit
    one as given. The default grid of an E-TSDM model gets both sides of every sub-interval boundary b (so the jumps
    show): the pair that crosses it (t_a = b − Δt, t_b = b), and those just before (t_b = b − Δt) and after (t_a = b);
    ``s`` = t − t_a of the scheme (0 forward, Δt/2 central; Δt = 1, s = 0 without FD)."""
    grid = parse_grid(spec, T, t_max=hi)
    if spec is not None and is_explicit(spec):
        return grid
    if etsdm is not None and (spec or "default").strip() == "default":
        b = np.asarray(etsdm.boundaries()[1:])
        grid = np.unique(np.concatenate([grid, *(b + s - k * dt for k in (0, 1, 2))]))
        grid = grid[grid <= hi]
    return grid[grid >= lo]


def crosses_boundary(t_a: np.ndarray, t_b: np.ndarray, etsdm: Etsdm | None) -> np.ndarray:
    """True where (t_a, t_b] contains an E-TSDM sub-interval boundary (t̃/n, 2t̃/n, …, t̃)."""
    if etsdm is None:
        return np.zeros(len(t_a), dtype=bool)
    return etsdm.crosses(t_a, t_b)


def valid_range(dt: float, scheme: str, T: int) -> tuple[float, float]:
    """The span of t where the scheme's evaluation points stay inside [0, T−1]."""
    if scheme == "central":
        return dt / 2, T - 1 - dt / 2
    return 0.0, T - 1 - dt


def is_explicit(spec: str) -> bool:
    """Whether a `timesteps` spec lists its points (a list or range:, taken as given) rather than generating a grid
    (clipped to the valid range)."""
    s = spec.strip()
    return s.startswith("range:") or not any(
        s == p or s.startswith(p + ":") for p in ("default", "all", "linear", "log")
    )


# ---------------------------------------------------------------------------------------------
# rounding noise of an FD difference (docs/probe.md, "Precision")
# ---------------------------------------------------------------------------------------------

# c of fd_noise where it cannot be measured in the run: ‖ε_dtype − ε₆₄‖/(u‖ε₆₄‖) measured 6–18 on the
# tiny test UNet, 47–99 on builtin:digits-ddpm (float32/float16/bfloat16; docs/probe.md): the max, rounded up
NOISE_C = 100.0
# a row whose estimated noise exceeds this share of mean ‖Δε‖ is flagged: its K may be off by as much
NOISE_LIMIT = 0.1
LOW_PRECISION = ("float16", "bfloat16")


def unit_roundoff(dtype: torch.dtype) -> float:
    """u = eps/2: 2⁻⁵³ float64, 2⁻²⁴ float32, 2⁻¹¹ float16, 2⁻⁸ bfloat16."""
    return torch.finfo(dtype).eps / 2


def noise_columns(
    K: np.ndarray, noise: np.ndarray | None, same: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``fd_noise_rel`` = mean noise / mean K per row (both (n, G), noise in K's units) and
    ``fd_noise_limited`` = rel > NOISE_LIMIT; a row with mean K = 0 is limited iff its noise is > 0 — unless the
    network was fed the same condition at both points (``same``, (G,)) and K is 0 in every sample: one computation
    twice, no rounding noise (rel 0; E-TSDM inside a sub-interval). ``noise`` None (JVP, no cancellation): NaN, False.
    """
    if noise is None:
        return np.full(K.shape[1], np.nan), np.zeros(K.shape[1], dtype=bool)
    num, den = noise.mean(axis=0), K.mean(axis=0)
    exact = (K == 0).all(axis=0) & (np.zeros(K.shape[1], dtype=bool) if same is None else np.asarray(same, bool))
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(den > 0, num / np.where(den > 0, den, 1.0), np.where((num > 0) & ~exact, np.inf, 0.0))
    return rel, rel > NOISE_LIMIT


def check_noise(df: pd.DataFrame, dtype: torch.dtype, allow: bool, precision: str | None = None) -> None:
    """Refuse a low-precision FD table with rows limited by rounding noise, unless ``allow``; the message names the
    option that set the precision (``precision``, else ``dtype``)."""
    name = str(dtype).removeprefix("torch.")
    bad = df["fd_noise_limited"].to_numpy(dtype=bool)
    if allow or name not in LOW_PRECISION or not bad.any():
        return
    fd = int(df["method"].astype(str).str.startswith("fd").sum())
    worst = float(df.loc[bad, "fd_noise_rel"].max())
    who, fix = (f"`precision` {precision}", "`precision` fp32") if precision else (f"`dtype` {name}", "`dtype` float32")
    jvp = "`method` jvp alone (its JVP rows have no cancellation)" if (df["method"] == "jvp").any() else "`method` jvp"
    raise InputError(
        f"{who}: {int(bad.sum())} of {fd} FD rows are limited by rounding noise (up to {100 * worst:.3g} % of ‖Δε‖); "
        f"use {jvp}, a larger `dt`, or {fix} (or `allow_noise_limited` to keep them)"
    )


# ---------------------------------------------------------------------------------------------
# evaluating FD pairs
# ---------------------------------------------------------------------------------------------


def noisy_inputs(model: EpsModel, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = α_t x0 + σ_t ε per row (t float64 (B,)), in the model's dtype and device."""
    work = torch.float64 if model.dtype == torch.float64 else torch.float32
    a, s = model.schedule.alpha(t).to(work), model.schedule.sigma(t).to(work)
    return noisy(x0.to(work), noise.to(work), a, s).to(model.device, model.dtype)


def fd_pair(model: EpsModel, x0: torch.Tensor, noise: torch.Tensor, pts: FDPoints, idx: torch.Tensor) -> torch.Tensor:
    """ε of items ``idx`` (grid-major) at t_a, then at t_b: (2m, …) in the model's dtype."""
    n = x0.shape[0]
    j, i = idx // n, idx % n
    t_x, t_a, t_b = (torch.as_tensor(v, dtype=torch.float64)[j] for v in (pts.t, pts.t_a, pts.t_b))
    x = noisy_inputs(model, x0[i], noise[i], t_x)
    with torch.inference_mode():
        if pts.conditions:  # feed the conditions themselves; convert with α, σ at the true t
            tx2 = torch.cat([t_x, t_x]).to(model.device)
            eps = model.at_condition(torch.cat([x, x]), torch.cat([t_a, t_b]), tx2, torch.cat([i, i]))
        else:
            eps = model(torch.cat([x, x]), torch.cat([t_a, t_b]), torch.cat([i, i]))
    return eps


def fd_noise(
    model: EpsModel, x0: torch.Tensor, noise: torch.Tensor, pts: FDPoints, items: int = 16
) -> dict[str, float | str | int]:
    """The factor c of the rounding-noise estimate c·u·(‖ε_a‖ + ‖ε_b‖) of an FD difference (u: unit roundoff).

    c is ‖ε − ε₆₄‖/(u‖ε₆₄‖) for ``items`` pairs spread over the grid, max over both points: ε₆₄ from the
    same network with its tensors cast to float64 in place (exact; restored afterwards) on the same
    inputs. Without a module, in float64 or where the cast fails: the documented constant NOISE_C.
    """
    u = unit_roundoff(model.dtype)
    const: dict[str, float | str | int] = {"method": "constant", "c": NOISE_C, "u": u, "limit": NOISE_LIMIT}
    if model.module is None or model.dtype == torch.float64:
        return const
    total = x0.shape[0] * len(pts.t)
    idx = torch.linspace(0, total - 1, min(items, total)).round().long().unique()
    eps = fd_pair(model, x0, noise, pts, idx)
    tensors = [t for t in [*model.module.parameters(), *model.module.buffers()] if t.is_floating_point()]
    dtypes = [t.dtype for t in tensors]
    try:
        for t in tensors:
            t.data = t.data.double()
        ref = fd_pair(dataclasses.replace(model, dtype=torch.float64), x0, noise, pts, idx)
    except (RuntimeError, TypeError, InputError) as e:  # e.g. no float64 on the device, or a net hard-coding float32
        log.info("rounding factor not measured (%s): using c = %g", str(e).splitlines()[0][:120], NOISE_C)
        return const
    finally:
        for t, d in zip(tensors, dtypes, strict=True):
            t.data = t.data.to(d)
    err = torch.linalg.vector_norm((eps.double() - ref).reshape(len(ref), -1), dim=1)
    c = float((err / (u * torch.linalg.vector_norm(ref.reshape(len(ref), -1), dim=1).clamp_min(1e-300))).max())
    return {"method": "measured", "c": c, "u": u, "limit": NOISE_LIMIT, "items": int(idx.numel())}
