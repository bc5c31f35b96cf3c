"""GPU suite: every family's denoiser at its real size, raw forward vs lipscope's probes, one command.

    python benchmarks/gpu_suite.py                          # CUDA, all models, bf16,tf32,fp32 (< 8 min on 80 GB)
    python benchmarks/gpu_suite.py --precision bf16 --models flux-dev --compile
    python benchmarks/gpu_suite.py --tiny --device cpu      # every code path at tiny sizes (tests/)

Random-weight denoisers built from the real diffusers classes with the published configs of SD 1.5's UNet, SDXL's
UNet, DiT-XL/2-256, PixArt-α-512, SD3-medium and FLUX.1-dev (``MODELS``), each wrapped by its lipscope family
(``lipscope.families``: the same EpsModel a loaded pipeline gets) with random conditioning of the real shapes. Where
the full model does not fit next to its activations in a precision, the first blocks are kept (``--max-blocks``
and ``FIT_BLOCKS``; the JSON and the table say which). For each model and precision (fp32, tf32: fp32 weights with
TF32 matmuls/convolutions, bf16: bfloat16 weights):

  raw      the family's denoiser call (``EpsModel.net``, as its pipeline makes it), at the batch sizes of
           ``--batches`` until one is slower per evaluation or out of memory; the best is used below;
  fd       ``probe(method="fd")`` at that batch (evaluations/s and ÷ raw);
  jvp      ``probe(method="jvp")`` (JVP evaluations/s, raw forwards per JVP);
  jvp-ode  the probe's ODE total derivative where this lipscope has it (else "n/a" with the reason);
  compile  with ``--compile``: raw and FD under ``torch.compile`` (``lipscope.speed``); JVP is refused there.

Per mode: peak memory (``torch.cuda.max_memory_allocated``, CUDA only) and model FLOP utilisation (FLOPs of one call
counted by ``torch.utils.flop_counter`` ÷ seconds ÷ the device's peak for the precision, ``PEAK_TFLOPS``; n/a on
an unknown device). Writes one JSON (``--json``) and a markdown table (``--md``); docs/performance.md says where.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_models import MODELS, Model, build  # noqa: E402

import lipscope  # noqa: E402
from lipscope.errors import InputError  # noqa: E402
from lipscope.probe import METHODS, probe  # noqa: E402
from lipscope.speed import Speed, accelerated  # noqa: E402

# dense peak TFLOP/s per precision (vendor data sheets, no sparsity); tf32 is the tensor-core rate
PEAK_TFLOPS = {
    "H200": {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4},
    "H100 80GB HBM3": {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4},  # SXM
    "H100 PCIe": {"fp32": 51.2, "tf32": 378.0, "bf16": 756.0},
    "H100": {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4},
    "A100": {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0},
}
PRECISIONS = ("fp32", "tf32", "bf16")


def peak_tflops(dev: torch.device, precision: str) -> float | None:
    if dev.type != "cuda":
        return None
    name = torch.cuda.get_device_name(dev)
    for key, peaks in PEAK_TFLOPS.items():  # most specific names first
        if key in name:
            return peaks[precision]
    return None


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def median_seconds(fn, dev: torch.device, reps: int) -> float:
    """Median wall seconds of ``reps`` calls after one warm-up call."""
    fn()
    sync(dev)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync(dev)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def reset_peak(dev: torch.device) -> None:
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)


def peak_gib(dev: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def flops_of(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        fn()
    return int(fc.get_total_flops())


def raw_call(m: lipscope.EpsModel, b: int):
    """The family's denoiser call for b evaluations (2b rows under CFG), as bench_families does it."""
    x = torch.randn(b, *m.sample_shape, device=m.device, dtype=m.dtype)
    c = torch.full((b,), 500.0, device=m.device, dtype=m.dtype)
    kc, _ = m.conditioning.rows(torch.arange(b), m.device, m.dtype) if m.conditioning is not None else ({}, None)

    def call() -> torch.Tensor:
        with torch.inference_mode():
            return m.net(x, c, **kc)

    return call


