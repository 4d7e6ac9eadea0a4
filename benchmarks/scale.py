"""``python -m benchmarks.scale``: stores at scale; cleanup cost grows with expired records, not stored ones.

Per store:

1. **hub.suspend**: ``--hub-suspends`` suspensions one by one through a
   ``PersistenceHub`` (AES-GCM on, json codec, zstd), one process, one thread,
   in a prefix of their own.
2. **write**: N suspended records (``StoredRecord`` with a random ~1 KB blob,
   the size the hub seals the benchmark state to, and realistic metadata)
   through ``store.put_many`` in batches of 1,000. ``2 x --expired`` of them
   are already past their expiry, spread evenly through the write order:
   group E1 due an hour or two ago, group E2 due within the last hour. Only
   the ``put_many`` calls are timed.
3. **footprint**: Redis ``INFO memory`` used_memory delta / N (and ``MEMORY
   USAGE`` of sample keys and the indexes), PostgreSQL
   ``pg_total_relation_size`` of both tables / N, SQLite file size / N, file
   store du / N, in-process stores what a fresh store holds after 10,000
   records (tracemalloc).
4. **prune among N**: ``hub.cleanup(now1)`` with ``on_expired=None`` (E1 flip
   to ``expired``; ``now1`` lies between E1 and E2), then ``store.due(now,
   1000)`` + ``store.delete`` until nothing is due (removes E2).
5. **prune among E**: the same two prunes on fresh prefixes that hold only E1
   (resp. only E2), written before any prune so that each prune among N runs
   right next to its baseline, under the same background load.

A prune whose projected time passes ``--prune-budget`` is cut short; the
table then shows the time extrapolated from the part that ran, marked ``~``,
and a cProfile of one ``due()`` page is printed. Writing stops at
``--write-budget`` (the expired records are still written) and N shows what
was reached.

Isolation: Redis keys under ``{scale-<run>-<role>}:`` in db 14, PostgreSQL
tables ``scale_<run>_<role>_*`` in db ``test``, files in
``/tmp/cp-scale-<run>``; all removed at the end (Redis by SCAN + UNLINK of that
prefix only). A crashed run is cleaned with ``--clean <run>``. URLs:
``CELERY_PERSIST_SCALE_REDIS_URL``, ``CELERY_PERSIST_SCALE_POSTGRES_URL``,
Neo4j ``CELERY_PERSIST_BENCH_NEO4J_URL`` / ``CELERY_PERSIST_TEST_NEO4J_URL`` /
``CELERY_PERSIST_TEST_FALKORDB_URL`` (else the test suite's FalkorDB).
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import gc
import io
import json
import os
import pstats
import random
import re
import secrets
import shutil
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, cast

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    __package__ = "benchmarks"  # noqa: A001

from celery_persist import Keyring, PersistenceHub  # noqa: E402
from celery_persist.stores import open_store  # noqa: E402
from celery_persist.stores.base import BaseStore, Kind, Status, StoredRecord  # noqa: E402

SCALE_MD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "SCALE.md")
MARK_BEGIN = "<!-- scale-results:begin -->"
MARK_END = "<!-- scale-results:end -->"

REDIS_URL = os.environ.get("CELERY_PERSIST_SCALE_REDIS_URL", "redis://127.0.0.1:6379/14")
POSTGRES_URL = os.environ.get("CELERY_PERSIST_SCALE_POSTGRES_URL", "postgresql://127.0.0.1/test")

DEFAULT_STORES = ("redis", "postgres", "sqlite", "file", "mongomock", "memory")
ALL_STORES = (*DEFAULT_STORES, "neo4j")
#: N per store: (default, --quick).
DEFAULT_N = {
    "redis": (1_000_000, 20_000),
    "postgres": (1_000_000, 20_000),
    "sqlite": (100_000, 10_000),
    "file": (100_000, 10_000),
    "mongomock": (100_000, 10_000),
    "memory": (100_000, 10_000),
    "neo4j": (4_000, 1_000),
}
NEO4J_SKIP = (
    "not at scale: FalkorDB (the only Bolt server here) takes statements under ~4 KB only, so each 1 KB record "
    "goes out as base64 literals over several statements; measured 31 records/s written and 19 expiries/s "
    "(N=2,000), i.e. ~55 min to write 100,000. Run it with --stores neo4j (N=4,000 by default)"
)

BATCH = 1000
DUE_PAGE = 500  # hub.cleanup's default batch
DELETE_PAGE = 1000
SAMPLE = 10_000  # records an in-process store's footprint is measured on
HOUR = 3600.0
DAY = 86400.0


# -- records -------------------------------------------------------------------------------------


def bench_state() -> dict[str, Any]:
    """A workflow state the hub seals (json, zstd, AES-GCM) to about 1 KB."""
    return {
        "order_id": 4_100_233,
        "customer": "cust-041233",
        "items": [
            {"sku": f"SKU-{i:05d}", "qty": i % 5 + 1, "price": round(19.99 + i, 2), "name": f"Widget deluxe model {i}"} for i in range(12)
        ],
        "approvals": ["manager", "finance"],
        "notes": os.urandom(650).hex(),  # incompressible part: a signed token, a nonce...
    }


def bench_metadata(i: int, rng: random.Random) -> dict[str, Any]:
    order = 4_000_000 + i
    return {
        "task": "shop.tasks.await_approval",
        "flow": "order-approval",
        "step": "manager-review",
        "order_id": order,
        "customer": f"cust-{i % 97_531:06d}",
        "amount": round(rng.uniform(5.0, 5000.0), 2),
        "currency": "EUR",
        "prompt": f"Approve order #{order}?",
        "attempt": 1,
    }


@dataclass(frozen=True)
class Clock:
    """The run's fixed instants: E1 is due before ``now1``, E2 between ``now1`` and ``now2``."""

    now2: float

    @property
    def now1(self) -> float:
        return self.now2 - HOUR


