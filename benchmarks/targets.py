"""Which stores the benchmark runs against, how to reach them, and their raw floors.

A target pairs a store URL (opened with :func:`celery_persist.open_store`) with
the raw driver that serves as its floor. Targets whose store module does not
exist yet, whose driver is missing, or whose server does not answer are
skipped with a reason, so the benchmark picks new stores up as they land.

Isolation: every run uses a fresh id. SQL tables are ``bench_<id>_*`` and are
dropped at the end; Redis keys live under a ``bench:<id>:`` prefix in db 13 and
only those are deleted; files and SQLite databases live in a ``/tmp`` directory
that is removed. URLs come from ``CELERY_PERSIST_BENCH_<STORE>_URL``, then the
test suite's ``CELERY_PERSIST_TEST_<STORE>_URL``, then local defaults.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import os
import shutil
import socket
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from celery_persist.stores import BaseStore, open_store

from . import floors

__all__ = ["Target", "TargetContext", "ALL_TARGETS", "make_targets", "env_url"]

ALL_TARGETS = ("memory", "file", "sqlite", "postgres", "redis", "mongomock", "neo4j")
MB = 1000**2


def env_url(store: str, default: str) -> str:
    upper = store.upper()
    return os.environ.get(f"CELERY_PERSIST_BENCH_{upper}_URL") or os.environ.get(f"CELERY_PERSIST_TEST_{upper}_URL") or default


def _module_present(name: str) -> bool:
    return importlib.util.find_spec(f"celery_persist.stores.{name}") is not None


def _tcp_reason(url: str, default_port: int) -> str | None:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or default_port
    try:
        with socket.create_connection((host, port), timeout=2):
            return None
    except OSError as exc:
        return f"no server at {host}:{port} ({exc.__class__.__name__})"


@dataclass
class TargetContext:
    """Per-run scratch space and the unique names stores and floors use."""

    run_id: str
    tmpdir: str
    cleanups: list[Callable[[], None]] = field(default_factory=list)

    def close(self) -> None:
        for fn in reversed(self.cleanups):
            with contextlib.suppress(Exception):
                fn()
        self.cleanups.clear()
        shutil.rmtree(self.tmpdir, ignore_errors=True)


@dataclass
class Target:
    """One store under test and its floor.

    Attributes:
        name: Short name shown in tables.
        url: Store URL for open_store.
        options: Store options (prefix, ...).
        make_floor: Builds the raw floor for this store.
        reason: Why the target is skipped (None: usable).
        max_size: Largest state size this store takes (None: any).
        drop: Removes what the store wrote (called once at the end).
    """

    name: str
    url: str
    options: dict[str, Any]
    make_floor: Callable[[], floors.RawStore]
    reason: str | None = None
    max_size: int | None = None
    note: str = ""
    drop: Callable[[BaseStore], None] | None = None
    #: Run in a watched child process (a store that can hang on a server bug).
    isolate: bool = False
    #: Seconds a child may go without finishing a cell before it is killed.
    cell_timeout: float = 45.0
    #: Environment the child needs to reach the same server, namespace and floor.
    child_env: dict[str, str] = field(default_factory=dict)
    #: Cap on timed runs for states of 100 KB and more (slow stores).
    slow_runs: int | None = None

    def open(self) -> BaseStore:
        store = open_store(self.url, **self.options)
        store.setup()
        return store


def _drop_store(store: BaseStore) -> None:
    drop = getattr(store, "drop", None)
    if callable(drop):
        drop()


def _redis_drop(url: str, prefix: str) -> Callable[[BaseStore], None]:
    def drop(store: BaseStore) -> None:
        import redis

        if callable(getattr(store, "drop", None)):
            store.drop()  # type: ignore[attr-defined]
        # Whatever the store's layout, our keys all carry the run's prefix; delete only those.
        r = redis.Redis.from_url(url)
        try:
            batch = [k for k in r.scan_iter(match=f"*{prefix}*", count=1000)]
            for i in range(0, len(batch), 500):
                r.delete(*batch[i : i + 500])
        finally:
            r.close()

    return drop


def _test_backend(name: str) -> Any | None:
    """The conformance suite's Backend entry called ``name``, if the tests define one."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if not os.path.isdir(os.path.join(root, "tests", "integration", "backends")):
        return None
    if root not in sys.path:
        sys.path.insert(0, root)
    try:
        from tests.integration.backends import all_backends
    except Exception:  # noqa: BLE001 - a half-written backend module must not stop the benchmark
        return None
    try:
        for backend in all_backends():
            if backend.name == name:
                return backend
    except Exception:  # noqa: BLE001
        return None
    return None


