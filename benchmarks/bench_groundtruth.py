"""Cost of the exact reference: one exact probability-flow ODE solve against one sampler step, same samples.

    python benchmarks/bench_groundtruth.py            # digits-gmm:10 (K = 10, D = 64), 512 samples, CPU
    python benchmarks/bench_groundtruth.py --tiny     # smoke test (tests/ runs this)

Times, on the same x_T: the exact ODE endpoint (``lipscope.exactode.pf_ode_endpoint``, Dormand–Prince 5(4) at
rtol = atol = 1e-10, both phases), one step of the ε*-driven DDIM sampler (one closed-form field evaluation and the
scheduler update), and one step of DDIM driven by the tiny pixel UNet of ``lipscope groundtruth`` (random weights:
the cost does not depend on them). The ratio ODE / UNet step says how many network sampler steps one exact
reference costs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from lipscope import rng, solvers
from lipscope.exactode import pf_ode_endpoint
from lipscope.mixtures import exact_model, parse_density
from lipscope.runs import gt_models as gm


def best_of(fn, min_seconds: float) -> float:
    """The fastest of repeated calls (at least 2) within ``min_seconds``."""
    times, start = [], time.perf_counter()
    while len(times) < 2 or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--data", default="digits-gmm:10")
    p.add_argument("--samples", type=int, default=512)
    p.add_argument("--min-seconds", type=float, default=3.0)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    if a.tiny:
        a.data, a.samples, a.min_seconds = "gmm:3:1x4x4", 16, 0.0
    kd = parse_density(a.data)
    sched_cfg = gm.scheduler_config("vp")
    net = gm.as_model(gm.build(gm.default_config("unet", kd.shape), 0), sched_cfg, "unet")
    exact = exact_model(kd.mixture, net.schedule, sched_cfg)
    x_t = rng.normal(0, rng.Stream.SAMPLER_INIT, a.samples, kd.shape, dtype=torch.float64)
    ode = best_of(lambda: pf_ode_endpoint(kd.mixture, net.schedule, x_t, 999.0), a.min_seconds)
    _, info = pf_ode_endpoint(kd.mixture, net.schedule, x_t, 999.0)
    steps = 10
    eps_step = best_of(lambda: solvers.run(exact, "ddim", steps, x_t, a.samples), a.min_seconds) / steps
    net_step = best_of(lambda: solvers.run(net, "ddim", steps, x_t, a.samples), a.min_seconds) / steps
    res = {"data": a.data, "K": kd.mixture.K, "D": kd.mixture.D, "samples": a.samples,
           "threads": torch.get_num_threads(), "torch": torch.__version__, "ode_solve_s": ode,
           "ode_phases": info["phases"], "exact_step_s": eps_step, "sampler_step_s": net_step,
           "ode_over_step": ode / net_step, "ode_over_exact_step": ode / eps_step}  # fmt: skip
    print(json.dumps(res, indent=2))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2) + "\n")
    return res


if __name__ == "__main__":
    main(sys.argv[1:])
