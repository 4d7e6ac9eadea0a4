"""The documentation site builds with ``mkdocs build --strict``, and its generated pages are complete.

``scripts/docs`` runs mkdocs-material + mkdocstrings over docs/ and the package's
docstrings; docs/hooks.py generates the settings page from ``config.SETTINGS``,
the CLI reference from the click commands and the exports table from
``celery_persist.__all__``. One build (a few seconds) serves every test here.
"""

from __future__ import annotations

import html
import importlib.util
import os
import re
import subprocess
from pathlib import Path

import click
import pytest

import celery_persist
from celery_persist.config import SETTINGS

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "docs"
DOCS_TOOLS = ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python")


def _missing_tools() -> list[str]:
    missing = []
    for name in DOCS_TOOLS:
        try:
            if importlib.util.find_spec(name) is None:
                missing.append(name)
        except ModuleNotFoundError:  # a parent package is missing
            missing.append(name)
    return missing


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    missing = _missing_tools()
    if missing:
        reason = f"the docs tools are not installed ({', '.join(missing)}): pip install --group docs"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(reason)  # CI installs the test group, which includes the docs group
        pytest.skip(reason)
    out = tmp_path_factory.mktemp("docs") / "site"
    proc = subprocess.run([str(SCRIPT), str(out)], cwd=ROOT, capture_output=True, text=True, timeout=240, check=False)
    assert proc.returncode == 0, f"scripts/docs failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    assert (out / "index.html").is_file()
    return out


def _text(page: Path) -> str:
    """The page's visible text, tags dropped, entities decoded, whitespace collapsed."""
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", page.read_text(encoding="utf-8"))).split())


def test_the_build_succeeds_with_every_page(site: Path) -> None:
    for page in ("concepts", "settings", "stores", "security", "operations", "cli", "reference"):
        assert (site / page / "index.html").is_file(), page


def test_settings_page_lists_every_setting(site: Path) -> None:
    page = (site / "settings" / "index.html").read_text(encoding="utf-8")
    missing = [s.name for s in SETTINGS if f"<code>{s.name}</code>" not in page]
    assert not missing, f"the settings page lacks {missing}"
    assert "<!-- generated:" not in page


def test_cli_page_documents_every_command(site: Path) -> None:
    from celery_persist.cli import main, persist

    text = _text(site / "cli" / "index.html")
    for group, prog in ((persist, "celery -A proj persist"), (main, "celery-persist")):
        ctx = click.Context(group, info_name=prog)
        for name in group.list_commands(ctx):
            command = group.get_command(ctx, name)
            assert command is not None
            assert f"Usage: {prog} {name}" in text, f"{prog} {name} is missing from the CLI reference"
            summary = " ".join((command.help or "").split("\n\n")[0].split())
            assert summary in text, f"the help of {prog} {name} is missing from the CLI reference"


def test_reference_links_every_export(site: Path) -> None:
    page = (site / "reference" / "index.html").read_text(encoding="utf-8")
    for name in celery_persist.__all__:
        assert f"<code>{name}</code>" in page, f"{name} is missing from the exports table"
