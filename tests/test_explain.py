"""The diagnosis summary (lipscope.explain) and the probe command with --method jvp-ode, --attribute and
--reference end to end: run.json's summary.exponent/exponent_ci/onset, attribution.csv/.png, sentences, refusals."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

import lipscope
from lipscope import rng
from lipscope.attribution import attribution_table
from lipscope.exponent import fit_exponent, onset


def _table() -> pd.DataFrame:
    """A probe-like table: a power law τ^−0.5 below t = 20 and a flat tail, 6 samples; a zero method; a reference."""
    t = np.array([0.0, 1, 2, 3, 5, 7, 10, 20, 100, 200, 500])
    g = np.random.default_rng(0)
    base = np.where(t > 0, (np.maximum(t, 1) / 1000) ** -0.5, 40.0)
    base = np.where(t >= 20, 5.0, base)
    K = base[None] * np.exp(0.1 * g.normal(size=(6, t.size)))
    rows = []
    for name, k in (("jvp", K), ("fd-forward", np.zeros_like(K)), ("ref-empirical", 10 * K)):
        s = k.std(0, ddof=1) / np.sqrt(6)
        rows.append(pd.DataFrame({"t": t, "method": name, "K_mean": k.mean(0), "K_ci_low": k.mean(0) - 2.57 * s,
                                  "K_ci_high": k.mean(0) + 2.57 * s}))  # fmt: skip
    df = pd.concat(rows, ignore_index=True)
    df.attrs |= {"T": 1000, "K_samples": np.concatenate([K, np.zeros_like(K), 10 * K], axis=1)}
    return df


def test_explain_generates_each_number_from_the_table():
    df = _table()
    d = lipscope.explain(df, seed=4)
    K = df.attrs["K_samples"][:, :11]
    t = df["t"].to_numpy()[:11]
    ref = fit_exponent(t, K, 1000, 4)
    assert d["method"] == "jvp" and d["exponent"] == ref.p and d["exponent_ci"] == [ref.ci_low, ref.ci_high]
    assert d["onset"] == onset(t, K.mean(0), 100.0)[0] == 3.0  # ≈ 31.6, 22.4, 18.3 at t = 1..3; 14.1 < 3·5 at t = 5
    s = d["sentences"]
    assert s[0] == f"jvp: K ∝ τ^{ref.p:.2f} [{ref.ci_low:.2f}, {ref.ci_high:.2f}] for t in [1, 10]"
    assert s[1].startswith("jvp: onset t = 3 (K > 3× the median over t ≥ 100")
    assert s[2].startswith("fd-forward: exponent n/a, because K is 0 at 6 of 6 points in [1, 10]")
    assert s[3].startswith("fd-forward: onset n/a, because K at the smallest t (0) is 0")
    assert s[-1].startswith("ref-empirical: at t = 0 the optimal denoiser's K = ")
    assert "is 10× [10×, 10×] the network's (jvp" in s[-1]
    assert np.allclose(d["reference"]["ref-empirical"]["ratio"], 10.0)


def test_explain_of_a_table_read_back_has_no_interval():
    df = _table()
    back = pd.DataFrame(df)  # attrs dropped, as pd.read_csv gives
    back.attrs = {}
    d = lipscope.explain(back)
    e = d["methods"]["jvp"]["exponent"]
    assert e["p"] == pytest.approx(d["exponent"]) and np.isnan(e["ci_low"]) and "no per-sample K" in e["ci_reason"]
    assert "(interval n/a, because the table has no per-sample K (attrs K_samples) to resample)" in d["sentences"][0]


def _loop_interval(stat, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """2.5/97.5 % quantiles of ``stat(rows)`` over the bootstrap's draws, written as a loop over resampled rows."""
    counts = rng.bootstrap_rng(seed).multinomial(n, np.full(n, 1 / n), size=2000)
    v = np.array([stat(np.repeat(np.arange(n), c)) for c in counts])
    return np.nanquantile(v, 0.025, axis=0), np.nanquantile(v, 0.975, axis=0)


