"""Cost of the diagnosis against the raw forward pass of the same network, on one workload.

    python benchmarks/bench_diagnosis.py                         # builtin:digits-ddpm (real weights), CPU
    python benchmarks/bench_diagnosis.py --network cifar10       # CIFAR-10 DDPM architecture, random weights
    python benchmarks/bench_diagnosis.py --tiny                  # smoke test (tests/ runs this)

On n samples × G grid points (the same items for every method, one fixed batch of B network inputs) it times:
the raw forward (``unet(x, t).sample``, B inputs a call), the probe's ``fd`` (2 forwards an item), ``jvp`` (1 JVP),
``jvp-ode`` (2 JVPs: the primal of the first gives dx/dτ), ``fd-ode`` (3 forwards, forward scheme), the attribution
by blocks (one JVP over P + 1 copies: P consumer groups + outside) and the empirical and Gaussian optimal denoisers
(N data points, exact derivative). Each is reported as seconds per item and as raw forwards per item
(its time ÷ the raw forward's time per input), the unit docs/performance.md states the costs in. Every timing is
the minimum over ``--reps`` interleaved repetitions (robust to other work on the machine), in ``--threads`` torch
threads (1 by default: on a shared machine two threads wait on each other's barriers and the timings scatter by 10×).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_probe import CIFAR10_DDPM, TINY  # noqa: E402

from lipscope import rng  # noqa: E402
from lipscope.attribution import attribution_norms, consumers  # noqa: E402
from lipscope.batching import RunStats  # noqa: E402
from lipscope.jvp import jvp_norms  # noqa: E402
from lipscope.ode import fd_ode_norms, jvp_ode_norms  # noqa: E402
from lipscope.optimal import empirical_eps, fit_gaussian, reference_norms  # noqa: E402
from lipscope.points import fd_points  # noqa: E402
from lipscope.probe import fd_norms  # noqa: E402


def _network(name: str):
    from diffusers import UNet2DModel

    from lipscope.loading import load_model
    from lipscope.models import from_unet

    if name == "digits":
        return load_model("builtin:digits-ddpm"), "builtin:digits-ddpm (UNet2DModel, 0.70 M parameters)"
    with torch.random.fork_rng():
        torch.manual_seed(0)
        unet = UNet2DModel(**(TINY if name == "tiny" else CIFAR10_DDPM)).eval()
    what = "tiny UNet2DModel" if name == "tiny" else "CIFAR-10 DDPM UNet2DModel (35.7 M parameters, random weights)"
    return from_unet(unet, {"num_train_timesteps": 1000}), what


def _clock(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--network", default="digits", choices=("digits", "cifar10", "tiny"))
    p.add_argument("--tiny", action="store_true", help="smoke test: the tiny UNet, 2 samples × 2 grid points")
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--grid", default="1,5,20,100")
    p.add_argument("--batch", type=int, default=32, help="network inputs per call for every method")
    p.add_argument("--data-points", type=int, default=1797, help="N of the optimal denoisers (digits: all of them)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.tiny:
        a.network, a.samples, a.grid, a.batch, a.data_points, a.reps = "tiny", 2, "1,20", 8, 50, 1
    model, what = _network(a.network)
    n, grid = a.samples, np.array([float(v) for v in a.grid.split(",")])
    items = n * len(grid)
    shape = tuple(model.sample_shape)
    x0 = torch.rand((n, *shape), generator=torch.Generator().manual_seed(0)) * 2 - 1
    noise = rng.noise(0, n, shape)
    # raw forward: the same number of network inputs as one pass over the items, B per call
    xs, ts = torch.randn((a.batch, *shape)), torch.linspace(1, 999, a.batch)
    calls = max(1, -(-items // a.batch))
    bs = a.batch
    pts = fd_points(grid, 1.0, "forward", model.T)
    groups = len(dict.fromkeys(c.group for c in consumers(model, "blocks")))
    data = torch.rand((a.data_points, int(np.prod(shape))), generator=torch.Generator().manual_seed(1)) * 2 - 1
    gauss = fit_gaussian(data)

    def forward():
        with torch.no_grad():
            for _ in range(calls):
                model(xs, ts)

    runs = {
        "raw": forward,
        "fd": lambda: fd_norms(model, x0, noise, pts, bs, stats=RunStats()),
        "jvp": lambda: jvp_norms(model, x0, noise, grid, bs, stats=RunStats()),
        "jvp-ode": lambda: jvp_ode_norms(model, x0, noise, grid, bs, stats=RunStats()),
        "fd-ode": lambda: fd_ode_norms(model, x0, noise, pts, bs, stats=RunStats()),
        "attribution": lambda: attribution_norms(model, x0, noise, grid, "blocks", bs, stats=RunStats()),
        "ref-empirical": lambda: reference_norms(
            model.schedule, lambda x, al, s: empirical_eps(data, x, al, s), x0, noise, grid
        ),  # fmt: skip
        "ref-gaussian": lambda: reference_norms(model.schedule, gauss.eps, x0, noise, grid),
    }
    res: dict = {
        "network": what,
        "device": "cpu",
        "threads": a.threads,
        "torch": torch.__version__,
        "workload": f"{n} samples × {len(grid)} grid points = {items} items, batch {bs} network inputs",
        "attribution_groups": groups,
        "reference_points": a.data_points,
        "reps": a.reps,
        "methods": {},
    }
    for fn in runs.values():
        fn()  # warm-up (first-call allocations)
    best = {name: _clock(fn) for name, fn in runs.items()}
    for _ in range(a.reps - 1):  # interleaved: every method sees the same stretch of machine load
        best = {name: min(best[name], _clock(fn)) for name, fn in runs.items()}
    raw = best.pop("raw") / (calls * a.batch)
    res["raw_forward_s_per_input"] = raw
    print(f"{what}: {res['workload']}; raw forward {raw * 1e3:.3f} ms per input ({a.threads} thread(s))")
    for name, sec in best.items():
        s = sec / items
        res["methods"][name] = {"s_per_item": s, "raw_forwards_per_item": s / raw}
        print(f"  {name:14s} {s * 1e3:9.3f} ms per item = {s / raw:6.2f} raw forwards")
    m = res["methods"]
    res["jvp_ode_minus_jvp_in_forwards"] = m["jvp-ode"]["raw_forwards_per_item"] - m["jvp"]["raw_forwards_per_item"]
    res["attribution_over_jvp"] = m["attribution"]["s_per_item"] / m["jvp"]["s_per_item"]
    print(
        f"  jvp-ode − jvp = {res['jvp_ode_minus_jvp_in_forwards']:.2f} raw forwards; attribution ÷ jvp = "
        f"{res['attribution_over_jvp']:.2f} (P + 1 = {groups + 1} parts)"
    )
    if a.json:
        from lipscope.io import atomic_write_text

        atomic_write_text(a.json, json.dumps(res, indent=2) + "\n")
    return res


if __name__ == "__main__":
    main()
