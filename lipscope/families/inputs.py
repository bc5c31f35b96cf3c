"""Which of a recorded denoiser call's inputs is the noisy latent, which the timestep (and how it is fed from the model
step), and which are per-row conditioning — identified from the values a pipeline passed (:mod:`.capture`), never
from the class. Each finding is checked on the recording; what cannot be identified raises :class:`Unidentified`.

The latent is the input equal to the sample the pipeline hands ``scheduler.step`` (tiled m times along the batch for
a batched CFG call, or one list element per row); the timestep is the input constant within a step and affine in the
model step k across steps (fitted, then snapped to the rational coefficients the pipeline's arithmetic rounds).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import torch

from .capture import Call, Path, get_at, walk

MAX_DENOMINATOR = 10_000  # the fed timestep's coefficients are ratios of small integers (1/1000, timestep_scale …)


class Unidentified(Exception):  # noqa: N818 - turned into one InputError line by the generic adapter
    """What the capture could not identify, in words."""


def unit_roundoff(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).eps) / 2


@dataclass(frozen=True)
class Latent:
    """Where the noisy latent sits: ``form`` "tensor" (rows first, ``blocks`` copies of the sample along the batch)
    or "list" (one element per row); ``row`` is one row's shape as the denoiser takes it."""

    path: Path
    form: str
    row: tuple[int, ...]
    blocks: int


@dataclass(frozen=True)
class TimeInput:
    """The timestep input: fed = (a + b·k)/(1 + c·k) for model step k (c = 0: affine, the usual case; c ≠ 0 where
    a pipeline feeds the unshifted time while its noise level is shifted, e.g. CogView4); ``shape`` is its
    captured shape (rows first, or () for one value for the whole batch)."""

    path: Path
    shape: tuple[int, ...]
    a: Fraction
    b: Fraction
    c: Fraction
    residual: float  # relative residual of the fit over the recorded steps
    captured_dtype: str

    def fed(self, k: torch.Tensor) -> torch.Tensor:
        """The fed timestep in k's dtype; b = p/q is applied as k·p/q (the pipelines write t / 1000)."""
        p, q = self.b.numerator, self.b.denominator
        if q > MAX_DENOMINATOR:  # not snapped: the fitted value itself
            out = k * float(self.b)
        else:
            out = k * p if p != 1 else k
            out = out / q if q != 1 else out
        if self.a:
            out = out + float(self.a)
        return out / (1 + float(self.c) * k) if self.c else out

    def describe(self) -> str:
        num = f"{self.a} + ({self.b})·k" if self.a else f"({self.b})·k"
        return f"({num}) / (1 + {float(self.c):.6g}·k)" if self.c else num


def _numbers(x: Any) -> torch.Tensor | None:
    if isinstance(x, torch.Tensor) and x.numel() and (x.is_floating_point() or not x.dtype.is_complex):
        return x.detach().to(torch.float64).reshape(-1)
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return torch.tensor([float(x)], dtype=torch.float64)
    return None


