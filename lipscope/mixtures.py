"""Data with a known density: Gaussian mixtures that look like data, and their exact references.

Specs (:func:`parse_density`):

* ``digits-gmm:K`` — K full-covariance components fitted to scikit-learn's digits (1×8×8, 0..16 → [−1, 1]) by
  scikit-learn's ``GaussianMixture`` (EM, k-means init seeded by ``seed``, ``reg`` added to the diagonal);
* ``gmm:K:SHAPE`` — a seeded random mixture (:meth:`lipscope.gaussian.GaussianMixture.random`, means scaled by
  ``spread``) over SHAPE = ``D`` or ``CxHxW``;
* a ``.npz`` file of a mixture written by a run (``mixture.npz``: weights, means, eigvals, eigvecs, shape).

Options ``:rank=R`` keep each component's R largest variances and set the others to ``floor`` (the data then sits
within √floor of a union of R-dimensional affine sets: near a manifold); ``:floor=F`` (default 1e-2) is the least
variance of every direction (full rank: λ ← max(λ, F)); ``:seed=S``, ``:reg=R`` (digits), ``:spread=X`` (random).

Exact references at model step k of any process x = α x0 + σ ε (q_k = Σ w_j N(α μ_j, α²Σ_j + σ²I)): the score
∇log q_k, ε* = −σ ∇log q_k (Theorem 3.1's setting), the posterior mean x̂0* = E[x0 | x] = Σ_j r_j (μ_j + α Σ_j
A_j⁻¹ (x − α μ_j)) (well defined at α = 0, where ε* ÷ α is not), and log q_0(x0) for any sample. All float64.
"""

from __future__ import annotations

import functools
import hashlib
import io
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import rng
from .errors import InputError
from .gaussian import GaussianMixture
from .models import EpsModel, from_callable
from .processes import FlowProcess
from .schedules import NoiseProcess

DEFAULT_FLOOR = 1e-2
MAX_BYTES = 2**31  # K·D²·8 bytes of eigenvectors
# blocks of the FRESH stream (rng.Stream.FRESH): training micro-batch i on process p is block 256·i + p
# (:func:`train_block`); these blocks, above any a training run reaches, hold the evaluation sets
EVAL_X0, TRUE_SET, TRUE_SET_2, TRAIN_REFERENCE = ((1 << 38) + j for j in range(4))


@dataclass(frozen=True)
class KnownDensity:
    """A Gaussian mixture used as data, with how it was made (``info``) and its content hash (``digest``)."""

    mixture: GaussianMixture
    spec: str
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.mixture.shape)

    @property
    def digest(self) -> str:
        return mixture_digest(self.mixture)

    def describe(self) -> dict[str, Any]:
        """What run.json records: the spec, the hash, the construction and the spectrum."""
        lam = self.mixture.eigvals
        return {"spec": self.spec, "sha256_16": self.digest, "K": self.mixture.K, "D": self.mixture.D,
                "shape": list(self.shape), "least_variance": float(lam.min()), "largest_variance": float(lam.max()),
                **self.info}  # fmt: skip