def best_raw(m, dev, batches: list[int], reps: int) -> dict[str, Any]:
    """Raw evaluations/s per batch; stops at the first batch slower per evaluation than the best, or out of memory."""
    per: dict[str, float] = {}
    best_b, best_rate = batches[0], 0.0
    for b in batches:
        try:
            reset_peak(dev)
            s = median_seconds(raw_call(m, b), dev, reps)
        except RuntimeError as e:
            if not is_oom(e):
                raise
            per[str(b)] = float("nan")
            break
        per[str(b)] = b / s
        if b / s < best_rate:
            break
        best_b, best_rate = b, b / s
    return {"per_batch_evals_per_s": per, "batch": best_b, "evals_per_s": best_rate}


def mode_row(dev, precision: str, seconds: float, evals: int, flops: int | None) -> dict[str, Any]:
    peak = peak_tflops(dev, precision)
    achieved = None if flops is None else flops / seconds / 1e12
    return {
        "seconds": seconds,
        "evals_per_s": evals / seconds,
        "peak_mem_gib": peak_gib(dev),
        "tflops": achieved,
        "mfu": None if (achieved is None or peak is None) else achieved / peak,
    }


# FD's step where Δt = 1 is below a network's time resolution (bf16 time input)
FD_DT_COARSE = 100.0


def run_probe(m, x0, method: str, b: int, grid: str, dev, reps: int) -> tuple[float, int, dict[str, Any]]:
    """(least wall seconds of ``reps`` probe calls, network evaluations of one); bf16 FD keeps its noise-limited rows
    (speed only). Peak memory is that of the calls."""
    reset_peak(dev)
    best, evals, step = float("inf"), 0, {}  # step: the FD step it ran at and why, where not Δt = 1
    for _ in range(reps):
        t0 = time.perf_counter()
        kw = dict(method=method, timesteps=grid, samples=x0.shape[0], batch_size=str(max(2, b)), data_range=None)
        try:
            df = probe(m, x0, allow_noise_limited=True, **kw)
        except InputError as e:  # a network that reads t in bf16 (Flux) cannot resolve Δt = 1: FD's speed at a step
            if "time resolution" not in str(e):  # it can resolve (the cost of an FD row does not depend on Δt)
                raise
            step = {"dt": FD_DT_COARSE, "dt_why": str(e)}
            df = probe(m, x0, allow_noise_limited=True, dt=FD_DT_COARSE, **kw)
        sync(dev)
        # jvp-ode: items (2 JVPs each, lipscope.ode), counted apart from the runner's forwards
        best, evals = min(best, time.perf_counter() - t0), int(df.attrs.get("forwards") or df.attrs.get("ode_items", 0))
    return best, evals, step


def bench_model(spec: Model, precision: str, a, dev) -> dict[str, Any]:
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    m, blocks = build(spec, a.tiny, dev, dtype, a.max_blocks)
    res: dict[str, Any] = {
        "model": spec.name,
        "class": spec.cls,
        "precision": precision,
        "blocks": blocks,
        "params_M": sum(p.numel() for p in m.module.parameters()) / 1e6,
        "sample_shape": list(m.sample_shape),
        "conditioning": spec.conditioning,
    }
    speed = Speed(tf32=precision == "tf32")
    with accelerated(m, speed) as fast:
        raw = best_raw(fast, dev, a.batch_list, a.reps)
        b = raw["batch"]
        f1 = flops_of(raw_call(fast, 1))  # FLOPs of one evaluation (CFG: both branches)
        reset_peak(dev)
        s = median_seconds(raw_call(fast, b), dev, a.reps)
        res["raw"] = {**raw, **mode_row(dev, precision, s, b, f1 * b)}
        x0 = torch.randn(b, *m.sample_shape, generator=torch.Generator().manual_seed(0))
        grid = a.grid
        for method in ("fd", "jvp", "jvp-ode"):
            if method.split(",")[0] not in METHODS:
                res[method] = {"n/a": f"n/a: no {method} in this lipscope (methods: {', '.join(METHODS)})"}
                continue
            try:
                wall, evals, step = run_probe(fast, x0, method, b, grid, dev, a.probe_reps)
            except RuntimeError as e:
                if not is_oom(e):
                    raise
                res[method] = {"n/a": f"out of memory at batch {b}"}
                continue
            row = mode_row(dev, precision, wall, evals, f1 * evals)  # FD: f1 per evaluation; JVP: replaced below
            row["over_raw"] = row["evals_per_s"] / res["raw"]["evals_per_s"]
            if method == "jvp":  # FLOPs of one JVP evaluation, counted through lipscope.fwad.jvp
                row["tflops"] = jvp_flops(fast) * evals / wall / 1e12
                pk = peak_tflops(dev, precision)
                row["mfu"] = None if pk is None else row["tflops"] / pk
                row["raw_forwards_per_jvp"] = 1.0 / row["over_raw"]
            row |= step  # said in the row: the FD step it ran at, and why
            res[method] = row
    if a.compile:
        res["compile"] = bench_compiled(m, precision, a, dev, res["raw"]["batch"], f1)
    del m, fast
    reset_peak(dev)
    return res


