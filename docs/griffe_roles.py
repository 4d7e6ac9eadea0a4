"""A griffe extension for the API reference: render the docstrings' reST bits as Markdown.

The package's docstrings are Google style but borrow two reST habits that
mkdocstrings would print literally:

* Sphinx roles (``:class:`PersistConfig```, ``:meth:`~PersistenceHub.claim```)
  become inline code showing what Sphinx shows: the target, or its last
  component after a ``~``;
* a literal block's ``::`` marker is dropped (a paragraph ending ``text::``
  keeps one colon); the indented block after it is a code block in Markdown too.

Loaded by mkdocs.yml (``extensions`` of the python handler).
"""

from __future__ import annotations

import re
from typing import Any

import griffe

LITERAL = re.compile(r"^(?P<head>.*?)::[ \t]*$(?=\n[ \t]*\n)", re.MULTILINE)
ROLE = re.compile(r":(?:py:)?(?:class|meth|func|attr|data|mod|exc|obj|const|ref):`(?P<tilde>~?)\.?(?P<target>[^`]+)`")


def plain_roles(text: str) -> str:
    """``:role:`target``` -> ```target```; ``:role:`~a.b.c``` -> ```c```."""

    def code(match: re.Match[str]) -> str:
        target = match["target"]
        return f"`{target.rsplit('.', 1)[-1] if match['tilde'] else target}`"

    return ROLE.sub(code, text)


def plain_literal_markers(text: str) -> str:
    """Drop reST's ``::`` literal-block markers: a lone ``::`` line goes, ``text::`` becomes ``text:``."""
    return LITERAL.sub(lambda m: m["head"] + (":" if m["head"].strip() else ""), text)


class SphinxRolesAsCode(griffe.Extension):
    """Rewrite every docstring of the loaded package once its tree is complete."""

    def on_object(self, *, obj: griffe.Object, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = plain_literal_markers(plain_roles(obj.docstring.value))
