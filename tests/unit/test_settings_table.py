"""The README's settings table is the one ``scripts/settings-table`` generates from ``SETTINGS``."""

from __future__ import annotations

import runpy
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from celery_persist.config import SETTINGS

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "settings-table"


@pytest.fixture(scope="module")
def script() -> dict[str, Any]:
    return runpy.run_path(str(SCRIPT))


def test_readme_table_is_generated_from_settings(script: dict[str, Any]) -> None:
    _, current, _ = script["split_readme"]((ROOT / "README.md").read_text(encoding="utf-8"))
    assert current == script["render_table"](), "README.md's settings table is stale: run .venv/bin/python scripts/settings-table --write"


def test_every_setting_has_one_row(script: dict[str, Any]) -> None:
    rows = script["render_table"]().splitlines()[2:]
    assert [row.split("`")[1] for row in rows] == [s.name for s in SETTINGS]
    assert "| 64 MiB |" in rows[[s.name for s in SETTINGS].index("persist_max_state_size")]


def test_check_and_write(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    stale = "intro\n<!-- settings-table:start -->\n| old |\n<!-- settings-table:end -->\nafter\n"
    readme.write_text(stale, encoding="utf-8")

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, str(SCRIPT), *args, "--readme", str(readme)], capture_output=True, text=True)

    check = run("--check")
    assert check.returncode == 1 and "--write" in check.stderr and "+| `persist_store_url`" in check.stderr
    assert run("--write").returncode == 0
    text = readme.read_text(encoding="utf-8")
    assert text.startswith("intro\n<!-- settings-table:start -->\n| setting |") and text.endswith("<!-- settings-table:end -->\nafter\n")
    assert run("--check").returncode == 0
