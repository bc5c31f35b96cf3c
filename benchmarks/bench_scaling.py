"""Wall time and peak memory of the probe against the work (samples × grid points) and the model size (issue 22 item 4).

    python benchmarks/bench_scaling.py --json benchmarks/results/cpu-scaling.json --plot docs/data/scaling.png
    python benchmarks/bench_scaling.py --tiny      # smoke test (tests/ runs this)

Network: a class-conditional ``DiTTransformer2DModel`` (random weights, 16×16×4 latents, 6 blocks) wrapped by
lipscope's DiT family. Work: 4 sizes of samples × grid points (16 … 128) at the middle width; model: 3 widths at
32 points.
Each configuration runs in a fresh subprocess (one CPU thread, fixed batch): wall time of ``probe`` (FD and JVP), and
peak memory as the growth of the process's peak resident set during the probe (``ru_maxrss`` after − resident set
before; CPU has no per-mode allocator counter). The JSON carries the log-log slopes (≈ 1 expected for the work) and a
linear fit wall = fixed + per_point · points per method (FD's fixed part: its per-run rounding-noise estimate).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np

WIDTHS = (2, 4, 8)  # heads of 64: hidden 128, 256, 512
WORK = ((4, 4), (8, 4), (8, 8), (16, 8))  # (samples, grid points): 16, 32, 64, 128 points
MID = 4
FIXED_WORK = (8, 4)  # 32 points


def child(heads: int, samples: int, grid: int, method: str, tiny: bool) -> dict:
    """One configuration, in this process: build, probe once to warm up, then the timed probe."""
    import dataclasses

    import torch
    from diffusers import DiTTransformer2DModel

    from lipscope.families import family_of_class
    from lipscope.probe import probe

    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = dict(
        num_attention_heads=heads,
        attention_head_dim=8 if tiny else 64,
        num_layers=2 if tiny else 6,
        sample_size=8 if tiny else 16,
        out_channels=8,
    )
    net = DiTTransformer2DModel(**cfg)
    fam = family_of_class("DiTTransformer2DModel")
    m = fam.build(net, {"_class_name": "DDPMScheduler", "num_train_timesteps": 1000}, "dit", "cpu", "float32")
    m = dataclasses.replace(m, conditioning=fam.conditioning(m, [1, 2]))
    x0 = torch.randn(samples, *m.sample_shape, generator=torch.Generator().manual_seed(0))
    grid = ",".join(str(int(v)) for v in np.linspace(20, 900, grid))
    kw = dict(method=method, timesteps=grid, samples=samples, batch_size=4, data_range=None)
    probe(m, x0[:1], **{**kw, "samples": 1, "timesteps": "20"})  # warm-up: first-call costs out of the timing
    rss0 = int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize()
    t0 = time.perf_counter()
    df = probe(m, x0, **kw)
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "heads": heads,
        "hidden": heads * cfg["attention_head_dim"],
        "params_M": sum(p.numel() for p in net.parameters()) / 1e6,
        "samples": samples,
        "grid": grid.count(",") + 1,
        "points": samples * (grid.count(",") + 1),
        "method": method,
        "wall_s": wall,
        "forwards": int(df.attrs["forwards"]),
        "peak_rss_growth_MiB": max(0, peak - rss0) / 2**20,
    }


def run(heads: int, samples: int, grid: int, method: str, tiny: bool) -> dict:
    if tiny:  # the smoke test stays in-process (peak memory is then the process's, not the configuration's)
        return child(heads, samples, grid, method, tiny)
    args = [sys.executable, __file__, "--child", f"{heads},{samples},{grid},{method}"] + (["--tiny"] if tiny else [])
    out = subprocess.run(args, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def slope(x: list[float], y: list[float]) -> float:
    return float(np.polyfit(np.log(x), np.log(y), 1)[0])


def plot(res: dict, path: str) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(9, 3.6))
    for method, mk in (("fd", "o"), ("jvp", "s")):
        w = [r for r in res["work"] if r["method"] == method]
        s = [r for r in res["model"] if r["method"] == method]
        ax[0].loglog(
            [r["points"] for r in w],
            [r["wall_s"] for r in w],
            mk + "-",
            label=f"{method} (slope {res['slopes'][f'work_{method}']:.2f})",
        )
        ax[1].loglog(
            [r["params_M"] for r in s],
            [r["wall_s"] for r in s],
            mk + "-",
            label=f"{method} (slope {res['slopes'][f'model_{method}']:.2f})",
        )
    ax[0].set(xlabel="samples × grid points", ylabel="probe wall time (s)", title="work (hidden 256)")
    ax[1].set(
        xlabel="parameters (M)",
        ylabel="probe wall time (s)",
        title=f"model size ({FIXED_WORK[0]}×{FIXED_WORK[1]} points)",
    )
    for a in ax:
        a.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # no overlapping minor labels on log axes
        a.legend()
        a.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--json", default=None)
    p.add_argument("--plot", default=None)
    a = p.parse_args(argv)
    if a.child:
        h, s, g, method = a.child.split(",")
        print(json.dumps(child(int(h), int(s), int(g), method, a.tiny)))
        return {}
    res: dict = {
        "network": "DiTTransformer2DModel, 6 blocks, 16×16×4 latents, random weights",
        "threads": 1,
        "batch_size": 4,
        "work": [],
        "model": [],
    }
    for method in ("fd", "jvp"):
        for s, g in WORK[:2] if a.tiny else WORK:
            res["work"].append(run(MID, s, g, method, a.tiny))
            print(res["work"][-1], flush=True)
        for h in WIDTHS[:2] if a.tiny else WIDTHS:
            res["model"].append(run(h, *FIXED_WORK, method, a.tiny))
            print(res["model"][-1], flush=True)
    res["slopes"] = {}
    for method in ("fd", "jvp"):
        w = [r for r in res["work"] if r["method"] == method]
        m = [r for r in res["model"] if r["method"] == method]
        res["slopes"][f"work_{method}"] = slope([r["points"] for r in w], [r["wall_s"] for r in w])
        res["slopes"][f"model_{method}"] = slope([r["params_M"] for r in m], [r["wall_s"] for r in m])
        res["slopes"][f"work_{method}_memory"] = slope(
            [r["points"] for r in w], [max(r["peak_rss_growth_MiB"], 1e-3) for r in w]
        )
        # wall = fixed + per_point · points: the per-run work (FD: the rounding-noise estimate) apart from the rest
        per_point, fixed = np.polyfit([r["points"] for r in w], [r["wall_s"] for r in w], 1)
        res["linear_fit"] = res.get("linear_fit", {}) | {method: {"fixed_s": fixed, "per_point_s": per_point}}
    print(res["slopes"], res["linear_fit"])
    if a.json:
        from lipscope.io import atomic_write_text

        atomic_write_text(a.json, json.dumps(res, indent=1) + "\n")
    if a.plot:
        plot(res, a.plot)
    return res


if __name__ == "__main__":
    main()
