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
import os
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_probe import CIFAR10_DDPM, TINY  # noqa: E402

from lipscope.families import EncodedPrompts, family_of_class  # noqa: E402
from lipscope.fwad import forward_ad_patches  # noqa: E402
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
NAMES = ("cifar10-unet", "dit-s2", "sd3-s", "pixart-s", "flux-s", "sd-s")
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


def _old_group_norm_jvp(ctx, x_t, w_t, b_t, *_):
    """The GroupNorm tangent before issue 22's rewrite (var_mean over reshaped groups, a dozen passes): the
    ``-groupnorm`` ablation."""
    x, g = ctx.x, ctx.groups
    xg = x.reshape(x.shape[0], g, -1)
    var, mean = torch.var_mean(xg, dim=-1, unbiased=False, keepdim=True)
    r = torch.rsqrt(var + ctx.eps)
    xhat = (xg - mean) * r
    shape = (1, -1) + (1,) * (x.ndim - 2)
    out = torch.zeros_like(x)
    if x_t is not None:
        c = x_t.reshape(xg.shape)
        c = c - c.mean(-1, keepdim=True)
        out = ((c - xhat * (xhat * c).mean(-1, keepdim=True)) * r).reshape(x.shape)
        out = out * (1.0 if ctx.weight is None else ctx.weight.reshape(shape))
    if w_t is not None:
        out = out + xhat.reshape(x.shape) * w_t.reshape(shape)
    if b_t is not None:
        out = out + b_t.reshape(shape)
    return out


def _func_jvp(name, fn, primals, tangents):
    with torch.no_grad():  # as lipscope's jvp before issue 22's dual tensors
        return torch.func.jvp(fn, primals, tangents)


@contextmanager
def ablated(change: str | None):
    """Undo one of issue 22's JVP changes for the duration (what each contributed): ``-dual`` (``torch.func.jvp``
    instead of dual tensors), ``-cl-weights`` (no channels-last weight copies kept per context), ``-groupnorm`` (the
    previous tangent formula), ``-chunks`` (attention over the whole score matrix)."""
    import lipscope.fwad as fw

    if change is None:  # touches nothing (the "before" run imports an older lipscope without these names)
        yield
        return
    saved = {
        "jvp": fw.jvp,
        "_channels_last": fw._channels_last,
        "gn": fw._GroupNorm.jvp,
        "chunks": dict(fw.CHUNK_ELEMENTS),
    }
    try:
        if change == "-dual":
            fw.jvp = _func_jvp
        elif change == "-cl-weights":
            fw._channels_last = lambda x: False
        elif change == "-groupnorm":
            fw._GroupNorm.jvp = staticmethod(_old_group_norm_jvp)
        elif change == "-chunks":
            fw.CHUNK_ELEMENTS.update(cpu=2**62, cuda=2**62)
        elif change is not None:
            raise ValueError(change)
        yield
    finally:
        fw.jvp, fw._channels_last = saved["jvp"], saved["_channels_last"]
        fw._GroupNorm.jvp = staticmethod(saved["gn"])
        fw.CHUNK_ELEMENTS.update(saved["chunks"])


ABLATIONS = ("-dual", "-cl-weights", "-groupnorm", "-chunks")


def jvp_call(model, x: torch.Tensor, t: torch.Tensor, evals: int = 2, change: str | None = None):
    """JVP evaluations as ``lipscope.jvp.jvp_norms`` makes them: inside one patch context (as a probe's whole run is),
    one untimed warm-up evaluation (it makes the context's channels-last weight copies), then ``evals`` timed ones
    through :func:`lipscope.fwad.jvp`; returns seconds per evaluation. The raw forward it is compared with runs the
    stock network (fused attention, native norms), outside the context. ``change``: one change undone
    (:func:`ablated`)."""
    import lipscope.fwad as fw

    rows = torch.arange(x.shape[0])

    def call() -> float:
        with ablated(change), forward_ad_patches(model.module):
            fw.jvp(model.name, lambda s: model(x, s, rows), (t,), (torch.ones_like(t),))
            t0 = time.perf_counter()
            for _ in range(evals):
                fw.jvp(model.name, lambda s: model(x, s, rows), (t,), (torch.ones_like(t),))
            return (time.perf_counter() - t0) / evals

    return call


