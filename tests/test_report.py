"""``lipscope report`` as a user meets it: every number on the page traced back to the run.json or CSV value it
came from, the verdict generated only from numbers with intervals, and the page rendered by a real headless
Chromium (the distribution's package, installed by .ci/run) into a PNG whose content is checked."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats as st

GRID = "0,1,2,5,10,50,100,300,600,900"


class Page(HTMLParser):
    """Collects the num/quote spans (source, value, shown text), the verdict's text, images, scripts and links."""

    def __init__(self) -> None:
        super().__init__()
        self.nums: list[dict] = []
        self.quotes: list[dict] = []
        self.imgs: list[str] = []
        self.scripts = 0
        self.links: list[str] = []
        self.verdict_text: list[str] = []  # text outside spans, in the verdict section
        self._span: dict | None = None
        self._in_verdict = False
        self._depth = 0

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "section":
            self._in_verdict = a.get("class") == "verdict"
        if tag == "span" and a.get("class") in ("num", "quote"):
            self._span = {**a, "text": ""}
        if tag == "img":
            self.imgs.append(a.get("src", ""))
        if tag == "script":
            self.scripts += 1
        for k in ("href", "src"):
            if a.get(k) and not str(a[k]).startswith("data:"):
                self.links.append(a[k])

    def handle_endtag(self, tag):
        if tag == "span" and self._span is not None:
            (self.nums if self._span["class"] == "num" else self.quotes).append(self._span)
            self._span = None
        if tag == "section":
            self._in_verdict = False

    def handle_data(self, data):
        if self._span is not None:
            self._span["text"] += data
        elif self._in_verdict:
            self.verdict_text.append(data)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """base and E-TSDM probed on one grid, base again on another (not comparable), and an evaluation."""
    from lipscope.runs import EvaluateOptions, ProbeOptions, run_evaluate, run_probe

    root = tmp_path_factory.mktemp("report")
    common = dict(samples=3, device="cpu", sampler="ddim:10,dpmsolver++:20", train_timesteps="logit-normal:0,1")
    for name, model, grid in [("base", "ddpm", GRID), ("etsdm", "etsdm", GRID), ("coarse", "ddpm", "0,1,5,50,500")]:
        run_probe(ProbeOptions(model=f"builtin:digits-{model}", timesteps=grid, out=str(root / name), **common))
    run_evaluate(EvaluateOptions(model="builtin:digits-etsdm", baseline=("builtin:digits-ddpm",), scheduler=("ddim",),
                                 steps=(2,), num=8, seeds=2, device="cpu", out=str(root / "eval")))  # fmt: skip
    return root


def _value(root: Path, src: str) -> float:
    """The value a span's data-src names, read from the run folder (derived values recomputed here)."""
    kind, rest = src.split(":", 1)
    if kind == "json":
        run, path = rest.split(":", 1)
        v = json.loads((root / run / "run.json").read_text())
        for k in path.split("."):
            v = v[int(k)] if isinstance(v, list) else v[k]
        return float(v)
    if kind == "csv":
        run, file, rest2 = rest.split(":", 2)
        row, col = rest2.rsplit(":", 1)
        return float(pd.read_csv(root / run / file).loc[int(row), col])
    what, *args = rest.split(":")
    if what == "relerr":
        d = pd.read_csv(root / args[0] / "steps.csv").loc[int(args[1])]
        return float(d["budget_err"] / d["budget"])
    below = {}
    for r in args[:2]:
        meta = json.loads((root / r / "run.json").read_text())
        df = pd.read_csv(root / r / "lipschitz.csv")
        d = df[(df["method"] == meta["summary"]["method"]) & (df["t"] < meta["summary"]["t_split"])]
        below[r] = (d["K_mean"].mean(), d["K_sem"].mean(), int(d["n"].min()))
    if what == "kbelow":
        return float(below[args[0]][0])
    (ma, sa, na), (mb, sb, nb) = below[args[0]], below[args[1]]
    r, se = ma / mb, math.sqrt((sa / ma) ** 2 + (sb / mb) ** 2)
    q = st.t.ppf(0.975, min(na, nb) - 1)
    return {None: r, "lo": r * math.exp(-q * se), "hi": r * math.exp(q * se)}[args[2] if len(args) > 2 else None]


def _shown_matches(text: str, v: float) -> bool:
    """The shown text is v rounded to the digits it shows (percentages ×100)."""
    t = text.replace("%", "").strip()
    if t == "n/a":
        return not math.isfinite(v)
    v = 100 * v if "%" in text else v
    mant = re.sub(r"e.*$", "", t).lstrip("-").replace(".", "").lstrip("0") or "0"
    return float(t) == float(f"{v:.{max(len(mant), 1)}g}")


