"""``lipscope report``: probe runs (and evaluate runs) → one page (docs/report.md).

Per run: the model card, K(t) against t and log-SNR with its intervals, exponent and onset, what the probe
diagnosed (quoted from run.json), attribution, step budgets and training coverage. For two or more runs: each
comparable pair's ratio of mean K below t̃ with its interval, and the evaluation runs' paired differences. The
verdict is generated from those numbers only: an interval that covers 1 (a ratio) or 0 (a difference) reads
"no difference"; runs of other grids, targets or T are not compared, and the page says why.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats as st

from .. import io as lio
from ..errors import InputError
from ..plots import figure_png, plot_compare, plot_lipschitz
from ..reportpage import Num, Quoted, Section, Text, render_html, render_markdown
from .common import check_out_file

CONFIDENCE = 0.95


def _read_json(p: Path) -> dict[str, Any]:
    try:
        d = json.loads(p.read_text())
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise InputError(f"{p} is not readable JSON ({type(e).__name__}); pass folders written by lipscope") from e
    if not isinstance(d, dict):
        raise InputError(f"{p} must hold a JSON object; pass folders written by lipscope")
    return d


def load_run(folder: str | Path, command: str = "probe") -> dict[str, Any]:
    """A run folder's run.json and tables, checked to be a lipscope ``command`` run."""
    r = Path(folder)
    what = "`runs`" if command == "probe" else "`eval`"
    if not (r / "run.json").is_file():
        raise InputError(f"{what} {r} is not a lipscope run (no run.json); pass folders written by lipscope {command}")
    meta = _read_json(r / "run.json")
    if meta.get("command") != command:
        raise InputError(f"{what} {r} is a lipscope {meta.get('command')!r} run; pass folders of lipscope {command}")
    run: dict[str, Any] = {"name": r.name, "path": r, "meta": meta}
    for f in ("lipschitz.csv", "steps.csv", "eval_paired.csv", "train_timesteps.csv"):
        if (r / f).is_file():
            run[f] = pd.read_csv(r / f)
    if command == "probe" and "lipschitz.csv" not in run:
        raise InputError(f"{what} {r} has no lipschitz.csv; rerun lipscope probe")
    return run


def _get(meta: dict[str, Any], path: str) -> Any:
    v: Any = meta
    for k in path.split("."):
        v = v[int(k)] if isinstance(v, list) else v.get(k) if isinstance(v, dict) else None
    return v


def jnum(run: dict[str, Any], path: str, digits: int = 3, pct: bool = False) -> Num:
    v = _get(run["meta"], path)
    return Num(float(v) if v is not None else math.nan, f"json:{run['name']}:{path}", digits, pct)


def quote(run: dict[str, Any], path: str) -> Quoted:
    return Quoted(str(_get(run["meta"], path)), f"json:{run['name']}:{path}")


def k_below(run: dict[str, Any]) -> dict[str, Any]:
    """Mean K over the grid points t < t̃ of the run's first network method, with a conservative standard error
    (the mean of the rows' s.e.m.: the rows share their samples, so they are treated as fully correlated)."""
    s = run["meta"]["summary"]
    df = run["lipschitz.csv"]
    d = df[(df["method"] == s["method"]) & (df["t"] < s["t_split"])]
    n = int(d["n"].min()) if len(d) else 0
    return {"mean": float(d["K_mean"].mean()) if len(d) else math.nan, "se": float(d["K_sem"].mean()) if len(d)
            else math.nan, "n": n, "t": tuple(np.sort(df[df["method"] == s["method"]]["t"].unique()))}  # fmt: skip


def ratio(a: dict[str, Any], b: dict[str, Any]) -> tuple[float, float, float]:
    """a/b with a Student-t interval on log(a/b) (delta method, n − 1 degrees of freedom of the smaller run)."""
    r = a["mean"] / b["mean"]
    se = math.hypot(a["se"] / a["mean"], b["se"] / b["mean"])
    q = float(st.t.ppf(0.5 + CONFIDENCE / 2, max(min(a["n"], b["n"]) - 1, 1)))
    return r, r * math.exp(-q * se), r * math.exp(q * se)


