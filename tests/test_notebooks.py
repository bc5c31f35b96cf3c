"""The notebooks execute top to bottom (small sizes) and are committed with their outputs."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("make_notebooks", ROOT / "notebooks" / "make_notebooks.py")
mk = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mk)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(mk.NOTEBOOKS))
def test_notebook_executes(name, monkeypatch):
    monkeypatch.setenv("LIPSCOPE_NB_SMALL", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = mk.execute(mk.build(name))
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors


@pytest.mark.parametrize("name", list(mk.NOTEBOOKS))
def test_committed_notebook_matches_its_source_and_has_figures(name):
    nb = json.loads((ROOT / "notebooks" / name).read_text())
    src = ["".join(c["source"]) for c in nb["cells"]]
    assert src == [s for _, s in mk.NOTEBOOKS[name]], "rerun: python notebooks/make_notebooks.py"
    pngs = sum("image/png" in o.get("data", {}) for c in nb["cells"] for o in c.get("outputs", []))
    assert pngs >= 1
