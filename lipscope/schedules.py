"""VP noise schedules as small pure functions (DESIGN.md, "The science").

Discrete DDPM-family schedules: ᾱ_k = ∏_{i≤k}(1−β_i), α_k = √ᾱ_k, σ_k = √(1−ᾱ_k),
x_k = α_k x0 + σ_k ε, normalised time τ = k/T.

Fractional k uses piecewise-linear interpolation of log ᾱ between integer steps (as DPM-Solver's
discrete ``NoiseScheduleVP`` does). log ᾱ is then continuous and exact at integer k; its slope is
constant on each [j, j+1). Derivatives at an integer k use the segment to the right, [k, k+1)
(the left segment at k = T−1): a one-sided derivative, documented in docs/theory.md.

All arithmetic is float64: near k = 0, σ² = 1 − ᾱ ≈ β_0 = 1e-4 and float32 ᾱ would lose three
significant digits of σ.

:class:`NoiseProcess` is what every process shares (VP here; VE, EDM and flow matching in
:mod:`lipscope.processes`): α, σ and their τ-derivatives on the model-step axis, log-SNR, the
native time axis, what the network is fed (c(t)) and how its output becomes ε (:mod:`lipscope.targets`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from .errors import InputError
from .targets import to_epsilon

VP_PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")  # what DDPM-family schedulers accept

DEFAULT_SCHEDULER_CONFIG: dict[str, Any] = {
    "_class_name": "DDPMScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "prediction_type": "epsilon",
}


class NoiseProcess:
    """A forward process x = α(t) x0 + σ(t) ε on the model-step axis k ∈ [0, T−1] (fractional k allowed).

    Subclasses give T, α(k), σ(k), dα/dτ, dσ/dτ (τ = k/T, float64, differentiable in k) and may override
    what the network is fed for a model step (:meth:`condition`), the scaling of its input
    (:meth:`scale_input`) and how its output becomes ε (:meth:`eps_from_output`). The rest is derived.
    """

    kind: ClassVar[str] = "vp-discrete"
    native_time_name: ClassVar[str] = "tau"  # the process's own time: τ = k/T unless said otherwise
    default_data_range: ClassVar[tuple[float, float] | None] = (-1.0, 1.0)  # the family's data convention
    output_is_prediction: ClassVar[bool] = True  # the raw output is the prediction itself (not EDM's preconditioned F)
    prediction_type: str

    @property
    def T(self) -> int:  # noqa: N802
        raise NotImplementedError

    def alpha(self, k: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def sigma(self, k: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def dalpha_dtau(self, k: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def dsigma_dtau(self, k: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def log_snr(self, k: torch.Tensor) -> torch.Tensor:
        """λ = log(α²/σ²)."""
        return 2 * (self.alpha(k).log() - self.sigma(k).log())

    def dlog_snr_dtau(self, k: torch.Tensor) -> torch.Tensor:
        """dλ/dτ = 2(α'/α − σ'/σ)."""
        return 2 * (self.dalpha_dtau(k) / self.alpha(k) - self.dsigma_dtau(k) / self.sigma(k))

    def native_time(self, k: torch.Tensor) -> torch.Tensor:
        """The process's own time at model step k (τ = k/T unless the process says otherwise)."""
        return _as_f64(k) / self.T

    def dnative_dtau(self, k: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(_as_f64(k))

    def condition(self, c: torch.Tensor) -> torch.Tensor:
        """What the network is fed for (possibly E-TSDM-mapped) model step c: c itself for VP and flow."""
        return c

    def scale_input(self, x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """The network's input for x at true step k (EDM's c_in; x itself elsewhere)."""
        return x

    def eps_from_output(self, out: torch.Tensor, x: torch.Tensor, k: torch.Tensor, prediction_type: str):
        """ε from the raw network output at true step k (:func:`lipscope.targets.to_epsilon`)."""
        if prediction_type == "epsilon":
            return to_epsilon(out, x, "epsilon")
        return to_epsilon(out, x, prediction_type, self.alpha(k), self.sigma(k))

    def describe(self) -> dict[str, Any]:
        """What run.json records about the process."""
        return {
            "process": self.kind,
            "T": self.T,
            "time_axis": f"model step k in [0, {self.T - 1}], tau = k/{self.T}",
            "native_time": self.native_time_name,
            "network_fed": "k (the model step)",
            "prediction_type": self.prediction_type,
        }


@dataclass(frozen=True)
class Schedule(NoiseProcess):
    """A discrete VP schedule: log ᾱ at integer steps 0..T−1 (float64) and the model's prediction type."""

    log_alpha_bar: torch.Tensor  # (T,) float64
    prediction_type: str = "epsilon"

    @property
    def T(self) -> int:  # noqa: N802 - paper notation
        return int(self.log_alpha_bar.numel())

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        """ᾱ_k at integer steps (float64)."""
        return self.log_alpha_bar.exp()

    def log_alpha_bar_at(self, k: torch.Tensor) -> torch.Tensor:
        """log ᾱ at fractional step k, piecewise-linear between integer steps."""
        return interp_log_alpha_bar(self.log_alpha_bar, k)

    def alpha(self, k: torch.Tensor) -> torch.Tensor:
        """α_k = √ᾱ_k."""
        return (0.5 * self.log_alpha_bar_at(k)).exp()

    def sigma(self, k: torch.Tensor) -> torch.Tensor:
        """σ_k = √(1 − ᾱ_k), computed with expm1 so it stays accurate near k = 0."""
        return torch.sqrt(-torch.expm1(self.log_alpha_bar_at(k)))

    def dlog_alpha_bar_dk(self, k: torch.Tensor) -> torch.Tensor:
        """Slope of log ᾱ in k (right-sided at integer k, left-sided at k = T−1)."""
        return slope_log_alpha_bar(self.log_alpha_bar, k)

    def dalpha_dtau(self, k: torch.Tensor) -> torch.Tensor:
        """dα/dτ with τ = k/T: α · ½ d log ᾱ/dk · T."""
        return self.alpha(k) * 0.5 * self.dlog_alpha_bar_dk(k) * self.T

    def dsigma_dtau(self, k: torch.Tensor) -> torch.Tensor:
        """dσ/dτ = −α (dα/dτ) / σ (from α² + σ² = 1); infinite where σ = 0."""
        return -self.alpha(k) * self.dalpha_dtau(k) / self.sigma(k)

    def log_snr(self, k: torch.Tensor) -> torch.Tensor:
        """λ = log ᾱ − log(1 − ᾱ), with expm1 so it stays accurate near k = 0."""
        lab = self.log_alpha_bar_at(k)
        return lab - torch.log(-torch.expm1(lab))

    def dlog_snr_dtau(self, k: torch.Tensor) -> torch.Tensor:
        """dλ/dτ = (d log ᾱ/dτ)/(1 − ᾱ)."""
        return self.dlog_alpha_bar_dk(k) * self.T / (-torch.expm1(self.log_alpha_bar_at(k)))


def _as_f64(k: torch.Tensor | float | np.ndarray) -> torch.Tensor:
    """k as float64, keeping autograd/forward-AD graphs (so JVPs flow through the schedule)."""
    return k.to(torch.float64) if isinstance(k, torch.Tensor) else torch.as_tensor(k, dtype=torch.float64)


def interp_log_alpha_bar(log_ab: torch.Tensor, k: torch.Tensor | float) -> torch.Tensor:
    """Piecewise-linear interpolation of log ᾱ (given at 0..T−1) at fractional k ∈ [0, T−1]."""
    kk = _as_f64(k)
    log_ab = log_ab.to(kk.device)
    T = log_ab.numel()
    lo = kk.floor().clamp(0, T - 2).long()
    w = kk - lo.to(torch.float64)
    return log_ab[lo] * (1 - w) + log_ab[lo + 1] * w


def slope_log_alpha_bar(log_ab: torch.Tensor, k: torch.Tensor | float) -> torch.Tensor:
    """d log ᾱ / dk of the interpolant: the slope of the segment [⌊k⌋, ⌊k⌋+1)."""
    kk = _as_f64(k)
    log_ab = log_ab.to(kk.device)
    T = log_ab.numel()
    lo = kk.floor().clamp(0, T - 2).long()
    return log_ab[lo + 1] - log_ab[lo]


@dataclass(frozen=True)
class ContinuousSchedule(Schedule):
    """A continuous-time VP schedule, τ ∈ [0, 1], measured in ``T`` model steps (t = τT).

    ``vp-linear`` (Song et al. 2021): log ᾱ(τ) = −½(β₁ − β₀)τ² − β₀τ, β₀ = 0.1, β₁ = 20.
    ``vp-cosine`` (Nichol & Dhariwal 2021): ᾱ(τ) = cos²(π/2·(τ+s)/(1+s)) / cos²(π/2·s/(1+s)), s = 0.008.
    σ(0) = 0 for both: the singularity sits exactly at t = 0.
    """

    kind: ClassVar[str] = "vp-continuous"
    curve: str = "vp-linear"

    def _tau(self, k: torch.Tensor) -> torch.Tensor:
        return _as_f64(k) / self.T

    def log_alpha_bar_at(self, k: torch.Tensor) -> torch.Tensor:
        tau = self._tau(k)
        if self.curve == "vp-linear":
            return -0.5 * (20.0 - 0.1) * tau**2 - 0.1 * tau
        u = (tau + 0.008) / 1.008 * (math.pi / 2)
        return 2 * torch.log(torch.cos(u)) - 2 * math.log(math.cos(0.008 / 1.008 * math.pi / 2))

    def dlog_alpha_bar_dk(self, k: torch.Tensor) -> torch.Tensor:
        tau = self._tau(k)
        if self.curve == "vp-linear":
            return (-(20.0 - 0.1) * tau - 0.1) / self.T
        u = (tau + 0.008) / 1.008 * (math.pi / 2)
        return -2 * torch.tan(u) * (math.pi / 2) / 1.008 / self.T

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "curve": self.curve}


CONTINUOUS = ("vp-linear", "vp-cosine")
NAMED: dict[str, dict[str, Any]] = {
    "linear": {"beta_schedule": "linear"},
    "scaled_linear": {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
    "cosine": {"beta_schedule": "squaredcos_cap_v2"},
    "sigmoid": {"beta_schedule": "sigmoid"},
}


def named_schedule(name: str, T: int = 1000) -> Schedule:
    """A schedule by name: discrete ``linear``, ``scaled_linear``, ``cosine`` (squaredcos_cap_v2),
    ``sigmoid`` (through diffusers), or continuous ``vp-linear``, ``vp-cosine``."""
    if name in CONTINUOUS:
        k = torch.arange(T, dtype=torch.float64)
        proto = ContinuousSchedule(log_alpha_bar=torch.zeros(T, dtype=torch.float64), curve=name)
        return ContinuousSchedule(log_alpha_bar=proto.log_alpha_bar_at(k), curve=name)
    if name not in NAMED:
        raise InputError(f"`schedule` {name!r} not known; use one of {', '.join([*NAMED, *CONTINUOUS])}")
    return schedule_from_config({**NAMED[name], "num_train_timesteps": T})


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_scheduler_config(cfg: dict[str, Any]) -> None:
    """Refuse, naming the key, what DDPMScheduler would reject with a traceback or accept silently."""

    def bad(key: str, want: str) -> InputError:
        return InputError(
            f"scheduler config: {key} must be {want}, got {cfg[key]!r}; fix the scheduler_config.json "
            "(or pass another `scheduler_config`)"
        )

    n = cfg.get("num_train_timesteps", 1000)
    if not isinstance(n, int) or isinstance(n, bool) or n < 2:
        raise bad("num_train_timesteps", "an integer ≥ 2")
    if "beta_start" in cfg and not (_is_number(cfg["beta_start"]) and 0 <= cfg["beta_start"] < 1):
        raise bad("beta_start", "a number in [0, 1)")
    if "beta_end" in cfg and not (_is_number(cfg["beta_end"]) and 0 < cfg["beta_end"] < 1):
        raise bad("beta_end", "a number in (0, 1)")
    if "beta_schedule" in cfg and not isinstance(cfg["beta_schedule"], str):
        raise bad("beta_schedule", "a name such as linear, scaled_linear or squaredcos_cap_v2")
    if "prediction_type" in cfg and cfg["prediction_type"] not in VP_PREDICTION_TYPES:
        raise bad("prediction_type", f"one of {', '.join(VP_PREDICTION_TYPES)}")
    tb = cfg.get("trained_betas")
    if tb is not None:
        if not isinstance(tb, (list, tuple)) or len(tb) < 2 or not all(_is_number(b) and 0 < b < 1 for b in tb):
            raise bad("trained_betas", "a list of at least 2 numbers, each in (0, 1)")
        if "num_train_timesteps" in cfg and len(tb) != n:
            raise bad("trained_betas", f"a list of num_train_timesteps = {n} values (got {len(tb)} values)")


def schedule_from_config(config: dict[str, Any]) -> Schedule:
    """Build a Schedule from any diffusers DDPM-family scheduler config.

    The betas come from ``DDPMScheduler.from_config`` (so linear, scaled_linear, squaredcos_cap_v2,
    sigmoid, trained_betas and rescale_betas_zero_snr follow diffusers exactly); the cumulative
    product is then taken in float64 as Σ log(1 − β). Bad values raise one InputError naming the key.
    """
    from diffusers import DDPMScheduler

    if not isinstance(config, dict):
        raise InputError(f"scheduler config must be a JSON object (a dict), got {type(config).__name__}")
    cfg = dict(config)
    if "num_train_timesteps" not in cfg and "timesteps" in cfg:  # very old configs (google/ddpm-*)
        cfg["num_train_timesteps"] = cfg["timesteps"]
    _check_scheduler_config(cfg)
    try:
        sched = DDPMScheduler.from_config(cfg)
    except NotImplementedError as e:
        raise InputError(
            f"scheduler config: beta_schedule {cfg.get('beta_schedule')!r} is not supported by DDPMScheduler "
            "(use linear, scaled_linear, squaredcos_cap_v2 or sigmoid)"
        ) from e
    except Exception as e:  # from_config is pure construction: any failure is the config's
        msg = (str(e).strip().splitlines() or [""])[0][:200]
        raise InputError(
            f"scheduler config not understood ({type(e).__name__}: {msg}); pass a DDPM-family scheduler_config.json"
        ) from e
    betas = sched.betas.to(torch.float64)
    if not (torch.isfinite(betas).all() and (betas >= 0).all() and (betas <= 1).all()):
        raise InputError(
            "scheduler config: its betas fall outside [0, 1]; check beta_start, beta_end and beta_schedule"
        )
    log_ab = torch.cumsum(torch.log1p(-betas), dim=0)
    # zero-terminal-SNR schedules have ᾱ_{T-1} = 0: keep log finite (σ = 1 there to float64 precision)
    log_ab = log_ab.clamp(min=-745.0)
    return Schedule(log_alpha_bar=log_ab, prediction_type=str(sched.config.prediction_type))


def default_schedule() -> Schedule:
    """The DDPM default: linear betas 1e-4 … 0.02, T = 1000, ε-prediction."""
    return schedule_from_config(DEFAULT_SCHEDULER_CONFIG)


# ---------------------------------------------------------------------------------------------
# timestep grids
# ---------------------------------------------------------------------------------------------


def default_grid(T: int, t_max: float | None = None, dense_below: int = 20, n_log: int = 44) -> np.ndarray:
    """Every integer step below ``dense_below``, then ``n_log`` log-spaced integers up to ``t_max``.

    With T = 1000 this is about 64 points: the region near 0 where K blows up is sampled at every
    step, the rest on a log scale.
    """
    t_max = float(T - 1 if t_max is None else t_max)
    dense = np.arange(0, min(dense_below, int(np.floor(t_max)) + 1), dtype=np.float64)
    if t_max <= dense_below:
        return dense
    logs = np.round(np.geomspace(dense_below, t_max, n_log))
    logs = np.minimum(logs, np.floor(t_max))
    return np.unique(np.concatenate([dense, logs]))


MAX_GRID_POINTS = 1_000_000  # a grid larger than this is a typo, not a probe


def parse_grid(spec: str | None, T: int, t_max: float | None = None) -> np.ndarray:
    """Parse a timestep grid spec into sorted unique float64 steps in [0, T).

    Specs: ``default``/None, ``all`` (0..t_max), ``linear:N`` (N rounded linspace of 0..t_max),
    ``log:N`` (t = 0 and N − 1 rounded geomspace of 1..t_max, deduplicated), ``range:a:b:s`` (a ≤ k < b step s,
    fractional allowed), or an explicit comma list ``0,1,2.5``. ``t_max`` (default T−1) is the
    largest step the generated grids use; explicit steps are validated against [0, T).
    """
    hi = float(T - 1 if t_max is None else t_max)
    if spec is not None and not spec.strip():
        raise InputError("`timesteps` is empty; leave it out for the default grid, or give a list like 0,1,2.5")
    s = (spec or "default").strip()
    try:
        if s == "default":
            grid = default_grid(T, hi)
        elif s == "all":
            grid = np.arange(0, np.floor(hi) + 1, dtype=np.float64)
        elif s.startswith("linear:"):
            n = int(s.split(":", 1)[1])
            _positive(n, s)
            grid = np.unique(np.round(np.linspace(0, hi, min(n, MAX_GRID_POINTS))))
        elif s.startswith("log:"):
            n = int(s.split(":", 1)[1])
            _positive(n, s)
            logs = np.geomspace(1, max(hi, 1), min(n, MAX_GRID_POINTS) - 1)  # t = 0 first, then N − 1 log-spaced
            grid = np.unique(np.concatenate([[0.0], np.minimum(np.round(logs), np.floor(hi))]))
        elif s.startswith("range:"):
            parts = s.split(":")[1:]
            if len(parts) != 3:
                raise ValueError
            a, b, st = (float(p) for p in parts)
            if not (math.isfinite(a) and math.isfinite(b) and math.isfinite(st)) or st <= 0:
                raise InputError(f"`timesteps` {s}: a, b and the step must be finite numbers, the step > 0")
            if a < 0 or b > T:
                raise InputError(f"`timesteps` {s} reaches outside [0, {T}) (T = {T}); keep a ≥ 0 and b ≤ {T}")
            if (b - a) / st > MAX_GRID_POINTS:
                raise InputError(
                    f"`timesteps` {s} has {(b - a) / st:.3g} points; use a larger step (at most {MAX_GRID_POINTS:,})"
                )
            grid = np.arange(a, b, st, dtype=np.float64)
        else:
            grid = np.array([float(p) for p in s.split(",") if p.strip()], dtype=np.float64)
    except InputError:
        raise
    except ValueError as e:
        raise InputError(
            f"`timesteps` {s!r} not understood; use default, all, linear:N, log:N, range:a:b:s or a list like 0,1,2.5"
        ) from e
    grid = np.unique(grid)
    if grid.size == 0:
        raise InputError(f"`timesteps` {s!r} gives no timesteps")
    if grid.min() < 0 or grid.max() >= T or not np.all(np.isfinite(grid)):
        raise InputError(f"`timesteps` {s!r} has steps outside [0, {T}) (T = {T}); keep every step in 0..{T - 1}")
    return grid


def _positive(n: int, s: str) -> None:
    if n < 1:
        raise InputError(f"`timesteps` {s}: N must be ≥ 1")
