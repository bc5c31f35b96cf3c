"""Reproduce the natural-patch evidence of docs/etsdm.md (CPU, about 25 minutes per process on 2 cores).

    python scripts/etsdm_patches_evidence.py [--runs runs] [--process vp|flow] [--skip-train]

Data: ``patches:16`` (2080 16×16 RGB tiles of the two photographs in scikit-learn's wheel, CC BY 2.0).
1. base:    lipscope train --config configs/patches-unet.json --data patches:16 --steps 2000 --batch-size 32 …
            (--process flow: --scheduler-config configs/flow-scheduler.json, rectified flow, velocity target)
2. E-TSDM:  lipscope finetune --etsdm --model RUNS/…-base --steps 600 --seed 1 …
3. control: lipscope finetune --no-etsdm … (the same loop)
4. probes:  one-step FD at every t < 200 and every 25th above, in time space and --space condition (same seed,
            same x0); flow models are probed in their own output (--target velocity), which f holds constant
5. evaluate: DDIM (flow: its Euler step) at 5/10/20 steps (+ DPM-Solver++ for VP), 3 seeds × 300 samples, KID and
   FD in a seeded random-conv feature space (scripts/patch_features.py, passed by path), paired differences
Writes RUNS/evidence-patches-<process>.json with the numbers docs/etsdm.md reports, and each step's wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from etsdm_digits_evidence import k_stats, ratios  # the same summaries (scripts/ is on sys.path)

HERE = Path(__file__).resolve().parent  # patch_features.py, for --features py:patch_features:features
DATA = "patches:16"
GRID = ",".join(str(t) for t in [*range(0, 200), *range(200, 1000, 25)])
WALL: dict[str, float] = {}


def sh(label: str, *args: str) -> None:
    print("$ lipscope", " ".join(args), flush=True)
    extra = ["--no-progress"] if args[0] in ("train", "finetune", "probe") else []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    t0 = time.time()
    subprocess.run([sys.executable, "-m", "lipscope", *args, *extra], check=True, env=env)
    WALL[label] = round(time.time() - t0, 1)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--runs", default="runs")
    p.add_argument("--process", choices=("vp", "flow"), default="vp")
    p.add_argument("--skip-train", action="store_true")
    p.add_argument("--samples", default="64")
    a = p.parse_args()
    R, flow = Path(a.runs), a.process == "flow"
    pre = f"patches-{a.process}"
    names = {"base": R / f"{pre}-base", "etsdm": R / f"{pre}-etsdm", "control": R / f"{pre}-control"}
    sched = ["--scheduler-config", "configs/flow-scheduler.json"] if flow else []
    common = ["--data", DATA, "--batch-size", "32", "--checkpoint-every", "500"]
    if not a.skip_train:
        sh("train base", "train", "--config", "configs/patches-unet.json", *sched, *common, "--steps", "2000",
           "--lr", "2e-4", "--seed", "0", "--out", str(names["base"]))  # fmt: skip
        for name, flag in (("etsdm", "--etsdm"), ("control", "--no-etsdm")):
            sh(f"finetune {name}", "finetune", flag, "--model", str(names["base"]), *common, "--steps", "600",
               "--lr", "1e-4", "--warmup", "100", "--seed", "1", "--out", str(names[name]))  # fmt: skip
    target = ["--target", "velocity"] if flow else []
    ev: dict = {"process": a.process, "fd_time": {}, "fd_condition": {}}
    for name, run in names.items():
        for space in ("time", "condition"):
            out = R / f"probe-{pre}-{name}-{space}"
            sh(f"probe {name} {space}", "probe", "--model", str(run), "--data", DATA, "--timesteps", GRID,
               "--samples", a.samples, "--seed", "0", "--space", space, *target, "--out", str(out))  # fmt: skip
            ev["fd_time" if space == "time" else "fd_condition"][name] = k_stats(out)
    sh("compare", "compare", *(str(R / f"probe-{pre}-{n}-time") for n in names),
       str(R / f"probe-{pre}-etsdm-condition"), "--out", str(R / f"compare-{pre}.png"))  # fmt: skip
    samplers = "ddim" if flow else "ddim,dpmsolver"
    sh("evaluate", "evaluate", "--model", str(names["etsdm"]), "--baseline", str(names["control"]), "--baseline",
       str(names["base"]), "--data", DATA, "--scheduler", samplers, "--steps", "5,10,20", "--num", "300",
       "--seeds", "3", "--features", "py:patch_features:features", "--out", str(R / f"eval-{pre}"))  # fmt: skip
    ev["ratios"] = ratios(ev)
    ev["training"] = {n: json.loads((r / "train.json").read_text()) for n, r in names.items()}
    ev["evaluate"] = pd.read_csv(R / f"eval-{pre}" / "eval_summary.csv").replace({np.nan: None}).to_dict("records")
    ev["paired"] = pd.read_csv(R / f"eval-{pre}" / "eval_paired.csv").replace({np.nan: None}).to_dict("records")
    ev["wall_seconds"] = WALL
    (R / f"evidence-{pre}.json").write_text(json.dumps(ev, indent=2, default=str))
    print(json.dumps({k: ev[k] for k in ("fd_time", "fd_condition", "ratios", "wall_seconds")}, indent=2))


if __name__ == "__main__":
    main()