def why_not_comparable(a: dict[str, Any], b: dict[str, Any]) -> str | None:
    """None where the two probe runs measure the same quantity on the same grid; else the reason."""
    ma, mb = a["meta"], b["meta"]
    for what, f in (("target", lambda m: m.get("target")), ("T", lambda m: m["model"].get("T")),
                    ("noise process", lambda m: m["process"].get("process")),
                    ("method", lambda m: m["summary"].get("method")),
                    ("t̃ (t_split)", lambda m: m["summary"].get("t_split"))):  # fmt: skip
        if f(ma) != f(mb):
            return f"their {what} differs ({f(ma)} vs {f(mb)})"
    if k_below(a)["t"] != k_below(b)["t"]:
        return "their timestep grids differ (probe both with the same --timesteps)"
    return None


def _fig_lambda(run: dict[str, Any]) -> bytes | None:
    df = run["lipschitz.csv"]
    if "K_per_lambda" not in df.columns or not np.isfinite(df["lambda"]).any():
        return None
    return figure_png(plot_lipschitz(df, title=f"{run['name']}: K per unit log-SNR", x="lambda"))


def run_section(run: dict[str, Any]) -> list[Section]:
    """The sections of one probe run."""
    m, name = run["meta"], run["name"]
    model = m["model"]
    et = model.get("etsdm")
    etsdm: Any = (
        ["t̃ = ", jnum(run, "model.etsdm.t_tilde", 4), ", n = ", jnum(run, "model.etsdm.n", 4)] if et else "none"
    )
    card: list[list[Any]] = [
        ["model", str(model.get("name"))],
        ["network", str(model.get("config", {}).get("_class_name", "?"))],
        ["noise process", str(m["process"].get("process"))],
        ["parameterisation", str(model.get("prediction_type"))],
        ["target measured", str(m.get("target"))],
        ["E-TSDM map", etsdm],
        ["conditioning", json.dumps(m.get("conditioning")) if m.get("conditioning") else "none"],
        ["precision", str(m.get("dtype")) + (f", guard {m['precision']}" if m.get("precision") else "")],
        ["samples per t", jnum(run, "options.samples", 6)],
        ["grid points", jnum(run, "grid_points", 6)],
    ]
    s = Section(f"Run {name}", tables=[(["", ""], card)])
    meth = m["summary"].get("diagnosis", {}).get("methods", {})
    rows: list[list[Any]] = []
    for meth_name, d in meth.items():
        p = f"summary.diagnosis.methods.{meth_name}"
        e = d.get("exponent", {})
        ci = _ci(run, f"{p}.exponent.p", f"{p}.exponent.ci_low", f"{p}.exponent.ci_high")
        exp_cell: Text = ci if not e.get("reason") else [f"n/a ({e['reason']})"]
        no_onset = [f"none ({d.get('onset_reason')})"]
        onset: Text = [jnum(run, f"{p}.onset", 4)] if d.get("onset") is not None else no_onset
        rows.append([meth_name, exp_cell, onset])
    s.tables.append((["method", "exponent p (K ∝ τ^p) [95 % CI]", "onset t"], rows))
    sents = m["summary"].get("diagnosis", {}).get("sentences", [])
    s.paras += [[quote(run, f"summary.diagnosis.sentences.{i}")] for i in range(len(sents))]
    png = run["path"] / "lipschitz.png"
    if png.is_file():
        s.figures.append((f"{name}: K(t) with its 95 % interval (step boundaries and training density as probed)",
                          png.read_bytes()))  # fmt: skip
    if (lam := _fig_lambda(run)) is not None:
        s.figures.append((f"{name}: K per unit log-SNR λ with its 95 % interval", lam))
    if (run["path"] / "attribution.png").is_file():
        s.figures.append((f"{name}: where ∂ε/∂t enters the network", (run["path"] / "attribution.png").read_bytes()))
    out = [s]
    if "steps.csv" in run:
        out.append(budget_section(run))
    return out


