"""SQL stores: one SQLAlchemy Core code path for SQLite, PostgreSQL and MySQL/MariaDB.

URLs:
    ``sqlite:///relative/path.db`` or ``sqlite:////absolute/path.db`` (the
    embedded default; in-memory SQLite is refused, use ``memory://``). A
    missing parent directory is created with mode 0700 and a missing database
    file with mode 0600, before SQLite opens it, so its ``-wal``, ``-shm`` and
    ``-journal`` files (which SQLite gives the database's mode) are private too.
    ``postgresql://user:pass@host:5432/db`` (also ``postgres://``): psycopg 3
    (``postgresql+psycopg``) when it is installed, else psycopg2. psycopg 3
    sends ``bytea`` in binary, and reads that ask for it (statements with the
    ``persist_binary`` execution option) get binary results, where psycopg2
    hex-encodes both ways. An explicit ``postgresql+psycopg2://`` is honoured.
    ``mysql://...`` / ``mariadb://...``: PyMySQL unless a driver is named.
    PyMySQL sends bytes as a hex literal, so the server's ``max_allowed_packet``
    must exceed twice the largest blob; a larger blob is refused with a
    ConfigurationError naming the setting rather than sent.
    Any other ``dialect+driver://`` SQLAlchemy knows is passed through.
    (URL resolution and engine set-up: :mod:`celery_persist.stores.sql_engine`.)

Options:
    ``prefix``: table name prefix, default ``celery_persist_``; tables are
    ``<prefix>records``, ``<prefix>blobs`` and ``<prefix>migrations``
    (see :mod:`celery_persist.stores.sql_migrations` for the schema and upgrades).
    ``busy_timeout``: seconds an SQLite writer waits for the lock (default 30).
    ``connect_timeout``: seconds to wait for a server connection (default 10).
    ``engine_options``: extra keyword arguments for ``sqlalchemy.create_engine``.

Reads that want blobs (:meth:`SQLStore.get`, :meth:`SQLStore.due`,
``scan(with_blob=True)``) join the records and blobs tables by primary key in
one statement, so a record and its blob always come from one snapshot;
``scan()`` without blobs reads the records table only. :meth:`SQLStore.setup`
runs the migrations under a lock (PostgreSQL advisory lock, MySQL
``GET_LOCK``, SQLite ``BEGIN IMMEDIATE``), so several processes may call it
at once and later releases upgrade existing tables.

Atomicity: :meth:`SQLStore.transition` is one ``UPDATE ... SET status = :to
(, version = :v, seal = :s) WHERE key_hash = :k AND status IN (:expect) (AND
version = :expect_version)`` on the records table and wins iff one row changed. Row locks make it atomic on PostgreSQL (READ COMMITTED
re-checks the WHERE clause on the row it waited for) and InnoDB (an UPDATE
reads the latest committed row); the MySQL dialects count matched rows
(``CLIENT.FOUND_ROWS``). SQLite runs every write transaction as ``BEGIN
IMMEDIATE`` in WAL mode, so writers queue on ``busy_timeout`` instead of
failing on a lock upgrade and readers never block. :meth:`SQLStore.put` is an
upsert of both rows (``ON CONFLICT DO UPDATE`` / ``ON DUPLICATE KEY UPDATE``).
Writes that touch both tables lock the record row first, then the blob row,
so they cannot deadlock each other. :meth:`SQLStore.replace_blob` locks the
record row (``SELECT ... FOR UPDATE``), then runs ``UPDATE blobs ... WHERE
<stored blob is old_blob>``: SQLite and PostgreSQL compare the bytes; MySQL
compares ``SHA2(blob, 256)``, computed by the server, with the digest of the
old blob, which PyMySQL would otherwise send hex-encoded; the record row's
``updated_at``, ``version`` and ``seal`` are set in the same transaction.

Batches: :meth:`SQLStore.transition_many` on PostgreSQL is one ``UPDATE ... FROM
unnest(:keys, :expects, ...) AS v WHERE t.key_hash = v.key_hash AND <v's status and version
checks> RETURNING key_hash`` per 500 changes, in autocommit: the same row-lock compare-and-set
as :meth:`SQLStore.transition`, once per row, with the arrays as eight parameters whatever
the batch size. SQLite and MySQL (no ``UPDATE ... RETURNING``) run one transaction per 500:
``SELECT key_hash, status, version ... WHERE key_hash IN (...)`` (``FOR UPDATE`` on MySQL;
SQLite's ``BEGIN IMMEDIATE`` already holds the write lock), the checks in Python, then one
``UPDATE ... SET status = CASE WHEN key_hash = ... THEN ... END, ... WHERE key_hash IN (<winners>)``.
:meth:`SQLStore.delete_many` is one ``WITH gone AS (DELETE ... WHERE key_hash = ANY(:keys)
RETURNING key_hash) DELETE FROM blobs ...`` on PostgreSQL, one transaction of two ``DELETE
... WHERE key_hash IN (...)`` elsewhere, per 1,000 keys. Keys are sent sorted, so concurrent
batches lock rows in one order.

Transactions: PostgreSQL runs in autocommit, as every operation except
:meth:`SQLStore.put_many`, :meth:`SQLStore.replace_blob` and
:meth:`SQLStore.setup` is one statement (:meth:`SQLStore.put` and
:meth:`SQLStore.delete` write both tables with a data-modifying ``WITH``);
those three run in one transaction. SQLite and MySQL run each operation in
one transaction.

Fork: the engine remembers the pid that created it; in a child the pool is
dropped without closing the parent's connections (``dispose(close=False)``)
and new connections are opened on first use, as Celery's database backend
does.

Errors: connection loss, timeouts, lock and deadlock errors become
:class:`~celery_persist.errors.StoreUnavailable`; a missing table or a
permission problem becomes :class:`~celery_persist.errors.ConfigurationError`.
The message names the driver's cause (``OperationalError: connection failed:
... Connection refused``), URLs and passwords masked. A row that does not
decode is an :class:`~celery_persist.errors.IntegrityError` from :meth:`SQLStore.get`
and a poisoned placeholder in :meth:`SQLStore.scan` / :meth:`SQLStore.due`.

Server restarts: server connections are checked out with ``pool_pre_ping``, and
a disconnect seen on one connection invalidates every older one in the pool, so
after a restart the next operation opens a fresh connection; an operation that
was using a connection when the server went away (or that runs while it is
still starting up) raises ``StoreUnavailable``, and the one after reconnects.

Servers tested: SQLite 3 (stdlib), PostgreSQL 15 with psycopg 3.3 and psycopg2 2.9,
MariaDB 10.11 with PyMySQL 1.2.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import threading
from collections.abc import Collection, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects import postgresql

from ..errors import ConfigurationError, PersistenceError, StoreUnavailable
from .base import (
    KEEP,
    BaseStore,
    Keep,
    Kind,
    Page,
    Status,
    StoredRecord,
    TransitionSpec,
    decode_record,
    decoded,
    distinct_changes,
    dump_metadata,
    salvage,
    token_changes,
)
from .drivers import describe
from .sql_engine import SQLTarget
from .sql_migrations import MIGRATIONS, MYSQL, Schema

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection, Engine, Row

__all__ = ["SQLStore"]

logger = logging.getLogger(__name__)

_PREFIX = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,39}")
_BATCH = 1000
#: Changes per transition_many statement (SQLite / MySQL: ~9 parameters per change).
_CHANGES = 500


def _expect_text(expect: Collection[Status]) -> str:
    """``{claimed, suspended}`` -> ``",claimed,suspended,"``: what the PostgreSQL batch matches a status in."""
    return "," + ",".join(sorted(Status(s).value for s in expect)) + ","


class SQLStore(BaseStore):
    """Records (and their blobs, in a table of their own) in any SQL database SQLAlchemy speaks; see the module docstring.

    Args:
        url: ``sqlite:///path``, ``postgresql://...``, ``mysql://...`` or ``mariadb://...``.
        prefix: Table name prefix (letters, digits, ``_``; at most 40 characters).
        busy_timeout: Seconds an SQLite writer waits for the database lock.
        connect_timeout: Seconds to wait for a server connection.
        engine_options: Extra ``create_engine`` keyword arguments (pool sizes, ...).

    Example:
        >>> store = open_store("postgresql://127.0.0.1/app", prefix="shop_")
        >>> store.setup()   # creates shop_records, shop_blobs, shop_migrations
    """

    schemes: ClassVar[tuple[str, ...]] = ("sqlite", "postgresql", "postgres", "mysql", "mariadb")

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "celery_persist_",
        busy_timeout: float = 30.0,
        connect_timeout: float = 10.0,
        engine_options: dict[str, Any] | None = None,
    ) -> None:
        if not _PREFIX.fullmatch(prefix):
            raise ConfigurationError(
                f"SQL store prefix {prefix!r} must start with a letter or '_', hold only letters, digits and '_', "
                "and be at most 40 characters"
            )
        self._target = SQLTarget.parse(url)
        self.name = self._target.name
        self.dialect = self._target.dialect
        self.driver = self._target.driver
        self.prefix = prefix
        self._busy_timeout = float(busy_timeout)
        self._connect_timeout = float(connect_timeout)
        self._engine_options = dict(engine_options or {})
        self._eng: Engine | None = None
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._max_packet = 0  # MySQL only: learnt from the server on connect

        self._schema = Schema.build(self.dialect, prefix)
        self.table, self.blobs, self.migrations_table = self._schema.records, self._schema.blobs, self._schema.migrations
        self._upsert = self._schema.upsert(self.table)
        self._upsert_blob = self._schema.upsert(self.blobs)
        t, b = self.table, self.blobs
        # persist_binary: psycopg returns these results in binary (bytea as raw bytes, not hex text).
        self._with_blob: sa.Select[Any] = (
            sa.select(*t.c, b.c.blob).join_from(t, b, t.c.key_hash == b.c.key_hash).execution_options(persist_binary=True)
        )
        self._without_blob: sa.Select[Any] = sa.select(*t.c).execution_options(persist_binary=True)
        self._put_one = self._build_put_one() if self.dialect == "postgresql" else None
        self._delete_one = self._build_delete_one() if self.dialect == "postgresql" else None
        self._many_pg = self._build_many_pg() if self.dialect == "postgresql" else None

    # -- statements ---------------------------------------------------------------------------

    def _build_put_one(self) -> Any:
        """PostgreSQL: :meth:`put` as one statement, so it keeps autocommit's single round trip.

        The blob insert reads the key from the record upsert's RETURNING: that data
        dependency makes the record row be locked first, the lock order of every
        write (see :meth:`put`). One statement in autocommit saves the BEGIN and
        COMMIT round trips a two-statement transaction would cost.
        """
        t, b = self.table, self.blobs
        record = postgresql.insert(t).values({c.name: sa.bindparam(c.name, type_=c.type) for c in t.c})
        record = record.on_conflict_do_update(
            index_elements=[t.c.key_hash], set_={c.name: record.excluded[c.name] for c in t.c if not c.primary_key}
        )
        written = record.returning(t.c.key_hash).cte("persist_record")
        blob = postgresql.insert(b).from_select(
            ["key_hash", "blob"], sa.select(written.c.key_hash, sa.bindparam("blob", type_=b.c.blob.type))
        )
        return blob.on_conflict_do_update(index_elements=[b.c.key_hash], set_={"blob": blob.excluded.blob}).add_cte(written)

    def _build_delete_one(self) -> Any:
        """PostgreSQL: :meth:`delete` as one statement, record row first (as :meth:`_build_put_one`)."""
        t, b = self.table, self.blobs
        gone = sa.delete(t).where(t.c.key_hash == sa.bindparam("key_hash")).returning(t.c.key_hash).cte("persist_gone")
        return sa.delete(b).where(b.c.key_hash.in_(sa.select(gone.c.key_hash))).add_cte(gone)

    def _build_many_pg(self) -> tuple[sa.TextClause, sa.TextClause]:
        """PostgreSQL: (transition_many, delete_many) as one statement each, arrays as parameters."""
        # Table names come from the checked prefix, quoted by the dialect: no value is ever written in.
        quote = postgresql.dialect().identifier_preparer  # type: ignore[no-untyped-call]
        records, blobs = quote.format_table(self.table), quote.format_table(self.blobs)
        transition = sa.text(
            f"UPDATE {records} AS t SET status = v.to_status, updated_at = CAST(:now AS float8), "  # noqa: S608
            "due_at = CASE WHEN v.keep_due THEN t.due_at ELSE v.due_at END, "
            "version = COALESCE(v.version, t.version), seal = COALESCE(v.seal, t.seal) "
            "FROM unnest(CAST(:keys AS text[]), CAST(:expects AS text[]), CAST(:tos AS text[]), CAST(:keeps AS boolean[]), "
            "CAST(:dues AS float8[]), CAST(:versions AS bigint[]), CAST(:seals AS text[]), CAST(:evs AS bigint[])) "
            "AS v(key_hash, expect, to_status, keep_due, due_at, version, seal, expect_version) "
            "WHERE t.key_hash = v.key_hash AND strpos(v.expect, ',' || t.status || ',') > 0 "
            "AND (v.expect_version IS NULL OR t.version = v.expect_version) "
            "RETURNING t.key_hash"
        )
        delete = sa.text(
            f"WITH gone AS (DELETE FROM {records} WHERE key_hash = ANY(CAST(:keys AS text[])) RETURNING key_hash), "  # noqa: S608
            f"gone_blobs AS (DELETE FROM {blobs} WHERE key_hash IN (SELECT key_hash FROM gone)) "
            "SELECT count(*) FROM gone"
        )
        return transition, delete

    # -- engine and connections ---------------------------------------------------------------

    def _engine(self) -> Engine:
        pid = os.getpid()
        if self._pid != pid:
            # A child: never touch the parent's sockets or SQLite handles; a lock
            # held by another parent thread at fork time would never be released.
            self._lock = threading.Lock()
            if self._eng is not None:
                self._eng.dispose(close=False)
            self._pid = pid
        eng = self._eng
        if eng is None:
            with self._lock:
                eng = self._eng
                if eng is None:
                    with self._errors():
                        eng = self._eng = self._create_engine()
        return eng

    def _create_engine(self) -> Engine:
        eng = self._target.create_engine(
            busy_timeout=self._busy_timeout, connect_timeout=self._connect_timeout, engine_options=self._engine_options
        )
        if self.dialect in MYSQL:
            event.listen(eng, "connect", self._on_mysql_connect)
        return eng

    def _on_mysql_connect(self, dbapi_conn: Any, _record: Any) -> None:
        cur = dbapi_conn.cursor()
        try:
            cur.execute("SELECT @@max_allowed_packet")
            self._max_packet = int(cur.fetchone()[0])
        finally:
            cur.close()

    def _check_packet(self, sizes: Iterable[int]) -> None:
        """Refuse a blob the MySQL server would reject by dropping the connection.

        PyMySQL sends bytes as a hex literal (2 bytes per byte) in the statement,
        which must fit in the server's ``max_allowed_packet``; the server would
        answer with "server has gone away", which looks transient but is not.
        """
        if not self._max_packet:
            return
        factor = 2 if self.driver == "pymysql" else 1
        largest = max(sizes, default=0)
        need = largest * factor + 65536
        if need > self._max_packet:
            raise ConfigurationError(
                f"a {largest}-byte blob does not fit the MySQL server's max_allowed_packet "
                f"({self._max_packet}); raise it to at least {need} "
                "(SET GLOBAL max_allowed_packet=..., or max_allowed_packet in the server config)",
                store=self.name,
            )

    @contextlib.contextmanager
    def _connect(self, *, write: bool = False, transaction: bool = False) -> Iterator[Connection]:
        """A connection for one unit of work, errors mapped.

        ``write``: SQLite takes the write lock up front (``BEGIN IMMEDIATE``).
        ``transaction``: several statements that must commit together (PostgreSQL
        otherwise runs in autocommit, one statement per operation).
        """
        with self._errors():
            eng = self._engine()
            with eng.connect() as conn:
                if write:
                    conn.execution_options(persist_write=True)
                if transaction and self.dialect == "postgresql":
                    conn.execution_options(isolation_level="READ COMMITTED")
                with conn.begin():
                    yield conn

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        """The one place driver errors become store errors; the message names the driver's cause, masked."""
        try:
            yield
        except PersistenceError:
            raise
        except sa_exc.DBAPIError as exc:
            # exc.orig, never exc: SQLAlchemy's text quotes the statement and its parameters.
            cause = self._describe(exc.orig)
            text = str(exc.orig).lower()
            if isinstance(exc, sa_exc.ProgrammingError) or "no such table" in text:
                raise ConfigurationError(
                    f"SQL store schema or permissions problem ({cause}); "
                    "run store.setup() (celery persist setup) and check the database user's rights",
                    store=self.name,
                ) from exc
            if exc.connection_invalidated or isinstance(exc, sa_exc.OperationalError | sa_exc.InterfaceError):
                raise StoreUnavailable(f"SQL store unavailable ({cause})", store=self.name) from exc
            raise
        except (sa_exc.DisconnectionError, sa_exc.TimeoutError) as exc:
            raise StoreUnavailable(f"SQL store unavailable ({self._describe(exc)})", store=self.name) from exc
        except (sa_exc.ArgumentError, sa_exc.NoSuchModuleError) as exc:
            raise ConfigurationError(f"bad SQL store configuration ({self._describe(exc)})", store=self.name) from exc
        except OSError as exc:
            raise StoreUnavailable(f"SQL store unavailable ({self._describe(exc)})", store=self.name) from exc

    def _describe(self, exc: BaseException | None) -> str:
        if exc is None:
            return "no driver error"
        return describe(exc, password=self._target.url.password)

    # -- rows -------------------------------------------------------------------------------

    @staticmethod
    def _row(record: StoredRecord) -> dict[str, Any]:
        return {
            "key_hash": record.key_hash,
            "kind": str(record.kind),
            "status": str(record.status),
            "metadata": dump_metadata(record.metadata),
            "created_at": record.created_at,
            "expires_at": record.expires_at,
            "due_at": record.due_at,
            "updated_at": record.updated_at,
            "version": record.version,
            "seal": record.seal,
        }

    @staticmethod
    def _record(row: Row[Any], blob: Any = None) -> StoredRecord:
        """The row's record, or its poisoned placeholder when the row does not decode."""
        m = row._mapping
        key_hash = str(m["key_hash"])
        return salvage(
            key_hash,
            lambda: decode_record(
                key_hash,
                kind=m["kind"],
                status=m["status"],
                blob=m["blob"] if blob is None else blob,
                metadata=m["metadata"],
                created_at=m["created_at"],
                expires_at=m["expires_at"],
                due_at=m["due_at"],
                updated_at=m["updated_at"],
                version=m["version"],
                seal=m["seal"],
            ),
        )

    def _select(self, *, with_blob: bool) -> sa.Select[Any]:
        return self._with_blob if with_blob else self._without_blob

    # -- the contract -----------------------------------------------------------------------

    def setup(self) -> None:
        """Create the tables and apply the migrations this database lacks, under a lock."""
        lock_name = f"celery_persist:{self.table.name}"
        with self._errors(), self._engine().connect() as conn:
            conn.execution_options(persist_write=True)
            if self.dialect == "postgresql":
                conn.execution_options(isolation_level="READ COMMITTED")
            if self.dialect in MYSQL:
                # Session-level, so it holds across the implicit commits of MySQL DDL;
                # taken before and released after the migrations' transaction, so the
                # next process to get it sees every version row committed.
                got = conn.execute(sa.select(sa.func.get_lock(lock_name[:64], 60))).scalar()
                conn.commit()
                if got != 1:
                    raise StoreUnavailable("timed out waiting for the SQL store migration lock", store=self.name)
            try:
                with conn.begin():
                    if self.dialect == "postgresql":
                        key = int.from_bytes(hashlib.sha256(lock_name.encode()).digest()[:8], "big", signed=True)
                        conn.execute(sa.select(sa.func.pg_advisory_xact_lock(key)))
                    self._migrate(conn)
            finally:
                if self.dialect in MYSQL:
                    conn.execute(sa.select(sa.func.release_lock(lock_name[:64])))
                    conn.commit()

    def _migrate(self, conn: Connection) -> None:
        self.migrations_table.create(conn, checkfirst=True)
        done = set(conn.execute(sa.select(self.migrations_table.c.version)).scalars())
        for version, name, migrate in MIGRATIONS:
            if version in done:
                continue
            logger.info("celery-persist: applying SQL migration %d (%s) on %s", version, name, self.name)
            migrate(self._schema, conn)
            conn.execute(sa.insert(self.migrations_table).values(version=version, name=name))

    def schema_version(self) -> int:
        """The highest migration applied (0 before :meth:`setup`)."""
        with self._connect() as conn:
            if not sa.inspect(conn).has_table(self.migrations_table.name):
                return 0
            return int(conn.execute(sa.select(sa.func.max(self.migrations_table.c.version))).scalar() or 0)

    def put(self, record: StoredRecord) -> None:
        # Every write that touches both tables locks the record row first, then the
        # blob row: one lock order, so two writers cannot deadlock on PostgreSQL or
        # InnoDB row locks (SQLite locks the whole database).
        row = self._row(record)
        if self._put_one is not None:
            with self._connect(write=True) as conn:
                conn.execute(self._put_one, {**row, "blob": record.blob})
            return
        with self._connect(write=True, transaction=True) as conn:
            self._check_packet([len(record.blob)])
            conn.execute(self._upsert, row)
            conn.execute(self._upsert_blob, {"key_hash": record.key_hash, "blob": record.blob})

    def put_many(self, records: Iterable[StoredRecord]) -> None:
        """Upsert in one transaction, ``executemany`` in batches of 1,000, in key order (fewer deadlocks)."""
        latest = {r.key_hash: r for r in records}  # last one wins, as with put() in a loop
        if not latest:
            return
        keys = sorted(latest)
        with self._connect(write=True, transaction=True) as conn:
            self._check_packet(len(r.blob) for r in latest.values())
            for i in range(0, len(keys), _BATCH):
                batch = [latest[k] for k in keys[i : i + _BATCH]]
                conn.execute(self._upsert, [self._row(r) for r in batch])
                conn.execute(self._upsert_blob, [{"key_hash": r.key_hash, "blob": r.blob} for r in batch])

    def get(self, key_hash: str) -> StoredRecord | None:
        # One statement (a join), so one snapshot on every database: two SELECTs in
        # autocommit could pair a record with the blob of a put that landed in between.
        with self._connect() as conn:
            row = conn.execute(self._with_blob.where(self.table.c.key_hash == key_hash)).first()
        return None if row is None else decoded(self._record(row), store=self.name)

    def delete(self, key_hash: str) -> bool:
        t, b = self.table, self.blobs
        if self._delete_one is not None:
            with self._connect(write=True) as conn:
                return conn.execute(self._delete_one, {"key_hash": key_hash}).rowcount == 1
        with self._connect(write=True, transaction=True) as conn:
            found = conn.execute(sa.delete(t).where(t.c.key_hash == key_hash)).rowcount == 1
            conn.execute(sa.delete(b).where(b.c.key_hash == key_hash))
            return found

    def quarantine(self, key_hash: str) -> bool:
        """One ``UPDATE ... SET due_at = NULL WHERE key_hash = :k`` (the row is never decoded)."""
        t = self.table
        with self._connect(write=True) as conn:
            return conn.execute(sa.update(t).where(t.c.key_hash == key_hash).values(due_at=None)).rowcount == 1

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
        if not expect:
            return False
        t = self.table
        values: dict[str, Any] = {"status": str(to), "updated_at": now, **token_changes(version, seal)}
        if not isinstance(due_at, Keep):
            values["due_at"] = due_at
        where = [t.c.key_hash == key_hash, t.c.status.in_(sorted(str(s) for s in expect))]
        if expect_version is not None:
            where.append(t.c.version == int(expect_version))
        with self._connect(write=True) as conn:
            return conn.execute(sa.update(t).where(*where).values(**values)).rowcount == 1

    def transition_many(self, changes: Sequence[TransitionSpec], *, now: float) -> list[str]:
        """One statement (PostgreSQL) or one transaction (SQLite, MySQL) per 500 changes; see the module docstring."""
        ordered = distinct_changes(changes)
        by_key = {c.key_hash: c for c in ordered if c.expect}
        keys = sorted(by_key)
        moved: set[str] = set()
        for i in range(0, len(keys), _CHANGES):
            part = [by_key[k] for k in keys[i : i + _CHANGES]]
            moved.update(self._transition_pg(part, now) if self._many_pg is not None else self._transition_locked(part, now))
        return [c.key_hash for c in ordered if c.key_hash in moved]

    def _transition_pg(self, part: Sequence[TransitionSpec], now: float) -> list[str]:
        assert self._many_pg is not None
        params = {
            "now": float(now),
            "keys": [c.key_hash for c in part],
            "expects": [_expect_text(c.expect) for c in part],
            "tos": [c.to.value for c in part],
            "keeps": [isinstance(c.due_at, Keep) for c in part],
            "dues": [None if isinstance(c.due_at, Keep) or c.due_at is None else float(c.due_at) for c in part],
            "versions": [None if c.version is None else int(c.version) for c in part],
            "seals": [None if c.seal is None else str(c.seal) for c in part],
            "evs": [None if c.expect_version is None else int(c.expect_version) for c in part],
        }
        with self._connect(write=True) as conn:
            return [str(k) for k in conn.execute(self._many_pg[0], params).scalars()]

    def _transition_locked(self, part: Sequence[TransitionSpec], now: float) -> list[str]:
        """SQLite / MySQL: read the rows under the write lock (``FOR UPDATE``), check, update the winners in one statement."""
        t = self.table
        with self._connect(write=True, transaction=True) as conn:
            rows = conn.execute(
                sa.select(t.c.key_hash, t.c.status, t.c.version).where(t.c.key_hash.in_([c.key_hash for c in part])).with_for_update()
            ).all()
            found = {str(r.key_hash): (str(r.status), int(r.version or 0)) for r in rows}
            won = [
                c
                for c in part
                if c.key_hash in found
                and found[c.key_hash][0] in {s.value for s in c.expect}
                and (c.expect_version is None or found[c.key_hash][1] == int(c.expect_version))
            ]
            if not won:
                return []
            values: dict[str, Any] = {"updated_at": float(now), "status": self._case(t.c.status, {c.key_hash: c.to.value for c in won})}
            dues = {c.key_hash: None if c.due_at is None else float(c.due_at) for c in won if not isinstance(c.due_at, Keep)}
            versions = {c.key_hash: int(c.version) for c in won if c.version is not None}
            seals = {c.key_hash: str(c.seal) for c in won if c.seal is not None}
            for column, chosen in (("due_at", dues), ("version", versions), ("seal", seals)):
                if chosen:
                    values[column] = self._case(t.c[column], chosen)
            conn.execute(sa.update(t).where(t.c.key_hash.in_([c.key_hash for c in won])).values(**values))
            return [c.key_hash for c in won]

    def _case(self, column: sa.Column[Any], chosen: dict[str, Any]) -> Any:
        """``CASE WHEN key_hash = :k THEN :v ... ELSE column END``, each value bound with ``column``'s type."""
        whens = [(self.table.c.key_hash == k, sa.literal(v, column.type) if v is not None else sa.null()) for k, v in chosen.items()]
        return sa.case(*whens, else_=column)

    def delete_many(self, key_hashes: Sequence[str]) -> int:
        """One statement (PostgreSQL) or one two-statement transaction per 1,000 keys, in key order."""
        t, b = self.table, self.blobs
        keys = sorted(set(key_hashes))
        gone = 0
        for i in range(0, len(keys), _BATCH):
            part = keys[i : i + _BATCH]
            if self._many_pg is not None:
                with self._connect(write=True) as conn:
                    gone += int(conn.execute(self._many_pg[1], {"keys": part}).scalar() or 0)
                continue
            with self._connect(write=True, transaction=True) as conn:
                gone += int(conn.execute(sa.delete(t).where(t.c.key_hash.in_(part))).rowcount or 0)
                conn.execute(sa.delete(b).where(b.c.key_hash.in_(part)))
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
        t, b = self.table, self.blobs
        if self.dialect in MYSQL:
            # PyMySQL sends bytes as hex: comparing with old_blob would send 40 MB for
            # a 10 MB swap; comparing digests, the server hashes the stored blob and
            # only the new one is sent.
            same = sa.func.unhex(sa.func.sha2(b.c.blob, 256)) == hashlib.sha256(old_blob).digest()
        else:
            # PostgreSQL gains little from the digest (binary parameters are cheap),
            # and SQLite runs in-process: comparing the bytes is simplest.
            same = b.c.blob == old_blob
        with self._connect(write=True, transaction=True) as conn:
            self._check_packet([len(new_blob)])
            # Record row first (the lock order of put and delete), then the compare-and-set
            # as a new statement: under READ COMMITTED it sees the blob as it is once the
            # record is ours, not as it was when we started waiting for the lock.
            if conn.execute(sa.select(t.c.key_hash).where(t.c.key_hash == key_hash).with_for_update()).first() is None:
                return False
            if conn.execute(sa.update(b).where(b.c.key_hash == key_hash, same).values(blob=new_blob)).rowcount != 1:
                return False
            conn.execute(sa.update(t).where(t.c.key_hash == key_hash).values(updated_at=now, **token_changes(version, seal)))
            return True

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
        t = self.table
        stmt = self._select(with_blob=with_blob)
        if cursor is not None:
            stmt = stmt.where(t.c.key_hash > cursor)
            if with_blob:
                # The same bound on the blobs side of the join: without it PostgreSQL may plan a
                # merge join that walks the blobs index from its first row up to the cursor.
                stmt = stmt.where(self.blobs.c.key_hash > cursor)
        if kind is not None:
            stmt = stmt.where(t.c.kind == str(kind))
        if status is not None:
            stmt = stmt.where(t.c.status == str(status))
        stmt = stmt.order_by(t.c.key_hash).limit(limit)
        with self._connect() as conn:
            rows = conn.execute(stmt).all()
        items = [self._record(r) if with_blob else self._record(r, b"") for r in rows]
        return Page(items, items[-1].key_hash if len(items) >= limit else None)

    def due(self, now: float, limit: int = 100) -> list[StoredRecord]:
        if limit <= 0:
            return []
        with self._connect() as conn:
            rows = conn.execute(self.due_query(now, limit)).all()
        return [self._record(r) for r in rows]

    def due_query(self, now: float, limit: int) -> sa.Select[Any]:
        """The statement :meth:`due` runs (public so tests can EXPLAIN it)."""
        t = self.table
        return self._with_blob.where(t.c.due_at <= now).order_by(t.c.due_at, t.c.key_hash).limit(limit)

    def health(self) -> dict[str, Any]:
        info: dict[str, Any] = {"ok": False, "store": self.name, "dialect": self.dialect, "driver": self.driver}
        try:
            with self._connect() as conn:
                conn.execute(sa.select(sa.literal(1))).scalar()
                version = conn.dialect.server_version_info or ()
                info["server_version"] = ".".join(str(v) for v in version)
                if not sa.inspect(conn).has_table(self.migrations_table.name):
                    info["error"] = "schema missing: run setup()"
                    return info
                info["schema_version"] = int(conn.execute(sa.select(sa.func.max(self.migrations_table.c.version))).scalar() or 0)
        except Exception as exc:  # noqa: BLE001 - health reports, it does not raise
            info["error"] = type(exc.__cause__ or exc).__name__
            return info
        info["ok"] = info["schema_version"] >= MIGRATIONS[-1][0]
        if not info["ok"]:
            info["error"] = "schema is behind: run setup()"
        return info

    def drop(self) -> None:
        """Drop this prefix's tables (tests, uninstall). Irreversible."""
        with self._connect(write=True, transaction=True) as conn:
            self.blobs.drop(conn, checkfirst=True)
            self.table.drop(conn, checkfirst=True)
            self.migrations_table.drop(conn, checkfirst=True)

    def close(self) -> None:
        eng, self._eng = self._eng, None
        if eng is not None:
            # In a forked child the pool belongs to the parent: drop it, do not close it.
            eng.dispose(close=self._pid == os.getpid())
