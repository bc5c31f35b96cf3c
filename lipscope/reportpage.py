"""One report page as HTML (self-contained: figures as base64 data URIs, inline CSS, no script, no network) or
markdown (PNGs beside it). Pure rendering: the numbers arrive as :class:`Num`, each carrying where it came from.

Every number on the page is a ``Num``: its shown text, its full value and its source (``json:RUN:path``,
``csv:RUN:FILE:ROW:COLUMN`` or ``derived:…``), written into the HTML as ``<span class="num" data-value=…
data-src=…>`` so a reader (and the tests) can trace each one back to run.json or a CSV.
"""

from __future__ import annotations

import base64
import html
import math
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Num:
    """A number on the page: ``value`` shown with ``digits`` significant digits (``pct``: as a percentage)."""

    value: float
    src: str
    digits: int = 3
    pct: bool = False

    def text(self) -> str:
        if not math.isfinite(self.value):
            return "n/a"
        v = 100 * self.value if self.pct else self.value
        s = f"{v:.{self.digits}g}"
        return f"{s} %" if self.pct else s


class Quoted(str):
    """A sentence quoted verbatim from run.json (``src``: ``json:RUN:path``): its numbers are run.json's."""

    src: str

    def __new__(cls, text: str, src: str) -> Quoted:
        o = super().__new__(cls, text)
        o.src = src
        return o


Text = list[Any]  # str pieces, Quoted sentences and Num


@dataclass
class Section:
    title: str
    paras: list[Text] = field(default_factory=list)
    tables: list[tuple[list[str], list[list[Any]]]] = field(default_factory=list)  # (header, rows of str/Num)
    figures: list[tuple[str, bytes]] = field(default_factory=list)  # (caption, PNG bytes)
    level: int = 2


CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}td,th{border:1px solid #ccc;padding:.25em .6em;
text-align:left}th{background:#f3f3f3}figure{margin:1em 0}img{max-width:100%;border:1px solid #eee}
figcaption{font-size:.85em;color:#555}.verdict li{margin:.3em 0}.num{font-variant-numeric:tabular-nums}
@media print{h2{page-break-after:avoid}figure{page-break-inside:avoid}}"""


def _span(x: Any) -> str:
    if isinstance(x, Num):
        return (
            f'<span class="num" data-value="{x.value!r}" data-src="{html.escape(x.src)}">{html.escape(x.text())}</span>'
        )
    if isinstance(x, Quoted):
        return f'<span class="quote" data-src="{html.escape(x.src)}">{html.escape(str(x))}</span>'
    return html.escape(str(x))


def _inline(t: Text | str | Num) -> str:
    return "".join(_span(x) for x in (t if isinstance(t, list) else [t]))


def render_html(title: str, sections: list[Section]) -> str:
    """The page as one HTML string."""
    out = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
           f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>"]  # fmt: skip
    for s in sections:
        cls = ' class="verdict"' if s.title.lower().startswith("verdict") else ""
        out.append(f"<section{cls}><h{s.level}>{html.escape(s.title)}</h{s.level}>")
        if cls:
            out.append("<ul>" + "".join(f"<li>{_inline(p)}</li>" for p in s.paras) + "</ul>")
        else:
            out += [f"<p>{_inline(p)}</p>" for p in s.paras]
        for head, rows in s.tables:
            out.append("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>")
            out += ["<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>" for r in rows]
            out.append("</table>")
        for cap, png in s.figures:
            b64 = base64.b64encode(png).decode()
            out.append(f'<figure><img alt="{html.escape(cap)}" src="data:image/png;base64,{b64}">'
                       f"<figcaption>{html.escape(cap)}</figcaption></figure>")  # fmt: skip
        out.append("</section>")
    out.append("</body></html>")
    return "\n".join(out)


def _md(t: Text | str | Num) -> str:
    return "".join(x.text() if isinstance(x, Num) else str(x) for x in (t if isinstance(t, list) else [t]))


def render_markdown(title: str, sections: list[Section], figure_name) -> tuple[str, dict[str, bytes]]:
    """The page as markdown and its figures (``figure_name(i)`` → the file name each PNG gets beside it)."""
    lines, files = [f"# {title}", ""], dict[str, bytes]()
    for s in sections:
        lines += ["#" * s.level + " " + s.title, ""]
        bullet = "- " if s.title.lower().startswith("verdict") else ""
        lines += [bullet + _md(p) + ("" if bullet else "\n") for p in s.paras]
        for head, rows in s.tables:
            lines += ["", "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
            lines += ["| " + " | ".join(_md(c).replace("|", "\\|") for c in r) + " |" for r in rows]
            lines.append("")
        for cap, png in s.figures:
            name = figure_name(len(files))
            files[name] = png
            lines += [f"![{cap}]({name})", ""]
        lines.append("")
    return "\n".join(lines), files
