"""The benchmark scripts keep running (tiny smoke configuration)."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def test_bench_probe_tiny(tmp_path, monkeypatch):
    out = tmp_path / "b.json"
    monkeypatch.setattr(sys, "argv", ["bench_probe.py", "--tiny", "--json", str(out)])
    runpy.run_path(str(ROOT / "benchmarks" / "bench_probe.py"), run_name="__main__")
    import json

    res = json.loads(out.read_text())
    for key in ("raw_best", "probe_auto", "naive_loop", "ratio_probe_auto_vs_raw_best"):
        assert res[key] > 0


def test_bench_jvp_tiny(tmp_path, monkeypatch):
    import json

    out = tmp_path / "j.json"
    monkeypatch.setattr(sys, "argv", ["bench_jvp.py", "--tiny", "--json", str(out)])
    runpy.run_path(str(ROOT / "benchmarks" / "bench_jvp.py"), run_name="__main__")
    res = json.loads(out.read_text())
    assert res["per_batch"]["4"]["jvp_over_forward"] > 0


def test_bench_families_quick(tmp_path, monkeypatch):
    import json

    out = tmp_path / "f.json"
    monkeypatch.setattr(sys, "argv", ["bench_families.py", "--quick", "--only", "sd3", "--json", str(out)])
    runpy.run_path(str(ROOT / "benchmarks" / "bench_families.py"), run_name="__main__")
    rows = json.loads(out.read_text())["rows"]
    assert [r["conditioning"] for r in rows] == ["cond", "cfg"]
    assert all(r["fd_over_raw"] > 0 and r["jvp_over_raw"] > 0 for r in rows)


def test_bench_jvp_ratio_tiny():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_jvp_ratio

    import lipscope.fwad as fw

    before = (fw.jvp, fw._channels_last, fw._GroupNorm.jvp, dict(fw.CHUNK_ELEMENTS))
    res = bench_jvp_ratio.main(["--tiny", "--ablate"])
    assert set(res["rows"]) == {"cifar10-unet", "dit-s2", "sd3-s"}
    for r in res["rows"].values():
        assert r["jvp_over_forward"] > 0 and r["fd_over_raw"] > 0 and r["fd_batch_over_raw"] > 0
        assert all(r["jvp_over_forward" + c] > 0 for c in bench_jvp_ratio.ABLATIONS)
    assert (fw.jvp, fw._channels_last, fw._GroupNorm.jvp, dict(fw.CHUNK_ELEMENTS)) == before  # every change restored


def test_bench_scaling_tiny(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_scaling

    res = bench_scaling.main(["--tiny", "--json", str(tmp_path / "s.json"), "--plot", str(tmp_path / "s.png")])
    assert [r["points"] for r in res["work"] if r["method"] == "fd"] == [16, 32]
    assert all(np.isfinite(v) for v in res["slopes"].values()) and (tmp_path / "s.png").stat().st_size > 0
    assert set(res["linear_fit"]) == {"fd", "jvp"} and all(
        np.isfinite(f["per_point_s"]) for f in res["linear_fit"].values()
    )


def test_bench_diagnosis_tiny(tmp_path, monkeypatch):
    import json

    out = tmp_path / "d.json"
    monkeypatch.setattr(sys, "argv", ["bench_diagnosis.py", "--tiny", "--json", str(out)])
    runpy.run_path(str(ROOT / "benchmarks" / "bench_diagnosis.py"), run_name="__main__")
    res = json.loads(out.read_text())
    assert set(res["methods"]) == {"fd", "jvp", "jvp-ode", "fd-ode", "attribution", "ref-empirical", "ref-gaussian"}
    assert all(m["raw_forwards_per_item"] > 0 for m in res["methods"].values()) and res["attribution_groups"] == 5


def test_bench_attention_jvp_tiny():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_attention_jvp

    res = bench_attention_jvp.main(["--tiny", "--reps", "1"])
    (row,) = res["rows"]
    assert row["chunked_over_fused"] > 0 and row["whole_over_fused"] > 0 and row["tangent_rel_diff"] < 1e-5