def jvp_flops(m) -> int:
    """FLOPs of one JVP evaluation, through :func:`lipscope.fwad.jvp` as the probe runs it (tangent ops included)."""
    from lipscope.fwad import forward_ad_patches, jvp

    x = torch.randn(1, *m.sample_shape, device=m.device, dtype=m.dtype)
    t = torch.full((1,), 500.0, device=m.device, dtype=torch.float32)
    with forward_ad_patches(m.module), torch.no_grad():
        return flops_of(lambda: jvp(m.name, lambda s: m(x, s), (t,), (torch.ones_like(t),)))


def bench_compiled(m, precision: str, a, dev, b: int, f1: int) -> dict[str, Any]:
    """raw and FD under torch.compile (``--compile-mode``; CPU tests: the eager backend, same path, no compiler)."""
    speed = Speed(tf32=precision == "tf32", compile=a.compile_mode, compile_backend=a.compile_backend)
    out: dict[str, Any] = {"mode": a.compile_mode, "backend": a.compile_backend}
    with accelerated(m, speed) as fast:
        reset_peak(dev)
        s = median_seconds(raw_call(fast, b), dev, a.reps)
        out["raw"] = mode_row(dev, precision, s, b, f1 * b)
        x0 = torch.randn(b, *m.sample_shape, generator=torch.Generator().manual_seed(0))
        run_probe(fast, x0, "fd", b, a.grid, dev, 1)  # compiles (one graph per batch shape)
        wall, evals, _ = run_probe(fast, x0, "fd", b, a.grid, dev, a.probe_reps)
        out["fd"] = {**mode_row(dev, precision, wall, evals, f1 * evals)}
        out["fd"]["over_raw"] = out["fd"]["evals_per_s"] / out["raw"]["evals_per_s"]
    out["jvp"] = {"n/a": "lipscope refuses compile with method jvp (forward AD through compiled graphs)"}
    torch._dynamo.reset()
    return out