def make_targets(names: list[str], ctx: TargetContext) -> list[Target]:
    """The targets called ``names``, each usable or carrying the reason it is skipped."""
    rid = ctx.run_id
    out: list[Target] = []
    for name in names:
        if name == "memory":
            out.append(Target("memory", "memory://", {}, floors.RawMemory, note="dict"))
        elif name == "file":
            d = os.path.join(ctx.tmpdir, "files")
            out.append(
                Target("file", f"file://{d}", {"prefix": "store"}, lambda d=d: floors.RawFile(os.path.join(d, "floor")), drop=_drop_store)
            )
        elif name == "sqlite":
            path = os.path.join(ctx.tmpdir, "store.db")
            out.append(
                Target(
                    "sqlite",
                    f"sqlite:///{path}",
                    {"prefix": f"bench_{rid}_"},
                    lambda: floors.RawSqlite(os.path.join(ctx.tmpdir, "floor.db")),
                    drop=_drop_store,
                )
            )
        elif name == "postgres":
            url = env_url("postgres", "postgresql://127.0.0.1/test")
            reason = _tcp_reason(url, 5432)
            dsn = url.replace("postgresql+psycopg://", "postgresql://").replace("postgresql+psycopg2://", "postgresql://")
            out.append(
                Target(
                    "postgres",
                    url,
                    {"prefix": f"bench_{rid}_"},
                    lambda dsn=dsn: floors.RawPostgres(dsn, f"bench_{rid}_floor"),
                    reason=reason,
                    drop=_drop_store,
                )
            )
        elif name == "redis":
            url = env_url("redis", "redis://127.0.0.1:6379/13")
            prefix = f"bench:{rid}:"
            reason = None if _module_present("redis") else "celery_persist/stores/redis.py not written yet"
            reason = reason or _tcp_reason(url, 6379)
            out.append(
                Target(
                    "redis",
                    url,
                    {"prefix": prefix},
                    lambda url=url, prefix=prefix: floors.RawRedis(url, prefix + "floor:"),
                    reason=reason,
                    drop=_redis_drop(url, prefix),
                )
            )
        elif name == "mongomock":
            reason = None if _module_present("mongodb") else "celery_persist/stores/mongodb.py not written yet"
            if reason is None and importlib.util.find_spec("mongomock") is None:
                reason = "mongomock is not installed"
            options: dict[str, Any] = {"prefix": f"bench_{rid}_"}
            if reason is None:
                # mongomock is a client, not a server: the store gets it (and writes one by
                # one, as mongomock's bulk_write rejects pymongo's ReplaceOne); the URL only
                # names the database.
                options.update(client=importlib.import_module("mongomock").MongoClient(), bulk=False)
            out.append(Target("mongomock", "mongodb://mongomock/bench", options, floors.RawMongomock, reason=reason, drop=_drop_store))
        elif name == "neo4j":
            out.append(_neo4j_target(ctx))
        else:
            raise ValueError(f"unknown target {name!r}; choose from {', '.join(ALL_TARGETS)}")
    return out


def _neo4j_target(ctx: TargetContext) -> Target:
    """Neo4j from CELERY_PERSIST_BENCH_NEO4J_URL, else the test suite's neo4j / neo4j-falkordb backend.

    The target runs isolated: FalkorDB's Bolt side has been seen to stop answering
    a store read mid-run, and a hung socket cannot be interrupted in-process.
    """
    rid = ctx.run_id
    url = os.environ.get("CELERY_PERSIST_BENCH_NEO4J_URL", "")
    given = os.environ.get("CELERY_PERSIST_BENCH_NEO4J_OPTIONS", "")
    options: dict[str, Any] = json.loads(given) if given else {"prefix": f"bench{rid}"}
    label = os.environ.get("CELERY_PERSIST_BENCH_NEO4J_LABEL") or f"Bench{rid}Floor"
    reason = None if _module_present("neo4j") else "celery_persist/stores/neo4j.py not written yet"
    note = os.environ.get("CELERY_PERSIST_BENCH_NEO4J_NOTE", "")
    if reason is None and not url:
        reasons = []
        for candidate in ("neo4j", "neo4j-falkordb"):
            backend = _test_backend(candidate)
            if backend is None:
                reasons.append(f"no {candidate} test backend")
                continue
            why = None
            try:
                why = backend.available()
                if not why:
                    url = backend.url()
            except Exception as exc:  # noqa: BLE001 - a server that does not start is a skip reason
                why = f"{type(exc).__name__}: {exc}"
            if why or not url:
                reasons.append(f"{candidate}: {why}")
                continue
            options = {**backend.options, **options}
            note = candidate
            break
        if not url:
            reason = "; ".join(reasons) or "no Neo4j URL (set CELERY_PERSIST_BENCH_NEO4J_URL)"
    if reason is None:
        reason = _tcp_reason(url, 7687)
    chunk = int(options.get("chunk_size", 0) or 0) or (1024 if "falkordb" in note else 1024 * 1024)
    parts = urlsplit(url) if url else None
    auth = (parts.username or "", parts.password or "") if parts is not None and parts.username else None
    raw_url = ""
    if parts is not None:
        raw_url = f"{parts.scheme}://{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    child_env = {
        "CELERY_PERSIST_BENCH_NEO4J_URL": url,
        "CELERY_PERSIST_BENCH_NEO4J_OPTIONS": json.dumps(options),
        "CELERY_PERSIST_BENCH_NEO4J_LABEL": label,
        "CELERY_PERSIST_BENCH_NEO4J_NOTE": note,
    }
    return Target(
        "neo4j",
        url,
        options,
        lambda: floors.RawNeo4j(raw_url, label, chunk, auth),
        reason=reason,
        max_size=1 * MB,
        note=note,
        drop=_drop_store,
        isolate=True,
        child_env=child_env,
        slow_runs=3,
    )


@contextlib.contextmanager
def target_context(run_id: str) -> Iterator[TargetContext]:
    ctx = TargetContext(run_id=run_id, tmpdir=tempfile.mkdtemp(prefix=f"cp-bench-{run_id}-", dir="/tmp"))
    try:
        yield ctx
    finally:
        ctx.close()