def interleaved(fns: dict, reps: int) -> dict[str, list[float]]:
    """Seconds per call of each fn, the fns called in turn ``reps`` times after one warm-up each; a fn that
    returns a float reports its own seconds per evaluation (the JVP: its steady state inside one context)."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():
        fn()
    for _ in range(reps):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            r = fn()
            times[k].append(r if isinstance(r, float) else time.perf_counter() - t0)
    return times


def measure(
    model,
    batch: int,
    reps: int,
    with_fd: bool = True,
    ablate: bool = False,
    with_jvp: bool = True,
    with_probe: bool = True,
) -> dict[str, float]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, *model.sample_shape, generator=g)
    t = torch.linspace(10.0, 900.0, batch)

    def fwd():
        with torch.inference_mode():
            return model(x, t)

    samples = 4 * batch  # FD: samples × 2 grid points = 8 runner batches of `batch` pairs' forwards
    x0 = torch.randn(samples, *model.sample_shape, generator=g)
    runner: list[float] = []
    xr = torch.cat([x, x])
    tr = torch.cat([t, t + 1])

    def raw_pairs():  # the raw call at the runner's batch: 2·batch forwards (a pair per item)
        with torch.inference_mode():
            return model(xr, tr)

    def fd() -> float:
        # the runner's time per batch, against the raw call timed right before it (the same stretch of machine load)
        t0 = time.perf_counter()
        for _ in range(4):
            raw_pairs()
        raw = (time.perf_counter() - t0) / 4
        df = probe(model, x0, method="fd", timesteps="20,600", samples=samples, batch_size=2 * batch, data_range=None)
        runner.append(df.attrs["forwards_per_s"] / (2 * batch / raw))
        return df.attrs["seconds"]

    from lipscope.fd import fd_norms
    from lipscope.points import FDPoints

    grid = np.array([20.0])
    pts = FDPoints(grid, grid, grid + 1.0)
    noise = torch.randn(x0.shape, generator=g)

    def fd_batch():  # one runner batch of `batch` pairs: noising, the pair call, the finite check, the norms
        return fd_norms(model, x0[:batch], noise[:batch], pts, batch_size=2 * batch)

    fns = {"forward": fwd} | ({"jvp": jvp_call(model, x, t)} if with_jvp else {})
    fns |= {"raw_pairs": raw_pairs, "fd_batch": fd_batch} if with_fd else {}
    if ablate and with_jvp:
        fns |= {f"jvp{c}": jvp_call(model, x, t, change=c) for c in ABLATIONS}
    fns |= {"fd": fd} if with_fd and with_probe else {}
    times = interleaved(fns, reps)
    med = {k: statistics.median(v) for k, v in times.items()}
    out: dict = {"forward": med["forward"]}
    if with_jvp:
        out |= {"jvp": med["jvp"], "jvp_over_forward": med["jvp"] / med["forward"]}
    for c in ABLATIONS if ablate and with_jvp else ():
        out[f"jvp_over_forward{c}"] = med[f"jvp{c}"] / med["forward"]
    if with_fd:  # one runner batch against the raw call at its batch, interleaved: the hot path alone
        out["fd_batch_over_raw"] = med["raw_pairs"] / med["fd_batch"]
    if with_fd and with_probe:
        # forwards/s of the FD runner (noising, conversion to ε, norms, conditioning rows: per batch)
        # ÷ forwards/s of the raw call at the same batch, paired per repetition; median and range over repetitions
        out["fd_over_raw"] = statistics.median(runner[1:])
        out["fd_over_raw_range"] = [min(runner[1:]), max(runner[1:])]
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--only", default=None, help="comma list of " + ", ".join(NAMES))
    p.add_argument("--no-fd", action="store_true", help="JVP only")
    p.add_argument("--no-jvp", action="store_true", help="FD only")
    p.add_argument("--no-probe", action="store_true", help="FD: the runner batch alone, not whole probe calls")
    p.add_argument("--ablate", action="store_true", help="also the JVP with each change undone (what each contributed)")
    p.add_argument("--merge", action="store_true", help="keep the other rows of an existing --json file")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    if a.tiny:
        a.batch, a.reps = 2, 2
    torch.set_num_threads(a.threads)
    res: dict = {"torch": torch.__version__, "threads": a.threads, "batch": a.batch, "reps": a.reps, "rows": {}}
    res["load_before"] = os.getloadavg()[0]
    for name, model in networks(a.tiny).items():
        if a.only and name not in a.only.split(","):
            continue
        r = measure(model, a.batch, a.reps, not a.no_fd, a.ablate, not a.no_jvp, not a.no_probe)
        r |= {"batch": a.batch, "reps": a.reps}
        res["rows"][name] = r
        fd = f"  FD batch ÷ raw {r['fd_batch_over_raw']:.3f}" if "fd_batch_over_raw" in r else ""
        fd += f"  FD runner ÷ raw {r['fd_over_raw']:.3f}" if "fd_over_raw" in r else ""
        fd += "".join(f"  {c} {r['jvp_over_forward' + c]:.2f}" for c in ABLATIONS if "jvp_over_forward" + c in r)
        jv = f"  jvp {r['jvp']:.4f}s  JVP ÷ forward {r['jvp_over_forward']:.2f}" if "jvp" in r else ""
        print(f"{name:13s} forward {r['forward']:.4f}s" + jv + fd, flush=True)
    res["load_after"] = os.getloadavg()[0]
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
