"""The layout promises of docs/architecture.md, checked on the source: one-way imports (function-local
ones included), small modules, one place for randomness, an immutable model adapter."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1] / "lipscope"

# lower number = lower layer; a module may import only from layers strictly below its own
# (modules of one layer never import each other, except where listed in SAME_LAYER)
LAYERS = {
    "errors": 0,
    "rng": 0,
    "shard": 0,
    "labels": 0,
    "io": 1,
    "devices": 1,
    "targets": 1,
    "fwad": 1,
    "conditioning": 1,
    "ranges": 1,
    "weights": 1,
    "reduction": 1,
    "metrics": 1,
    "plots": 1,
    "patches": 1,
    "cards": 1,
    "exponent": 1,
    "budget": 1,
    "coverage": 1,
    "budgetplot": 1,
    "reportpage": 1,
    "sigmas": 1,
    "explain": 2,
    "odesolve": 1,
    "schedules": 2,
    "etsdm": 2,
    "data": 2,
    "zoo": 2,
    "journal": 2,
    "gtplots": 2,
    "processes": 3,
    "latents": 3,
    "captions": 3,
    "models": 4,
    "batching": 5,
    "points": 5,
    "precision": 5,
    "speed": 5,
    "gaussian": 5,
    "sigma_samplers": 5,
    "sampling": 6,
    "pyspec": 5,
    "resolution": 5,
    "families": 5,
    "lora": 5,
    "axes": 5,
    "optimal": 5,
    "jvp": 6,
    "fd": 6,
    "features": 6,
    "objectives": 6,
    "checkpoints": 6,
    "ode": 6,
    "attribution": 6,
    "solvers": 7,
    "mixtures": 6,
    "loading": 7,
    "probe": 7,
    "training": 7,
    "evaluate": 7,
    "exactode": 7,
    "theory": 8,
    "prompts": 8,
    "groundtruth": 8,
    "runs": 9,
    "cli": 10,
    "__init__": 11,
    "__main__": 12,
}
MAX_LINES = 400


def _modules() -> dict[str, Path]:
    out = {}
    for p in ROOT.rglob("*.py"):
        rel = p.relative_to(ROOT).with_suffix("")
        out[".".join(rel.parts)] = p
    return out


def _imports(name: str, path: Path) -> set[str]:
    """lipscope modules imported anywhere in the file (top level and inside functions)."""
    parts = name.split(".")
    package = parts[:-1]  # for x/__init__.py (name "x.__init__") the package is x; for x/y.py it is x
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 0:
                if node.module and node.module.startswith("lipscope."):
                    found.add(node.module.removeprefix("lipscope."))
                continue
            base = package[: len(package) - (node.level - 1)]
            if node.module:
                found.add(".".join([*base, node.module]))
            else:  # from . import a, b
                found.update(".".join([*base, a.name]) for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name.removeprefix("lipscope.") for a in node.names if a.name.startswith("lipscope."))
    return {f for f in found if f}


def _layer(mod: str) -> int:
    return LAYERS[mod.split(".")[0]]


def _top(mod: str) -> str:
    return mod.split(".")[0]


def test_every_module_has_a_layer():
    assert {_top(m) for m in _modules()} <= set(LAYERS), "add new modules to LAYERS (and docs/architecture.md)"


def test_imports_point_down_only():
    bad = []
    for name, path in _modules().items():
        for imp in _imports(name, path):
            if _top(imp) == _top(name):
                continue  # inside one package (cli/, runs/)
            if imp.split(".")[0] not in LAYERS:
                continue
            if _layer(imp) >= _layer(name):
                bad.append(f"{name} (layer {_layer(name)}) imports {imp} (layer {_layer(imp)})")
    assert not bad, "\n".join(bad)


def test_no_import_cycle_counting_function_local_imports():
    graph = {n: {i for i in _imports(n, p) if i in _modules() or _top(i) in LAYERS} for n, p in _modules().items()}
    graph = {n: {i if i in graph else _top(i) for i in deps} - {n} for n, deps in graph.items()}
    seen: dict[str, int] = {}

    def visit(n: str, stack: list[str]) -> None:
        seen[n] = 1
        for m in graph.get(n, ()):
            if seen.get(m) == 1:
                raise AssertionError("import cycle: " + " → ".join([*stack[stack.index(m) :], m]))
            if m not in seen:
                visit(m, [*stack, m])
        seen[n] = 2

    for n in graph:
        if n not in seen:
            visit(n, [n])


@pytest.mark.parametrize("name", sorted(_modules()))
def test_modules_are_small(name):
    n = len(_modules()[name].read_text().splitlines())
    assert n <= MAX_LINES, f"{name} has {n} lines; split it by concept (docs/architecture.md)"


def test_randomness_flows_from_named_streams():
    """torch's global generator is seeded only inside rng.isolated_torch_rng (which restores it)."""
    offenders = []
    for name, path in _modules().items():
        src = path.read_text()
        if name != "rng" and ("torch.manual_seed(" in src or "torch.random.manual_seed(" in src):
            offenders.append(name)
        if name != "rng" and "SeedSequence(" in src:
            offenders.append(name)
    assert not offenders, f"global or ad-hoc seeding in {offenders}; use lipscope.rng"


def test_isolated_rng_restores_global_state():
    from lipscope.rng import isolated_torch_rng

    before = torch.random.get_rng_state()
    with isolated_torch_rng(123):
        torch.randn(5)
    assert torch.equal(before, torch.random.get_rng_state())


def test_eps_model_is_immutable_and_holds_etsdm_once():
    from lipscope import Etsdm, from_callable

    m = from_callable(lambda x, t: x, sample_shape=(2,), etsdm=Etsdm(100.0, 5))
    with pytest.raises(dataclasses.FrozenInstanceError):
        m.name = "other"  # type: ignore[misc]
    fields = {f.name for f in dataclasses.fields(m)}
    assert "etsdm" in fields and "timestep_map" not in fields
    t = torch.tensor([0.0, 19.9, 20.0, 99.0, 100.0], dtype=torch.float64)
    torch.testing.assert_close(m.network_timesteps(t), torch.tensor([0.0, 0.0, 20.0, 80.0, 100.0], dtype=torch.float64))


def test_the_layer_table_of_docs_architecture_is_the_checked_one():
    import re

    doc = (ROOT.parent / "docs" / "architecture.md").read_text()
    rows = re.findall(r"^\| (\d+) \| (.+?) \|", doc, flags=re.M)
    documented = {m.strip("`/ "): int(n) for n, mods in rows for m in mods.split(",")}
    checked = {k: v for k, v in LAYERS.items() if not k.startswith("__")}
    assert documented == checked, "docs/architecture.md's layer table and LAYERS disagree"
