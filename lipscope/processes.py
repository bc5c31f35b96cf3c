"""Noise processes beyond discrete VP, and the one place a scheduler config becomes a process.

Every process is x = α(t) x0 + σ(t) ε on lipscope's model-step axis k ∈ [0, T−1] (τ = k/T,
T = ``num_train_timesteps``), so the probe, the E-TSDM map and the batching are the same for all:

* VP discrete / continuous (:mod:`lipscope.schedules`): DDPM-family schedulers; the network is fed k.
* VE / score-SDE (``ScoreSdeVeScheduler``): α = 1, σ(τ) = σ_min (σ_max/σ_min)^τ; the network is fed σ
  and outputs the score (diffusers' fourier ``UNet2DModel`` divides by σ), so ε = −σ·out.
* EDM (``EDMEulerScheduler``, Karras et al. 2022): α = 1, σ on the scheduler's own ramp read from the
  low-noise end (Karras ρ-ramp or exponential), native time σ; the network is fed c_noise = ¼ ln σ and
  c_in·x, and its output F gives x̂0 = c_skip x + c_out F (the scheduler's ``precondition_*``).
* Cosine v-diffusion (``IPNDMScheduler``: DanceDiffusion): α = cos(πτ/2), σ = sin(πτ/2), v-prediction.
* Flow matching (``FlowMatchEulerDiscreteScheduler`` and kin: SD3, Flux): α = 1 − σ, σ = τ; the network
  is fed the timestep σ·T (= k) and predicts the velocity u = ε − x0. A timestep ``shift`` only changes
  which σ a sampler visits, never what the network is fed at a given σ: recorded, not applied.

:func:`process_from_config` dispatches on the config's ``_class_name`` and refuses unknown classes by name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from .errors import InputError
from .schedules import NoiseProcess, _as_f64, schedule_from_config
from .sigmas import edm_sigma, edm_step, ve_sigma, ve_step
from .targets import mean_half, per_row

VP_CLASSES = (
    "DDPMScheduler DDIMScheduler DDIMInverseScheduler DDPMParallelScheduler DDIMParallelScheduler PNDMScheduler "
    "LMSDiscreteScheduler EulerDiscreteScheduler EulerAncestralDiscreteScheduler HeunDiscreteScheduler "
    "DPMSolverMultistepScheduler DPMSolverMultistepInverseScheduler DPMSolverSinglestepScheduler "
    "DPMSolverSDEScheduler KDPM2DiscreteScheduler KDPM2AncestralDiscreteScheduler UniPCMultistepScheduler "
    "DEISMultistepScheduler LCMScheduler TCDScheduler SASolverScheduler RePaintScheduler UnCLIPScheduler "
    "GaussianDDPMScheduler"
).split()
VE_CLASSES = ("ScoreSdeVeScheduler",)
EDM_CLASSES = ("EDMEulerScheduler", "EDMDPMSolverMultistepScheduler")
FLOW_CLASSES = ("FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler", "FlowMatchLCMScheduler")
COSINE_CLASSES = ("IPNDMScheduler",)


def _num(cfg: dict[str, Any], key: str, default: float, positive: bool = True) -> float:
    v = cfg.get(key, default)
    if v is None:
        v = default
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or (positive and v <= 0):
        raise InputError(f"scheduler config: {key} must be a {'positive ' if positive else ''}number, got {v!r}")
    return float(v)


def _steps(cfg: dict[str, Any], default: int) -> int:
    n = cfg.get("num_train_timesteps", default)
    if not isinstance(n, int) or isinstance(n, bool) or n < 2:
        raise InputError(f"scheduler config: num_train_timesteps must be an integer ≥ 2, got {n!r}")
    return n


@dataclass(frozen=True)
class VEProcess(NoiseProcess):
    """Score-SDE VE: α = 1, σ(τ) = σ_min (σ_max/σ_min)^τ; network fed σ, output the score."""

    kind: ClassVar[str] = "ve"
    default_data_range: ClassVar[tuple[float, float] | None] = (0.0, 1.0)  # ScoreSdeVePipeline clamps to [0, 1]
    steps: int = 2000
    sigma_min: float = 0.01
    sigma_max: float = 1348.0
    prediction_type: str = "score"
    sampling_eps: float = 1e-5  # the SDE time t ∈ [eps, 1] samplers visit and score_sde's loss draws

    @property
    def T(self) -> int:  # noqa: N802
        return self.steps

    def sigma(self, k: torch.Tensor) -> torch.Tensor:
        return ve_sigma(k, self.T, self.sigma_min, self.sigma_max)

    def step_of_sigma(self, sigma: torch.Tensor | float) -> torch.Tensor:
        """The (fractional) model step of σ: k = T ln(σ/σ_min)/ln(σ_max/σ_min)."""
        return ve_step(sigma, self.T, self.sigma_min, self.sigma_max)

    def alpha(self, k: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(_as_f64(k))

    def dalpha_dtau(self, k: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(_as_f64(k))

    def dsigma_dtau(self, k: torch.Tensor) -> torch.Tensor:
        return self.sigma(k) * math.log(self.sigma_max / self.sigma_min)

    def condition(self, c: torch.Tensor) -> torch.Tensor:
        return self.sigma(c).to(c.dtype)

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "network_fed": "sigma(k)",
            "sigma_min": self.sigma_min,
            "sigma_max": self.sigma_max,
            "sampling_eps": self.sampling_eps,
        }


@dataclass(frozen=True)
class EDMProcess(NoiseProcess):
    """EDM (Karras et al. 2022): α = 1, σ on the scheduler's ramp; c_in, c_noise = ¼ ln σ, c_skip, c_out."""

    kind: ClassVar[str] = "edm"
    output_is_prediction: ClassVar[bool] = False
    native_time_name: ClassVar[str] = "sigma"
    steps: int = 1000
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    sigma_data: float = 0.5
    rho: float = 7.0
    ramp: str = "karras"  # or "exponential"
    prediction_type: str = "epsilon"  # EDM's F-prediction (c_out > 0); v_prediction flips c_out's sign

    @property
    def T(self) -> int:  # noqa: N802
        return self.steps

    def _r(self, k: torch.Tensor) -> torch.Tensor:
        return _as_f64(k) / (self.T - 1)

    def sigma(self, k: torch.Tensor) -> torch.Tensor:
        return edm_sigma(k, self.T, self.sigma_min, self.sigma_max, self.rho, self.ramp)

    def step_of_sigma(self, sigma: torch.Tensor | float) -> torch.Tensor:
        """The (fractional) model step of σ on the ramp (below 0 under σ_min, above T−1 over σ_max)."""
        return edm_step(sigma, self.T, self.sigma_min, self.sigma_max, self.rho, self.ramp)

    def alpha(self, k: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(_as_f64(k))

    def dalpha_dtau(self, k: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(_as_f64(k))

    def dsigma_dtau(self, k: torch.Tensor) -> torch.Tensor:
        dr_dtau = self.T / (self.T - 1)
        if self.ramp == "exponential":
            return self.sigma(k) * math.log(self.sigma_max / self.sigma_min) * dr_dtau
        a, b = self.sigma_min ** (1 / self.rho), self.sigma_max ** (1 / self.rho)
        return self.rho * (a + self._r(k) * (b - a)) ** (self.rho - 1) * (b - a) * dr_dtau

    def native_time(self, k: torch.Tensor) -> torch.Tensor:
        return self.sigma(k)

    def dnative_dtau(self, k: torch.Tensor) -> torch.Tensor:
        return self.dsigma_dtau(k)

    def condition(self, c: torch.Tensor) -> torch.Tensor:
        return (0.25 * torch.log(self.sigma(c))).to(c.dtype)

    def scale_input(self, x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        s = self.sigma(k)
        return x * per_row(1 / torch.sqrt(s * s + self.sigma_data**2), x.ndim).to(x.dtype)

    def eps_from_output(self, out: torch.Tensor, x: torch.Tensor, k: torch.Tensor, prediction_type: str):
        """x̂0 = c_skip x + c_out F, ε = (x − x̂0)/σ = ((1 − c_skip) x − c_out F)/σ, coefficients in float64."""
        s, sd2 = self.sigma(k), self.sigma_data**2
        c_skip = sd2 / (s * s + sd2)
        c_out = s * self.sigma_data / torch.sqrt(s * s + sd2) * (-1.0 if prediction_type == "v_prediction" else 1.0)
        cx, cf = per_row((1 - c_skip) / s, x.ndim).to(x.dtype), per_row(c_out / s, x.ndim).to(x.dtype)
        return cx * x - cf * mean_half(out, x)

    def training_target(self, x0: torch.Tensor, eps: torch.Tensor, k: torch.Tensor, prediction_type: str):
        """What F is trained toward (Karras et al. 2022, Eq. 8): F* = (x0 − c_skip x)/c_out at x = x0 + σε, written
        without cancellation as (σ/σ_d · x0 − σ_d ε)/√(σ² + σ_d²) (sign flipped for v_prediction's negative c_out);
        with it the λ(σ) = 1/c_out²-weighted denoiser loss λ‖D − x0‖² is the unit-weight ‖F − F*‖²."""
        s, sd = self.sigma(k), self.sigma_data
        norm = torch.sqrt(s * s + sd * sd) * (-1.0 if prediction_type == "v_prediction" else 1.0)
        a, b = (per_row(v, x0.ndim).to(x0.device, x0.dtype) for v in (s / sd / norm, sd / norm))
        return a * x0 - b * eps

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "network_fed": "c_noise = ln(sigma(k))/4, input c_in*x",
            "sigma_min": self.sigma_min,
            "sigma_max": self.sigma_max,
            "sigma_data": self.sigma_data,
            "ramp": self.ramp,
            "rho": self.rho,
        }


@dataclass(frozen=True)
class FlowProcess(NoiseProcess):
    """Rectified flow / flow matching: α = 1 − σ, σ = τ; network fed σ·T (= k), output u = ε − x0."""

    kind: ClassVar[str] = "flow"
    steps: int = 1000
    shift: float | None = 1.0  # recorded: the sampler's σ spacing; None with dynamic (resolution-dependent) shift
    prediction_type: str = "flow_prediction"

    @property
    def T(self) -> int:  # noqa: N802
        return self.steps

    def sigma(self, k: torch.Tensor) -> torch.Tensor:
        return _as_f64(k) / self.T

    def alpha(self, k: torch.Tensor) -> torch.Tensor:
        return 1 - self.sigma(k)

    def dalpha_dtau(self, k: torch.Tensor) -> torch.Tensor:
        return -torch.ones_like(_as_f64(k))

    def dsigma_dtau(self, k: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(_as_f64(k))

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "network_fed": "timestep sigma*T = k",
            "shift": "dynamic" if self.shift is None else self.shift,
            "shift_note": "a timestep shift changes which sigma a sampler visits, not what the network is fed",
        }


@dataclass(frozen=True)
class CosineProcess(NoiseProcess):
    """v-diffusion (Salimans & Ho 2022; Crowson's audio diffusion, DanceDiffusion's ``IPNDMScheduler``): α = cos(πτ/2),
    σ = sin(πτ/2), τ = k/T; the network predicts v = α ε − σ x0 (its pipeline feeds τ itself)."""

    kind: ClassVar[str] = "cosine"
    steps: int = 1000
    prediction_type: str = "v_prediction"

    @property
    def T(self) -> int:  # noqa: N802
        return self.steps

    def _angle(self, k: torch.Tensor) -> torch.Tensor:
        return _as_f64(k) / self.T * (math.pi / 2)

    def alpha(self, k: torch.Tensor) -> torch.Tensor:
        return torch.cos(self._angle(k))

    def sigma(self, k: torch.Tensor) -> torch.Tensor:
        return torch.sin(self._angle(k))

    def dalpha_dtau(self, k: torch.Tensor) -> torch.Tensor:
        return -(math.pi / 2) * torch.sin(self._angle(k))

    def dsigma_dtau(self, k: torch.Tensor) -> torch.Tensor:
        return (math.pi / 2) * torch.cos(self._angle(k))


def process_from_config(config: dict[str, Any]) -> NoiseProcess:
    """The noise process of a diffusers scheduler config, by its ``_class_name`` (no name: DDPM-family VP)."""
    if not isinstance(config, dict):
        raise InputError(f"scheduler config must be a JSON object (a dict), got {type(config).__name__}")
    name = config.get("_class_name")
    if name in VE_CLASSES:
        ve = VEProcess(
            steps=_steps(config, 2000),
            sigma_min=_num(config, "sigma_min", 0.01),
            sigma_max=_num(config, "sigma_max", 1348.0),
            sampling_eps=_num(config, "sampling_eps", 1e-5),
        )
        if not ve.sigma_min < ve.sigma_max:
            raise InputError(f"scheduler config: needs sigma_min < sigma_max, got {ve.sigma_min} and {ve.sigma_max}")
        if not ve.sampling_eps < 1:
            raise InputError(f"scheduler config: sampling_eps must be below 1, got {ve.sampling_eps}")
        return ve
    if name in EDM_CLASSES:
        pred = config.get("prediction_type", "epsilon")
        if pred not in ("epsilon", "v_prediction"):
            raise InputError(f"scheduler config: {name} prediction_type must be epsilon or v_prediction, got {pred!r}")
        ramp = config.get("sigma_schedule", "karras")
        if ramp not in ("karras", "exponential"):
            raise InputError(f"scheduler config: sigma_schedule must be karras or exponential, got {ramp!r}")
        p = EDMProcess(
            steps=_steps(config, 1000),
            sigma_min=_num(config, "sigma_min", 0.002),
            sigma_max=_num(config, "sigma_max", 80.0),
            sigma_data=_num(config, "sigma_data", 0.5),
            rho=_num(config, "rho", 7.0),
            ramp=ramp,
            prediction_type=pred,
        )
        if not p.sigma_min < p.sigma_max:
            raise InputError(f"scheduler config: needs sigma_min < sigma_max, got {p.sigma_min} and {p.sigma_max}")
        return p
    if name in FLOW_CLASSES:
        if config.get("invert_sigmas"):
            raise InputError(
                f"scheduler config: {name} with invert_sigmas (Mochi) is not supported; use a config without it"
            )
        dynamic = bool(config.get("use_dynamic_shifting"))
        return FlowProcess(steps=_steps(config, 1000), shift=None if dynamic else _num(config, "shift", 1.0))
    if name in COSINE_CLASSES:
        return CosineProcess(steps=_steps(config, 1000))
    if name is None or name in VP_CLASSES:
        return schedule_from_config(config)
    if name == "ScoreSdeVpScheduler":
        raise InputError(
            "scheduler config: ScoreSdeVpScheduler (continuous VP SDE) is not read from configs; use a DDPM-family "
            "scheduler_config.json, or the named schedule vp-linear from Python"
        )
    raise InputError(
        f"scheduler config: {name} is not a noise process lipscope knows (VP: DDPM-family schedulers; VE: "
        f"{', '.join(VE_CLASSES)}; EDM: {', '.join(EDM_CLASSES)}; flow: {', '.join(FLOW_CLASSES)}); "
        "pass another `scheduler_config`"
    )


def etsdm_axis(process: NoiseProcess) -> dict[str, Any] | None:
    """What an E-TSDM denoiser of this process needs to map the timestep its pipeline passes (σ for VE, c_noise =
    ¼ ln σ for EDM) on the model-step axis k (:mod:`lipscope.etsdm`); None where it is fed k itself (VP, flow)."""
    if isinstance(process, VEProcess):
        return {"process": "ve", "T": process.T, "sigma_min": process.sigma_min, "sigma_max": process.sigma_max}
    if isinstance(process, EDMProcess):
        return {"process": "edm", "T": process.T, "sigma_min": process.sigma_min, "sigma_max": process.sigma_max,
                "rho": process.rho, "ramp": process.ramp}  # fmt: skip
    return None


def check_etsdm_axis(axis: dict[str, Any] | None, process: NoiseProcess, name: str) -> None:
    """Refuse an E-TSDM denoiser whose own map (the axis in its config) is not its process's: lipscope maps the model
    step of the scheduler's process, so the two would feed different conditions."""
    want = etsdm_axis(process)
    if axis == want or (axis is not None and want is not None and _same_axis(axis, want)):
        return
    have = "the model step" if axis is None else f"a {axis.get('process')} axis {axis}"
    need = "the model step (no `etsdm_axis`)" if want is None else f"the {process.kind} axis {want}"
    raise InputError(
        f"`model` {name}: its E-TSDM map is written on {have}, but its scheduler is a {process.kind} process that "
        f"needs {need}; retrofit the denoiser with lipscope.etsdm.with_etsdm(..., axis=etsdm_axis(process)), or pass "
        "the `scheduler_config` it was trained with"
    )


def _same_axis(a: dict[str, Any], b: dict[str, Any]) -> bool:
    if a.keys() != b.keys():
        return False
    num = (int, float)
    return all(
        math.isclose(a[k], b[k], rel_tol=1e-12) if isinstance(a[k], num) and isinstance(b[k], num) else a[k] == b[k]
        for k in a
    )
