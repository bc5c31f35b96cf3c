"""Recording a pipeline's own ``__call__``: every denoiser call (its inputs exactly as passed, its output), every
scheduler ``step`` (model output, timestep, sample, result), the scheduler's ``set_timesteps`` arguments and the
autoencoder's ``decode`` input. The raw material :mod:`lipscope.families.generic` identifies the denoiser's inputs
from; nothing here interprets what it records.

Hooks are torch's forward (pre-)hooks with keyword arguments on the denoiser and instance-level wrappers
(``functools.wraps``, so ``inspect.signature`` still sees the scheduler's own parameters) on ``scheduler.step``,
``scheduler.set_timesteps`` and ``vae.decode``; all are removed when the call returns or raises.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch


class StopAtDecode(Exception):  # noqa: N818 - a control-flow signal, not an error
    """Raised inside ``vae.decode`` to end a recording run once the decode input is known."""


def clone_tree(obj: Any) -> Any:
    """A copy of a nested structure of tensors (tuples, lists, dicts kept; tensors detached and cloned)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # a namedtuple
        return type(obj)(*(clone_tree(v) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(clone_tree(v) for v in obj)
    if isinstance(obj, dict):
        items = {k: clone_tree(v) for k, v in obj.items()}
        return items if type(obj) is dict else type(obj)(**items)  # diffusers' output dataclasses are dicts too
    return obj


def first_output(out: Any) -> Any:
    """The prediction in a denoiser's return value: ``out[0]`` of a tuple, ``.sample`` of an output object."""
    if isinstance(out, tuple):
        return out[0]
    if hasattr(out, "sample"):
        return out.sample
    if isinstance(out, dict) and "sample" in out:
        return out["sample"]
    return out


Path = tuple[Any, ...]  # a place in a call: ("args", i, …) or ("kwargs", name, …), then indices or keys


def call_root(args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    return {"args": tuple(args), "kwargs": dict(kwargs)}


def get_at(root: Any, path: Path) -> Any:
    for key in path:
        root = root[key]
    return root


def put_at(root: Any, path: Path, value: Any) -> Any:
    """A copy of ``root`` with ``value`` at ``path`` (containers on the path copied, everything else shared)."""
    if not path:
        return value
    key, rest = path[0], path[1:]
    if isinstance(root, dict):
        return {**root, key: put_at(root[key], rest, value)}
    items = list(root)
    items[key] = put_at(items[key], rest, value)
    return type(root)(*items) if hasattr(root, "_fields") else type(root)(items)


def walk(root: Any, path: Path = ()):
    """(path, node) of every node, containers before their items (dicts, lists and tuples are descended)."""
    yield path, root
    if isinstance(root, dict):
        for k, v in root.items():
            yield from walk(v, (*path, k))
    elif isinstance(root, (list, tuple)):
        for i, v in enumerate(root):
            yield from walk(v, (*path, i))


def map_tensors(root: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    if isinstance(root, torch.Tensor):
        return fn(root)
    if isinstance(root, dict):
        return {k: map_tensors(v, fn) for k, v in root.items()}
    if isinstance(root, tuple) and hasattr(root, "_fields"):
        return type(root)(*(map_tensors(v, fn) for v in root))
    if isinstance(root, (list, tuple)):
        return type(root)(map_tensors(v, fn) for v in root)
    return root


@dataclass
class Call:
    """One denoiser call: the step it belongs to, its inputs as passed and its prediction."""

    step: int
    args: tuple
    kwargs: dict[str, Any]
    output: Any = None
    returned: Any = None  # the whole return value (tuple or output object), for stubbed re-runs


@dataclass
class Step:
    """One ``scheduler.step`` call: what it was given and what it returned."""

    index: int
    model_output: torch.Tensor
    timestep: Any
    sample: torch.Tensor
    kwargs: dict[str, Any]
    prev_sample: torch.Tensor | None = None
    sigma: float | None = None  # the scheduler's own sigma at this step, where it keeps one (flow matching)


@dataclass
class Recording:
    """Everything one pipeline call did with its denoiser, scheduler and autoencoder."""

    calls: list[Call] = field(default_factory=list)
    steps: list[Step] = field(default_factory=list)
    set_timesteps: tuple[tuple, dict[str, Any]] | None = None
    decode: tuple[tuple, dict[str, Any]] | None = None

    def calls_of(self, step: int) -> list[Call]:
        return [c for c in self.calls if c.step == step]


def _wrap(obj: Any, name: str, make: Callable[[Callable], Callable]) -> Callable[[], None]:
    """Shadow ``obj.name`` with ``make(original)`` on the instance; returns the undo."""
    orig = getattr(obj, name)
    had = name in vars(obj)
    setattr(obj, name, functools.wraps(orig)(make(orig)))

    def undo() -> None:
        if had:
            setattr(obj, name, orig)
        else:
            delattr(obj, name)

    return undo


def record(
    pipe: Any,
    denoiser: torch.nn.Module,
    call_kwargs: dict[str, Any],
    *,
    final: torch.Tensor | None = None,
    stop_at_decode: bool = False,
    stub: list[Any] | None = None,
) -> Recording:
    """Run ``pipe(**call_kwargs)`` and record it. ``final``: replaces the last step's ``prev_sample`` (what the
    pipeline then hands towards its autoencoder); ``stop_at_decode``: end the run inside ``vae.decode``; ``stub``:
    return values the denoiser returns in turn instead of computing (runs that only follow the latents' path)."""
    rec = Recording()
    undo: list[Callable[[], None]] = []
    if stub:
        turn = iter(range(10**9))
        undo.append(_wrap(denoiser, "forward", lambda orig: lambda *a, **k: stub[next(turn) % len(stub)]))

    def pre(_module, args, kwargs):
        rec.calls.append(Call(len(rec.steps), clone_tree(args), clone_tree(kwargs)))

    def post(_module, _args, _kwargs, out):
        rec.calls[-1].output = clone_tree(first_output(out))
        rec.calls[-1].returned = clone_tree(out)

    def make_step(orig):
        def step(model_output, timestep, sample, *args, **kwargs):
            i = len(rec.steps)
            entry = Step(i, clone_tree(model_output), clone_tree(timestep), clone_tree(sample), clone_tree(kwargs))
            rec.steps.append(entry)
            out = orig(model_output, timestep, sample, *args, **kwargs)
            prev = out[0] if isinstance(out, tuple) else out.prev_sample
            entry.prev_sample = prev.detach().clone()
            idx, sigmas = getattr(pipe.scheduler, "step_index", None), getattr(pipe.scheduler, "sigmas", None)
            if isinstance(idx, int) and idx > 0 and isinstance(sigmas, torch.Tensor):
                entry.sigma = float(sigmas[idx - 1])
            last = len(rec.steps) == call_kwargs.get("num_inference_steps", -1)
            if final is not None and last:
                new = final.to(device=prev.device, dtype=prev.dtype).reshape(prev.shape)
                if isinstance(out, tuple):
                    return (new, *out[1:])
                out.prev_sample = new
            return out

        return step

    def make_set_timesteps(orig):
        def set_timesteps(*args, **kwargs):
            if rec.set_timesteps is None:
                rec.set_timesteps = (clone_tree(args), clone_tree(kwargs))
            return orig(*args, **kwargs)

        return set_timesteps

    def make_decode(orig):
        def decode(*args, **kwargs):
            if rec.decode is None:
                rec.decode = (clone_tree(args), clone_tree(kwargs))
            if stop_at_decode:
                raise StopAtDecode
            return orig(*args, **kwargs)

        return decode

    handles = [
        denoiser.register_forward_pre_hook(pre, with_kwargs=True),
        denoiser.register_forward_hook(post, with_kwargs=True),
    ]
    try:
        undo.append(_wrap(pipe.scheduler, "step", make_step))
        undo.append(_wrap(pipe.scheduler, "set_timesteps", make_set_timesteps))
        vae = getattr(pipe, "vae", None)
        if vae is not None and hasattr(vae, "decode"):
            undo.append(_wrap(vae, "decode", make_decode))
        try:
            pipe(**call_kwargs)
        except StopAtDecode:
            pass
    finally:
        for h in handles:
            h.remove()
        for u in reversed(undo):
            u()
    return rec