def budget_section(run: dict[str, Any]) -> Section:
    """Per sampler of steps.csv: its largest step, that step's share, the last step's, the interpolation error."""
    name, rows = run["name"], []
    src = f"csv:{name}:steps.csv"

    def cell(i: int, col: str, digits: int = 3, pct: bool = False) -> Num:
        return Num(float(run["steps.csv"].loc[i, col]), f"{src}:{i}:{col}", digits, pct)

    for sampler, d in run["steps.csv"].groupby("sampler", sort=False):
        i, last = int(d["budget"].idxmax()), int(d.index[-1])
        rel = Num(float(d.loc[i, "budget_err"] / d.loc[i, "budget"]), f"derived:relerr:{name}:{i}", 2, True)
        mass: Any = cell(i, "train_mass", 3, True) if "train_mass" in d.columns else "—"
        where = [cell(i, "step", 4), " (t ", cell(i, "t_from", 6), " → ", cell(i, "t_to", 6), ")"]
        rows.append([str(sampler), where, cell(i, "share", 3, True), cell(last, "share", 3, True), ["±", rel], mass])
    s = Section(f"{name}: step budget", level=3)
    head = [
        "sampler",
        "largest step",
        "its share of ∫K dτ",
        "last step's share",
        "interpolation error",
        "training mass",
    ]
    s.tables.append((head, rows))
    if run["meta"]["summary"].get("coverage") is not None:
        s.paras.append([quote(run, "summary.coverage.sentence")])
    return s


def compare_section(runs: list[dict[str, Any]]) -> tuple[Section, list[Text]]:
    """Side by side, and each comparable pair's ratio; returns the section and its verdict lines."""
    s, verdict = Section("Side by side"), list[Text]()
    rows: list[list[Any]] = []
    for r in runs:
        kb = k_below(r)
        summ = r["meta"]["summary"]
        rows.append([
            r["name"],
            jnum(r, "summary.peak_K"),
            Num(kb["mean"], f"derived:kbelow:{r['name']}"),
            jnum(r, "summary.singularity_ratio"),
            _exp(r) if summ.get("exponent") is not None else "n/a",
            jnum(r, "summary.onset", 4) if summ.get("onset") is not None else "none",
        ])  # fmt: skip
    s.tables.append((["run", "peak K", "mean K below t̃", "singularity ratio", "exponent [95 % CI]", "onset t"], rows))
    pairs = []
    for i, a in enumerate(runs):
        for b in runs[i + 1 :]:
            why = why_not_comparable(a, b)
            if why:
                s.paras.append([f"{b['name']} vs {a['name']}: not compared, because {why}."])
                verdict.append([f"{b['name']} vs {a['name']}: n/a, because {why}"])
                continue
            ka, kb = k_below(a), k_below(b)
            if not (ka["mean"] > 0 and kb["mean"] > 0):
                zero = [r for r, k in ((a, ka), (b, kb)) if not k["mean"] > 0]
                line = _zero_verdict(a, b, zero)
                s.paras.append(line)
                verdict.append(line)
                verdict.append(_exp_verdict(a, b))
                continue
            rr, lo, hi = ratio(ka, kb)
            src = f"derived:kratio:{a['name']}:{b['name']}"
            nums = [Num(rr, src), " [", Num(lo, src + ":lo"), ", ", Num(hi, src + ":hi"), "]"]
            pairs.append([a["name"], b["name"], nums])
            verdict.append(_k_verdict(a, b, nums, lo, hi))
            verdict.append(_exp_verdict(a, b))
    if pairs:
        s.tables.append((["run A", "run B", "mean K below t̃: A / B [95 % CI]"], pairs))
    if len(runs) > 1:
        s.figures.append(("K(t) of every run", figure_png(plot_compare({r["name"]: r["lipschitz.csv"] for r in runs}))))
    return s, verdict


