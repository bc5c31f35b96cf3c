"""Docs that must not drift: the CLI reference is generated from the typer app."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def generated_cli_md(tmp_path: Path) -> str:
    out = tmp_path / "cli.md"
    subprocess.run(
        [sys.executable, "-m", "typer", "lipscope.cli", "utils", "docs", "--name", "lipscope", "--output", str(out)],
        check=True,
        capture_output=True,
        env={"COLUMNS": "120", "PATH": "", "TERM": "dumb"},
    )
    return out.read_text()


def test_cli_reference_is_up_to_date(tmp_path):
    """Regenerate with: python -m typer lipscope.cli utils docs --name lipscope --output docs/cli.md"""
    assert (ROOT / "docs" / "cli.md").read_text() == generated_cli_md(tmp_path)


def test_readme_test_command_is_what_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text()
    cmd = next(line.split("=", 1)[1].strip().strip("'") for line in ci.splitlines() if line.startswith("TEST_CMD="))
    assert cmd in (ROOT / "README.md").read_text()
    # the same environment too: CI sets none of its own; what the tests need, tests/conftest.py sets for everyone
    assert not [ln for ln in ci.splitlines() if ln.lstrip().startswith(("export ", "env "))], ci
    conftest = (ROOT / "tests" / "conftest.py").read_text()
    assert 'os.environ["HF_HUB_OFFLINE"] = "1"' in conftest and 'os.environ["MPLBACKEND"] = "Agg"' in conftest


def test_mkdocs_builds_strict(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "site" / "index.html").exists()
