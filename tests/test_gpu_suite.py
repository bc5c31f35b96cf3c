"""benchmarks/gpu_suite.py: every code path on CPU at tiny sizes, and the real-size configs against the published
parameter counts (built on the meta device: no memory, no weights)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import gpu_suite  # noqa: E402
from gpu_models import MODELS  # noqa: E402

# parameters of the published checkpoints' denoisers (model cards / safetensors headers); DiT: diffusers' class keeps
# one timestep + label embedder per block (its conversion copies DiT's shared one), 749.8 M instead of the paper's 675 M
PUBLISHED = {
    "sd15": 859_520_964,
    "sdxl": 2_567_463_684,
    "dit-xl-2-256": 749_826_464,
    "pixart-alpha-512": 610_856_096,
    "sd3-medium": 2_028_328_000,
    "flux-dev": 11_901_408_320,
}


@pytest.mark.parametrize("name", list(MODELS))
def test_real_size_configs(name):
    import diffusers

    spec = MODELS[name]
    with torch.device("meta"):
        m = getattr(diffusers, spec.cls)(**spec.config)
    assert sum(p.numel() for p in m.parameters()) == PUBLISHED[name]


def _check(out: dict, models: list[str], precs: list[str], compiled: bool) -> None:
    rows = {(r["model"], r["precision"]): r for r in out["rows"]}
    assert set(rows) == {(m, p) for m in models for p in precs}
    for r in rows.values():
        assert r["raw"]["batch"] in (1, 2) and r["raw"]["evals_per_s"] > 0 and r["blocks"] == "all"
        for mode in ("fd", "jvp"):
            row = r[mode]
            assert row["evals_per_s"] > 0 and math.isfinite(row["over_raw"]) and row["tflops"] > 0
            assert row["peak_mem_gib"] is None and row["mfu"] is None  # CPU: no CUDA counters, no device peak
        assert r["jvp"]["raw_forwards_per_jvp"] == pytest.approx(1 / r["jvp"]["over_raw"])
        assert "n/a" in r["jvp-ode"] or r["jvp-ode"]["evals_per_s"] > 0
        assert ("compile" in r) == compiled
        if compiled:
            assert r["compile"]["fd"]["evals_per_s"] > 0 and "n/a" in r["compile"]["jvp"]


def test_tiny_every_family(tmp_path):
    js, md = tmp_path / "s.json", tmp_path / "s.md"
    out = gpu_suite.main(["--tiny", "--device", "cpu", "--precision", "fp32", "--json", str(js), "--md", str(md)])
    _check(out, list(MODELS), ["fp32"], False)
    assert json.loads(js.read_text())["rows"][0]["model"] == "sd15"
    table = md.read_text().splitlines()
    assert sum(line.startswith("| ") for line in table) == 1 + len(MODELS)  # header + one row per model


def test_tiny_precisions_and_compile(tmp_path):
    models = ["dit-xl-2-256", "flux-dev"]  # a class-conditional and an embedded-guidance transformer
    argv = [
        "--tiny",
        "--device",
        "cpu",
        "--models",
        ",".join(models),
        "--precision",
        "tf32,bf16",
        "--compile",
        "--compile-backend",
        "eager",
        "--json",
        str(tmp_path / "s.json"),
        "--md",
        str(tmp_path / "s.md"),
    ]
    out = gpu_suite.main(argv)
    _check(out, models, ["tf32", "bf16"], True)
    # Flux reads t in bfloat16: FD at Δt = 1 is below its resolution, so its bf16 row runs FD at a step it resolves
    # and says so (row and table); the tf32 rows keep Δt = 1
    rows = {(r["model"], r["precision"]): r for r in out["rows"]}
    assert rows[("flux-dev", "bf16")]["fd"]["dt"] == gpu_suite.FD_DT_COARSE
    assert "time resolution" in rows[("flux-dev", "bf16")]["fd"]["dt_why"]
    assert "dt" not in rows[("flux-dev", "tf32")]["fd"] and "dt" not in rows[("dit-xl-2-256", "bf16")]["fd"]
    assert "below the time resolution" in (tmp_path / "s.md").read_text()


def test_max_blocks_and_budget(tmp_path):
    argv = [
        "--tiny",
        "--device",
        "cpu",
        "--models",
        "sd3-medium,pixart-alpha-512",
        "--precision",
        "fp32",
        "--max-blocks",
        "1",
        "--budget-s",
        "0",
        "--json",
        str(tmp_path / "s.json"),
        "--md",
        str(tmp_path / "s.md"),
    ]
    out = gpu_suite.main(argv)
    assert [r["blocks"] for r in out["rows"]] == ["num_layers=1 of 2"]  # the first pair runs, then the budget is spent
    assert out["meta"]["skipped_over_budget"] == ["pixart-alpha-512 fp32"]
    assert "Skipped" in (tmp_path / "s.md").read_text()