def fmt(v: Any, spec: str = ".3g") -> str:
    return "n/a" if v is None or (isinstance(v, float) and v != v) else format(v, spec)


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    head = f"Device: {meta['device_name']} · torch {meta['torch']} · diffusers {meta['diffusers']} · {meta['date']}\n\n"
    lines = [
        "| model | blocks | precision | batch | raw evals/s | raw MFU | raw GiB | FD ÷ raw | FD GiB | JVP ÷ raw "
        "(forwards/JVP) | JVP MFU | JVP GiB | jvp-ode | compiled FD ÷ eager raw |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        fd, jv, ode = r.get("fd", {}), r.get("jvp", {}), r.get("jvp-ode", {})
        comp = r.get("compile", {}).get("fd", {})
        cratio = comp["evals_per_s"] / r["raw"]["evals_per_s"] if comp else None
        dtcell = f" (Δt = {fd['dt']:g})" if "dt" in fd else ""
        jcell = "n/a" if "n/a" in jv else f"{fmt(jv['over_raw'], '.2f')} ({fmt(jv['raw_forwards_per_jvp'], '.2f')})"
        lines.append(
            f"| {r['model']} | {r['blocks']} | {r['precision']} | {r['raw']['batch']} | {fmt(r['raw']['evals_per_s'])} "
            f"| {fmt(r['raw']['mfu'], '.1%')} | {fmt(r['raw']['peak_mem_gib'], '.1f')} "
            f"| {fmt(fd.get('over_raw'), '.2f')}{dtcell} "
            f"| {fmt(fd.get('peak_mem_gib'), '.1f')} | {jcell} | {fmt(jv.get('mfu'), '.1%')} "
            f"| {fmt(jv.get('peak_mem_gib'), '.1f')} | {ode.get('n/a', fmt(ode.get('over_raw'), '.2f'))} "
            f"| {fmt(cratio, '.2f')} |"
        )
    coarse = sorted({r["model"] for r in rows if "dt" in r.get("fd", {})})
    tail = (
        f"\nFD at Δt = {FD_DT_COARSE:g} for {', '.join(coarse)}: Δt = 1 is below the time resolution of a network that "
        "reads t in bfloat16 (the cost of an FD row does not depend on Δt)\n"
        if coarse
        else ""
    )
    tail += (
        f"\nSkipped (over --budget-s): {', '.join(meta['skipped_over_budget'])}\n"
        if meta.get("skipped_over_budget")
        else ""
    )
    return head + "\n".join(lines) + "\n" + tail


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--models", default=",".join(MODELS), help=f"comma list of {', '.join(MODELS)}")
    p.add_argument("--precision", default="bf16,tf32,fp32", help="comma list of fp32, tf32, bf16 (run in this order)")
    p.add_argument("--batches", default="1,2,4,8,16,32", help="raw batch sizes tried, in order")
    p.add_argument("--grid", default="10,500", help="probe timesteps (model steps)")
    p.add_argument("--reps", type=int, default=3, help="timed calls per raw measurement (median)")
    p.add_argument("--probe-reps", type=int, default=2, help="probe calls per mode (least time)")
    p.add_argument(
        "--budget-s",
        type=float,
        default=450.0,
        help="skip the (model, precision) pairs left once this many seconds have passed",
    )
    p.add_argument("--max-blocks", type=int, default=None, help="keep at most this many blocks of every model")
    p.add_argument("--compile", action="store_true", help="also raw and FD under torch.compile")
    p.add_argument("--compile-mode", default="default")
    p.add_argument("--compile-backend", default="inductor")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (tiny default: 1)")
    p.add_argument("--tiny", action="store_true", help="tiny configs of the same classes: every path, no numbers")
    p.add_argument("--json", default="benchmarks/results/gpu-suite.json")
    p.add_argument("--md", default="benchmarks/results/gpu-suite.md")
    a = p.parse_args(argv)
    if a.tiny:
        a.batches, a.reps, a.grid, a.probe_reps = "1,2", 1, "10,500", 1
        a.threads = a.threads or 1
    if a.threads:
        torch.set_num_threads(a.threads)
    a.batch_list = [int(v) for v in a.batches.split(",")]
    dev = torch.device(a.device)
    precs = a.precision.split(",")
    bad = [q for q in precs if q not in PRECISIONS] + [n for n in a.models.split(",") if n not in MODELS]
    if bad:
        p.error(f"unknown precision or model: {', '.join(bad)}")
    import diffusers

    meta = {
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "tiny": a.tiny,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "args": vars(a) | {"batch_list": None},
    }
    rows, skipped, start = [], [], time.perf_counter()
    for prec in precs:  # the first precision named runs for every model before the next one starts
        for name in a.models.split(","):
            if rows and time.perf_counter() - start > a.budget_s:
                skipped.append(f"{name} {prec}")
                continue
            t0 = time.perf_counter()
            r = bench_model(MODELS[name], prec, a, dev)
            r["suite_seconds"] = time.perf_counter() - t0
            rows.append(r)
            print(
                f"{name:10s} {prec:5s} batch {r['raw']['batch']:3d}  raw {r['raw']['evals_per_s']:9.2f}/s  "
                f"fd ÷ raw {fmt(r['fd'].get('over_raw'), '.2f')}  jvp ÷ raw {fmt(r['jvp'].get('over_raw'), '.2f')}  "
                f"({r['suite_seconds']:.0f} s)",
                flush=True,
            )
    meta["skipped_over_budget"] = skipped
    out = {"meta": meta, "rows": rows}
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(out, indent=1, default=str) + "\n")
    if a.md:
        Path(a.md).write_text(markdown(rows, meta))
    return out


if __name__ == "__main__":
    main()
