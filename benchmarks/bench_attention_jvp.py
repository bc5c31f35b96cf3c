"""One attention's JVP against its fused SDPA forward, CPU float32, one thread (issue 22: what the row chunks give).

    python benchmarks/bench_attention_jvp.py --json benchmarks/results/cpu-attention-jvp.json

Q, K, V and their tangents in diffusers' processor layout ((B, L, H, d) viewed as (B, H, L, d)); timed alternately
(median of ``--reps``): ``F.scaled_dot_product_attention`` (the stock fused kernel), lipscope's attention rule
(``fwad._Attention`` through dual tensors: the primal that keeps P, then the tangent) in query-row chunks, and the
same rule over the whole score matrix (``CHUNK_ELEMENTS`` unbounded: the ``-chunks`` ablation of bench_jvp_ratio).
Also recorded: the largest difference of the two tangents relative to the tangent's size (float32 rounding).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.autograd.forward_ad as fwad_api

SHAPES = ((2, 8, 1024, 16), (2, 8, 1024, 64), (2, 6, 333, 64), (2, 6, 256, 64))  # B, H, L, d


def main(argv: list[str] | None = None) -> dict:
    import lipscope.fwad as fw

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    shapes = ((1, 2, 40, 8),) if a.tiny else SHAPES
    res: dict = {"torch": torch.__version__, "threads": 1, "reps": a.reps, "rows": []}
    g = torch.Generator().manual_seed(0)
    for b, h, n, d in shapes:
        q, k, v, qt, kt, vt = (torch.randn(b, n, h, d, generator=g).transpose(1, 2) for _ in range(6))
        scale = d**-0.5

        def rule(q=q, k=k, v=v, qt=qt, kt=kt, vt=vt, scale=scale):
            with torch.no_grad(), fwad_api.dual_level():
                duals = [fwad_api.make_dual(x, t) for x, t in ((q, qt), (k, kt), (v, vt))]
                return fwad_api.unpack_dual(fw._Attention.apply(*duals, None, scale)[0]).tangent

        def whole(rule=rule):
            cpu = fw.CHUNK_ELEMENTS["cpu"]
            fw.CHUNK_ELEMENTS["cpu"] = 2**62
            try:
                return rule()
            finally:
                fw.CHUNK_ELEMENTS["cpu"] = cpu

        def fused(q=q, k=k, v=v):
            with torch.no_grad():
                return torch.nn.functional.scaled_dot_product_attention(q, k, v)

        fns = {"fused_forward": fused, "jvp_chunked": rule, "jvp_whole": whole}
        times: dict[str, list[float]] = {key: [] for key in fns}
        for fn in fns.values():
            fn()
        for _ in range(a.reps):
            for key, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                times[key].append(time.perf_counter() - t0)
        med = {key: statistics.median(ts) for key, ts in times.items()}
        tc, tw = rule(), whole()
        row = {
            "shape_BHLd": [b, h, n, d],
            "chunks": len(fw._row_chunks(q, k)),
            **{f"{key}_s": val for key, val in med.items()},
            "chunked_over_fused": med["jvp_chunked"] / med["fused_forward"],
            "whole_over_fused": med["jvp_whole"] / med["fused_forward"],
            "tangent_rel_diff": ((tc - tw).abs().max() / tw.abs().max()).item(),
        }
        res["rows"].append(row)
        print(
            f"{b}×{h}×{n}×{d}: {row['chunks']} chunks  JVP ÷ fused forward: chunked {row['chunked_over_fused']:.2f}, "
            f"whole {row['whole_over_fused']:.2f}  (tangents differ by {row['tangent_rel_diff']:.1e})",
            flush=True,
        )
    if a.json:
        from lipscope.io import atomic_write_text

        atomic_write_text(a.json, json.dumps(res, indent=2) + "\n")
    return res


if __name__ == "__main__":
    main()