class RecordSource:
    """Yields batches of records: ``n`` in all, ``e1`` + ``e2`` of them expired, spread evenly."""

    def __init__(self, clock: Clock, blob_size: int, n: int, e1: int, e2: int, seed: int, sealer: PersistenceHub | None = None) -> None:
        #: Seals the expired records as the hub would (cleanup checks seals and sets aside what fails).
        self.sealer = sealer
        self.clock = clock
        self.blob_size = blob_size
        self.n = n
        self.rng = random.Random(seed)
        # Interleave E1 and E2, then spread them evenly over the whole write.
        labels = [g for _, g in sorted([(k / e1, 1) for k in range(e1)] + [(k / e2, 2) for k in range(e2)])]
        stride = n / len(labels) if labels else 0.0
        self.groups: dict[int, int] = {int((j + 0.5) * stride): g for j, g in enumerate(labels)}
        self.capped = False
        self.skipped = 0

    def _record(self, i: int, group: int, key_hash: str, blob: bytes) -> StoredRecord:
        rng, now = self.rng, self.clock.now2
        if group == 1:
            due = now - 2 * HOUR + rng.uniform(1.0, HOUR - 1.0)  # (now1 - 1h, now1)
        elif group == 2:
            due = now - HOUR + rng.uniform(1.0, HOUR - 60.0)  # (now1, now2 - 1min)
        else:
            due = now + rng.uniform(HOUR, 7 * DAY)
        created = min(due, now) - rng.uniform(60.0, 3 * DAY)
        rec = StoredRecord(
            key_hash=key_hash,
            kind=Kind.SUSPENSION,
            status=Status.SUSPENDED,
            blob=blob,
            metadata=bench_metadata(i, rng),
            created_at=created,
            expires_at=due,
            due_at=due,
            updated_at=created,
        )
        if group and self.sealer is not None:
            rec = rec.replace(version=1, seal=self.sealer._seal_of(rec, version=1))
        return rec

    def batches(self) -> Iterator[list[StoredRecord]]:
        """Batches of BATCH records, each with its own random key hash and blob (distinct bytes objects)."""
        size = self.blob_size
        batch: list[StoredRecord] = []
        # One urandom call per batch, not two per record: generating 1M records is not free.
        keys, blobs = "", b""
        for i in range(self.n):
            group = self.groups.get(i, 0)
            if self.capped and not group:
                self.skipped += 1  # over the write budget: only the expired ones still go in
                continue
            k = len(batch)
            if k == 0:
                keys, blobs = os.urandom(32 * BATCH).hex(), os.urandom(size * BATCH)
            batch.append(self._record(i, group, keys[64 * k : 64 * k + 64], blobs[size * k : size * k + size]))
            if len(batch) >= BATCH:
                yield batch
                batch = []
        if batch:
            yield batch


# -- results -------------------------------------------------------------------------------------


@dataclass
class Prune:
    """One prune: ``count`` records handled in ``seconds``; ``target`` is the nominal size (E)."""

    count: int = 0
    expected: int = 0
    target: int = 0
    seconds: float = 0.0
    first_page_ms: float = 0.0
    cut: bool = False
    #: Server-side counters over the prune (PostgreSQL WAL bytes, Redis server CPU seconds).
    server: dict[str, float] = field(default_factory=dict)

    @property
    def exact(self) -> bool:
        return not self.cut and self.count == self.target

    @property
    def estimate(self) -> float:
        """Seconds for ``target`` records (scaled from what ran when the prune was cut or handled more)."""
        if self.exact or not self.count:
            return self.seconds
        return self.seconds * self.target / self.count

    def cell(self) -> str:
        if self.exact:
            return f"{self.seconds:,.2f} s"
        return f"~{self.estimate:,.1f} s ({self.count:,} in {self.seconds:.1f} s)"


@dataclass
class Result:
    store: str
    n: int = 0
    expired: int = 0
    blob_size: int = 0
    write_s: float = 0.0
    write_cpu_s: float = 0.0
    write_capped: bool = False
    server_cpu_s: float | None = None
    hub_n: int = 0
    hub_s: float = 0.0
    hub_blob: int = 0
    among_n: int = 0
    among_suspend_s: float = 0.0
    among_resume_s: float = 0.0
    prunes: dict[str, Prune] = field(default_factory=dict)
    bytes_per_record: float | None = None
    footprint: str = ""
    plan: str = ""
    notes: list[str] = field(default_factory=list)
    skipped: str | None = None
    seconds: float = 0.0

    @property
    def write_rate(self) -> float:
        return self.n / self.write_s if self.write_s else 0.0

    @property
    def hub_rate(self) -> float:
        return self.hub_n / self.hub_s if self.hub_s else 0.0

    def among_cell(self) -> str:
        """``suspend/s / resume/s`` of real flows among the N stored, or ``-``."""
        if not self.among_n or not self.among_suspend_s or not self.among_resume_s:
            return "-"
        return f"{self.among_n / self.among_suspend_s:,.0f}/s / {self.among_n / self.among_resume_s:,.0f}/s"


# -- targets -------------------------------------------------------------------------------------


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _du(path: str) -> tuple[int, int, int]:
    """(allocated bytes, apparent bytes, entries) under ``path``."""
    used = apparent = entries = 0
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            st = os.lstat(os.path.join(root, name))
            used += st.st_blocks * 512
            apparent += st.st_size
            entries += 1
    return used, apparent, entries


