"""The frozen EpsModel adapter: the one place a network is called.

An :class:`EpsModel` is a callable ``eps(x, t)`` with ``t`` a float tensor of shape (B,) in model
steps (fractional allowed), returning ε whatever the network predicts (ε, v or x0; the conversion is
:mod:`lipscope.targets`, at the true t and differentiable in t). E-TSDM models carry
their map in one field, ``etsdm``. Specs (hub ids, folders, files, ``py:``, ``builtin:``) are turned
into EpsModels by :mod:`lipscope.loading`.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .conditioning import Conditioning, cat_kwargs, guided
from .devices import DTYPES as DTYPES  # re-exported
from .devices import resolve_device, resolve_dtype
from .errors import InputError, ModelOutputError, short_error
from .etsdm import Etsdm, axis_of, etsdm_of, unmapped
from .latents import LatentCodec
from .processes import check_etsdm_axis, process_from_config
from .schedules import DEFAULT_SCHEDULER_CONFIG, NoiseProcess, Schedule
from .targets import NATIVE_TARGET, TARGETS, from_epsilon, mean_half

if TYPE_CHECKING:
    from diffusers import UNet2DModel

log = logging.getLogger("lipscope")

SUPPORTED_CLASSES = ("UNet2DModel", "ETSDMUNet2DModel")
NetFn = Callable[..., torch.Tensor]  # net(x, c, **conditioning) → raw output


@dataclass(frozen=True)
class EpsModel:
    """A noise predictor ε(x, t) with its schedule: the object every estimator works on. Immutable.

    ``net(x, c)`` is the raw network (output in its own parameterisation, fed condition c); calling
    the EpsModel feeds c = f(t) (the E-TSDM map when ``etsdm`` is set, else t) and converts the output
    to ε with α, σ at the true ``t``.
    """

    net: NetFn
    schedule: NoiseProcess
    name: str = "model"
    sample_shape: tuple[int, ...] | None = None
    prediction_type: str = "epsilon"
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    config: dict[str, Any] = field(default_factory=dict)
    scheduler_config: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_SCHEDULER_CONFIG))
    module: nn.Module | None = None
    etsdm: Etsdm | None = None
    rounds_timesteps: bool = False  # the adapter casts t to whole steps (detect_rounding); FD needs whole steps
    target: str = "eps"  # what a call returns: ε (samplers and training need it), or x0, v, score, velocity
    # True: net(x, c) takes the model step c and x as it is (callables, closed forms); False: what the process
    # feeds a diffusers network (σ for VE, c_noise and c_in·x for EDM) and its output conversion (EDM's c_skip/c_out)
    fed_steps: bool = False
    # the data range this model was trained on, when it is known better than its process family's convention
    # ("auto"): None for closed forms on unbounded (Gaussian) data
    data_range: tuple[float, float] | None | str = "auto"
    latent: LatentCodec | None = None  # a latent pipeline's autoencoder: image data is encoded to x0 with it
    conditioning: Conditioning | None = None  # a conditional denoiser's inputs per sample, and CFG

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise InputError(f"`target` {self.target!r} not known; use one of {', '.join(TARGETS)}")
        space = getattr(self.conditioning, "space", None)  # a generic pipeline's captured call fixes its input space
        if space is not None:
            object.__setattr__(self, "sample_shape", space.sample_shape)
            object.__setattr__(self, "latent", space.codec)

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
        return self.etsdm.map(t) if self.etsdm is not None else t

    def __call__(self, x: torch.Tensor, t: torch.Tensor | float, rows: torch.Tensor | None = None) -> torch.Tensor:
        """ε(x, t) for x (B, …) and float t (B,) in model steps; ``rows``: which samples the rows of x are (their
        conditioning; default 0..B−1)."""
        x = x.to(device=self.device, dtype=self.dtype)
        tt = as_timesteps(t, x.shape[0], self.device, self.dtype)
        return self.at_condition(x, self.network_timesteps(tt), tt, rows)

    def at_condition(
        self, x: torch.Tensor, c: torch.Tensor, t: torch.Tensor, rows: torch.Tensor | None = None
    ) -> torch.Tensor:
        """ε (or ``target``) from the network fed condition c directly (no E-TSDM map), converted at true step t.

        The process decides what the network sees: c itself (VP, flow), σ(c) (VE) or ¼ ln σ(c) (EDM), and
        the input scaling (EDM's c_in at the true t). A conditional model is also fed the conditioning of
        samples ``rows``; with a guidance scale both branches go in one call and ε is the guided field."""
        x = x.to(device=self.device, dtype=self.dtype)
        p, c = self.schedule, as_timesteps(c, x.shape[0], self.device, self.dtype)
        x_in, c = (x, c) if self.fed_steps else (p.scale_input(x, t), p.condition(c))
        cond = self.conditioning
        if cond is None:
            return self._convert(self._net(x_in, c, {}), x, t, self.target)
        kw_c, kw_u = cond.rows(torch.arange(x.shape[0]) if rows is None else rows, self.device, self.dtype)
        if cond.guidance_scale is None or kw_u is None:
            return self._convert(self._net(x_in, c, kw_c), x, t, self.target)
        out = self._net(torch.cat([x_in, x_in]), torch.cat([c, c]), cat_kwargs(kw_c, kw_u))
        b = x.shape[0]
        # targets are affine in the output at fixed (x, t): no round trip through ε (none at a flow's σ = 1)
        return guided(self._convert(out[:b], x, t, self.target), self._convert(out[b:], x, t, self.target),
                      cond.guidance_scale)  # fmt: skip

    def _net(self, x: torch.Tensor, c: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
        try:
            out = self.net(x, c, **kwargs)
        except Exception as e:
            if isinstance(e, (IndexError, TypeError, RuntimeError)) and not kwargs:
                _refuse_if_float_t_failure(self, e, x, c)
            if not self.fed_steps or isinstance(e, (InputError, torch.OutOfMemoryError)) or "out of memory" in str(e):
                raise  # a diffusers network's own failure is an internal error; OOM is for the batch back-off
            fix = "use `method` fd" if "forward AD" in str(e) else "fix the network (or its `model_args`)"
            raise InputError(f"`model` {self.name}: the network raised {short_error(e)}; {fix}") from e
        check_output(out, x)
        return out

    def _convert(self, out: torch.Tensor, x: torch.Tensor, t: torch.Tensor, target: str) -> torch.Tensor:
        """The network output as ``target``, at true step t (the native output as it is where it is the target)."""
        p = self.schedule
        if NATIVE_TARGET.get(self.prediction_type) == target and (self.fed_steps or p.output_is_prediction):
            return mean_half(out, x)  # the network's own parameterisation: no round trip through ε (α = 0 in flow)
        convert = NoiseProcess.eps_from_output if self.fed_steps else type(p).eps_from_output
        eps = convert(p, out, x, t, self.prediction_type)
        return eps if target == "eps" else from_epsilon(eps, x, target, p.alpha(t), p.sigma(t))


def _refuse_if_float_t_failure(model: EpsModel, e: BaseException, x: torch.Tensor, c: torch.Tensor) -> None:
    """One line when ``model.net`` failed on float t but runs on the same t as integers (a table indexed by t)."""
    if isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower():
        return  # the batched runner backs off on OOM
    try:
        model.net(x, c.floor().long())
    except Exception:
        return  # fails on integer t too: not about float t, let the original error through
    raise InputError(
        f"`model` {model.name}: the network fails on float timesteps ({short_error(e)}); lipscope feeds float t "
        "(B,) in model steps — cast inside your adapter (t.round().long(), then use an integer `dt`), or make the "
        "time embedding take float t (sinusoidal, or interpolate between table rows)"
    ) from e


def _shape(shape: tuple[int, ...] | torch.Size, batch: int) -> str:
    dims = ["B" if i == 0 and d == batch else str(d) for i, d in enumerate(shape)]
    return f"({', '.join(dims)})"


def check_output(out: Any, x: torch.Tensor) -> None:
    """Refuse a network output that is not a float tensor of x's shape (or (B, 2C, …): learned variance).

    Cheap on purpose (type and shape only): it runs on every network call.
    """
    if not isinstance(out, torch.Tensor):
        raise ModelOutputError(
            f"the network returned {type(out).__name__}, not a tensor; `model` must return ε (or v/x0) "
            "as one tensor of the input's shape"
        )
    shape, want = tuple(out.shape), tuple(x.shape)
    learned_var = (
        len(shape) == len(want) >= 2 and shape[0] == want[0] and shape[1] == 2 * want[1] and shape[2:] == want[2:]
    )
    if shape != want and not learned_var:
        b = want[0] if want else -1
        raise ModelOutputError(
            f"the network returned shape {_shape(shape, b)} for input {_shape(want, b)}; it must return ε "
            "(or v/x0) of the input's shape (or twice its channels for learned variance); check `model`"
        )
    if not out.is_floating_point():
        raise ModelOutputError(
            f"the network returned a {str(out.dtype).removeprefix('torch.')} tensor; `model` must return "
            "floating-point ε (or v/x0)"
        )


def as_timesteps(t: torch.Tensor | float, batch: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
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


def check_fractional_dt(model: EpsModel, dt: float, *, scheme="forward", method="fd", timesteps: Any = None) -> None:
    """Refuse what a rounding adapter turns into K = 0 or double K: fractional dt/timesteps, odd central dt, JVP."""
    if not model.rounds_timesteps:
        return
    what, d = f"`model` {model.name} rounds t to whole steps", float(dt)
    if d != round(d):
        raise InputError(f"{what}: a fractional `dt` ({d:g}) gives K = 0 or double K; use an integer `dt`")
    if scheme == "central" and round(d) % 2:
        raise InputError(f"{what}: the central `scheme` evaluates t ± `dt`/2; use an even `dt` or `scheme` forward")
    if "jvp" in str(method).split(","):
        raise InputError(f"{what}: its derivative in t is 0, so `method` jvp gives K = 0; use `method` fd")
    ts = torch.as_tensor(timesteps if timesteps is not None else [], dtype=torch.float64).reshape(-1)
    if (frac := ts[ts != ts.round()]).numel():
        raise InputError(f"{what}: `timesteps` has fractional steps (e.g. {float(frac[0]):g}); use whole steps")


# ---------------------------------------------------------------------------------------------
# devices and dtypes
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# wrappers
# ---------------------------------------------------------------------------------------------


def from_unet(
    unet: UNet2DModel,
    scheduler_config: dict[str, Any] | None = None,
    name: str = "unet",
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = "float32",
) -> EpsModel:
    """Wrap a diffusers ``UNet2DModel`` (eval mode, moved to device/dtype) as an EpsModel."""
    cls = type(unet).__name__
    if cls not in SUPPORTED_CLASSES:
        raise InputError(
            f"model class {cls} is not supported yet (supported: {', '.join(SUPPORTED_CLASSES)}); "
            "wrap it as a callable eps(x, t) and pass it with `model` py:module:factory"
        )
    # an E-TSDM UNet applies the map in its forward; the EpsModel applies it once, from its etsdm field
    forward = unmapped(unet)

    def net(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return forward(x, c).sample

    return from_module(unet, net, scheduler_config, None, name, device, dtype)


def from_module(
    module: nn.Module, net: NetFn, scheduler_config: dict[str, Any] | None, sample_shape: tuple[int, ...] | None,
    name: str, device: str | torch.device = "cpu", dtype: str | torch.dtype = "float32",
) -> EpsModel:  # fmt: skip
    """An EpsModel around a diffusers denoiser ``module`` (eval, on device/dtype) called through ``net(x, c, **kw)``,
    with the process of ``scheduler_config`` (the DDPM default, with a warning, when None); ``sample_shape`` None:
    from the module's config. An E-TSDM denoiser's map becomes the EpsModel's ``etsdm`` (``net`` calls
    :func:`lipscope.etsdm.unmapped`, so the map is applied once)."""
    dev, dt = resolve_device(device), resolve_dtype(dtype)
    if scheduler_config is None:
        log.warning("no scheduler config found for %s: using the DDPM default (linear 1e-4..0.02, T=1000)", name)
        scheduler_config = dict(DEFAULT_SCHEDULER_CONFIG)
    schedule = process_from_config(scheduler_config)
    if etsdm_of(module) is not None:  # the denoiser's own map must be written on its process's axis
        check_etsdm_axis(axis_of(module), schedule, name)
    module = module.to(dev).eval()
    if next(module.parameters()).dtype != dt:
        module = module.to(dt)
    cfg = {**dict(getattr(module, "config", {})), "_class_name": type(module).__name__}
    if sample_shape is None:  # a diffusers denoiser's (in_channels, *sample_size): an int or a pair
        s = cfg["sample_size"]
        sample_shape = (int(cfg["in_channels"]), *((s, s) if isinstance(s, int) else s))
    return EpsModel(
        net=net,
        schedule=schedule,
        name=name,
        sample_shape=sample_shape,
        prediction_type=schedule.prediction_type,
        device=dev,
        dtype=dt,
        config={k: v for k, v in cfg.items() if not k.startswith("_") or k == "_class_name"},
        scheduler_config=dict(scheduler_config),
        module=module,
        etsdm=etsdm_of(module),
    )


def from_callable(
    fn: NetFn | nn.Module,
    schedule: NoiseProcess | None = None,
    *,
    sample_shape: tuple[int, ...] | None = None,
    name: str = "callable",
    prediction_type: str | None = None,
    scheduler_config: dict[str, Any] | None = None,
    config: dict[str, Any] | None = None,
    etsdm: Etsdm | None = None,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = "float32",
    data_range: tuple[float, float] | None | str = "auto",
) -> EpsModel:
    """Wrap any ``eps(x, t)`` (t: float tensor (B,) in model steps, x unscaled) as an EpsModel.

    The callable is fed model steps whatever the process (``fed_steps``) and returns ε, or
    ``prediction_type`` (default: a VP schedule's own, else epsilon), converted at the true t.

    ``etsdm``: the network is fed f(t) (E-TSDM) instead of t. Example — a researcher's own network::

        model = lipscope.from_callable(lambda x, t: my_net(x, t), sample_shape=(3, 32, 32))
        df = lipscope.probe(model, data="x0.npz")
    """
    dev, dt = resolve_device(device), resolve_dtype(dtype)
    if schedule is None:
        if scheduler_config is None:
            log.warning("%s: no schedule given, using the DDPM default (linear 1e-4..0.02, T=1000)", name)
            scheduler_config = dict(DEFAULT_SCHEDULER_CONFIG)
        schedule = process_from_config(scheduler_config)
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
        prediction_type=prediction_type or (schedule.prediction_type if isinstance(schedule, Schedule) else "epsilon"),
        device=dev,
        dtype=dt,
        config=dict(config) if config is not None else {"callable": name},
        fed_steps=True,
        data_range=data_range,
        scheduler_config=dict(scheduler_config or _process_fingerprint(schedule)),
        module=module,
        etsdm=etsdm,
    )


def _process_fingerprint(p: NoiseProcess) -> dict[str, Any]:
    """What identifies a process built in Python (no scheduler config): its description, plus the hash of a
    VP schedule's log ᾱ."""
    out = {k: v for k, v in p.describe().items() if isinstance(v, (str, int, float))}
    if isinstance(p, Schedule):
        out["log_alpha_bar_sha"] = hashlib.sha256(p.log_alpha_bar.detach().cpu().numpy().tobytes()).hexdigest()[:16]
    return out
