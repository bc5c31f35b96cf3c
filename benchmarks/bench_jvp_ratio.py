"""JVP ÷ raw forward at realistic sizes, CPU float32, one thread, interleaved and repeated (issue 22 item 1).

    python benchmarks/bench_jvp_ratio.py --json benchmarks/results/cpu-jvp-ratio.json
    python benchmarks/bench_jvp_ratio.py --tiny        # smoke test (tests/ runs this)

Networks (random weights): the CIFAR-10 DDPM UNet (google/ddpm-cifar10-32's config, 35.7 M), a DiT-S/2-like
``DiTTransformer2DModel`` (hidden 384 = 6 heads × 64, 12 blocks, 32×32×4 latents, class-conditional) and an SD3-like
MMDiT ``SD3Transformer2DModel`` of the same width and depth (16×32×32 latents, 77 text tokens), each wrapped by its
lipscope family. Per network and batch, the raw call (``EpsModel``, inference mode) and lipscope's JVP evaluation
(:func:`lipscope.fwad.jvp` in t under ``forward_ad_patches``, exactly what ``jvp_norms`` computes per batch, in the
steady state of one patch context) are timed alternately ``--reps`` times after a warm-up each; the ratio is
median(JVP) ÷ median(forward). Ratios, not absolute times, are comparable across runs on a shared machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_probe import CIFAR10_DDPM, TINY  # noqa: E402

from lipscope.families import EncodedPrompts, family_of_class  # noqa: E402
from lipscope.fwad import forward_ad_patches, jvp  # noqa: E402
from lipscope.models import from_unet  # noqa: E402
from lipscope.probe import probe  # noqa: E402

DIT_S2 = dict(num_attention_heads=6, attention_head_dim=64, num_layers=12, sample_size=32, out_channels=8)
SD3_S = dict(
    sample_size=32,
    in_channels=16,
    out_channels=16,
    num_layers=12,
    num_attention_heads=6,
    attention_head_dim=64,
    joint_attention_dim=384,
    caption_projection_dim=384,
    pooled_projection_dim=256,
    pos_embed_max_size=32,
)
DIT_TINY = dict(num_attention_heads=2, attention_head_dim=8, num_layers=2, sample_size=8, out_channels=8)
SD3_TINY = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    num_layers=2,
    num_attention_heads=2,
    attention_head_dim=8,
    joint_attention_dim=16,
    caption_projection_dim=16,
    pooled_projection_dim=8,
    pos_embed_max_size=16,
)
PIXART_S = dict(
    num_attention_heads=6,
    attention_head_dim=64,
    num_layers=12,
    sample_size=32,
    out_channels=8,
    cross_attention_dim=384,
    caption_channels=512,
    use_additional_conditions=False,
)
FLUX_S = dict(
    in_channels=64,
    num_layers=4,
    num_single_layers=8,
    attention_head_dim=64,
    num_attention_heads=6,
    joint_attention_dim=512,
    pooled_projection_dim=256,
    guidance_embeds=True,
    axes_dims_rope=(8, 28, 28),
)
SD_S = dict(
    sample_size=32,
    block_out_channels=(128, 256, 256),
    cross_attention_dim=384,
    attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
)
DDPM = {"_class_name": "DDPMScheduler", "num_train_timesteps": 1000}
FLOW = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}


def networks(tiny: bool) -> dict:
    """name → EpsModel (conditioned as its family is in a probe: DiT on a class label, SD3 on one prompt)."""
    import diffusers

    torch.manual_seed(0)
    out = {"cifar10-unet": from_unet(diffusers.UNet2DModel(**(TINY if tiny else CIFAR10_DDPM)).eval(), DDPM)}
    dit = diffusers.DiTTransformer2DModel(**(DIT_TINY if tiny else DIT_S2))
    m = family_of_class("DiTTransformer2DModel").build(dit, DDPM, "dit-s2", "cpu", "float32")
    out["dit-s2"] = dataclasses.replace(m, conditioning=family_of_class("DiTTransformer2DModel").conditioning(m, [3]))
    cfg = SD3_TINY if tiny else SD3_S
    sd3 = diffusers.SD3Transformer2DModel(**cfg)
    fam = family_of_class("SD3Transformer2DModel")
    m = fam.build(sd3, FLOW, "sd3-s", "cpu", "float32")
    emb = {
        "prompt_embeds": torch.randn(1, 8 if tiny else 77, cfg["joint_attention_dim"]),
        "pooled_prompt_embeds": torch.randn(1, cfg["pooled_projection_dim"]),
    }
    out["sd3-s"] = dataclasses.replace(m, conditioning=fam.conditioning(m, prompt_embeds=EncodedPrompts(emb)))
    if tiny:
        return out
    for name, cls, cfg, text, pooled in (
        ("pixart-s", "PixArtTransformer2DModel", PIXART_S, (120, 512), 0),
        ("flux-s", "FluxTransformer2DModel", FLUX_S, (128, 512), 256),
        ("sd-s", "UNet2DConditionModel", SD_S, (77, 384), 0),
    ):
        fam = family_of_class(cls)
        m = fam.build(getattr(diffusers, cls)(**cfg), FLOW if cls.startswith("Flux") else DDPM, name, "cpu", "float32")
        if cls.startswith("Flux"):
            m = dataclasses.replace(m, sample_shape=(16, 32, 32))
        emb = {
            "prompt_embeds": torch.randn(1, *text),
            "prompt_attention_mask": torch.ones(1, text[0], dtype=torch.long),
        }
        if pooled:
            emb["pooled_prompt_embeds"] = torch.randn(1, pooled)
        out[name] = dataclasses.replace(m, conditioning=fam.conditioning(m, prompt_embeds=EncodedPrompts(emb)))
    return out


def jvp_call(model, x: torch.Tensor, t: torch.Tensor, evals: int = 2):
    """JVP evaluations as ``lipscope.jvp.jvp_norms`` makes them: inside one patch context (as a probe's whole run is),
    one untimed warm-up evaluation (it makes the context's channels-last weight copies), then ``evals`` timed ones
    through :func:`lipscope.fwad.jvp`; returns seconds per evaluation. The raw forward it is compared with runs the
    stock network (fused attention, native norms), outside the context."""
    rows = torch.arange(x.shape[0])

    def call() -> float:
        with forward_ad_patches(model.module):
            jvp(model.name, lambda s: model(x, s, rows), (t,), (torch.ones_like(t),))
            t0 = time.perf_counter()
            for _ in range(evals):
                jvp(model.name, lambda s: model(x, s, rows), (t,), (torch.ones_like(t),))
            return (time.perf_counter() - t0) / evals

    return call


def interleaved(fns: dict, reps: int) -> dict[str, float]:
    """Median seconds per call of each fn, the fns called in turn ``reps`` times after one warm-up each; a fn that
    returns a float reports its own seconds per evaluation (the JVP: its steady state inside one context)."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():
        fn()
    for _ in range(reps):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            r = fn()
            times[k].append(r if isinstance(r, float) else time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def measure(model, batch: int, reps: int, with_fd: bool = True) -> dict[str, float]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, *model.sample_shape, generator=g)
    t = torch.linspace(10.0, 900.0, batch)

    def fwd():
        with torch.inference_mode():
            return model(x, t)

    x0 = torch.randn(batch, *model.sample_shape, generator=g)

    runner: list[float] = []

    def fd():  # batch samples × 2 grid points: 4 runner batches of `batch` forwards
        df = probe(model, x0, method="fd", timesteps="20,600", samples=batch, batch_size=batch, data_range=None)
        runner.append(df.attrs["forwards_per_s"])
        return df

    fns = {"forward": fwd, "jvp": jvp_call(model, x, t)} | ({"fd": fd} if with_fd else {})
    med = interleaved(fns, reps)
    out = {**med, "jvp_over_forward": med["jvp"] / med["forward"]}
    if with_fd:
        # the hot path: forwards/s of the FD runner (noising, conversion to ε, norms, conditioning rows: per batch)
        # ÷ forwards/s of the raw call; and of the whole probe call (+ per-run work: data, the FD noise estimate)
        out["fd_over_raw"] = statistics.median(runner[1:]) / (batch / med["forward"])
        out["fd_call_over_raw"] = (med["forward"] / batch) / (med["fd"] / fd().attrs["forwards"])
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--only", default=None, help="comma list of cifar10-unet, dit-s2, sd3-s")
    p.add_argument("--no-fd", action="store_true", help="JVP only")
    p.add_argument("--merge", action="store_true", help="keep the other rows of an existing --json file")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    if a.tiny:
        a.batch, a.reps = 2, 2
    torch.set_num_threads(a.threads)
    res: dict = {"torch": torch.__version__, "threads": a.threads, "batch": a.batch, "reps": a.reps, "rows": {}}
    for name, model in networks(a.tiny).items():
        if a.only and name not in a.only.split(","):
            continue
        r = {**measure(model, a.batch, a.reps, not a.no_fd), "batch": a.batch, "reps": a.reps}
        res["rows"][name] = r
        fd = f"  FD ÷ raw {r['fd_over_raw']:.3f}" if "fd_over_raw" in r else ""
        print(
            f"{name:13s} forward {r['forward']:.4f}s  jvp {r['jvp']:.4f}s  JVP ÷ forward {r['jvp_over_forward']:.2f}"
            + fd,
            flush=True,
        )
    if a.json:
        from lipscope.io import atomic_write_text

        if a.merge and Path(a.json).exists():  # rows of earlier runs (--only) kept, each with its own settings
            old = json.loads(Path(a.json).read_text())
            res["rows"] = {
                **old.get("rows", {}),
                **{k: {**v, "batch": a.batch, "reps": a.reps} for k, v in res["rows"].items()},
            }

        atomic_write_text(a.json, json.dumps(res, indent=2) + "\n")
    return res


if __name__ == "__main__":
    main()