class Target:
    """How to open, measure and remove one kind of store under the run's unique names."""

    name = ""
    #: Default seconds of put_many before N is capped (keeps the default run near 10 minutes).
    write_budget = 60.0

    def __init__(self, run: str, workdir: str) -> None:
        self.run = run
        self.workdir = workdir
        self.sample_source: Callable[[int], RecordSource] = lambda n: RecordSource(Clock(time.time()), 1024, n, 0, 0, seed=5)

    def unavailable(self) -> str | None:
        return None

    def open(self, role: str) -> BaseStore:
        raise NotImplementedError

    def drop(self, role: str, store: BaseStore) -> None:
        drop = getattr(store, "drop", None)
        if drop is not None:
            drop()
        store.close()

    def before_write(self, store: BaseStore, role: str) -> None:
        self._rss0 = _rss()

    def footprint(self, store: BaseStore, role: str, n: int) -> tuple[float | None, str]:
        # In-process stores. The RSS delta is blurred by what earlier stores freed, so the figure is
        # what a fresh store still holds (tracemalloc) after SAMPLE records, their batches released.
        gc.collect()
        rss = _rss() - self._rss0
        sample = self.open("sample")
        try:
            sample.setup()
            gc.collect()
            tracemalloc.start()
            try:
                base = tracemalloc.get_traced_memory()[0]
                for batch in self.sample_source(SAMPLE).batches():
                    sample.put_many(batch)
                del batch
                gc.collect()
                held = tracemalloc.get_traced_memory()[0] - base
            finally:
                tracemalloc.stop()
        finally:
            self.drop("sample", sample)
        detail = f"tracemalloc {held / SAMPLE:,.0f} B/record over {SAMPLE:,} records; process RSS +{rss / 2**20:,.0f} MiB for N"
        return held / SAMPLE, detail

    def plan(self, store: BaseStore, now: float) -> str:
        return ""

    def server_cpu(self) -> float | None:
        return None

    def counters(self) -> dict[str, float]:
        """Server-side counters read before and after each prune."""
        return {}


class MemoryTarget(Target):
    name = "memory"

    def open(self, role: str) -> BaseStore:
        return open_store("memory://")  # a fresh private store per open


class MongomockTarget(Target):
    name = "mongomock"

    def __init__(self, run: str, workdir: str) -> None:
        super().__init__(run, workdir)
        self._client: Any = None

    def unavailable(self) -> str | None:
        try:
            import mongomock  # noqa: F401
            import pymongo  # noqa: F401

            import celery_persist.stores.mongodb  # noqa: F401
        except ImportError as exc:
            return f"not importable: {exc}"
        return None

    def open(self, role: str) -> BaseStore:
        if self._client is None:
            import mongomock

            # One in-process "server" for the run: every role's store gets this client.
            self._client = mongomock.MongoClient()
        # bulk=False: mongomock's bulk_write rejects the sort pymongo gives ReplaceOne.
        return open_store("mongodb://mongomock/bench", prefix=f"{role}_", client=self._client, bulk=False)


class SqliteTarget(Target):
    name = "sqlite"

    def _path(self, role: str) -> str:
        return os.path.join(self.workdir, f"{role}.db")

    def open(self, role: str) -> BaseStore:
        return open_store(f"sqlite:///{self._path(role)}")

    def drop(self, role: str, store: BaseStore) -> None:
        store.close()
        for suffix in ("", "-wal", "-shm", "-journal"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._path(role) + suffix)

    def before_write(self, store: BaseStore, role: str) -> None:
        pass

    def footprint(self, store: BaseStore, role: str, n: int) -> tuple[float | None, str]:
        sizes = {s or "db": os.path.getsize(self._path(role) + s) for s in ("", "-wal") if os.path.exists(self._path(role) + s)}
        total = sum(sizes.values())
        return total / n, " + ".join(f"{k} {v / 2**20:,.1f} MiB" for k, v in sizes.items())

    def plan(self, store: BaseStore, now: float) -> str:
        import sqlite3

        from sqlalchemy.dialects import sqlite as sqlite_dialect

        query = cast(Any, store).due_query(now, DUE_PAGE)
        dialect: Any = sqlite_dialect.dialect
        sql = str(query.compile(dialect=dialect(), compile_kwargs={"literal_binds": True}))
        conn = sqlite3.connect(self._path("main"))
        try:
            rows = conn.execute("EXPLAIN QUERY PLAN " + sql).fetchall()
        finally:
            conn.close()
        return "; ".join(str(r[-1]) for r in rows)


class FileTarget(Target):
    name = "file"
    write_budget = 90.0

    def open(self, role: str) -> BaseStore:
        return open_store(f"file://{self.workdir}/files", prefix=role)

    def before_write(self, store: BaseStore, role: str) -> None:
        pass

    def footprint(self, store: BaseStore, role: str, n: int) -> tuple[float | None, str]:
        used, apparent, entries = _du(os.path.join(self.workdir, "files", role))
        return used / n, f"du {used / 2**20:,.0f} MiB (apparent {apparent / 2**20:,.0f} MiB), {entries:,} files+dirs"