def mixture_digest(g: GaussianMixture) -> str:
    """sha256 (16 hex) of the mixture's float64 parameters and shape."""
    h = hashlib.sha256(repr(tuple(g.shape)).encode())
    for t in (g.weights, g.means, g.eigvals, g.eigvecs):
        h.update(t.detach().double().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def mixture_npz(g: GaussianMixture) -> bytes:
    """The mixture as an .npz (float64 arrays; readable without unpickling)."""
    buf = io.BytesIO()
    np.savez(buf, allow_pickle=False, weights=g.weights.numpy(), means=g.means.numpy(), eigvals=g.eigvals.numpy(),
             eigvecs=g.eigvecs.numpy(), shape=np.asarray(g.shape, dtype=np.int64))  # fmt: skip
    return buf.getvalue()


def _load_npz(path: Path) -> GaussianMixture:
    try:
        with np.load(path, allow_pickle=False) as z:
            parts = {k: torch.from_numpy(np.asarray(z[k], dtype=np.float64)) for k in ("weights", "means", "eigvals",
                                                                                          "eigvecs")}  # fmt: skip
            shape = tuple(int(v) for v in z["shape"])
    except (OSError, ValueError, KeyError) as e:
        raise InputError(f"`data` {path}: not a mixture .npz written by lipscope groundtruth ({e})") from e
    k, d = parts["means"].shape if parts["means"].ndim == 2 else (0, 0)
    ok = (k >= 1 and parts["weights"].shape == (k,) and parts["eigvals"].shape == (k, d)
          and parts["eigvecs"].shape == (k, d, d) and math.prod(shape) == d)  # fmt: skip
    if not ok or not all(torch.isfinite(v).all() for v in parts.values()):
        raise InputError(f"`data` {path}: its arrays do not form a mixture (shapes or non-finite values)")
    w = parts["weights"]
    if (w <= 0).any() or abs(float(w.sum()) - 1) > 1e-9 or (parts["eigvals"] <= 0).any():
        raise InputError(f"`data` {path}: weights must be > 0 and sum to 1, variances > 0")
    return GaussianMixture(w, parts["means"], parts["eigvals"], parts["eigvecs"], shape)


def _options(spec: str, parts: list[str], allowed: tuple[str, ...]) -> dict[str, float]:
    out: dict[str, float] = {}
    for p in parts:
        key, eq, val = p.partition("=")
        if not eq or key not in allowed:
            raise InputError(f"`data` {spec}: option {p!r} not understood; use {', '.join(k + '=…' for k in allowed)}")
        try:
            out[key] = float(val)
        except ValueError as e:
            raise InputError(f"`data` {spec}: {key}={val!r} is not a number; give one, e.g. {key}=8") from e
        if key == "seed" and not (out[key] >= 0 and out[key] == int(out[key])):
            raise InputError(f"`data` {spec}: seed must be a whole number ≥ 0 (got {val})")
        if key != "seed" and not (math.isfinite(out[key]) and out[key] > 0):
            raise InputError(f"`data` {spec}: {key} must be a finite number > 0 (got {val})")
    return out


def _int(spec: str, what: str, v: str | float) -> int:
    try:
        n = int(str(v)) if not isinstance(v, float) else int(v)
    except ValueError as e:
        raise InputError(f"`data` {spec}: {what} must be a whole number (got {v!r})") from e
    if n < 1 or (isinstance(v, float) and v != n):
        raise InputError(f"`data` {spec}: {what} must be a whole number ≥ 1 (got {v})")
    return n


def _shape(spec: str, s: str) -> tuple[int, ...]:
    dims = tuple(_int(spec, "each dimension of the shape", p) for p in s.lower().split("x"))
    if len(dims) not in (1, 3):
        raise InputError(f"`data` {spec}: the shape is D or CxHxW (e.g. 64 or 1x8x8), got {s!r}")
    return dims


def with_spectrum(g: GaussianMixture, rank: int | None, floor: float) -> GaussianMixture:
    """Each component's R largest variances kept (all when ``rank`` is None), the others set to ``floor``, and
    every variance at least ``floor``: full rank or near a union of R-dimensional affine sets."""
    lam, order = torch.sort(g.eigvals, dim=1, descending=True)
    vecs = torch.gather(g.eigvecs, 2, order[:, None, :].expand_as(g.eigvecs))
    lam = lam.clamp(min=floor)
    if rank is not None:
        lam[:, rank:] = floor
    return replace(g, eigvals=lam, eigvecs=vecs)


@functools.lru_cache(maxsize=8)
def _fit_digits(k: int, seed: int, reg: float) -> tuple[GaussianMixture, dict[str, Any]]:
    """The EM fit (cached per process: a spec and its low-rank variant share one fit; the result is not mutated)."""
    import sklearn
    from sklearn.mixture import GaussianMixture as SkGMM

    from .data import digits_array

    x = digits_array().reshape(-1, 64).astype(np.float64)
    gm = SkGMM(k, covariance_type="full", random_state=seed, reg_covar=reg, max_iter=500, tol=1e-6).fit(x)
    cov = torch.from_numpy(gm.covariances_)
    lam, vecs = torch.linalg.eigh(0.5 * (cov + cov.transpose(1, 2)))
    g = GaussianMixture(torch.from_numpy(gm.weights_), torch.from_numpy(gm.means_), lam, vecs, (1, 8, 8))
    info = {"fit": "sklearn.mixture.GaussianMixture(covariance_type='full')", "sklearn": sklearn.__version__,
            "fit_seed": seed, "reg_covar": reg, "converged": bool(gm.converged_), "em_iterations": int(gm.n_iter_),
            "digits_mean_loglik_per_sample": float(gm.score(x)), "digits_samples": int(x.shape[0]),
            "data_range": [-1.0, 1.0]}  # fmt: skip
    return g, info


def parse_density(spec: str) -> KnownDensity:
    """A :class:`KnownDensity` from ``digits-gmm:K[:opts]``, ``gmm:K:SHAPE[:opts]`` or a mixture ``.npz``."""
    if not isinstance(spec, str) or not spec.strip():
        raise InputError("`data` is empty; use digits-gmm:K, gmm:K:SHAPE (e.g. gmm:8:1x8x8) or a mixture .npz")
    spec = spec.strip()
    head, *rest = spec.split(":")
    if head == "digits-gmm":
        if not rest:
            raise InputError(f"`data` {spec}: give the number of components, e.g. digits-gmm:10")
        k = _int(spec, "K (components)", rest[0])
        o = _options(spec, rest[1:], ("rank", "floor", "seed", "reg"))
        if k > 200:
            raise InputError(f"`data` {spec}: K = {k} components for 1797 digits is too many; use K ≤ 200")
        g, info = _fit_digits(k, int(o.get("seed", 0)), o.get("reg", 1e-3))
    elif head == "gmm":
        if len(rest) < 2:
            raise InputError(f"`data` {spec}: use gmm:K:SHAPE, e.g. gmm:8:64 or gmm:8:1x8x8")
        k, shape = _int(spec, "K (components)", rest[0]), _shape(spec, rest[1])
        o = _options(spec, rest[2:], ("rank", "floor", "seed", "spread"))
        d = math.prod(shape)
        if k * d * d * 8 > MAX_BYTES:
            raise InputError(f"`data` {spec}: K·D² = {k}·{d}² float64 is over 2 GiB; use fewer components or dims")
        g = GaussianMixture.random(k, d, seed=int(o.get("seed", 0)), spread=o.get("spread", 1.0))
        g = replace(g, shape=shape)
        info = {"construction": "lipscope.gaussian.GaussianMixture.random", "seed": int(o.get("seed", 0)),
                "spread": o.get("spread", 1.0)}  # fmt: skip
    elif spec.endswith(".npz"):
        if not Path(spec).is_file():
            raise InputError(f"`data` {spec}: no such file; give a mixture.npz written by lipscope groundtruth")
        return KnownDensity(_load_npz(Path(spec)), spec, {"construction": f"read from {spec}"})
    else:
        raise InputError(f"`data` {spec!r} is not a known density; use digits-gmm:K, gmm:K:SHAPE or a mixture .npz")
    rank = _int(spec, "rank", o["rank"]) if "rank" in o else None
    if rank is not None and rank > g.D:
        raise InputError(f"`data` {spec}: rank {rank} is above the dimension D = {g.D}")
    floor = o.get("floor", DEFAULT_FLOOR)
    g = with_spectrum(g, rank, floor)
    kind = "full rank" if rank is None else f"rank {rank} + floor (near a union of {rank}-dimensional affine sets)"
    return KnownDensity(g, spec, {**info, "rank": rank, "floor": floor, "kind": kind})


# ---- fresh samples (stream FRESH) ---------------------------------------------------------------


def train_block(index: int, rank: int = 0) -> int:
    """The FRESH block of training micro-batch ``index`` on process ``rank``."""
    return (int(index) << 8) + int(rank)


def draw(g: GaussianMixture, seed: int, block: int, n: int) -> torch.Tensor:
    """n fresh samples (float64, (n, *shape)) from ``block`` of stream FRESH under ``seed`` (one generator per
    block: the component of each sample, then its coordinates)."""
    gen = rng.generator(seed, rng.Stream.FRESH, int(block))
    comp = torch.multinomial(g.weights, n, replacement=True, generator=gen)
    z = torch.randn(n, g.D, generator=gen, dtype=torch.float64) * g.eigvals[comp].sqrt()
    x = g.means[comp] + torch.einsum("nde,ne->nd", g.eigvecs[comp], z)
    return x.reshape(n, *g.shape)


# ---- exact references ---------------------------------------------------------------------------


def log_density(g: GaussianMixture, x0: torch.Tensor) -> torch.Tensor:
    """log q_0(x0) per row (nats), float64: logsumexp_j (log w_j + log N(x0; μ_j, Σ_j))."""
    one = torch.ones(x0.shape[0], dtype=torch.float64)
    z, c, _ = g._parts(x0, one, torch.zeros_like(one))
    logn = -0.5 * (torch.log(c).sum(-1) + (z * z / c).sum(-1) + g.D * math.log(2 * math.pi))
    return torch.logsumexp(torch.log(g.weights)[None] + logn, dim=1)


def posterior_mean(g: GaussianMixture, x: torch.Tensor, a: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """x̂0* = E[x0 | x = a x0 + s ε] per row (per-row a, s; a = 0 allowed)."""
    z, c, r = g._parts(x, a, s)
    gain = a.double().reshape(-1, 1, 1) * g.eigvals[None] / c  # Σ A⁻¹ α in each component's eigenbasis
    m = g.means[None] + torch.einsum("kde,bke->bkd", g.eigvecs, gain * z)
    return (r[..., None] * m).sum(1).reshape(x.shape)


def exact_refs(g: GaussianMixture, process: NoiseProcess, x: torch.Tensor, k: torch.Tensor) -> dict[str, torch.Tensor]:
    """ε*, score and x̂0* at model steps k (per row) of ``process`` (VP, VE, EDM, flow)."""
    kk = torch.as_tensor(k, dtype=torch.float64).reshape(-1).expand(x.shape[0])
    a, s = process.alpha(kk), process.sigma(kk)
    score = g.score(x, a, s)
    return {"eps": -s.reshape(-1, *[1] * (x.ndim - 1)) * score, "score": score, "x0": posterior_mean(g, x, a, s)}


def exact_model(
    g: GaussianMixture, process: NoiseProcess, scheduler_config: dict[str, Any] | None = None, name: str = "exact"
) -> EpsModel:
    """The exact field as a float64 EpsModel fed model steps: ε* for VP (and VE, EDM), the velocity
    v* = ε* − x̂0* for flow, both from their closed forms (finite at σ = 1, where α = 0 and x0 = (x − σε)/α is not,
    and at σ = 0, where (x − x̂0*)/σ is not).
    ``scheduler_config``: the config samplers are built from (a trained model's; default: the process's record)."""
    flow = isinstance(process, FlowProcess)

    def net(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        tt = t.double()
        a, s = process.alpha(tt), process.sigma(tt)
        eps = g.eps_star(x, a, s)
        return (eps - posterior_mean(g, x, a, s) if flow else eps).to(x.dtype)

    return from_callable(net, process, sample_shape=g.shape, name=name, dtype="float64", data_range=None,
                         scheduler_config=scheduler_config, prediction_type="flow_prediction" if flow else "epsilon",
                         config={"closed_form": "gaussian_mixture", "sha256_16": mixture_digest(g)})  # fmt: skip