def find_latent(call: Call, sample: torch.Tensor) -> Latent:
    """The input equal to ``sample`` (P rows): a tensor of m·P rows whose m blocks each equal it, or a list of m·P
    tensors, one row each."""
    p, row_numel = sample.shape[0], sample[0].numel()
    found = []
    for path, node in walk({"args": call.args, "kwargs": call.kwargs}):
        if isinstance(node, torch.Tensor) and node.is_floating_point() and node.shape[0:1] and node.numel():
            rows = node.shape[0]
            if rows % p == 0 and node[0].numel() == row_numel:
                blocks = node.reshape(rows // p, p, -1)
                if all(torch.equal(b, sample.reshape(p, -1).to(node.dtype)) for b in blocks):
                    found.append(Latent(path, "tensor", tuple(node.shape[1:]), rows // p))
        elif isinstance(node, list) and node and len(node) % p == 0:
            if all(isinstance(e, torch.Tensor) and e.numel() == row_numel for e in node):
                s = sample.reshape(p, -1)
                if all(torch.equal(e.reshape(-1), s[i % p].to(e.dtype)) for i, e in enumerate(node)):
                    found.append(Latent(path, "list", tuple(node[0].shape), len(node) // p))
    if not found:
        raise Unidentified(
            "no denoiser input equals the sample the pipeline hands scheduler.step (the noisy latent; a scaled "
            "scale_model_input or latents concatenated with other inputs are not supported)"
        )
    return found[0]


def snap(v: float, tol: float) -> Fraction:
    """The fraction with the smallest denominator (≤ MAX_DENOMINATOR) within ``tol`` of v, else v itself."""
    for q in range(1, MAX_DENOMINATOR + 1):
        p = round(v * q)
        if abs(p / q - v) <= tol:
            return Fraction(p, q)
    return Fraction(v)


def find_timestep(calls: list[Call], ks: list[float], latent: Path, dtype: torch.dtype) -> TimeInput:
    """The input constant within each step and affine in the model step k across the steps (``calls``: the same
    call of every step; ``ks``: the model step of each)."""
    roots = [{"args": c.args, "kwargs": c.kwargs} for c in calls]
    k = torch.tensor(ks, dtype=torch.float64)
    hits = []
    for path, node in walk(roots[0]):
        if path[: len(latent)] == latent or path == latent:
            continue
        vals = []
        for r in roots:
            try:
                n = _numbers(get_at(r, path))
            except (KeyError, IndexError, TypeError):
                n = None
            if n is None or not torch.all(n == n[0]):
                break
            vals.append(float(n[0]))
        if len(vals) != len(roots) or len(set(vals)) < 2:
            continue
        # diffusers keeps timesteps and sigmas in float32 tables: the fed value and σ·T carry that rounding at least
        ndt = node.dtype if isinstance(node, torch.Tensor) and node.is_floating_point() else dtype
        u = max(unit_roundoff(ndt), unit_roundoff(torch.float32))
        tol = 64 * u * max(max(abs(v) for v in vals), 1.0)
        fit = _fit_time(k, torch.tensor(vals, dtype=torch.float64), tol)
        if fit is None:
            continue
        shape = tuple(node.shape) if isinstance(node, torch.Tensor) else ()
        dt = str(node.dtype).removeprefix("torch.") if isinstance(node, torch.Tensor) else type(node).__name__
        hits.append(TimeInput(path, shape, *fit, dt))
    if not hits:
        raise Unidentified("no denoiser input is constant within a step and affine in the scheduler's timestep")
    if len(hits) > 1:
        names = ", ".join(_name(h.path) for h in hits)
        raise Unidentified(f"several denoiser inputs follow the timestep ({names}); cannot tell which is the time")
    return hits[0]


def _fit_time(k: torch.Tensor, v: torch.Tensor, tol: float) -> tuple[Fraction, Fraction, Fraction, float] | None:
    """(a, b, c, relative residual) of v = (a + b k)/(1 + c k) within ``tol``: affine (c = 0) if that fits, else
    the linear-fractional map (needs 4 points: 3 unknowns and a check); None if neither fits."""
    scale = float(v.abs().max())
    ones = torch.ones_like(k)
    coef = torch.linalg.lstsq(torch.stack([ones, k], 1), v[:, None]).solution[:, 0]
    res = float((coef[0] + coef[1] * k - v).abs().max())
    if res <= tol and float(coef[1]) != 0:
        kmax = max(float(k.abs().max()), 1.0)
        a, b = snap(float(coef[0]), tol), snap(float(coef[1]), tol / kmax)
        if float((float(a) + float(b) * k - v).abs().max()) > 2 * tol:  # snapping must not spoil the fit
            a, b = Fraction(float(coef[0])), Fraction(float(coef[1]))
        return a, b, Fraction(0), res / max(scale, 1e-30)
    if k.numel() < 4:
        return None
    m = torch.linalg.lstsq(torch.stack([ones, k, -k * v], 1), v[:, None]).solution[:, 0]
    fit = (m[0] + m[1] * k) / (1 + m[2] * k)
    res = float((fit - v).abs().max())
    if res > tol or float(m[1]) == 0:
        return None
    a = snap(float(m[0]), tol)
    return a, Fraction(float(m[1])), Fraction(float(m[2])), res / max(scale, 1e-30)


def _name(path: Path) -> str:
    head = f"argument {path[1]}" if path[0] == "args" else str(path[1])
    return head + "".join(f"[{p!r}]" for p in path[2:])


def check_constant_across_steps(calls: list[Call], skip: tuple[Path, ...]) -> None:
    """Every input other than the latent and the timestep is the same at every step (conditioning is reused)."""
    roots = [{"args": c.args, "kwargs": c.kwargs} for c in calls]
    for path, node in walk(roots[0]):
        if any(path[: len(s)] == s for s in skip) or isinstance(node, (dict, list, tuple)):
            continue
        for r in roots[1:]:
            try:
                other = get_at(r, path)
            except (KeyError, IndexError, TypeError):
                raise Unidentified(f"the denoiser's input {_name(path)} is not passed at every step") from None
            same = (
                torch.equal(node, other)
                if isinstance(node, torch.Tensor) and isinstance(other, torch.Tensor)
                else node is other or node == other
            )
            if not same:
                raise Unidentified(f"the denoiser's input {_name(path)} changes between steps (not conditioning)")


def batch_candidates(root: dict[str, Any], rows: int, skip: tuple[Path, ...]) -> list[dict[Path, Any]]:
    """Every way of reading the inputs' per-row parts, most likely first: for a list of ``rows`` items, its items are
    rows ("rows") or it is descended; for a tensor with a dimension of size ``rows``, that dimension (dim 0 first) or
    none (a constant)."""
    lists = [p for p, n in walk(root) if isinstance(n, (list, tuple)) and len(n) == rows and p[:1] != () and len(p) > 1]
    lists = [p for p in lists if not any(p[: len(s)] == s for s in skip)]
    out: list[dict[Path, Any]] = []
    for choice in itertools.product(*[(("rows", "descend") if isinstance(get_at(root, p), list)
                                       else ("descend", "rows")) for p in lists]):  # fmt: skip
        as_rows = tuple(p for p, c in zip(lists, choice, strict=True) if c == "rows")
        tensors = []
        for path, node in walk(root):
            if any(path[: len(s)] == s for s in skip + as_rows) or not isinstance(node, torch.Tensor):
                continue
            dims: list[int | None] = [d for d in range(node.ndim) if node.shape[d] == rows]
            if dims:
                tensors.append((path, [*dims, None]))
        for picked in itertools.product(*[opts for _, opts in tensors]):
            cand: dict[Path, Any] = {p: "rows" for p in as_rows}
            cand.update({p: d for (p, _), d in zip(tensors, picked, strict=True) if d is not None})
            out.append(cand)
            if len(out) >= 64:
                return out
    return out


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ in float64 (0 when both vanish)."""
    a64, b64 = a.detach().to(torch.float64).reshape(-1), b.detach().to(torch.float64).reshape(-1)
    den = float(torch.linalg.vector_norm(b64))
    num = float(torch.linalg.vector_norm(a64 - b64))
    return 0.0 if num == 0 else (num / den if den > 0 else math.inf)
