"""Every built-in loads and probes; regression tests on the shipped weights."""

from __future__ import annotations

import json

import pytest

import lipscope
from lipscope.errors import InputError
from lipscope.zoo import card, list_builtins


@pytest.mark.parametrize("name", ["digits-ddpm", "digits-etsdm", "digits-control", "digits-gaussian"])
def test_builtin_loads_and_probes(name):
    assert name in list_builtins()
    m = lipscope.load_model(f"builtin:{name}")
    df = lipscope.probe(m, "digits", timesteps="0,50,500", samples=4)
    assert (df["K_mean"] >= 0).all() and len(df) == 3
    c = card(name)
    assert c["name"] == f"builtin:{name}"
    if name != "digits-gaussian":
        assert c["recipe"].startswith("lipscope ") and c["steps"] > 0 and c["final_loss_mean_last_100"] < 0.1
        assert (m.etsdm is not None) == (name == "digits-etsdm")


def test_unknown_builtin():
    with pytest.raises(InputError, match="digits-ddpm"):
        lipscope.load_model("builtin:nope")


@pytest.fixture(scope="module")
def probes():
    """Deterministic: fixed seed, fixed batch size, shipped weights. 32 samples, default grid."""
    out = {}
    for n in ("digits-ddpm", "digits-etsdm"):
        m = lipscope.load_model(f"builtin:{n}")
        out[n] = (
            lipscope.summary(lipscope.probe(m, "digits", samples=32, seed=0, batch_size=64), m.T),
            lipscope.probe(
                m, "digits", timesteps="range:0:100:1", samples=32, seed=0, batch_size=64, space="condition"
            ),
        )
    return out


def test_base_model_shows_the_singularity(probes):
    s, _ = probes["digits-ddpm"]
    assert s["singularity_ratio"] >= 6.0  # measured 8.87; a model without the singularity sits near 1
    assert s["peak_t"] < 20


def test_etsdm_bounds_condition_space_k_below_t_tilde(probes):
    base = probes["digits-ddpm"][1]["K_mean"].max()
    et = probes["digits-etsdm"][1]["K_mean"].max()
    assert base / et >= 5.0  # docs/etsdm.md: 5.25× (128 samples); 5.25× here too


def test_zoo_cards_match_the_evidence_file():
    from pathlib import Path

    ev = json.loads((Path(__file__).resolve().parents[1] / "docs" / "data" / "etsdm_digits_evidence.json").read_text())
    assert card("digits-etsdm")["probe_condition_space"] == ev["fd_condition"]["etsdm"]