class PostgresTarget(Target):
    name = "postgres"
    write_budget = 150.0

    def _prefix(self, role: str) -> str:
        return f"scale_{self.run}_{role}_"

    def _connect(self) -> Any:
        import psycopg

        return psycopg.connect(POSTGRES_URL.replace("postgresql+psycopg://", "postgresql://"), autocommit=True, connect_timeout=3)

    def unavailable(self) -> str | None:
        try:
            with self._connect() as conn:
                conn.execute("SELECT 1")
        except Exception as exc:  # noqa: BLE001 - reported as the skip reason
            return f"PostgreSQL at {POSTGRES_URL} does not answer ({type(exc).__name__})"
        return None

    def open(self, role: str) -> BaseStore:
        return open_store(POSTGRES_URL, prefix=self._prefix(role))

    def drop(self, role: str, store: BaseStore) -> None:
        try:
            super().drop(role, store)
        finally:
            drop_postgres_tables(self._prefix(role))

    def before_write(self, store: BaseStore, role: str) -> None:
        pass

    def footprint(self, store: BaseStore, role: str, n: int) -> tuple[float | None, str]:
        p = self._prefix(role)
        parts: dict[str, int] = {}
        with self._connect() as conn:
            for table in ("records", "blobs"):
                row = conn.execute(
                    "SELECT pg_total_relation_size(c.oid), pg_relation_size(c.oid), pg_indexes_size(c.oid),"
                    " COALESCE(pg_total_relation_size(NULLIF(c.reltoastrelid, 0)), 0)"
                    " FROM pg_class c WHERE c.oid = to_regclass(%s)",
                    (p + table,),
                ).fetchone()
                if row is None:
                    continue
                parts[table], parts[table + " heap"], parts[table + " indexes"], parts[table + " toast"] = row
        total = parts.get("records", 0) + parts.get("blobs", 0)
        detail = ", ".join(
            f"{t}: heap {parts[t + ' heap'] / 2**20:,.0f} + indexes {parts[t + ' indexes'] / 2**20:,.0f}"
            f" + toast {parts[t + ' toast'] / 2**20:,.0f} MiB"
            for t in ("records", "blobs")
            if t in parts
        )
        return total / n, detail

    def counters(self) -> dict[str, float]:
        # WAL written, to tell cost per record from cost per page touched (full-page images after a checkpoint).
        with self._connect() as conn:
            row = conn.execute("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')").fetchone()
        return {"WAL MiB": float(row[0]) / 2**20} if row else {}

    def plan(self, store: BaseStore, now: float) -> str:
        from sqlalchemy.dialects import postgresql

        query = cast(Any, store).due_query(now, DUE_PAGE)
        dialect: Any = postgresql.dialect
        sql = str(query.compile(dialect=dialect(), compile_kwargs={"literal_binds": True}))
        with self._connect() as conn:
            rows = conn.execute("EXPLAIN " + sql).fetchall()
        nodes = [str(r[0]).strip().removeprefix("->").strip() for r in rows if "cost=" in str(r[0])]
        return "; ".join(node.split("  (")[0] for node in nodes)


def drop_postgres_tables(prefix: str) -> list[str]:
    """Drop every table whose name starts with ``prefix`` (our run's only)."""
    import psycopg
    from psycopg import sql

    if not re.fullmatch(r"scale_[0-9a-z]+_[0-9a-z_]*", prefix):
        raise ValueError(f"refusing to drop tables for prefix {prefix!r}")
    pattern = prefix.replace("_", r"\_") + "%"
    with psycopg.connect(POSTGRES_URL.replace("postgresql+psycopg://", "postgresql://"), autocommit=True, connect_timeout=3) as conn:
        names = [r[0] for r in conn.execute("SELECT tablename FROM pg_tables WHERE tablename LIKE %s", (pattern,))]
        for name in names:
            conn.execute(sql.SQL("DROP TABLE IF EXISTS {} CASCADE").format(sql.Identifier(name)))
    return names


class RedisTarget(Target):
    name = "redis"
    write_budget = 150.0

    def _prefix(self, role: str) -> str:
        return f"scale-{self.run}-{role}"

    def _client(self) -> Any:
        import redis

        return redis.Redis.from_url(REDIS_URL, socket_connect_timeout=3, socket_timeout=120)

    def unavailable(self) -> str | None:
        try:
            client = self._client()
            client.ping()
            client.close()
        except Exception as exc:  # noqa: BLE001 - reported as the skip reason
            return f"Redis at {REDIS_URL} does not answer ({type(exc).__name__})"
        return None

    def open(self, role: str) -> BaseStore:
        return open_store(REDIS_URL, prefix=self._prefix(role))

    def drop(self, role: str, store: BaseStore) -> None:
        store.close()
        unlink_redis_prefix("{" + self._prefix(role) + "}:")

    def _cpu(self, client: Any) -> float:
        info = client.info("cpu")
        return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])

    def before_write(self, store: BaseStore, role: str) -> None:
        client = self._client()
        self._used0 = int(client.info("memory")["used_memory"])
        self._cpu0 = self._cpu(client)
        client.close()

    def server_cpu(self) -> float | None:
        client = self._client()
        try:
            return self._cpu(client) - self._cpu0
        finally:
            client.close()

    def counters(self) -> dict[str, float]:
        client = self._client()
        try:
            return {"server CPU s": self._cpu(client)}
        finally:
            client.close()

    def footprint(self, store: BaseStore, role: str, n: int) -> tuple[float | None, str]:
        tag = "{" + self._prefix(role) + "}:"
        client = self._client()
        try:
            used = int(client.info("memory")["used_memory"]) - self._used0
            sample = [m.decode() for m in client.zrange(tag + "all", 0, 199)][::40]
            rec = sum(int(client.memory_usage(tag + "r:" + kh) or 0) for kh in sample) / len(sample)
            blob = sum(int(client.memory_usage(tag + "b:" + kh) or 0) for kh in sample) / len(sample)
            # SAMPLES 0: measure every member (O(N), a few hundred ms on 1M).
            indexes = {ix: int(client.memory_usage(tag + ix, samples=0) or 0) for ix in ("all", "due", "ix")}
        finally:
            client.close()
        ix_per = sum(indexes.values()) / n
        detail = (
            f"used_memory +{used / 2**20:,.0f} MiB; MEMORY USAGE per record: hash {rec:,.0f} B + blob {blob:,.0f} B"
            f" + indexes {ix_per:,.0f} B (all {indexes['all'] / n:,.0f}, due {indexes['due'] / n:,.0f},"
            f" ix {indexes['ix'] / n:,.0f}) = {rec + blob + ix_per:,.0f} B"
        )
        return used / n, detail


def unlink_redis_prefix(prefix: str, url: str = REDIS_URL) -> int:
    """SCAN + UNLINK, in batches, of the keys starting with ``prefix`` (never FLUSHDB). Returns how many."""
    import redis

    # Only this benchmark's names, and nothing MATCH would read as a glob ('{' '}' are literal there).
    if not re.fullmatch(r"\{scale-[0-9a-z]+-[0-9a-z]*(\}:)?", prefix):
        raise ValueError(f"refusing to delete Redis keys for prefix {prefix!r}")
    client = redis.Redis.from_url(url, socket_connect_timeout=3, socket_timeout=120)
    removed = 0
    try:
        pending: list[bytes] = []
        for key in client.scan_iter(match=prefix + "*", count=10_000):
            pending.append(key)
            if len(pending) >= 5000:
                removed += int(client.unlink(*pending))
                pending = []
        if pending:
            removed += int(client.unlink(*pending))
    finally:
        client.close()
    return removed


