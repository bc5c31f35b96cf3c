"""Probe throughput vs the raw forward pass of the same UNet, in one run.

    python benchmarks/bench_probe.py                 # CIFAR-10 DDPM architecture, random weights
    python benchmarks/bench_probe.py --tiny          # smoke test (tests/ runs this)
    python benchmarks/bench_probe.py --device cuda --batches 64,128,256,512

Measures, for the same network:
  raw      unet(x, t) at each batch size in --batches (best one reported), no probe overhead;
  probe    lipscope's batched FD runner (--batch-size auto and at the raw best), forwards/s;
  naive    a per-timestep Python loop, one (sample, t) pair per call (batch 2): what a first script does;
  per-t    a per-timestep loop batching the samples of that timestep (one call per grid point);
  jvp      the exact probe (--method jvp) at float32 and at bfloat16 (weights cast), with the error of its K
           against float64 JVP, and the wall time of each probe mode on the same (samples × grid) workload;
  memory   peak CUDA memory of each mode (torch.cuda.max_memory_allocated; not measured on CPU, where the
           process-wide RSS cannot be split by mode).
Prints the ratios and, with --json, writes them to a file.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np
import torch
from diffusers import UNet2DModel

import lipscope
from lipscope.batching import RunStats
from lipscope.models import from_unet
from lipscope.points import fd_points, noisy_inputs
from lipscope.probe import fd_norms, jvp_norms
from lipscope.rng import noise as per_sample_noise

# google/ddpm-cifar10-32's unet/config.json (35.7 M parameters)
CIFAR10_DDPM = dict(
    sample_size=32,
    in_channels=3,
    out_channels=3,
    layers_per_block=2,
    block_out_channels=(128, 256, 256, 256),
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    downsample_padding=0,
    flip_sin_to_cos=False,
    freq_shift=1,
    norm_eps=1e-6,
    norm_num_groups=32,
    attention_head_dim=None,
    act_fn="silu",
)
TINY = dict(
    sample_size=8,
    in_channels=1,
    out_channels=1,
    layers_per_block=1,
    block_out_channels=(4, 8),
    norm_num_groups=2,
    down_block_types=("DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D"),
)


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, dev: torch.device, min_seconds: float) -> float:
    """Seconds per call: one warm-up call, then repeat until min_seconds have passed."""
    fn()
    _sync(dev)
    n, t0 = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        _sync(dev)
        el = time.perf_counter() - t0
        if el >= min_seconds:
            return el / n


def _peak_reset(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)


def _peak(dev: torch.device) -> float:
    return float(torch.cuda.max_memory_allocated(dev)) if dev.type == "cuda" else float("nan")


def raw_throughput(unet, shape, dev, batches, min_seconds, dtype=torch.float32) -> dict[int, float]:
    out = {}
    for b in batches:
        x = torch.randn(b, *shape, device=dev, dtype=dtype)
        t = torch.linspace(0, 999, b, device=dev)
        with torch.inference_mode():
            out[b] = b / timed(lambda x=x, t=t: unet(x, t).sample, dev, min_seconds)
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny UNet smoke run")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batches", default="8,16,32,64", help="raw-forward batch sizes to try")
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--grid", type=int, default=8, help="number of timesteps")
    p.add_argument("--naive-pairs", type=int, default=16, help="(sample, t) pairs timed for the naive loop")
    p.add_argument("--min-seconds", type=float, default=4.0)
    p.add_argument("--json", default=None, help="write results here")
    a = p.parse_args(argv)
    if a.tiny:
        a.batches, a.samples, a.grid, a.naive_pairs, a.min_seconds = "4,8", 4, 4, 4, 0.05

    dev = torch.device(a.device)
    torch.manual_seed(0)
    unet = UNet2DModel(**(TINY if a.tiny else CIFAR10_DDPM)).to(dev).eval()
    model = from_unet(unet, {"num_train_timesteps": 1000}, name="bench", device=dev)
    shape = model.sample_shape
    batches = [int(b) for b in a.batches.split(",")]

    raw = raw_throughput(unet, shape, dev, batches, a.min_seconds)
    best_b = max(raw, key=raw.get)

    x0 = lipscope.load_data("digits", a.samples, 0, shape)
    noise = per_sample_noise(0, a.samples, shape)
    pts = fd_points(np.linspace(0, 900, a.grid).round(), 1.0, "forward", 1000)

    def probe_rate(bs) -> float:
        st = RunStats()
        fd_norms(model, x0, noise, pts, batch_size=bs, stats=st)
        return st.forwards_per_s

    probe_auto, probe_best = probe_rate("auto"), probe_rate(best_b)

    # naive: one (sample, t) pair per call, Python loop over timesteps and samples
    t_x = torch.as_tensor(pts.t, dtype=torch.float64)
    pairs = [(j, i) for j in range(len(pts.t)) for i in range(a.samples)][: a.naive_pairs]

    def naive():
        with torch.inference_mode():
            for j, i in pairs:
                x = noisy_inputs(model, x0[i : i + 1], noise[i : i + 1], t_x[j : j + 1])
                e0 = model(x, torch.tensor([pts.t_a[j]]))
                e1 = model(x, torch.tensor([pts.t_b[j]]))
                torch.linalg.vector_norm((e1 - e0).double())

    naive_rate = 2 * len(pairs) / timed(naive, dev, a.min_seconds)

    # per-t: one call per grid point holding that timestep's samples at t_a and t_b
    def per_t():
        with torch.inference_mode():
            for j in range(len(pts.t)):
                x = noisy_inputs(model, x0, noise, t_x[j].repeat(a.samples))
                tt = torch.cat([torch.full((a.samples,), pts.t_a[j]), torch.full((a.samples,), pts.t_b[j])])
                e = model(torch.cat([x, x]), tt)
                torch.linalg.vector_norm((e[a.samples :] - e[: a.samples]).reshape(a.samples, -1).double(), dim=1)

    per_t_rate = 2 * a.samples * len(pts.t) / timed(per_t, dev, a.min_seconds)

    # the exact probe at float32 and bfloat16, and float64 for the error of K; each on the same workload
    import copy

    grid = np.asarray(pts.t)

    def jvp_run(m, bs) -> tuple[float, float, np.ndarray]:
        st = RunStats()
        _peak_reset(dev)
        t0 = time.perf_counter()
        K = jvp_norms(m, x0, noise, grid, batch_size=bs, stats=st).numpy()
        return time.perf_counter() - t0, _peak(dev), K

    m16 = from_unet(copy.deepcopy(unet), {"num_train_timesteps": 1000}, name="bf16", device=dev, dtype="bfloat16")
    m64 = from_unet(copy.deepcopy(unet), {"num_train_timesteps": 1000}, name="f64", device=dev, dtype="float64")
    raw16 = raw_throughput(m16.module, shape, dev, [best_b], a.min_seconds, torch.bfloat16)[best_b]
    jvp32_s, jvp32_mem, K32 = jvp_run(model, best_b)
    jvp16_s, jvp16_mem, K16 = jvp_run(m16, best_b)
    _, _, K64 = jvp_run(m64, best_b)
    st = RunStats()
    _peak_reset(dev)
    t0 = time.perf_counter()
    fd_norms(model, x0, noise, pts, batch_size=best_b, stats=st)
    fd32_s, fd32_mem = time.perf_counter() - t0, _peak(dev)
    per_t_s = 2 * a.samples * len(pts.t) / per_t_rate

    def err(K: np.ndarray) -> float:  # of the table's K_mean, worst grid point
        return float(np.max(np.abs(K.mean(0) - K64.mean(0)) / K64.mean(0)))

    res = {
        "network": "tiny" if a.tiny else "CIFAR-10 DDPM UNet2DModel (35.7M params, random weights)",
        "device": str(dev),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "raw_forwards_per_s": {str(k): v for k, v in raw.items()},
        "raw_best_batch": best_b,
        "raw_best": raw[best_b],
        "raw_bf16_at_best_batch": raw16,
        "probe_auto": probe_auto,
        "probe_at_best_batch": probe_best,
        "naive_loop": naive_rate,
        "per_timestep_loop": per_t_rate,
        "ratio_probe_auto_vs_raw_best": probe_auto / raw[best_b],
        "ratio_probe_best_vs_raw_best": probe_best / raw[best_b],
        "ratio_probe_auto_vs_naive": probe_auto / naive_rate,
        "ratio_probe_auto_vs_per_timestep": probe_auto / per_t_rate,
        "ratio_raw_bf16_vs_raw_fp32": raw16 / raw[best_b],
        "wall_s_fd_fp32_probe": fd32_s,
        "wall_s_jvp_fp32_probe": jvp32_s,
        "wall_s_jvp_bf16_probe": jvp16_s,
        "wall_s_per_timestep_fd_loop": per_t_s,
        "ratio_wall_jvp_bf16_vs_fd_fp32": jvp16_s / fd32_s,
        "ratio_speed_jvp_bf16_vs_per_timestep_fd": per_t_s / jvp16_s,
        "jvp_fp32_rel_err_vs_f64": err(K32),
        "jvp_bf16_rel_err_vs_f64": err(K16),
        "peak_mem_bytes": {"fd_fp32": fd32_mem, "jvp_fp32": jvp32_mem, "jvp_bf16": jvp16_mem}
        if dev.type == "cuda"
        else "not measured on CPU",
    }
    for k, v in res.items():
        print(f"{k:34s} {v:.4g}" if isinstance(v, float) else f"{k:34s} {v}")
    if a.json:
        from lipscope.io import atomic_write_text

        atomic_write_text(a.json, json.dumps(res, indent=2) + "\n")
    return res


if __name__ == "__main__":
    main()
