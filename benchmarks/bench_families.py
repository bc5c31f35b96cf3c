"""Probe throughput per model family vs the raw forward of the same denoiser, in one run.

    python benchmarks/bench_families.py              # tiny random-weight folders of tests/ (CPU, a few minutes)
    python benchmarks/bench_families.py --quick --only flux   # smoke test (tests/ runs this)
    python benchmarks/bench_families.py --json out.json

For each family (the tiny pipeline folders of tests/*fixtures*.py: DiT, SD, SDXL, SD3, PixArt, Flux) and each
conditioning (unconditional / conditional, and classifier-free guidance where the family has an unconditional
branch), at one batch of B model evaluations:

  raw    the family's denoiser call exactly as its pipeline makes it (``EpsModel.net``: the diffusers module
         with its conditioning kwargs; 2B rows under CFG, as the pipelines batch both branches), timed in a loop;
  fd     lipscope's batched forward-difference probe (``probe(method="fd", batch_size=B)``);
  jvp    lipscope's forward-mode JVP probe (one JVP = one evaluation with its tangent).

Ratios are evaluations/s of the probe over evaluations/s of the raw call (fd: the cost of noising, the
conversion to ε and the bookkeeping; jvp: the price of the tangent). Tiny networks make fixed per-call
costs look larger than on real models.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the tiny folder builders of the test suite

from lipscope.families import resolve_conditioning  # noqa: E402
from lipscope.loading import load_model  # noqa: E402
from lipscope.probe import probe  # noqa: E402


def folders(d: Path) -> dict[str, tuple[Path, dict]]:
    from family_fixtures import save_dit_pipeline, save_prompt_embeds, save_sd_pipeline
    from family_fixtures2 import save_embeds, save_pixart_folder, save_sd3_folder
    from family_fixtures3 import save_flux_embeds, save_flux_folder

    return {
        "dit": (save_dit_pipeline(d / "dit"), {"class_labels": [1, 2]}),
        "sd": (save_sd_pipeline(d / "sd"), {"prompt_embeds": str(save_prompt_embeds(d / "sd.st"))}),
        "sdxl": (
            save_sd_pipeline(d / "sdxl", xl=True),
            {"prompt_embeds": str(save_prompt_embeds(d / "xl.st", xl=True))},
        ),
        "sd3": (save_sd3_folder(d / "sd3"), {"prompt_embeds": str(save_embeds(d / "sd3.st", "sd3"))}),
        "pixart": (save_pixart_folder(d / "pixart"), {"prompt_embeds": str(save_embeds(d / "px.st", "pixart"))}),
        "flux": (save_flux_folder(d / "flux"), {"prompt_embeds": str(save_flux_embeds(d / "flux.st"))}),
    }


def raw_rate(m, b: int, reps: int) -> float:
    """Evaluations/s of the family's own denoiser call at b evaluations per call (2b rows under CFG)."""
    x = torch.randn(b, *m.sample_shape, dtype=m.dtype)
    c = torch.full((b,), 10.0, dtype=m.dtype)
    kw = {}
    if m.conditioning is not None:
        kc, ku = m.conditioning.rows(torch.arange(b), m.device, m.dtype)
        if m.conditioning.guidance_scale is not None and ku is not None:
            from lipscope.conditioning import cat_kwargs

            x, c, kc = torch.cat([x, x]), torch.cat([c, c]), cat_kwargs(kc, ku)
        kw = kc
    with torch.inference_mode():
        m.net(x, c, **kw)  # warm-up
        t0 = time.perf_counter()
        for _ in range(reps):
            m.net(x, c, **kw)
        return b * reps / (time.perf_counter() - t0)


def bench(name: str, path: Path, cond_args: dict, b: int, reps: int, samples: int) -> list[dict]:
    m = load_model(str(path))
    rows = []
    cases = [("uncond", None)] if name == "dit" else []
    cases += [("cond", None)]
    if name != "flux":  # FLUX.1-dev is guidance-distilled: its guidance is an input, not a CFG branch
        cases.append(("cfg", 2.0))
    for label, w in cases:
        args = {} if label == "uncond" else cond_args
        cond = resolve_conditioning(m, args.get("class_labels"), args.get("prompt_embeds"), w)
        mm = dataclasses.replace(m, conditioning=cond)
        x0 = torch.randn(samples, *m.sample_shape, generator=torch.Generator().manual_seed(0))
        raw = max(raw_rate(mm, b, reps) for _ in range(3))
        res = {"family": name, "conditioning": label, "batch": b, "raw_evals_per_s": raw}
        for method in ("fd", "jvp"):
            kw = dict(timesteps="0,1,2,5,10,20,50,100,200,500", samples=samples, data_range=None, batch_size=str(b))
            best = max(probe(m, x0, method=method, conditioning=cond, **kw).attrs["forwards_per_s"] for _ in range(2))
            res[f"{method}_evals_per_s"] = best
            res[f"{method}_over_raw"] = best / raw
        rows.append(res)
        print(
            f"{name:7s} {label:7s} raw {raw:9.1f}/s  fd {res['fd_evals_per_s']:9.1f}/s ({res['fd_over_raw']:.2f}x)  "
            f"jvp {res['jvp_evals_per_s']:9.1f}/s ({res['jvp_over_raw']:.2f}x)",
            flush=True,
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--quick", action="store_true", help="few samples and repeats: a smoke test")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--only", default=None, help="comma list of families (default: all)")
    a = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    reps, samples = (2, 4) if a.quick else (20, 32)
    b = 8 if a.quick else a.batch
    out = []
    with tempfile.TemporaryDirectory() as d:
        for name, (path, args) in folders(Path(d)).items():
            if a.only is None or name in a.only.split(","):
                out += bench(name, path, args, b, reps, samples)
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine()}
    if a.json:
        a.json.write_text(json.dumps({"meta": meta, "rows": out}, indent=1))


if __name__ == "__main__":
    main()