class Neo4jTarget(Target):
    name = "neo4j"

    def __init__(self, run: str, workdir: str) -> None:
        super().__init__(run, workdir)
        self.url = ""
        self.options: dict[str, Any] = {}

    def unavailable(self) -> str | None:
        for var in ("CELERY_PERSIST_BENCH_NEO4J_URL", "CELERY_PERSIST_TEST_NEO4J_URL"):
            if os.environ.get(var):
                self.url = os.environ[var]
                return None
        self.options = {"chunk_size": 1024}
        if os.environ.get("CELERY_PERSIST_TEST_FALKORDB_URL"):
            self.url = os.environ["CELERY_PERSIST_TEST_FALKORDB_URL"]
            return None
        try:
            from tests.integration.backends.neo4j import falkordb_url

            self.url = falkordb_url()
        except Exception as exc:  # noqa: BLE001 - reported as the skip reason
            return f"no Neo4j URL and FalkorDB did not start ({type(exc).__name__}: {exc})"
        return None

    def open(self, role: str) -> BaseStore:
        return open_store(self.url, prefix=f"scale-{self.run}-{role}", **self.options)

    def before_write(self, store: BaseStore, role: str) -> None:
        pass

    def footprint(self, store: BaseStore, role: str, n: int) -> tuple[float | None, str]:
        return None, "not measured"


TARGETS: dict[str, type[Target]] = {
    "redis": RedisTarget,
    "postgres": PostgresTarget,
    "sqlite": SqliteTarget,
    "file": FileTarget,
    "mongomock": MongomockTarget,
    "memory": MemoryTarget,
    "neo4j": Neo4jTarget,
}


# -- measuring -----------------------------------------------------------------------------------


class _Cut(Exception):
    """The prune's projected time passed its budget."""


class BudgetedStore:
    """Passes everything to ``store``, counting what a prune changed; cuts the prune once its projected time passes the budget.

    Checked before every ``due()``, ``transition()`` and ``delete()``: a store whose single calls
    are slow (mongomock scans every document per lookup) is cut within one call, not one page.
    """

    def __init__(self, store: BaseStore, expected: int, budget: float) -> None:
        self._store = store
        self._expected = expected
        self._budget = budget
        self._started = time.perf_counter()
        self.done = 0
        self.cut = False

    def _check(self) -> None:
        elapsed = time.perf_counter() - self._started
        if elapsed < min(5.0, self._budget / 4):
            return
        if (self.done and elapsed / self.done * self._expected > self._budget) or (not self.done and elapsed > self._budget):
            self.cut = True
            raise _Cut

    def due(self, now: float, limit: int = 100) -> list[StoredRecord]:
        self._check()
        return self._store.due(now, limit)

    def transition(self, key_hash: str, expect: Any, to: Status, **kwargs: Any) -> bool:
        self._check()
        won = self._store.transition(key_hash, expect, to, **kwargs)
        self.done += won
        return won

    def delete(self, key_hash: str) -> bool:
        self._check()
        gone = self._store.delete(key_hash)
        self.done += gone
        return gone

    def transition_many(self, changes: Any, *, now: float) -> list[str]:
        # cleanup's batched form (one call per page): checked per page, counted per record.
        self._check()
        won = self._store.transition_many(changes, now=now)
        self.done += len(won)
        return won

    def delete_many(self, key_hashes: Any) -> int:
        self._check()
        gone = self._store.delete_many(key_hashes)
        self.done += gone
        return gone

    def elapsed(self) -> float:
        return time.perf_counter() - self._started

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


def first_page_ms(store: BaseStore, now: float) -> float:
    best = float("inf")
    for _ in range(2):
        t = time.perf_counter()
        store.due(now, DUE_PAGE)
        best = min(best, time.perf_counter() - t)
    return best * 1000


def profile_due(store: BaseStore, now: float, title: str) -> None:
    prof = cProfile.Profile()
    prof.runcall(store.due, now, DUE_PAGE)
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats(12)
    print(f"\n--- cProfile: one due(now, {DUE_PAGE}) page, {title} ---")
    print("\n".join(out.getvalue().splitlines()[:40]), flush=True)


def prune_cleanup(store: BaseStore, ring: Keyring, now: float, expected: int, budget: float) -> Prune:
    res = Prune(expected=expected, target=expected, first_page_ms=first_page_ms(store, now))
    proxy = BudgetedStore(store, expected, budget)
    hub = PersistenceHub(cast(BaseStore, proxy), keyring=ring, encryption="required")
    with contextlib.suppress(_Cut):
        changed = hub.cleanup(now, on_expired=None)
        if changed != proxy.done:
            raise AssertionError(f"cleanup reported {changed} changes, the store saw {proxy.done}")
    res.seconds, res.count, res.cut = proxy.elapsed(), proxy.done, proxy.cut
    if not res.cut and res.count != expected:
        raise AssertionError(f"cleanup changed {res.count} records, expected {expected}")
    return res


def prune_delete(store: BaseStore, now: float, expected: int, target: int, budget: float) -> Prune:
    """Delete every record due at ``now`` (``expected`` of them; more than ``target`` if a cut cleanup left some)."""
    res = Prune(expected=expected, target=target, first_page_ms=first_page_ms(store, now))
    proxy = BudgetedStore(store, expected, budget)
    with contextlib.suppress(_Cut):
        while True:
            page = proxy.due(now, DELETE_PAGE)
            if not page:
                break
            before = proxy.done
            for rec in page:
                proxy.delete(rec.key_hash)
            if proxy.done == before:
                raise AssertionError("due() keeps returning records that delete() does not remove")
    res.seconds, res.count, res.cut = proxy.elapsed(), proxy.done, proxy.cut
    if not res.cut and res.count != expected:
        raise AssertionError(f"due+delete removed {res.count} records, expected {expected}")
    if not res.cut and store.due(now, 1):
        raise AssertionError("records still due after the delete loop")
    return res


