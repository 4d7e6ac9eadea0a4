"""MkDocs hooks: the pages that are generated from the code, so they cannot go stale.

A page asks for generated content with a marker comment on a line of its own:

* ``<!-- generated:settings -->``: the ``persist_*`` settings table, rendered by
  ``scripts/settings-table`` (the same function that writes the README's table)
  from ``celery_persist.config.SETTINGS``;
* ``<!-- generated:cli -->``: the help text of every command of ``celery persist``
  (``celery_persist.cli:persist``) and of the standalone ``celery-persist``
  (``celery_persist.cli:main``), as click prints it;
* ``<!-- generated:exports -->``: a table of ``celery_persist.__all__``, each name
  linked to where the API reference documents it (``mkdocs build --strict`` fails
  when one is documented nowhere).

A marker nobody fills, or a generator that fails, stops the build.
"""

from __future__ import annotations

import re
import runpy
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MARKER = re.compile(r"^<!-- generated:(?P<name>[a-z]+) -->$", re.MULTILINE)
HELP_WIDTH = 100


def settings_table() -> str:
    """The settings table, exactly as ``scripts/settings-table`` renders it for the README."""
    script = runpy.run_path(str(ROOT / "scripts" / "settings-table"))
    render: Callable[[], str] = script["render_table"]
    return render()


def _commands(group: click.Group, ctx: click.Context) -> Iterator[tuple[click.Command, click.Context]]:
    for name in group.list_commands(ctx):
        command = group.get_command(ctx, name)
        if command is None or command.hidden:
            continue
        yield command, click.Context(command, info_name=name, parent=ctx, terminal_width=HELP_WIDTH, max_content_width=HELP_WIDTH)


def _help(command: click.Command, ctx: click.Context) -> str:
    return "```text\n" + command.get_help(ctx).rstrip() + "\n```\n"


def _group_reference(group: click.Group, prog: str) -> str:
    ctx = click.Context(group, info_name=prog, terminal_width=HELP_WIDTH, max_content_width=HELP_WIDTH)
    parts = [f"## `{prog}`\n", _help(group, ctx)]
    for command, sub_ctx in _commands(group, ctx):
        parts += [f"### `{prog} {sub_ctx.info_name}`\n", _help(command, sub_ctx)]
    return "\n".join(parts)


def cli_reference() -> str:
    """Every command's ``--help``, from the click objects the entry points name."""
    from celery_persist.cli import main, persist

    return _group_reference(persist, "celery -A proj persist") + "\n" + _group_reference(main, "celery-persist")


def exports_table() -> str:
    """``celery_persist.__all__`` as a table: name, kind, summary, linked to its reference entry."""
    import griffe

    import celery_persist

    package = griffe.load("celery_persist", search_paths=[str(ROOT)])
    rows = ["| name | kind | what it is |", "|---|---|---|"]
    for name in celery_persist.__all__:
        member = package.members[name]
        target = member.final_target if isinstance(member, griffe.Alias) else member
        summary = " ".join(target.docstring.value.strip().split("\n\n")[0].split()) if target.docstring else ""
        summary = summary.replace("|", "\\|")
        rows.append(f"| [`{name}`][{target.path}] | {target.kind.value} | {summary} |")
    return "\n".join(rows) + "\n"


GENERATORS: dict[str, Callable[[], str]] = {"settings": settings_table, "cli": cli_reference, "exports": exports_table}


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    """Replace each marker with what its generator renders now."""

    def fill(match: re.Match[str]) -> str:
        generator = GENERATORS.get(match["name"])
        if generator is None:
            raise ValueError(f"{page.file.src_uri}: unknown generated section {match['name']!r} (known: {', '.join(GENERATORS)})")
        return generator()

    return MARKER.sub(fill, markdown)
