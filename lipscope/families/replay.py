"""Replaying a recorded denoiser call for any rows: the latent and the timestep replaced, the per-row conditioning
of each row's condition picked (a view where one condition serves every row), the outputs of the step's calls
combined as the pipeline combined them before ``scheduler.step`` (CFG, a sign, learned variance dropped).

A :class:`Template` is one denoiser call of a step; a :class:`Combination` says how the calls' outputs become the
step's model output; a :class:`CapturedCall` is both, what :mod:`lipscope.families.generic` probes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .capture import Path, first_output, get_at, map_tensors, put_at
from .inputs import Latent, TimeInput


@dataclass(frozen=True)
class Template:
    """One recorded denoiser call: its inputs (``root``: args and kwargs, rows first), the per-row parts
    (``batched``: path → batch dim of a tensor, or "rows" for a list with one item per row), the latent and the
    timestep. It was called with ``blocks``·P rows: P conditions, ``blocks`` times (a batched CFG call)."""

    root: dict[str, Any]
    batched: dict[Path, Any]
    latent: Latent
    time: TimeInput
    conditions: int  # P
    dtype: torch.dtype = torch.float32  # the latent's dtype in the recorded call: the pipeline's compute dtype

    @property
    def blocks(self) -> int:
        return self.latent.blocks

    def inputs(self, x: torch.Tensor, k: torch.Tensor, q: torch.Tensor, dtype: torch.dtype) -> dict[str, Any]:
        """The call's inputs for rows x (b, …) at model steps k (b,) with conditions q (b,) (each in [0, P)), for a
        denoiser computing in ``dtype``: inputs recorded in the pipeline's compute dtype follow it, those it passed
        in another dtype (float32 tables of a bfloat16 model) keep theirs."""
        b, m, p = x.shape[0], self.blocks, self.conditions
        sel = torch.cat([q.to(torch.long).cpu() + j * p for j in range(m)])
        same = p == 1 and m == 1  # one condition for every row: a broadcast view, nothing copied

        def rows(v: Any, dim: Any) -> Any:
            if dim == "rows":
                return type(v)(v[int(i)] for i in sel)
            if same:
                return v.expand(*v.shape[:dim], b, *v.shape[dim + 1 :])
            return v.index_select(dim, sel.to(v.device))

        root = self.root
        for path, dim in self.batched.items():
            root = put_at(root, path, rows(get_at(root, path), dim))
        lat = x.reshape(b, *self.latent.row)
        if self.latent.form == "list":
            value: Any = [lat[i] for i in range(b)] * m
        else:
            value = lat.repeat(m, *([1] * (lat.ndim - 1))) if m > 1 else lat
        root = map_tensors(root, lambda v: v.to(x.device, dtype) if v.dtype == self.dtype else v.to(x.device))
        root = put_at(
            root, self.latent.path, [v.to(dtype) for v in value] if isinstance(value, list) else value.to(dtype)
        )
        tdt = dtype if self.time.captured_dtype in ("int64", "int32", "int", str(self.dtype).removeprefix("torch.")) \
            else getattr(torch, self.time.captured_dtype)  # fmt: skip
        fed = self.time.fed(k.to(x.device, torch.float64 if tdt == torch.float64 else k.dtype)).to(tdt)
        tail = self.time.shape[1:]
        t = fed.reshape(b, *([1] * len(tail))).expand(b, *tail) if tail else fed
        return put_at(root, self.time.path, t.repeat(m, *([1] * len(tail))) if m > 1 else t)

    def call(self, denoiser: Any, x: torch.Tensor, k: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """The denoiser's prediction for these rows: (blocks·b, *raw row)."""
        root = self.inputs(x, k, q, compute_dtype(denoiser))
        return as_rows(first_output(denoiser(*root["args"], **root["kwargs"])))


def compute_dtype(denoiser: Any) -> torch.dtype:
    """The dtype a denoiser computes in (diffusers' ``dtype`` skips parameters it keeps in float32)."""
    dt = getattr(denoiser, "dtype", None)
    return dt if isinstance(dt, torch.dtype) else next(denoiser.parameters()).dtype