def _zero_verdict(a, b, zero: list[dict[str, Any]]) -> Text:
    """The ratio is n/a where a run's K is 0 below t̃ at every grid point (E-TSDM: ε does not change inside a
    sub-interval, so a finite difference that stays inside one is exactly 0)."""
    names = " and ".join(r["name"] for r in zero)
    line: Text = [
        f"K below t̃, {a['name']} / {b['name']}: n/a, because {names} has K zero at every grid point below t̃ ("
    ]
    for r in (a, b):
        line += [f"{r['name']}: mean ", Num(k_below(r)["mean"], f"derived:kbelow:{r['name']}"), "; "]
    line[-1] = ")"
    return line


def _k_verdict(a, b, nums: Text, lo: float, hi: float) -> Text:
    if lo <= 1 <= hi:
        return [f"K below t̃: no difference between {b['name']} and {a['name']} ({a['name']}/{b['name']} = ", *nums, ")"]
    word = "lowered" if lo > 1 else "raised"
    return [f"{b['name']} {word} K below t̃ vs {a['name']}: {a['name']}/{b['name']} = ", *nums]


def _exp_verdict(a, b) -> Text:
    ea, eb = a["meta"]["summary"].get("exponent"), b["meta"]["summary"].get("exponent")
    if ea is None or eb is None:
        return [f"exponent {a['name']} → {b['name']}: n/a, because a run has no exponent (see its diagnosis)"]
    ca, cb = a["meta"]["summary"]["exponent_ci"], b["meta"]["summary"]["exponent_ci"]
    overlap = None in ca or None in cb or not (ca[1] < cb[0] or cb[1] < ca[0])
    tail = " (the intervals overlap: no difference)" if overlap else " (the intervals are disjoint)"
    return [f"the exponent went from {a['name']}'s ", *_exp(a), f" to {b['name']}'s ", *_exp(b), tail]


def _ci(run: dict[str, Any], p: str, lo: str, hi: str) -> Text:
    return [jnum(run, p), " [", jnum(run, lo), ", ", jnum(run, hi), "]"]


def _exp(run: dict[str, Any]) -> Text:
    return _ci(run, "summary.exponent", "summary.exponent_ci.0", "summary.exponent_ci.1")


def eval_section(ev: dict[str, Any]) -> tuple[Section, list[Text]]:
    s, verdict = Section(f"Sample quality: {ev['name']}"), list[Text]()
    p = ev.get("eval_paired.csv")
    if p is None or p.empty:
        s.paras.append(["n/a, because the evaluation has no baseline (no eval_paired.csv)"])
        return s, verdict
    specs = _eval_specs(ev)
    rows, src = [], f"csv:{ev['name']}:eval_paired.csv"
    for i, r in p.iterrows():
        nums = [Num(float(r["diff_mean"]), f"{src}:{i}:diff_mean"), " [", Num(float(r["ci_low"]), f"{src}:{i}:ci_low"),
                ", ", Num(float(r["ci_high"]), f"{src}:{i}:ci_high"), "]"]  # fmt: skip
        who = f"{specs.get(r['model'], r['model'])} − {specs.get(r['baseline'], r['baseline'])}"
        at = f"{r['scheduler']}:{int(r['steps'])}"
        rows.append([who, at, str(r["metric"]), nums, Num(float(r["n"]), f"{src}:{i}:n", 4)])
        if not (math.isfinite(r["ci_low"]) and math.isfinite(r["ci_high"])):
            verdict.append([f"sample quality ({r['metric']}, {at}), {who}: n/a, because one seed gives no interval"])
        elif r["ci_low"] <= 0 <= r["ci_high"]:
            verdict.append([f"sample quality ({r['metric']}, {at}), {who}: no difference (Δ ", *nums, ")"])
        else:
            word = "better (lower)" if r["ci_high"] < 0 else "worse (higher)"
            verdict.append([f"sample quality ({r['metric']}, {at}), {who}: {word} (Δ ", *nums, ")"])
    s.tables.append((["model − baseline", "sampler", "metric", "Δ [95 % CI]", "seeds"], rows))
    s.paras.append([str(ev["meta"].get("comparability", ""))])
    return s, verdict


