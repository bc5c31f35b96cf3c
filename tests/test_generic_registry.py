"""The registry of the generic adapter: docs/models.md is generated from it and current, every tested pipeline has a
tiny folder in tests/generic_fixtures.py (and nothing else claims "tested"), and classes refused by name are refused
in one line."""

from __future__ import annotations

from pathlib import Path

import pytest
from generic_fixtures import TINY

from lipscope.errors import InputError
from lipscope.families import FAMILIES, pipeline_denoiser
from lipscope.families.registry import BEGIN, REFUSED, TESTED, denoiser_classes, models_table

DOC = Path(__file__).resolve().parents[1] / "docs" / "models.md"


def test_docs_models_md_is_generated_from_the_registry():
    text = DOC.read_text()
    assert BEGIN in text and text[text.index(BEGIN) :] == models_table(), (
        "docs/models.md is stale: python -m lipscope.families.registry docs/models.md"
    )


def test_every_tested_pipeline_has_its_tiny_folder_and_denoiser():
    assert set(TESTED) == set(TINY)
    for name, tiny in TINY.items():
        assert type(tiny.build()[tiny.component]).__name__ == TESTED[name].denoiser, name


def test_the_table_covers_every_denoiser_class_diffusers_ships():
    classes = {c for c, _ in denoiser_classes()}
    assert len(classes) > 60
    assert {t.denoiser for t in TESTED.values()} <= classes
    assert set(REFUSED) <= classes
    assert {c for f in FAMILIES for c in f.classes if not c.startswith("ETSDM")} <= classes
    table = models_table()
    assert all(f"| `{c}` |" in table for c in classes)


@pytest.mark.parametrize("cls", sorted(REFUSED))
def test_classes_that_are_not_denoisers_are_refused_by_name(cls):
    with pytest.raises(InputError) as e:
        pipeline_denoiser({"_class_name": "SomePipeline", "transformer": ["diffusers", cls]}, "x")
    assert f"whose transformer is a {cls}: {REFUSED[cls]}" in str(e.value) and "\n" not in str(e.value)