def as_rows(out: Any) -> torch.Tensor:
    """A prediction as one tensor, rows first (a list of per-row tensors stacked)."""
    if isinstance(out, (list, tuple)):
        return torch.stack([o for o in out])
    return out


def to_sample(raw: torch.Tensor, sample_row: tuple[int, ...]) -> torch.Tensor:
    """Rows of a prediction in the sample's layout: reshaped where it holds as many numbers, else its leading part
    (learned variance channels, extra tokens of an image condition)."""
    b, row = raw.shape[0], tuple(raw.shape[1:])
    n = 1
    for s in sample_row:
        n *= s
    if raw[0].numel() == n:
        return raw.reshape(b, *sample_row)
    if len(row) == len(sample_row) and all(r >= s for r, s in zip(row, sample_row, strict=True)):
        return raw[_leading(sample_row)]
    raise ValueError(f"prediction rows {row} do not hold the sample's {sample_row}")


@dataclass(frozen=True)
class Combination:
    """The step's model output from the calls' outputs: Σ weight·part over (call, block) parts, then, for a
    normalised CFG (Qwen-Image, Lumina 2), rescaled along the last dimension to the norm of part ``keep``, and
    multiplied by ``sign``."""

    weights: tuple[tuple[float, ...], ...]  # [call][block]
    keep: tuple[int, int] | None = None
    sign: float = 1.0
    residual: float = 0.0  # relative residual of the combination on the recording

    def used(self) -> list[int]:
        return [i for i, w in enumerate(self.weights) if any(v != 0 for v in w)]

    def apply(self, parts: list[list[torch.Tensor]]) -> torch.Tensor:
        """``parts[call][block]``: rows in the prediction's layout (sliced to the sample's size)."""
        out = None
        for i in self.used():
            for j, w in enumerate(self.weights[i]):
                if w:
                    term = parts[i][j] if w == 1 else w * parts[i][j]
                    out = term if out is None else out + term
        assert out is not None
        if self.keep is not None:
            ref = parts[self.keep[0]][self.keep[1]]
            norm = torch.linalg.vector_norm
            out = out * (norm(ref, dim=-1, keepdim=True) / norm(out, dim=-1, keepdim=True))
        return out if self.sign == 1 else self.sign * out

    def describe(self) -> str:
        terms = " + ".join(
            f"{w:g}·R{i}[{j}]" for i, ws in enumerate(self.weights) for j, w in enumerate(ws) if w
        )  # fmt: skip
        norm = f", rescaled to ‖R{self.keep[0]}[{self.keep[1]}]‖ along the last dim" if self.keep else ""
        return f"{'−' if self.sign < 0 else ''}({terms}){norm}"


def slice_like(raw: torch.Tensor, sample_row: tuple[int, ...]) -> torch.Tensor:
    """The leading part of prediction rows that the sample's numbers occupy, kept in the prediction's layout."""
    if raw[0].numel() == _numel(sample_row):
        return raw
    return raw[_leading(sample_row)]


def _leading(sample_row: tuple[int, ...]) -> tuple[slice, ...]:
    """The index of every row's leading part of the sample's size."""
    return (slice(None),) + tuple(slice(0, s) for s in sample_row)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


@dataclass(frozen=True)
class CapturedCall:
    """A pipeline's denoising step as recorded: its denoiser calls (``templates``) and how their outputs combine
    (``combination``) into the model output the scheduler integrates, in the sample space ``sample_row``."""

    denoiser: Any
    templates: tuple[Template, ...]
    combination: Combination
    sample_row: tuple[int, ...]

    @property
    def conditions(self) -> int:
        return self.templates[0].conditions

    def __call__(self, x: torch.Tensor, k: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """The step's model output (b, *sample_row) for rows x at model steps k, conditions q."""
        b = x.shape[0]
        parts: list[list[torch.Tensor]] = []
        for i, tpl in enumerate(self.templates):
            if i not in self.combination.used():
                parts.append([])
                continue
            raw = slice_like(tpl.call(self.denoiser, x, k, q), self.sample_row)
            parts.append([raw[j * b : (j + 1) * b] for j in range(tpl.blocks)])
        return to_sample(self.combination.apply(parts), self.sample_row)
