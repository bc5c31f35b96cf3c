"""A batched adaptive Runge–Kutta solver in float64: Dormand–Prince 5(4) with one step size per row.

Every row of y (B, D) is its own initial-value problem dy/dt = f(t, y) from t0 (per row) to ``t_end``; each row
keeps its own time, step size and error control (Hairer, Nørsett & Wanner, *Solving ODEs I*, II.4 and II.5: the
error of a row is the RMS over its D components of err / (atol + rtol·max(|y|, |y_new|)), a step is accepted at
≤ 1, the next step is h·min(5, max(0.2, 0.9·err^(−1/5)))), so one row's difficulty never loosens another's
tolerance. ``f`` is called once per stage on the rows still running, with their own times: a field that takes
per-row times (every closed form of :mod:`lipscope.mixtures`) needs no loop. FSAL: six field calls per step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

Field = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (t (B,), y (B, D)) → dy/dt (B, D)

# Dormand & Prince (1980), RK5(4)7M: nodes, stage matrix, 5th-order weights, and 5th − 4th order weights
C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
A = (
    (),
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
    (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),
)
B5 = A[6] + (0.0,)
B4 = (5179 / 57600, 0.0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40)
E = tuple(b5 - b4 for b5, b4 in zip(B5, B4, strict=True))


@dataclass(frozen=True)
class SolveStats:
    """Per-row accepted and rejected steps, and field evaluations (rows count one each)."""

    steps: torch.Tensor
    rejected: torch.Tensor
    nfev: torch.Tensor

    def describe(self) -> dict[str, float]:
        return {"steps_max": int(self.steps.max()), "steps_mean": float(self.steps.double().mean()),
                "rejected_total": int(self.rejected.sum()), "nfev_max": int(self.nfev.max())}  # fmt: skip


def _rms(v: torch.Tensor) -> torch.Tensor:
    return v.pow(2).mean(dim=1).sqrt()


def _initial_step(f: Field, t: torch.Tensor, y: torch.Tensor, f0: torch.Tensor, span: torch.Tensor, rtol, atol):
    """Hairer's starting step (II.4): h0 = 0.01‖y‖/‖f‖, one Euler step, then (0.01/max(‖f‖, ‖Δf‖/h0))^(1/5)."""
    scale = atol + rtol * y.abs()
    d0, d1 = _rms(y / scale), _rms(f0 / scale)
    h0 = torch.where((d0 < 1e-5) | (d1 < 1e-5), torch.full_like(d0, 1e-6), 0.01 * d0 / d1)
    h0 = torch.minimum(h0, span.abs())
    f1 = f(t + span.sign() * h0, y + (span.sign() * h0)[:, None] * f0)
    d2 = _rms((f1 - f0) / scale) / h0
    dmax = torch.maximum(d1, d2)
    h1 = torch.where(dmax <= 1e-15, torch.maximum(torch.full_like(h0, 1e-6), h0 * 1e-3), (0.01 / dmax) ** 0.2)
    return torch.minimum(torch.minimum(100 * h0, h1), span.abs())


def solve(
    f: Field,
    y0: torch.Tensor,
    t0: torch.Tensor | float,
    t_end: float,
    *,
    rtol: float = 1e-9,
    atol: float = 1e-12,
    max_steps: int = 100_000,
) -> tuple[torch.Tensor, SolveStats]:
    """y(t_end) for every row of y0 (B, D), float64, from its t0 (scalar or (B,)); forward or backward in t."""
    y = y0.to(torch.float64).clone()
    b = y.shape[0]
    t = torch.as_tensor(t0, dtype=torch.float64).expand(b).clone()
    end = torch.full((b,), float(t_end), dtype=torch.float64)
    steps, rejected = torch.zeros(b, dtype=torch.long), torch.zeros(b, dtype=torch.long)
    nfev = torch.zeros(b, dtype=torch.long)
    done = t == end
    if done.all():
        return y, SolveStats(steps, rejected, nfev)
    k1 = torch.zeros_like(y)
    k1[~done] = f(t[~done], y[~done])
    h = torch.zeros(b, dtype=torch.float64)
    h[~done] = _initial_step(f, t[~done], y[~done], k1[~done], end[~done] - t[~done], rtol, atol)
    nfev += (~done).long() * 2
    while not done.all():
        i = (~done).nonzero().squeeze(1)
        ti, yi, k = t[i], y[i], [k1[i]]
        span = end[i] - ti
        last = h[i] >= span.abs()
        hs = torch.where(last, span, span.sign() * h[i])  # signed step, the last one lands on t_end exactly
        for j in range(1, 7):  # the last stage is the new point itself (A[6] = 5th-order weights: FSAL)
            yj = yi + hs[:, None] * sum(a * kk for a, kk in zip(A[j], k, strict=False) if a != 0.0)
            k.append(f(ti + C[j] * hs, yj))
        y5 = yj
        nfev[i] += 6
        err = hs[:, None] * sum(e * kk for e, kk in zip(E, k, strict=True) if e != 0.0)
        scale = atol + rtol * torch.maximum(yi.abs(), y5.abs())
        en = _rms(err / scale)
        ok = en <= 1.0
        fac = torch.where(en == 0, torch.full_like(en, 5.0), (0.9 * en.clamp(min=1e-300) ** -0.2).clamp(0.2, 5.0))
        fac = torch.where(ok, fac, fac.clamp(max=1.0))
        acc = i[ok]
        t[acc] = torch.where(last[ok], end[acc], ti[ok] + hs[ok])
        y[acc], k1[acc] = y5[ok], k[6][ok]
        steps[acc] += 1
        rejected[i[~ok]] += 1
        h[i] = hs.abs() * fac
        done = t == end
        if int(steps.max()) + int(rejected.max()) > max_steps:
            raise RuntimeError(f"ODE solve took over {max_steps} steps on some rows (stiff field or tolerance too low)")
    return y, SolveStats(steps, rejected, nfev)
