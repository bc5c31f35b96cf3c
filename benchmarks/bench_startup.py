"""Start-up cost of the ``lipscope`` command: CPU seconds and the heavy libraries each answer imports.

    python benchmarks/bench_startup.py                          # 3 runs of each command, prints a table
    python benchmarks/bench_startup.py --json benchmarks/results/startup.json --label after
    python benchmarks/bench_startup.py --runs 1 --quick         # smoke test (tests/ runs this)

For each command that should answer at once (``lipscope --help``, ``lipscope probe --help``, a mistyped flag,
``lipscope models``) it runs ``python -m lipscope …`` in a fresh process and records

  cpu_s     user + system CPU seconds of the child (``getrusage(RUSAGE_CHILDREN)``), median over --runs: the
            number to compare, as it hardly depends on other work on the machine;
  wall_s    wall-clock seconds, median (load-sensitive: the load average is recorded beside it);
  heavy     which of torch, diffusers, transformers, pandas, matplotlib the process imported;
  lipscope_import_s  ``python -X importtime``'s cumulative time of the ``lipscope`` package import, and the
            five slowest top-level imports below it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = {
    "--help": ["--help"],
    "probe --help": ["probe", "--help"],
    "mistyped flag": ["probe", "--smaples", "8"],
    "models": ["models"],
}
HEAVY = ("torch", "diffusers", "transformers", "pandas", "matplotlib")
# run the command, then report which heavy libraries it imported (on stderr, after the command's own output)
PROBE = (
    "import sys, runpy\n"
    "sys.argv = ['lipscope', *sys.argv[1:]]\n"
    "try:\n"
    "    runpy.run_module('lipscope', run_name='__main__')\n"
    "except SystemExit:\n"
    "    pass\n"
    f"print('HEAVY=' + ','.join(m for m in {HEAVY!r} if m in sys.modules), file=sys.stderr)\n"
)


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "COLUMNS": "80"}


def _timed(argv: list[str]) -> tuple[float, float, str]:
    """(cpu_s, wall_s, stderr) of one ``python -m lipscope ARGV`` in a fresh process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "lipscope", *argv], capture_output=True, text=True, env=_env())
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return cpu, wall, r.stderr


def _heavy(argv: list[str]) -> list[str]:
    r = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, env=_env())
    line = [ln for ln in r.stderr.splitlines() if ln.startswith("HEAVY=")]
    return [m for m in line[-1].removeprefix("HEAVY=").split(",") if m] if line else ["(unknown)"]


def _importtime(argv: list[str]) -> dict:
    """``python -X importtime``: the lipscope package's cumulative import time and its slowest direct imports."""
    r = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "lipscope", *argv], capture_output=True, text=True, env=_env()
    )
    rows = []
    for ln in r.stderr.splitlines():
        if not ln.startswith("import time:") or "|" not in ln:
            continue
        _, cum, name = (s.strip() for s in ln.removeprefix("import time:").split("|"))
        if cum.isdigit():
            rows.append((name, int(cum) / 1e6))
    lipscope_s = sum(s for n, s in rows if n in ("lipscope", "lipscope.cli"))
    top = sorted(((n, s) for n, s in rows if "." not in n and n != "lipscope"), key=lambda r: -r[1])[:5]
    return {"lipscope_import_s": round(lipscope_s, 3), "slowest_top_level": {n: round(s, 3) for n, s in top}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="only `lipscope --help` (smoke test)")
    ap.add_argument("--label", default="", help="recorded with the numbers (e.g. before/after)")
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args()
    load_before = os.getloadavg()[0]
    rows = {}
    for name, argv in COMMANDS.items():
        if args.quick and name != "--help":
            continue
        runs = [_timed(argv) for _ in range(max(1, args.runs))]
        rows[name] = {
            "argv": argv,
            "cpu_s": round(statistics.median(r[0] for r in runs), 3),
            "wall_s": round(statistics.median(r[1] for r in runs), 3),
            "heavy": _heavy(argv),
            **_importtime(argv),
        }
        r = rows[name]
        print(f"{name:15s} cpu {r['cpu_s']:6.2f} s  wall {r['wall_s']:6.2f} s  imports {','.join(r['heavy']) or '-'}")
    res = {
        "label": args.label,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "python": platform.python_version(),
        "load_avg_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "runs": args.runs,
        "commands": rows,
    }
    print(f"load average (1 min) before/after: {res['load_avg_1min']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