def _eval_specs(ev: dict[str, Any]) -> dict[str, str]:
    o = ev["meta"].get("options", {})
    base = o.get("baseline") or []
    return {"model": str(o.get("model")), **{("baseline" if i == 0 else f"baseline{i + 1}"): str(b)
                                             for i, b in enumerate(base)}}  # fmt: skip


def _same_spec(a: str, b: str) -> bool:
    return a == b or (Path(a).exists() and Path(b).exists() and Path(a).resolve() == Path(b).resolve())


@dataclass(frozen=True)
class Report:
    path: Path
    verdict: list[str]  # the verdict lines as the page shows them


def report(runs: Sequence[str | Path], out: str | Path, evals: Sequence[str | Path] = (), fmt: str = "html") -> Report:
    """Write the report of probe ``runs`` (and evaluate runs ``evals``) to ``out``: one self-contained HTML file,
    or markdown with its PNGs beside it (``fmt="md"``); returns the path and the verdict lines."""
    if fmt not in ("html", "md"):
        raise InputError(f"`format` {fmt!r}: use html or md")
    want = (".html", ".htm") if fmt == "html" else (".md",)
    if Path(out).suffix.lower() not in want:
        raise InputError(f"`out` {out}: a {fmt} report is one file; give `out` a name ending in {want[0]}")
    if not runs:
        raise InputError("`runs`: give at least one probe run folder")
    loaded = [load_run(r) for r in runs]
    if len({r["name"] for r in loaded}) < len(loaded):
        raise InputError("`runs` share a folder name; give runs whose folders have different names")
    evs = [load_run(e, "evaluate") for e in evals]
    probed = [str(r["meta"]["options"].get("model")) for r in loaded]
    for ev in evs:
        if not any(_same_spec(s, p) for s in _eval_specs(ev).values() for p in probed):
            raise InputError(f"`eval` {ev['path']} evaluates {', '.join(_eval_specs(ev).values())}, none of the probed "
                             f"models ({', '.join(probed)}); pass evaluations of these models")  # fmt: skip
    out = Path(out)
    check_out_file(out, [*runs, *evals], "reads")
    sections: list[Section] = []
    verdict: list[Text] = []
    for r in loaded:
        n = len(r["meta"]["summary"].get("step_budget_sentences", []))
        verdict += [[f"{r['name']}: ", quote(r, f"summary.step_budget_sentences.{i}")] for i in range(n)]
        if r["meta"]["summary"].get("coverage"):
            verdict.append([f"{r['name']}: ", quote(r, "summary.coverage.sentence")])
    if len(loaded) > 1:
        cs, v = compare_section(loaded)
        sections.append(cs)
        verdict = v + verdict
    for ev in evs:
        es, v = eval_section(ev)
        sections.append(es)
        verdict += v
    for r in loaded:
        sections += run_section(r)
    head = Section("Verdict", paras=verdict or [["n/a, because one run alone has nothing to compare"]])
    title = "lipscope report: " + ", ".join(r["name"] for r in loaded)
    pages = [head, *sections]
    if fmt == "html":
        lio.atomic_write_text(out, render_html(title, pages))
    else:
        text, figs = render_markdown(title, pages, lambda i: f"{out.stem}_fig{i + 1}.png")
        for fname, png in figs.items():
            lio.atomic_write_bytes(out.parent / fname, png)
        lio.atomic_write_text(out, text)
    return Report(out, ["".join(x.text() if isinstance(x, Num) else str(x) for x in line) for line in head.paras])
