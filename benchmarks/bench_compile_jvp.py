"""Why lipscope refuses ``--compile`` with ``--method jvp``: a compiled network's forward-mode tangent, measured.

    python benchmarks/bench_compile_jvp.py --json benchmarks/results/cpu-compile-jvp.json

A small UNet (two levels, one attention block; random weights) is differentiated in t by :func:`lipscope.fwad.jvp`
(dual tensors) and by ``torch.func.jvp``, eagerly and through ``torch.compile`` (default backend), all under
lipscope's forward-AD patches. Recorded: the largest |tangent| of each, the compiled tangents' largest difference
from the eager one, and the seconds of each call (the compiled ones include compiling). On torch 2.13 (CPU) the
compiled tangent is identically zero: no speed-up can be taken from it, and a zero derivative is exactly the silent
wrong number lipscope exists to avoid (issue 22 item 1).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_probe import CIFAR10_DDPM  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    import diffusers

    from lipscope.fwad import forward_ad_patches, jvp

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", default=None)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--cifar", action="store_true", help="the CIFAR-10 DDPM UNet (35.7 M) instead of the small one")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    res: dict = {"torch": torch.__version__, "threads": 1, "rows": {}}
    cfg = CIFAR10_DDPM if a.cifar else dict(
        sample_size=16, in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1,
        norm_num_groups=8, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    )  # fmt: skip
    unet = diffusers.UNet2DModel(**cfg).eval()
    s = cfg["sample_size"]
    x, t = torch.randn(2, 3, s, s), torch.tensor([3.0, 500.0])
    res["network"] = "cifar10-ddpm" if a.cifar else "small unet"

    def f(s: torch.Tensor) -> torch.Tensor:
        return unet(x, s).sample

    with torch.no_grad(), forward_ad_patches(unet):
        compiled = torch.compile(f)
        for name, fn, how in (
            ("eager, dual tensors", f, "dual"),
            ("eager, torch.func.jvp", f, "func"),
            ("compiled, dual tensors", compiled, "dual"),
            ("compiled, torch.func.jvp", compiled, "func"),
        ):
            t0 = time.perf_counter()
            if how == "dual":
                tan = jvp("unet", fn, (t,), (torch.ones_like(t),))[1]
            else:
                tan = torch.func.jvp(fn, (t,), (torch.ones_like(t),))[1]
            first = time.perf_counter() - t0
            steady = []
            for _ in range(a.reps):  # after the first call (which compiles): the steady state
                t0 = time.perf_counter()
                if how == "dual":
                    jvp("unet", fn, (t,), (torch.ones_like(t),))
                else:
                    torch.func.jvp(fn, (t,), (torch.ones_like(t),))
                steady.append(time.perf_counter() - t0)
            res["rows"][name] = {
                "first_call_s": first,
                "steady_s": statistics.median(steady),
                "max_abs_tangent": tan.abs().max().item(),
            }
            if name.startswith("eager, dual"):
                ref = tan
            res["rows"][name]["max_abs_diff_from_eager"] = (tan - ref).abs().max().item()
    for name, r in res["rows"].items():
        tan, diff = r["max_abs_tangent"], r["max_abs_diff_from_eager"]
        print(f"{name:26s} max|tangent| {tan:.4g}  max|Δ| from eager {diff:.4g}  steady {r['steady_s']:.4f}s")
    if a.json:
        from lipscope.io import atomic_write_text

        atomic_write_text(a.json, json.dumps(res, indent=2) + "\n")
    return res


if __name__ == "__main__":
    main()
