"""Cypher dialects for :class:`~celery_persist.stores.neo4j.Neo4jStore`: Neo4j and FalkorDB.

A :class:`Dialect` says what the server at the other end of Bolt understands, and
:meth:`Dialect.prepare` writes a statement for it. Neo4j takes statements and Bolt
parameters as they are. FalkorDB (its Redis module speaks Bolt; the test suite runs on it
as no Neo4j is installed here) differs, as of 4.16, in ways handled here and in the store:

* Parameters are turned into text: floats lose everything past six
  decimals, a ``'`` or ``\\`` in a string breaks or changes it, bytes are
  refused, and ``toFloat()`` parses to 32-bit floats. So every value is
  written into the statement as a literal (floats as ``repr``, bytes and
  metadata as base64 text, other strings checked to hold only
  ``[A-Za-z0-9_.:/+=-]``).
* Its Bolt side crashes on a client message of about 4.1 KB, so statements
  are packed below 3,800 bytes, chunks default to 1 KiB (two per statement)
  and a record whose metadata alone is too big raises ``ConfigurationError``
  instead of reaching the server. It hangs on a result row over 64 KB, so
  chunks are always read one row each, never ``collect()``-ed.
* No ``IF NOT EXISTS`` for indexes, no uniqueness constraints in Cypher, no
  composite index over a property already indexed: the store creates
  single-property indexes that ``CALL db.indexes()`` does not list yet.
* ``BEGIN``/``COMMIT``/``ROLLBACK`` are accepted but do nothing: each
  statement commits on its own. FalkorDB runs the write statements of a
  graph one at a time and each atomically
  (https://docs.falkordb.com/design/concurrency), so a compare-and-set
  statement needs no separate lock statement there.
"""

from __future__ import annotations

import base64
import math
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigurationError
from .base import UndecodableRecord, dump_metadata, load_metadata

__all__ = ["Dialect", "literal", "as_bytes", "packed", "load_meta", "meta_text", "NEO4J_QUERY_BYTES", "FALKORDB_QUERY_BYTES"]

KiB = 1024
MiB = 1024 * KiB

#: Blob bytes per statement on Neo4j (chunk writes, and put_many() batches).
NEO4J_QUERY_BYTES = 8 * MiB
#: FalkorDB's Bolt side crashes on messages over ~4 KB: statements stay below this.
FALKORDB_QUERY_BYTES = 3800

_LITERAL_TEXT_RE = re.compile(r"[A-Za-z0-9_.:/+=-]*")
_PARAM_RE = re.compile(r"\$([A-Za-z_][A-Za-z0-9_]*)")
_META_B64 = "b64:"


@dataclass(frozen=True, slots=True)
class Dialect:
    """What the server at the other end of Bolt understands."""

    name: str  # "neo4j" or "falkordb"
    version: str
    #: Write values into the statement text instead of sending Bolt parameters.
    literals: bool
    #: Largest statement (UTF-8 bytes) the server takes, None when unbounded.
    max_query: int | None
    default_chunk_size: int
    #: Take the node's write lock in a statement of its own before reading it
    #: (Neo4j); False where each write statement runs alone anyway (FalkorDB).
    lock_statement: bool

    @classmethod
    def neo4j(cls, version: str) -> Dialect:
        return cls("neo4j", version, literals=False, max_query=None, default_chunk_size=MiB, lock_statement=True)

    @classmethod
    def falkordb(cls, agent: str) -> Dialect:
        return cls(
            "falkordb",
            f"FalkorDB (announces {agent})",
            literals=True,
            max_query=FALKORDB_QUERY_BYTES,
            default_chunk_size=KiB,
            lock_statement=False,
        )

    def prepare(self, statement: str, params: Mapping[str, Any], *, store: str) -> tuple[str, dict[str, Any] | None]:
        """The text and Bolt parameters to send for ``statement`` with ``params``.

        Raises:
            ConfigurationError: The statement, values written in, exceeds what the
                server takes (a record whose metadata is too big for FalkorDB).
        """
        if not self.literals:
            return statement, dict(params)
        text = _PARAM_RE.sub(lambda m: literal(params[m.group(1)]), statement)
        if self.max_query is not None and len(text.encode("utf-8")) > self.max_query:
            raise ConfigurationError(
                f"a record is too large for FalkorDB's Bolt messages (about {self.max_query} bytes per "
                "statement: metadata must stay small); use Neo4j",
                store=store,
            )
        return text, None

    def budget(self, statement: str) -> tuple[int, Callable[[Any], int]]:
        """Bytes of values one ``statement`` may carry, and how to measure a value."""
        if self.max_query is None:
            return NEO4J_QUERY_BYTES, lambda v: sum(len(x) if isinstance(x, bytes | str) else 8 for x in v.values())
        fixed = len(statement) + 200  # the other parameters, written in as literals
        return self.max_query - fixed, lambda v: len(literal(v)) + 2

    def dump_meta(self, metadata: Mapping[str, Any]) -> str:
        """Metadata as stored: canonical JSON text, base64 where values are written in as literals."""
        text = dump_metadata(metadata)
        if self.literals:
            return _META_B64 + base64.b64encode(text.encode("utf-8")).decode("ascii")
        return text