def test_every_diagnosis_sentence_carries_its_interval():
    """The ODE split's K_partial/K_total and t share, the attribution's mean shares and the reference's ratio each
    come with a bootstrap interval over samples, equal to a loop over resampled rows computed here from the
    per-sample values; where the value is 0/0 the sentence says n/a with the reason."""
    n, t = 8, np.array([0.0, 1, 2, 3, 5, 10, 100, 300])
    G = t.size
    g = np.random.default_rng(3)
    part = np.exp(g.normal(size=(n, G)))  # per-sample ‖∂ε/∂τ‖, ⟨∂ε/∂τ, dε/dτ⟩, ‖dε/dτ‖, ‖dε/dτ‖²
    tot2 = np.exp(g.normal(size=(n, G))) + 1.0
    inner = 0.3 * tot2 + 0.1 * g.normal(size=(n, G))
    tot = np.sqrt(tot2)
    ode = np.stack([tot, part, tot + part, inner, tot2], 2)
    net = part.copy()
    refk = 5 * net * np.exp(0.2 * g.normal(size=(n, G)))

    def rows(name, k, **extra):
        m = k.mean(0)
        return pd.DataFrame({"t": t, "method": name, "K_mean": m, "K_ci_low": 0.9 * m, "K_ci_high": 1.1 * m, **extra})

    ode_cols = {"K_partial": part.mean(0), "K_space": (tot + part).mean(0), "t_share": inner.sum(0) / tot2.sum(0)}
    df = pd.concat([rows("jvp", net), rows("jvp-ode", tot, **ode_cols), rows("ref-empirical", refk)], ignore_index=True)
    # two parts and outside: per sample ‖J_c‖, ⟨J_c, J⟩ of each, ‖J‖, ‖J‖² (no embedding), as attribution_norms
    ip = np.stack([0.6 * tot2, 0.3 * tot2 + g.normal(size=(n, G)), 0.1 * tot2], 2)
    ip[:, :, 2] = tot2 - ip[:, :, 0] - ip[:, :, 1]
    vals = np.concatenate([np.abs(ip), ip, tot[:, :, None], tot2[:, :, None]], 2)
    att = attribution_table(vals, t, ["down_blocks.0", "up_blocks.0", "outside"], [], "blocks")
    df.attrs |= {"T": 1000, "K_samples": np.concatenate([net, tot, refk], 1), "ode_samples": {"jvp-ode": ode},
                 "attribution": att}  # fmt: skip
    d = lipscope.explain(df, seed=9)
    lo, hi = _loop_interval(lambda r: inner[r].sum(0) / tot2[r].sum(0), n, 9)
    assert np.allclose(d["ode"]["jvp-ode"]["t_share_ci"], [lo, hi], rtol=1e-12)
    lo2, hi2 = _loop_interval(lambda r: part[r].sum(0) / tot[r].sum(0), n, 9)
    assert np.allclose(d["ode"]["jvp-ode"]["K_partial_over_K_total_ci"], [lo2, hi2], rtol=1e-12)
    s = next(x for x in d["sentences"] if x.startswith("jvp-ode: along the ODE at t = 1,"))
    r1 = part[:, 1].mean() / tot[:, 1].mean()
    assert f"(K_partial/K_total = {r1:.3g} [{lo2[1]:.3g}, {hi2[1]:.3g}])" in s
    assert f"t itself carries {100 * ode_cols['t_share'][1]:.0f} % [{100 * lo[1]:.0f} %, {100 * hi[1]:.0f} %]" in s
    low = t < 100  # the attribution's mean share over t < t̃, per part
    la, ha = _loop_interval(lambda r: (ip[r][:, low].sum(0) / tot2[r][:, low].sum(0)[:, None]).mean(0), n, 9)
    assert np.allclose(d["attribution"]["top_ci"], [[la[k], ha[k]] for k in (0, 1, 2)], rtol=1e-12)
    sa = next(x for x in d["sentences"] if x.startswith("attribution:"))
    assert f"down_blocks.0 {100 * d['attribution']['top'][0][1]:.0f} % [{100 * la[0]:.0f} %, {100 * ha[0]:.0f} %]" in sa
    lr, hr = _loop_interval(lambda r: refk[r].sum(0) / net[r].sum(0), n, 9)
    assert np.allclose(d["reference"]["ref-empirical"]["ratio_ci"], [lr, hr], rtol=1e-12)
    assert (
        f"{refk[:, 0].mean() / net[:, 0].mean():.3g}× [{lr[0]:.3g}×, {hr[0]:.3g}×] the network's" in d["sentences"][-1]
    )
    df.loc[df["method"] == "jvp-ode", "t_share"] = np.nan  # dε/dt = 0: n/a with the reason
    df.loc[df["method"] == "jvp", "K_mean"] = 0.0
    d = lipscope.explain(df, seed=9)
    assert "t itself carries n/a, because dε/dt = 0 there" in next(x for x in d["sentences"] if "along the ODE" in x)
    assert "is n/a times the network's, because the network's K is 0 there" in d["sentences"][-1]