def write(store: BaseStore, source: RecordSource, budget: float, progress: Callable[[int, float], None]) -> tuple[int, float, float, bool]:
    """put_many every batch; returns (records, put seconds, put CPU seconds, capped)."""
    written, spent, cpu = 0, 0.0, 0.0
    last_report = time.perf_counter()
    for batch in source.batches():
        c0, t0 = time.process_time(), time.perf_counter()
        store.put_many(batch)
        spent += time.perf_counter() - t0
        cpu += time.process_time() - c0
        written += len(batch)
        if not source.capped and spent > budget:
            source.capped = True
        if time.perf_counter() - last_report > 15:
            progress(written, spent)
            last_report = time.perf_counter()
    return written, spent, cpu, source.skipped > 0


def hub_suspends(target: Target, ring: Keyring, count: int, res: Result) -> None:
    store = target.open("hub")
    try:
        store.setup()
        hub = PersistenceHub(store, keyring=ring, encryption="required")
        rng = random.Random(7)
        states = [bench_state() for _ in range(8)]
        hub.suspend(states[0], ttl=DAY, metadata=bench_metadata(0, rng))  # connect, warm up
        t = time.perf_counter()
        for i in range(count):
            hub.suspend(states[i % 8], ttl=DAY, metadata=bench_metadata(i, rng))
        res.hub_s = time.perf_counter() - t
        res.hub_n = count
    finally:
        target.drop("hub", store)


def flows_among(store: BaseStore, ring: Keyring, count: int, res: Result) -> None:
    """``count`` suspensions through a hub on the store that holds the N records, one by one, then
    each resumed by its key (``hub.resume``: read, open, compare-and-set claim, complete)."""
    hub = PersistenceHub(store, keyring=ring, encryption="required")
    rng = random.Random(11)
    states = [bench_state() for _ in range(8)]
    hub.resume(hub.suspend(states[0], ttl=DAY, metadata=bench_metadata(0, rng)), {"ok": 0})  # warm up
    t = time.perf_counter()
    keys = [hub.suspend(states[i % 8], ttl=DAY, metadata=bench_metadata(i, rng)) for i in range(count)]
    res.among_suspend_s = time.perf_counter() - t
    t = time.perf_counter()
    for i, key in enumerate(keys):
        hub.resume(key, {"ok": i})
    res.among_resume_s = time.perf_counter() - t
    res.among_n = count


def sealed_size(ring: Keyring) -> int:
    store = open_store("memory://")
    hub = PersistenceHub(store, keyring=ring, encryption="required")
    hub.suspend(bench_state(), ttl=DAY, metadata=bench_metadata(0, random.Random(0)))
    page = store.scan(limit=1, with_blob=True)
    return len(page.items[0].blob)


@dataclass
class Options:
    records: int | None
    expired: int
    hub_suspends: int
    write_budget: float | None
    prune_budget: float
    quick: bool
    profile: bool


