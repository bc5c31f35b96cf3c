"""Shared fixtures: tiny diffusers UNets saved in every layout lipscope loads (offline, CPU)."""

from __future__ import annotations

import os
import tempfile

# the tests' own lipscope cache (sample caches, remembered batch sizes): nothing from earlier runs leaks in
os.environ.setdefault("LIPSCOPE_CACHE", tempfile.mkdtemp(prefix="lipscope-test-cache-"))
# the environment CI runs in, whoever runs the tests (README's command is .ci/run's): no network, no display;
# set before torch, diffusers and huggingface_hub read it, and inherited by every subprocess
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["MPLBACKEND"] = "Agg"
os.environ["PYTHONUNBUFFERED"] = "1"

# The one timeout of the tests: a subprocess (or a wait for what it writes) that has not answered in this long is
# hung, not slow. Tests wait for a sign the program gives (a file it writes, a line it prints), never for a guess
# of how fast the machine is; this is only the guard against waiting forever.
HANG_S = 3600

import json  # noqa: E402
import logging  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from diffusers import DDPMScheduler, UNet2DModel  # noqa: E402

TINY = dict(
    sample_size=8,
    in_channels=1,
    out_channels=1,
    layers_per_block=1,
    block_out_channels=(4, 8),
    norm_num_groups=2,
    down_block_types=("DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=4,
)


# the lipschitz.csv contract of DESIGN.md
CONTRACT = [
    "t",
    "t_prime",
    "dt",
    "method",
    "n",
    "K_mean",
    "K_std",
    "K_sem",
    "K_ci_low",
    "K_ci_high",
    "K_mean_per_dim",
    "alpha",
    "sigma",
]


@pytest.fixture(autouse=True)
def _lipscope_logger():
    """Each test sees the "lipscope" logger as it was: a CLI command run in-process (typer's CliRunner, cli.main)
    gives it its one-line handler and turns propagation off, which hid every later warning from ``caplog``."""
    lg = logging.getLogger("lipscope")
    state = (list(lg.handlers), lg.level, lg.propagate)
    yield
    lg.handlers[:], lg.level, lg.propagate = state[0], state[1], state[2]


def tiny_unet(seed: int = 0, **overrides) -> UNet2DModel:
    torch.manual_seed(seed)
    return UNet2DModel(**{**TINY, **overrides}).eval()


@pytest.fixture(scope="session")
def unet() -> UNet2DModel:
    return tiny_unet()


@pytest.fixture(scope="session")
def pipeline_dir(tmp_path_factory, unet) -> Path:
    """A DDPMPipeline-style folder: model_index.json, unet/, scheduler/."""
    d = tmp_path_factory.mktemp("pipe")
    unet.save_pretrained(d / "unet")
    DDPMScheduler(num_train_timesteps=1000).save_pretrained(d / "scheduler")
    (d / "model_index.json").write_text(
        json.dumps(
            {
                "_class_name": "DDPMPipeline",
                "unet": ["diffusers", "UNet2DModel"],
                "scheduler": ["diffusers", "DDPMScheduler"],
            }
        )
    )
    return d


@pytest.fixture()
def no_network(monkeypatch):
    """Make any attempt to reach the network fail loudly."""
    import socket

    def guard(*a, **k):
        raise RuntimeError("network access attempted in a test")

    monkeypatch.setattr(socket.socket, "connect", guard)


U32 = 2.0**-24  # float32 unit roundoff


def _float32_tolerance(module, df, data, samples, seed, T=1000, batch_sizes=(1, None)):
    """Per-sample bound (samples × rows of ``df``) on |K − K′| between two float32 evaluations of K on the
    probe's inputs (batched vs one at a time, two batch sizes, two CPUs' kernels). ``df`` is a probe table
    (in memory or read from lipschitz.csv) of a plain ε-prediction UNet2DModel ``module``; fd or jvp rows.

    Derivation. On the same float32 input x, let ε₆₄ be a float64 copy of the same weights. fd:
    K = ‖ε(t_b) − ε(t_a)‖/Δτ, so by the triangle inequality a float32 K is within (e_a + e_b)/Δτ of the
    float64 one, e_a = ‖ε₃₂(x, t_a) − ε₆₄(x, t_a)‖ (e_b likewise), plus U32·K for rounding the float32
    subtraction. jvp: K = T·‖∂ε/∂t‖, within T·‖∂ε₃₂/∂t − ∂ε₆₄/∂t‖. e is measured here for each batching in
    ``batch_sizes`` (network inputs per forward; 1: one input per forward, like a plain loop; None: all at
    once) and the per-item max taken: PyTorch picks the conv algorithm by batch size (im2col + GEMM at 1,
    oneDNN above; where oneDNN is off, NNPACK's Winograd from 16 on, measured at ~10× the rounding), so
    measuring 1 and all covers every family a probe batch can hit. Within a family, another blocking,
    vector width or thread split rounds other partial sums, but as many and of the same size: the error norm
    over the D outputs is concentrated (measured spread ≤ 1.6× over batch sizes 1–84 × ATen default / AVX2 /
    AVX-512 × oneDNN on/off). Allowing each of the two evaluations compared 2× the measured e gives
    |K − K′| ≤ 4e/Δτ + 2·U32·K (fd), 4·T·e (jvp). diffusers builds the sinusoidal embedding in float32 in
    both copies, so e leaves it out; t·freq is one IEEE product (the same on any CPU) and sin/cos rounding
    (≤ 1 ulp ≈ 6e-8 of an O(1) embedding vs. its change of O(Δt) rad across the step) is ≲ 1% of e.
    """
    import copy

    from lipscope.data import load_data
    from lipscope.fwad import forward_ad_patches
    from lipscope.rng import noise as per_sample_noise

    c = module.config
    x0 = load_data(data, samples, seed, (c.in_channels, c.sample_size, c.sample_size))
    noise = per_sample_noise(seed, samples, tuple(x0.shape[1:]), dtype=x0.dtype)
    G, n = len(df), samples
    j, i = torch.arange(G).repeat_interleave(n), torch.arange(n).repeat(G)  # grid-major (j, i), as the probe packs
    col = {k: torch.tensor(df[k].to_numpy(dtype="float64"))[j] for k in ("alpha", "sigma", "t", "t_a", "t_b")}
    x = col["alpha"].float().view(-1, 1, 1, 1) * x0[i] + col["sigma"].float().view(-1, 1, 1, 1) * noise[i]
    ta, tb = col["t_a"].float(), col["t_b"].float()
    net64 = copy.deepcopy(module).double()

    def chunks(k):
        return [slice(s, s + k) for s in range(0, n * G, k)]

    def fd(net, xx, k):  # ε at t_a and t_b; k network inputs per forward, (x, t_a) and (x, t_b) kept together
        if k == 1:
            one = [net(xx[s], tt[s]).sample for tt in (ta, tb) for s in chunks(1)]
            return torch.cat(one[: n * G]), torch.cat(one[n * G :])
        out = [net(torch.cat([xx[s], xx[s]]), torch.cat([ta[s], tb[s]])).sample for s in chunks(k // 2 if k else n * G)]
        return torch.cat([o[: len(o) // 2] for o in out]), torch.cat([o[len(o) // 2 :] for o in out])

    def jvp(net, xx, k):  # ∂ε/∂t at t, k inputs per forward
        with forward_ad_patches(net):
            return torch.cat(
                [
                    torch.func.jvp(lambda s, xs=xx[sl]: net(xs, s).sample, (ta[sl],), (torch.ones_like(ta[sl]),))[1]
                    for sl in chunks(k or n * G)
                ]
            )

    def norm(v):
        return v.double().flatten(1).norm(dim=1)

    with torch.no_grad():
        if str(df["method"].iloc[0]) == "jvp":
            ref = jvp(net64, x.double(), None)
            e = torch.stack([norm(jvp(module, x, k) - ref) for k in batch_sizes]).amax(0)
            tol = 4 * e * T
        else:
            ra, rb = fd(net64, x.double(), None)
            e = torch.stack([norm(a - ra) + norm(b - rb) for a, b in (fd(module, x, k) for k in batch_sizes)]).amax(0)
            tol = (4 * e + 2 * U32 * norm(rb - ra)) / ((col["t_b"] - col["t_a"]) / T)
    return tol.reshape(G, n).T.numpy()


@pytest.fixture()
def float32_tolerance():
    """The bound of :func:`_float32_tolerance`, as a fixture (tests need not import conftest)."""
    return _float32_tolerance