def load_meta(value: Any) -> dict[str, Any]:
    """Inverse of :meth:`Dialect.dump_meta`, for either dialect."""
    return load_metadata(meta_text(value))


def meta_text(value: Any) -> Any:
    """The metadata's JSON text as stored by either dialect (base64 undone); other values as they are.

    Raises:
        UndecodableRecord: ``b64:`` text that is not base64 of UTF-8.
    """
    if isinstance(value, str) and value.startswith(_META_B64):
        try:
            return base64.b64decode(value[len(_META_B64) :], validate=True).decode("utf-8")
        except ValueError:  # binascii.Error and UnicodeDecodeError are ValueErrors
            raise UndecodableRecord("metadata is not base64 JSON text") from None
    return value


def literal(value: Any) -> str:
    """``value`` as a Cypher literal, for servers whose parameters are lossy (FalkorDB)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError("times must be finite numbers")
        return repr(value)  # shortest text that parses back to the same float64
    if isinstance(value, bytes | bytearray | memoryview):
        return "'" + base64.b64encode(value).decode("ascii") + "'"
    if isinstance(value, str):
        if not _LITERAL_TEXT_RE.fullmatch(value):
            raise ConfigurationError(
                "with FalkorDB, key hashes and other text must match [A-Za-z0-9_.:/+=-]* "
                "(its Bolt parameters cannot carry quotes or backslashes); use Neo4j"
            )
        return f"'{value}'"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k}: {literal(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(literal(v) for v in value) + "]"
    raise TypeError(f"no Cypher literal for {type(value).__name__}")


def as_bytes(value: Any) -> bytes:
    """A blob or chunk property as read back: bytes from Neo4j, base64 text from FalkorDB.

    Raises:
        UndecodableRecord: Anything else (``bytes(n)`` of a number edited into a node
            would allocate ``n`` bytes), or text that is not base64.
    """
    if value is None:
        return b""
    if isinstance(value, str):  # FalkorDB: base64 text
        try:
            return base64.b64decode(value, validate=True)
        except ValueError:
            raise UndecodableRecord("blob is not base64 text") from None
    if isinstance(value, bytes | bytearray | memoryview):
        return value if type(value) is bytes else bytes(value)
    raise UndecodableRecord("blob is not bytes")


def packed(items: Sequence[Any], size_of: Callable[[Any], int], budget: int, most: int) -> Iterator[list[Any]]:
    """``items`` in groups of at most ``most`` whose sizes add up to at most ``budget`` (at least one each)."""
    group: list[Any] = []
    used = 0
    for item in items:
        size = size_of(item)
        if group and (used + size > budget or len(group) >= most):
            yield group
            group, used = [], 0
        group.append(item)
        used += size
    if group:
        yield group