def test_every_number_traces_to_its_source(runs):
    from lipscope import report

    res = report([runs / "base", runs / "etsdm", runs / "coarse"], runs / "r.html", evals=[runs / "eval"])
    page = Page()
    page.feed(res.path.read_text())
    assert len(page.nums) > 40 and page.quotes
    for n in page.nums:
        v = _value(runs, n["data-src"])
        got = float(n["data-value"])
        assert got == v or (math.isnan(got) and math.isnan(v)) or got == pytest.approx(v, rel=1e-12), n
        assert _shown_matches(n["text"], v), n
    for q in page.quotes:
        _, run, path = q["data-src"].split(":", 2)
        v = json.loads((runs / run / "run.json").read_text())
        for k in path.split("."):
            v = v[int(k)] if isinstance(v, list) else v[k]
        assert q["text"] == v
    # the verdict holds no number of its own: outside the spans only names (runs, samplers, metrics) carry digits
    rest = " ".join(page.verdict_text)
    for name in ("ddim:2", "ddim:10", "dpmsolver++:20", "kid_digits", "fd_digits", "fd_pixel", "swd_pixel"):
        rest = rest.replace(name, "")
    assert not re.search(r"\d", rest), rest
    html = res.path.read_text()
    assert "coarse vs base: not compared, because their timestep grids differ" in html
    # self-contained: no script, nothing fetched, every figure embedded
    assert page.scripts == 0 and not page.links
    assert len(page.imgs) >= 6 and all(s.startswith("data:image/png;base64,") for s in page.imgs)
    assert any("no difference" in v or "lowered" in v or "raised" in v for v in res.verdict)


def test_verdict_reads_no_difference_where_the_interval_covers_it(runs):
    from lipscope import report

    res = report([runs / "base", runs / "etsdm"], runs / "v.html", evals=[runs / "eval"])
    paired = pd.read_csv(runs / "eval" / "eval_paired.csv")
    for _, r in paired.iterrows():
        line = next(v for v in res.verdict if f"({r['metric']}, ddim:2)" in v)
        covers = r["ci_low"] <= 0 <= r["ci_high"]
        assert ("no difference" in line) == covers, line
    ratio = next(v for v in res.verdict if "K below t̃" in v)
    if "n/a" in ratio:  # E-TSDM's K is zero inside its sub-intervals: no ratio, and the page says so
        k = [_value(runs, f"derived:kbelow:{r}") for r in ("base", "etsdm")]
        assert min(k) == 0 and "has K zero at every grid point below t̃" in ratio
        return
    m = re.search(r"= ([-\d.e+]+) \[([-\d.e+]+), ([-\d.e+]+)\]", ratio)
    assert m is not None
    lo, hi = float(m.group(2)), float(m.group(3))
    assert ("no difference" in ratio) == (lo <= 1 <= hi)


def test_markdown_format_writes_pngs_beside(runs):
    from lipscope import report

    (runs / "md").mkdir()
    res = report([runs / "base"], runs / "md" / "r.md", fmt="md")
    text = res.path.read_text()
    pngs = sorted((runs / "md").glob("r_fig*.png"))
    assert pngs and all(f"]({p.name})" in text for p in pngs) and all(p.read_bytes()[:4] == b"\x89PNG" for p in pngs)


@pytest.mark.parametrize(
    "args,mentions",
    [
        (["{tmp}/nope"], ("nope", "lipscope run")),
        (["{root}/eval"], ("eval", "probe")),
        (["{root}/base", "--eval", "{root}/base"], ("--eval", "evaluate")),
        (["{root}/base", "--out", "{tmp}/x.pdf"], ("--out", ".html")),
        (["{root}/base", "--format", "pdf"], ("--format", "html or md")),
        (["{root}/base", "--out", "{root}/base/r.html"], ("--out", "inside the run")),
    ],
)
def test_report_bad_input_one_line(args, mentions, runs, tmp_path, capfd, monkeypatch):
    from test_bad_inputs import assert_one_line_refusal, run_inprocess

    argv = ["report", *(a.format(tmp=tmp_path, root=runs) for a in args)]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "r.html")]
    res = run_inprocess(argv, capfd, monkeypatch)
    assert_one_line_refusal(res, mentions)
    assert not (tmp_path / "r.html").exists() and not (runs / "base" / "r.html").exists()


def test_eval_of_other_models_refused(runs, tmp_path, capfd, monkeypatch):
    from test_bad_inputs import assert_one_line_refusal, run_inprocess

    other = tmp_path / "other"
    shutil.copytree(runs / "eval", other)
    meta = json.loads((other / "run.json").read_text())
    meta["options"] |= {"model": "someone/else", "baseline": ["someone/other"]}
    (other / "run.json").write_text(json.dumps(meta))
    res = run_inprocess(["report", str(runs / "base"), "--eval", str(other), "--out", str(tmp_path / "r.html")],
                        capfd, monkeypatch)  # fmt: skip
    assert_one_line_refusal(res, ("--eval", "someone/else"))


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if p := shutil.which(name):
            return p
    raise AssertionError("no Chromium: install the distribution's package (apt-get install chromium; .ci/run does)")


def test_rendered_by_headless_chromium(runs, tmp_path):
    from PIL import Image

    from lipscope import report

    page = report([runs / "base", runs / "etsdm"], tmp_path / "page.html", evals=[runs / "eval"]).path
    png = tmp_path / "shot.png"
    profile = tmp_path / "profile"
    profile.mkdir()
    cmd = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={profile}", f"--screenshot={png}", "--window-size=1200,4000", page.as_uri()]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and png.is_file(), r.stderr[-2000:]
    img = np.asarray(Image.open(png).convert("RGB")).astype(int)
    assert img.shape[:2] == (4000, 1200)
    assert img.std() > 20, "blank page"
    # the K curves' blue (seaborn "deep" #4C72B0) is on the page: the embedded figures were drawn
    blue = (np.abs(img - np.array([76, 114, 176])).sum(-1) < 40).sum()
    assert blue > 2000, blue
    # text was rendered: dark pixels in the top band (title and verdict)
    assert (img[:600].sum(-1) < 150).sum() > 500