def _run(args, cwd=None, extra_path=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    if extra_path:
        env["PYTHONPATH"] = os.pathsep.join([str(extra_path), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-m", "lipscope", *args], capture_output=True, text=True, env=env, cwd=cwd)


def test_probe_command_with_the_diagnosis(tmp_path, pipeline_dir):
    out = tmp_path / "diag"
    grid = "0,1,2,3,4,5,6,8,10,20,50,100,300"
    r = _run(["probe", "--model", str(pipeline_dir), "--data", "digits", "--samples", "4", "--timesteps", grid,
              "--method", "jvp,jvp-ode", "--attribute", "blocks", "--reference", "empirical,gaussian",
              "--out", str(out), "--no-progress"])  # fmt: skip
    assert r.returncode == 0, r.stderr
    meta = json.loads((out / "run.json").read_text())
    s = meta["summary"]
    e = s["diagnosis"]["methods"]["jvp"]["exponent"]
    assert s["exponent"] == e["p"] and s["exponent_ci"] == [e["ci_low"], e["ci_high"]] and e["t_lo"] == 1
    assert "onset" in s and meta["reference"]["N"] == 1797
    dg = s["diagnosis"]  # the intervals come from the per-sample values of this run (4 samples)
    lo, hi = (np.array(v, dtype=float) for v in dg["ode"]["jvp-ode"]["t_share_ci"])
    assert np.all(lo[1:] <= hi[1:]) and np.isfinite(lo[1:]).all()  # t > 0, where dε/dt ≠ 0
    assert all(np.isfinite(v).all() for v in dg["attribution"]["top_ci"])
    said = " ".join(dg["sentences"])
    assert " %, " in said and "× [" in said and "K_partial/K_total = " in said
    df = pd.read_csv(out / "lipschitz.csv")
    assert set(df["method"]) == {"jvp", "jvp-ode", "ref-empirical", "ref-gaussian"}
    ode = df[df["method"] == "jvp-ode"]
    assert np.allclose(ode["K_partial"].to_numpy(), df[df["method"] == "jvp"]["K_mean"].to_numpy())
    att = pd.read_csv(out / "attribution.csv")
    assert {"t", "method", "part", "K_part", "share"} <= set(att.columns)
    total = att[att["part"] == "total"].set_index("t")["K_part"]
    jv = df[df["method"] == "jvp"].set_index("t")["K_mean"]
    assert np.allclose(total.to_numpy(), jv.loc[total.index].to_numpy(), rtol=512 * 2.0**-24)  # float32, 2 layouts
    sums = att[att["kind"].isin(["part", "outside"])].groupby("t")["share"].sum()
    assert np.allclose(sums.dropna(), 1.0)
    assert (out / "attribution.png").read_bytes()[:4] == b"\x89PNG"
    assert "K ∝ τ^" in r.stdout and "attribution" in r.stdout and "ref-empirical" in r.stdout


@pytest.mark.parametrize(
    "args,says",
    [
        (["--attribute", "rows"], "--attribute"),
        (["--reference", "optimal"], "--reference"),
        (["--method", "jvp-od"], "--method"),
        (["--reference", "empirical", "--data", "model"], "--reference needs the data set itself"),
        (
            ["--attribute", "blocks", "--method", "jvp", "--model", "py:lsmod_diag:make", "--data", "digits"],
            "--attribute needs to know",
        ),
    ],
)
def test_bad_diagnosis_options_are_one_line(tmp_path, args, says):
    (tmp_path / "lsmod_diag.py").write_text("def make():\n    return lambda x, t: x\n")
    base = ["probe", "--out", str(tmp_path / "o"), "--samples", "2", "--timesteps", "1,2", "--no-progress"]
    r = _run([*base, *args], cwd=tmp_path, extra_path=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert says in r.stderr and len(r.stderr.strip().splitlines()) <= 2, r.stderr  # the error (and a model warning)
    assert not (tmp_path / "o").exists()


def test_a_grid_without_the_points_a_number_needs_prints_na_with_the_reason(tmp_path, pipeline_dir):
    """Too few small-t points for the exponent and no point above t̃: the run goes on (exit 0), and each number it
    cannot give is printed as "n/a, because …" (the summary's median/singularity ratio and the exponent)."""
    r = _run(["probe", "--model", str(pipeline_dir), "--data", "digits", "--samples", "2", "--timesteps", "1,2",
              "--method", "jvp", "--out", str(tmp_path / "o"), "--no-progress"])  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "n/a, because no grid point at t ≥ 100" in r.stdout
    assert "exponent n/a, because 2 grid points in the first decade" in r.stdout
    s = json.loads((tmp_path / "o" / "run.json").read_text())["summary"]
    assert s["exponent"] is None and s["exponent_ci"] == [None, None] and s["onset"] is None
