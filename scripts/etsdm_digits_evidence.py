"""Reproduce the digits evidence of docs/etsdm.md (CPU, about an hour on 2 cores).

    python scripts/etsdm_digits_evidence.py [--runs runs] [--skip-train]

1. base:    lipscope train --config configs/digits-unet.json --data digits --steps 8000 …
2. E-TSDM:  lipscope finetune --etsdm --model runs/digits-base --steps 2000 --seed 1 …
3. control: lipscope finetune        --model runs/digits-base --steps 2000 --seed 1 …  (same loop)
4. probes:  one-step FD over every t, and --space condition, for all three (same seed, same x0)
5. evaluate: DDIM and DPM-Solver++ at 5/10/20/50 steps, 3 seeds × 500 samples, vs the digits
6. compare: the three curves on one plot
Writes RUNS/evidence.json with the numbers docs/etsdm.md reports.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd

T_TILDE = 100.0


def sh(*args: str) -> None:
    print("$ lipscope", " ".join(args), flush=True)
    subprocess.run(
        [sys.executable, "-m", "lipscope", *args, "--no-progress"]
        if args[0] in ("train", "finetune", "probe")
        else [sys.executable, "-m", "lipscope", *args],
        check=True,
    )


def k_stats(run: Path) -> dict[str, float]:
    df = pd.read_csv(run / "lipschitz.csv")
    lo, hi = df[df["t"] < T_TILDE], df[df["t"] >= T_TILDE]
    return {
        "mean_below": float(lo["K_mean"].mean()),
        "max_below": float(lo["K_mean"].max()),
        "median_above": float(hi["K_mean"].median()),
        "peak_t": float(df.loc[df["K_mean"].idxmax(), "t"]),
    }


def ratios(ev: dict) -> dict[str, float]:
    """The headline ratios of docs/etsdm.md from the K summaries of base, control and E-TSDM."""
    c, t = ev["fd_condition"], ev["fd_time"]
    return {
        "cond_max_below_base_over_etsdm": c["base"]["max_below"] / c["etsdm"]["max_below"],
        "cond_max_below_control_over_etsdm": c["control"]["max_below"] / c["etsdm"]["max_below"],
        "median_above_etsdm_over_base": t["etsdm"]["median_above"] / t["base"]["median_above"],
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--runs", default="runs")
    p.add_argument("--skip-train", action="store_true")
    p.add_argument("--samples", default="128")
    a = p.parse_args()
    R = Path(a.runs)
    names = {"base": R / "digits-base", "etsdm": R / "digits-etsdm", "control": R / "digits-control"}
    if not a.skip_train:
        sh(
            "train",
            "--config",
            "configs/digits-unet.json",
            "--data",
            "digits",
            "--steps",
            "8000",
            "--batch-size",
            "128",
            "--lr",
            "2e-4",
            "--checkpoint-every",
            "1000",
            "--seed",
            "0",
            "--out",
            str(names["base"]),
        )
        for name, flag in (("etsdm", "--etsdm"), ("control", "--no-etsdm")):
            sh(
                "finetune",
                flag,
                "--model",
                str(names["base"]),
                "--data",
                "digits",
                "--steps",
                "2000",
                "--batch-size",
                "128",
                "--lr",
                "1e-4",
                "--warmup",
                "100",
                "--checkpoint-every",
                "1000",
                "--seed",
                "1",
                "--out",
                str(names[name]),
            )
    ev: dict = {"fd_time": {}, "fd_condition": {}}
    for name, run in names.items():
        for space in ("time", "condition"):
            out = R / f"probe-{name}-{space}"
            sh(
                "probe",
                "--model",
                str(run),
                "--data",
                "digits",
                "--timesteps",
                "all",
                "--samples",
                a.samples,
                "--seed",
                "0",
                "--space",
                space,
                "--out",
                str(out),
            )
            ev["fd_time" if space == "time" else "fd_condition"][name] = k_stats(out)
    sh(
        "compare",
        *(str(R / f"probe-{n}-time") for n in names),
        str(R / "probe-etsdm-condition"),
        "--out",
        str(R / "compare-digits.png"),
    )
    sh(
        "evaluate",
        "--model",
        str(names["etsdm"]),
        "--baseline",
        str(names["control"]),
        "--baseline",
        str(names["base"]),
        "--data",
        "digits",
        "--scheduler",
        "ddim,dpmsolver",
        "--steps",
        "5,10,20,50",
        "--num",
        "500",
        "--seeds",
        "3",
        "--out",
        str(R / "eval-digits"),
    )
    ev["ratios"] = ratios(ev)
    ev["training"] = {n: json.loads((r / "train.json").read_text()) for n, r in names.items()}
    summ = pd.read_csv(R / "eval-digits" / "eval_summary.csv")
    ev["evaluate"] = summ.replace({np.nan: None}).to_dict(orient="records")
    (R / "evidence.json").write_text(json.dumps(ev, indent=2, default=str))
    print(json.dumps({k: ev[k] for k in ("fd_time", "fd_condition", "ratios")}, indent=2))


if __name__ == "__main__":
    main()
