"""Cost of the exact derivative: one JVP through the UNet vs one forward pass of the same UNet.

    python benchmarks/bench_jvp.py                  # CIFAR-10 DDPM architecture, random weights, CPU
    python benchmarks/bench_jvp.py --tiny           # smoke test (tests/ runs this)

Per batch size it times, on the same inputs: the plain forward (stock SDPA attention and fused
GroupNorm), the forward with lipscope's forward-AD patches applied (AttnProcessor + functional
GroupNorm, no tangent), and ``torch.func.jvp`` w.r.t. the timestep (what ``--method jvp`` runs).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from diffusers import UNet2DModel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_probe import CIFAR10_DDPM, TINY, timed  # noqa: E402

from lipscope.fwad import forward_ad_patches  # noqa: E402
from lipscope.models import from_unet  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batches", default="8,16")
    p.add_argument("--min-seconds", type=float, default=4.0)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    if a.tiny:
        a.batches, a.min_seconds = "4", 0.05
    dev = torch.device(a.device)
    torch.manual_seed(0)
    unet = UNet2DModel(**(TINY if a.tiny else CIFAR10_DDPM)).to(dev).eval()
    model = from_unet(unet, {"num_train_timesteps": 1000}, device=dev)
    res: dict = {
        "network": "tiny" if a.tiny else "CIFAR-10 DDPM UNet2DModel (random weights)",
        "device": str(dev),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "per_batch": {},
    }
    for b in (int(v) for v in a.batches.split(",")):
        x = torch.randn(b, *model.sample_shape, device=dev)
        t = torch.linspace(1, 999, b, device=dev)
        with torch.no_grad():
            fwd = timed(lambda x=x, t=t: model(x, t), dev, a.min_seconds)
            with forward_ad_patches(unet):
                patched = timed(lambda x=x, t=t: model(x, t), dev, a.min_seconds)
                jvp = timed(
                    lambda x=x, t=t: torch.func.jvp(lambda s: model(x, s), (t,), (torch.ones_like(t),)),
                    dev,
                    a.min_seconds,
                )
        res["per_batch"][str(b)] = {
            "forward_s": fwd,
            "patched_forward_s": patched,
            "jvp_s": jvp,
            "jvp_over_forward": jvp / fwd,
            "patched_over_forward": patched / fwd,
        }
        print(
            f"batch {b:4d}: forward {fwd:.4f}s  patched {patched:.4f}s ({patched / fwd:.2f}×)  "
            f"jvp {jvp:.4f}s ({jvp / fwd:.2f}× forward)"
        )
    if a.json:
        from lipscope.io import atomic_write_text

        atomic_write_text(a.json, json.dumps(res, indent=2) + "\n")
    return res


if __name__ == "__main__":
    main()