def run_store(target: Target, opts: Options, clock: Clock, ring: Keyring, blob_size: int) -> Result:
    started = time.perf_counter()
    res = Result(store=target.name, blob_size=blob_size)
    n = opts.records or DEFAULT_N[target.name][1 if opts.quick else 0]
    e = min(opts.expired, n // 4) if target.name == "neo4j" else opts.expired
    if 2 * e > n:
        e = n // 2
        res.notes.append(f"--expired lowered to {e:,} (2 x expired must fit in N)")
    res.expired = e

    def say(msg: str) -> None:
        print(f"[{target.name}] {msg}", flush=True)

    say(f"hub.suspend x {opts.hub_suspends:,} ...")
    hub_suspends(target, ring, opts.hub_suspends, res)
    say(f"hub.suspend: {res.hub_rate:,.0f}/s")

    # Main store (N records) and two baselines that hold only E1 or only E2, written up front so
    # that each prune among N runs right next to its baseline, under the same background load.
    target.sample_source = lambda k: RecordSource(clock, blob_size, k, 0, 0, seed=5)
    stores: dict[str, BaseStore] = {}
    try:
        store = stores["main"] = target.open("main")
        store.setup()
        target.before_write(store, "main")
        sealer = PersistenceHub(open_store("memory://"), keyring=ring, encryption="required")
        source = RecordSource(clock, blob_size, n, e, e, seed=1, sealer=sealer)
        say(f"writing {n:,} records ({2 * e:,} of them expired) ...")
        if opts.profile:
            prof = cProfile.Profile()
            prof.runcall(store.put_many, next(RecordSource(clock, blob_size, BATCH, 0, 0, seed=9).batches()))
            _print_profile(prof, f"{target.name}: one put_many of {BATCH:,}")
        budget = opts.write_budget or (30.0 if opts.quick else target.write_budget)
        written, spent, cpu, capped = write(store, source, budget, lambda w, s: say(f"  {w:,} written, {w / s:,.0f}/s"))
        if opts.profile:
            written += BATCH
        res.n, res.write_s, res.write_cpu_s, res.write_capped = written, spent, cpu, capped
        res.server_cpu_s = target.server_cpu()
        if capped:
            res.notes.append(f"write stopped at the {budget:.0f} s budget: N is {written:,}, not {n:,}")
        say(f"written {written:,} in {spent:,.1f} s: {res.write_rate:,.0f}/s (client CPU {cpu:,.1f} s)")
        res.bytes_per_record, res.footprint = target.footprint(store, "main", written)
        say(f"footprint: {res.footprint}")
        # After the footprint (the flows' records would count in it), before the prunes (their
        # records are neither expired nor due then: resumed ones are kept for retention).
        say(f"hub.suspend + hub.resume x {opts.hub_suspends:,} among {written:,} ...")
        flows_among(store, ring, opts.hub_suspends, res)
        say(f"among {written:,}: suspend / resume {res.among_cell()}")
        with contextlib.suppress(Exception):
            res.plan = target.plan(store, clock.now2)
        for role, group in (("base1", 1), ("base2", 2)):
            base = stores[role] = target.open(role)
            base.setup()
            src = RecordSource(clock, blob_size, e, e if group == 1 else 0, e if group == 2 else 0, seed=group + 1, sealer=sealer)
            write(base, src, float("inf"), lambda w, s: None)
        profiled: set[str] = set()
        for method, now, where, role in (
            ("cleanup", clock.now1, "N", "main"),
            ("cleanup", clock.now1, "E", "base1"),
            ("delete", clock.now2, "N", "main"),
            ("delete", clock.now2, "E", "base2"),
        ):
            # A cleanup cut short leaves E1 records due: the delete loop among N removes them too.
            due = e + (e - res.prunes["cleanup/N"].count if (method, where) == ("delete", "N") else 0)
            among = (written if method == "cleanup" else written - res.prunes["cleanup/N"].count) if where == "N" else e
            title = f"{target.name}, among {among:,}"
            before = target.counters()
            prune = res.prunes[f"{method}/{where}"] = _prune(stores[role], method, ring, now, e, due, opts, title, say, profiled)
            after = target.counters()
            prune.server = {k: after[k] - before[k] for k in before if k in after}
            if prune.server:
                say("  server: " + ", ".join(f"{k} {v:,.1f}" for k, v in prune.server.items()))
    finally:
        say("dropping everything written ...")
        t = time.perf_counter()
        for role, store in stores.items():
            target.drop(role, store)
        say(f"dropped in {time.perf_counter() - t:,.1f} s")
    res.seconds = time.perf_counter() - started
    return res


def _prune(
    store: BaseStore,
    method: str,
    ring: Keyring,
    now: float,
    e: int,
    due: int,
    opts: Options,
    title: str,
    say: Callable[[str], None],
    profiled: set[str],
) -> Prune:
    prof = cProfile.Profile() if opts.profile else None
    if prof is not None:
        prof.enable()
    if method == "cleanup":
        p = prune_cleanup(store, ring, now, e, opts.prune_budget)
    else:
        p = prune_delete(store, now, due, e, opts.prune_budget)
    if prof is not None:
        prof.disable()
        _print_profile(prof, f"{method} of {e:,}, {title}")
    say(f"{method} {title}: {p.cell()} ({p.count:,} records; first due() page {p.first_page_ms:,.1f} ms)")
    if p.cut and method not in profiled:
        profiled.add(method)  # once per store and method: the point is where the time goes
        profile_due(store, now, title)
    return p


def _print_profile(prof: cProfile.Profile, title: str) -> None:
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats(15)
    print(f"\n--- cProfile: {title} ---")
    print("\n".join(out.getvalue().splitlines()[:45]), flush=True)


# -- report --------------------------------------------------------------------------------------


def _rate(per_second: float) -> str:
    return f"{per_second:,.0f}/s" if per_second >= 10 else f"{per_second:.2f}/s"


def _bytes(value: float | None) -> str:
    return "n/a" if value is None else f"{value:,.0f}"


def tables(results: list[Result], e: int) -> str:
    ek = f"{e // 1000}k" if e % 1000 == 0 else f"{e:,}"
    lines = [
        f"| store | N | write (put_many x 1,000) | hub.suspend, 1 process | flows among N: suspend / resume, 1 process "
        f"| prune {ek} among N: cleanup / due+delete | prune {ek} among {ek}: cleanup / due+delete | ratio N / {ek} | bytes/record |",
        "|---|---:|---:|---:|---:|---|---|---|---:|",
    ]
    for r in results:
        if r.skipped:
            lines.append(f"| {r.store} | - | - | - | - | skipped: {r.skipped} | | | |")
            continue
        p = r.prunes

        def pair(where: str, p: dict[str, Prune] = p) -> str:
            return " / ".join(p[f"{m}/{where}"].cell() if f"{m}/{where}" in p else "-" for m in ("cleanup", "delete"))

        def ratio(m: str, p: dict[str, Prune] = p) -> str:
            a, b = p.get(f"{m}/N"), p.get(f"{m}/E")
            return f"{a.estimate / b.estimate:.2f}x" if a and b and b.estimate else "-"

        n_cell = f"{r.n:,}" + (" (capped)" if r.write_capped else "")
        lines.append(
            f"| {r.store} | {n_cell} | {r.write_rate:,.0f}/s | {r.hub_rate:,.0f}/s | {r.among_cell()} | {pair('N')} | {pair('E')} "
            f"| {ratio('cleanup')} / {ratio('delete')} | {_bytes(r.bytes_per_record)} |"
        )
    lines += [
        "",
        "| store | write time (client CPU, server CPU) | first due() page of 500, among N / among E "
        "| prune rate among N: cleanup / due+delete | server during prunes (N / E) | due() plan | footprint |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if r.skipped:
            continue
        p = r.prunes
        srv = f", server {r.server_cpu_s:,.1f} s" if r.server_cpu_s is not None else ""
        pages = f"{p['cleanup/N'].first_page_ms:,.1f} ms / {p['cleanup/E'].first_page_ms:,.1f} ms"
        rates = " / ".join(_rate(p[f"{m}/N"].target / p[f"{m}/N"].estimate) for m in ("cleanup", "delete"))
        server = "; ".join(
            f"{m}: " + " / ".join(f"{v:,.1f}" for v in (p[f"{m}/N"].server.get(k, 0.0), p[f"{m}/E"].server.get(k, 0.0))) + f" {k}"
            for m in ("cleanup", "delete")
            for k in p[f"{m}/N"].server
        )
        lines.append(
            f"| {r.store} | {r.write_s:,.1f} s (client {r.write_cpu_s:,.1f} s{srv}) | {pages} | {rates} | {server or '-'} "
            f"| {r.plan or '-'} | {r.footprint} |"
        )
    notes = [f"- {r.store}: {n}" for r in results for n in r.notes]
    if notes:
        lines += ["", *notes]
    return "\n".join(lines)


def machine() -> str:
    try:
        from .machine import format_machine, machine_info

        return format_machine(machine_info(redis_url=REDIS_URL, postgres_url=POSTGRES_URL))
    except Exception as exc:  # noqa: BLE001 - the description is a nicety
        import platform

        return f"- {os.cpu_count()} CPUs, Python {platform.python_version()} (machine details unavailable: {type(exc).__name__})"


def update_doc(block: str) -> None:
    with open(SCALE_MD, encoding="utf-8") as f:
        text = f.read()
    if MARK_BEGIN not in text or MARK_END not in text:
        raise SystemExit(f"{SCALE_MD} has no {MARK_BEGIN} ... {MARK_END} section")
    head, rest = text.split(MARK_BEGIN, 1)
    _, tail = rest.split(MARK_END, 1)
    with open(SCALE_MD, "w", encoding="utf-8") as f:
        f.write(f"{head}{MARK_BEGIN}\n{block}\n{MARK_END}{tail}")


# -- main ----------------------------------------------------------------------------------------


def clean(run: str) -> None:
    if not re.fullmatch(r"[0-9a-z]+", run):
        raise SystemExit("run id: lowercase letters and digits")
    print(f"redis: removed {unlink_redis_prefix('{scale-' + run + '-')} keys")
    with contextlib.suppress(Exception):
        print(f"postgres: dropped {drop_postgres_tables(f'scale_{run}_')}")
    path = os.path.join(tempfile.gettempdir(), f"cp-scale-{run}")
    if os.path.isdir(path):
        shutil.rmtree(path)
        print(f"removed {path}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.scale", description=__doc__.split("\n\n")[0])
    ap.add_argument("--records", type=int, default=None, help="N for every store (default: 1,000,000 Redis/PostgreSQL, 100,000 others)")
    ap.add_argument("--stores", default=",".join(DEFAULT_STORES), help=f"comma list of {', '.join(ALL_STORES)}")
    ap.add_argument("--quick", action="store_true", help="small N (20k servers, 10k others), 1,000 expired: about 1.5 min")
    ap.add_argument("--expired", type=int, default=None, help="expired records per prune (default 10,000; --quick 1,000)")
    ap.add_argument("--hub-suspends", type=int, default=None, help="hub.suspend calls per store (default 500; --quick 200)")
    ap.add_argument(
        "--write-budget",
        type=float,
        default=None,
        help="seconds of put_many per store before N is capped (default 150 Redis/PostgreSQL, 90 file, 60 others; --quick 30)",
    )
    ap.add_argument(
        "--prune-budget", type=float, default=None, help="seconds a prune may project before it is cut (default 60; --quick 15)"
    )
    ap.add_argument("--profile", action="store_true", help="cProfile one put_many batch and every prune")
    ap.add_argument("--json", metavar="FILE", help="write the results as JSON")
    ap.add_argument("--update-doc", action="store_true", help="rewrite the results section of benchmarks/SCALE.md")
    ap.add_argument("--clean", metavar="RUN", help="remove what a crashed run left (Redis keys, PG tables, temp dir) and exit")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.clean:
        clean(args.clean)
        return 0
    names = [s.strip() for s in args.stores.split(",") if s.strip()]
    unknown = [s for s in names if s not in TARGETS]
    if unknown:
        raise SystemExit(f"unknown store(s) {unknown}; known: {', '.join(ALL_STORES)}")
    opts = Options(
        records=args.records,
        expired=args.expired or (1_000 if args.quick else 10_000),
        hub_suspends=args.hub_suspends if args.hub_suspends is not None else (200 if args.quick else 500),
        write_budget=args.write_budget,
        prune_budget=args.prune_budget or (15.0 if args.quick else 60.0),
        quick=args.quick,
        profile=args.profile,
    )
    run = secrets.token_hex(4)
    workdir = os.path.join(tempfile.gettempdir(), f"cp-scale-{run}")
    os.makedirs(workdir, mode=0o700)
    ring = Keyring([("scale", os.urandom(32))])
    blob_size = sealed_size(ring)
    clock = Clock(now2=time.time())
    started = time.perf_counter()
    desc = machine()
    print(f"run {run} (clean a crashed run with --clean {run}); sealed blob of the bench state: {blob_size:,} bytes")
    print(desc, flush=True)
    results: list[Result] = []
    try:
        for name in names:
            target = TARGETS[name](run, workdir)
            reason = target.unavailable()
            if reason:
                print(f"[{name}] skipped: {reason}", flush=True)
                results.append(Result(store=name, skipped=reason))
                continue
            results.append(run_store(target, opts, clock, ring, blob_size))
        if "neo4j" not in names:
            results.append(Result(store="neo4j", skipped=NEO4J_SKIP))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    total = time.perf_counter() - started
    mode = "--quick" if args.quick else "default"
    cmd = "python -m benchmarks.scale " + " ".join(argv if argv is not None else sys.argv[1:])
    block = "\n".join(
        [
            f"Command: `{cmd.strip()}` ({mode} sizes; {total / 60:,.1f} min in all). "
            f"Blob {blob_size:,} bytes (random, the size the hub seals the bench state to), "
            f"{opts.expired:,} expired records per prune.",
            "",
            desc,
            "",
            tables(results, opts.expired),
        ]
    )
    print("\n" + block)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"machine": desc, "seconds": total, "results": [asdict(r) for r in results]}, f, indent=2)
    if args.update_doc:
        update_doc(block)
        print(f"\nupdated {SCALE_MD}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
