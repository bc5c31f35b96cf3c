"""The exponent of K near t = 0 on the closed forms, measured next to its band, for every process and data rank
(the table in docs/theory.md, "Exponent bands").

    python scripts/theory_bands.py [--samples 512] [--json out.json]

For each process (discrete DDPM VP, continuous VP, VE, EDM, flow) and data (full rank: N(0, I₃₂); low rank: 4
directions of variance 1 and 28 at a floor s) it runs ``lipscope.theory.theory_table`` (the probe's JVP on ε*, 512
samples, bootstrap interval) on two fit ranges: a decade deep inside the regime docs/theory.md derives (τ in
[τ₀, 10τ₀]) and the probe's default first decade, t = 1..10 steps. Printed: the measured exponent with its interval,
the closed form's band on the same grid, and the t → 0 limit with its regime.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from lipscope.theory import make_distribution, make_process, theory_table

# (label, process, schedule, deep decade τ₀ for full rank, for low rank)
PROCESSES = [
    ("VP discrete (DDPM linear)", "vp", "linear", 1e-8, 1e-8),
    ("VP continuous (vp-linear)", "vp", "vp-linear", 1e-8, 1e-6),
    ("VE (σ 0.01…1348)", "ve", "linear", 1e-6, 1e-6),
    ("EDM (Karras, σ 0.002…80)", "edm", "linear", 1e-6, 1e-6),
    ("flow matching", "flow", "linear", 1e-6, 1e-6),
]
FLOOR = 1e-8


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=512)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    rows = []
    print("| process | data | fit range | measured p [95 % CI] | band (closed form) | t → 0 limit (regime) |")
    print("|---|---|---|---|---|---|")
    for label, proc, sched, tau_full, tau_low in PROCESSES:
        process = make_process(proc, sched)
        for data, tau0 in (("full rank", tau_full), (f"rank 4, floor {FLOOR:g}", tau_low)):
            if data == "full rank":
                g = make_distribution(dim=32, var=[1.0] * 32)[0]
            else:
                g = make_distribution(dim=32, rank=4, floor=FLOOR, var=[1.0] * 4)[0]
            for where, grid in (
                (f"τ ∈ [{tau0:g}, {10 * tau0:g}]", np.geomspace(tau0, 10 * tau0, 8) * process.T),
                ("t = 1…10 steps", np.arange(1.0, 11.0)),
            ):
                df = theory_table(g, process, grid, dt=float(grid[0]) / 10, samples=a.samples)
                e, cf = df.attrs["exponent"]["jvp"], df.attrs["exponent"]["closed_form"]
                row = {"process": label, "data": data, "range": where, "p": e["p"], "ci": [e["ci_low"], e["ci_high"]],
                       "band": cf["band"], "limit": cf["limit"], "regime": cf["limit_reason"]}  # fmt: skip
                rows.append(row)
                lim = "n/a" if cf["limit"] != cf["limit"] else f"{cf['limit']:g}"
                print(
                    f"| {label} | {data} | {where} | {e['p']:.3f} [{e['ci_low']:.3f}, {e['ci_high']:.3f}] | "
                    f"[{cf['band'][0]:.3f}, {cf['band'][1]:.3f}] | {lim} ({cf['limit_reason'].split(';')[0]}) |"
                )
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
