"""The forward process x_t = α x0 + σ ε and the conversions between what a network predicts and ε,
both directions, with per-row α(t), σ(t) (DESIGN.md, "Models that predict v or x0"; "Other noise
processes").

Every formula holds for any process of the form x = α x0 + σ ε (VP, VE, EDM, flow matching):

    x0 = (x − σ ε)/α,  v = α ε − σ x0,  score = −ε/σ,  velocity u = ε − x0 (rectified flow's target),

so ε = out (ε-prediction), α v + σ x / (α² + σ²) … written out in :func:`to_epsilon`. These are the
only places the formulas are written; the probe, training and sampling all use them, and they are
differentiable in t (α, σ may carry forward-AD tangents).
"""

from __future__ import annotations

import torch

from .errors import InputError

# what a network outputs: ε, v (Salimans & Ho), x0, the score (score-SDE / VE fourier UNets divide by σ),
# or the flow-matching velocity u = ε − x0 (SD3, Flux, rectified flow)
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "score", "flow_prediction")
# what the probe measures (``target``): the same network seen in each parameterisation
TARGETS = ("eps", "x0", "v", "score", "velocity")
# the target each prediction type outputs directly
NATIVE_TARGET = {"epsilon": "eps", "v_prediction": "v", "sample": "x0", "score": "score", "flow_prediction": "velocity"}


def per_row(v: torch.Tensor, ndim: int) -> torch.Tensor:
    """A per-sample coefficient (B,) shaped to broadcast against a (B, …) tensor of ``ndim`` dims."""
    return v.reshape((-1,) + (1,) * (ndim - 1))


def noisy(x0: torch.Tensor, eps: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """x_t = α x0 + σ ε with per-row α, σ of shape (B,)."""
    return per_row(alpha, x0.ndim) * x0 + per_row(sigma, x0.ndim) * eps


def ode_velocity(x, eps, alpha, sigma, dalpha, dsigma) -> torch.Tensor:
    """dx/dτ of the probability-flow ODE at (x, ε): (α'/α) x + (σ' − α'σ/α) ε, per-row α, σ and their τ-derivatives
    (DESIGN.md, "Partial vs total derivative"; from x = αx0 + σε with x0 = (x − σε)/α held on the path)."""
    a, s, da, ds = (per_row(v.to(torch.float64), x.ndim) for v in (alpha, sigma, dalpha, dsigma))
    return ((da / a).to(x.dtype) * x + (ds - da * s / a).to(x.dtype) * eps).to(x.dtype)


def check_target_defined(target: str, process, t) -> None:
    """x0, v and velocity divide by α, the score by σ: refuse a grid (steps t of ``process``) that evaluates ``target``
    where that is 0."""
    zero = {"score": ("σ", process.sigma), "x0": ("α", process.alpha)}
    zero |= {"v": zero["x0"], "velocity": zero["x0"]}
    if target not in zero:
        return
    name, fn = zero[target]
    tt = torch.as_tensor(t, dtype=torch.float64)
    bad = tt[fn(tt) == 0]
    if bad.numel():
        raise InputError(
            f"`target` {target} is undefined where {name} = 0 (t = {float(bad[0]):g}); leave that t out of "
            "`timesteps` (e.g. start the grid at 1)"
        )


def check_prediction_type(prediction_type: str) -> None:
    if prediction_type not in PREDICTION_TYPES:
        raise InputError(f"prediction_type {prediction_type!r} not supported; use one of {', '.join(PREDICTION_TYPES)}")


def mean_half(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Learned-variance outputs (2C channels for C-channel inputs) keep their first half, the mean."""
    if out.ndim == x.ndim and out.ndim >= 2 and out.shape[1] == 2 * x.shape[1] and out.shape[2:] == x.shape[2:]:
        return out[:, : x.shape[1]]
    return out


def to_epsilon(
    out: torch.Tensor,
    x: torch.Tensor,
    prediction_type: str,
    alpha: torch.Tensor | None = None,
    sigma: torch.Tensor | None = None,
) -> torch.Tensor:
    """ε from a network output in its own parameterisation, with per-row α, σ at the true t.

    ε = out (ε-prediction); ε = (α v + σ x)/(α² + σ²) (v-prediction; α v + σ x for VP); ε = (x − α x̂0)/σ
    (x0-prediction); ε = −σ s (score); ε = (x + α u)/(α + σ) (flow velocity u = ε − x0; x + α u for α + σ = 1).
    """
    check_prediction_type(prediction_type)
    out = mean_half(out, x)
    if prediction_type == "epsilon":
        return out
    if alpha is None or sigma is None:
        raise ValueError(f"converting a {prediction_type} output to ε needs alpha and sigma")
    a64, s64 = alpha.to(torch.float64), sigma.to(torch.float64)
    a, s = per_row(a64, x.ndim).to(x.dtype), per_row(s64, x.ndim).to(x.dtype)
    if prediction_type == "sample":
        return (x - a * out) / s
    if prediction_type == "score":
        return -s * out
    # normalisers in float64, so a VP (α² + σ² = 1) or flow (α + σ = 1) model's coefficients are α, σ to the bit
    v = prediction_type == "v_prediction"
    den = a64 * a64 + s64 * s64 if v else a64 + s64
    ca, cx = per_row(a64 / den, x.ndim).to(x.dtype), per_row((s64 if v else 1) / den, x.ndim).to(x.dtype)
    return ca * out + cx * x


def from_epsilon(eps: torch.Tensor, x: torch.Tensor, target: str, alpha: torch.Tensor, sigma: torch.Tensor):
    """The ``target`` parameterisation (eps, x0, v, score, velocity) of ε at x, per-row α, σ."""
    if target not in TARGETS:
        raise InputError(f"`target` {target!r} not known; use one of {', '.join(TARGETS)}")
    if target == "eps":
        return eps
    a, s = per_row(alpha, x.ndim).to(x.dtype), per_row(sigma, x.ndim).to(x.dtype)
    if target == "score":
        return -eps / s
    x0 = (x - s * eps) / a
    if target == "x0":
        return x0
    if target == "v":
        return a * eps - s * x0
    return eps - x0


def prediction_target(
    prediction_type: str, x0: torch.Tensor, eps: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor
) -> torch.Tensor:
    """What a network of ``prediction_type`` is trained to output: ε, v = α ε − σ x0, x0, −ε/σ or ε − x0."""
    check_prediction_type(prediction_type)
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "sample":
        return x0
    a, s = per_row(alpha, x0.ndim), per_row(sigma, x0.ndim)
    if prediction_type == "v_prediction":
        return a * eps - s * x0
    if prediction_type == "score":
        return -eps / s
    return eps - x0
