"""SQL stores: one SQLAlchemy Core code path for SQLite, PostgreSQL and MySQL/MariaDB.

URLs:
    ``sqlite:///relative/path.db`` or ``sqlite:////absolute/path.db`` (the
    embedded default; the parent directory is created; in-memory SQLite is
    refused, use ``memory://``).
    ``postgresql://user:pass@host:5432/db`` (also ``postgres://``): psycopg 3
    (``postgresql+psycopg``) when it is installed, else psycopg2. psycopg 3
    sends ``bytea`` in binary, and reads that ask for it (statements with the
    ``persist_binary`` execution option) get binary results, where psycopg2
    hex-encodes both ways: a 10 MB put/get takes ~110/~45 ms instead of
    ~270/~120 ms. An explicit ``postgresql+psycopg2://`` is honoured.
    ``mysql://...`` / ``mariadb://...``: PyMySQL unless a driver is named.
    PyMySQL sends bytes as a hex literal, so the server's ``max_allowed_packet``
    must exceed twice the largest blob; a larger blob is refused with a
    ConfigurationError naming the setting rather than sent.
    Any other ``dialect+driver://`` SQLAlchemy knows is passed through.

Options:
    ``prefix``: table name prefix, default ``celery_persist_``; tables are
    ``<prefix>records`` and ``<prefix>migrations``.
    ``busy_timeout``: seconds an SQLite writer waits for the lock (default 30).
    ``connect_timeout``: seconds to wait for a server connection (default 10).
    ``engine_options``: extra keyword arguments for ``sqlalchemy.create_engine``.

Schema: ``<prefix>records(key_hash PK, kind, status, blob, metadata (JSON text),
created_at, expires_at, due_at, updated_at)`` with times as float8, an index on
``(due_at, key_hash)`` (so :meth:`SQLStore.due` is an index range scan, O(due
records)) and one on ``(kind, status, key_hash)`` for filtered listings.
:meth:`SQLStore.setup` runs the numbered migrations in ``<prefix>migrations``
that are not yet recorded, under a lock (PostgreSQL advisory lock, MySQL
``GET_LOCK``, SQLite ``BEGIN IMMEDIATE``), so several processes may call it
at once and later releases upgrade existing tables. On PostgreSQL the blob
column is ``STORAGE EXTERNAL``: blobs arrive compressed and encrypted, and
TOAST's pglz pass over them costs time for nothing.

Atomicity: :meth:`SQLStore.transition` is one ``UPDATE ... SET status = :to
WHERE key_hash = :k AND status IN (:expect)`` and wins iff one row changed.
Row locks make it atomic on PostgreSQL (READ COMMITTED re-checks the WHERE
clause on the row it waited for) and InnoDB (an UPDATE reads the latest
committed row); the MySQL dialects count matched rows (``CLIENT.FOUND_ROWS``).
SQLite runs every write transaction as ``BEGIN IMMEDIATE`` in WAL mode, so
writers queue on ``busy_timeout`` instead of failing on a lock upgrade and
readers never block. :meth:`SQLStore.put` is an upsert (``ON CONFLICT DO
UPDATE`` / ``ON DUPLICATE KEY UPDATE``); :meth:`SQLStore.replace_blob` is an
``UPDATE ... WHERE blob = :old``.

Cost to know: SQLite rewrites a whole row on any UPDATE, so a transition of a
record with a 10 MB blob writes 10 MB (~150 ms here, against ~2 ms for a small
record); PostgreSQL and InnoDB keep an unchanged out-of-line blob in place.

Transactions: PostgreSQL runs in autocommit, as every operation except
:meth:`SQLStore.put_many` and :meth:`SQLStore.setup` is one statement (this
saves the BEGIN/COMMIT round trips); those two run in one transaction.

Fork: the engine remembers the pid that created it; in a child the pool is
dropped without closing the parent's connections (``dispose(close=False)``)
and new connections are opened on first use, as Celery's database backend
does.

Errors: connection loss, timeouts, lock and deadlock errors become
:class:`~celery_persist.errors.StoreUnavailable`; a missing table or a
permission problem becomes :class:`~celery_persist.errors.ConfigurationError`.

Tested: SQLite 3 (stdlib), PostgreSQL 15 with psycopg 3.3 and psycopg2 2.9,
MariaDB 10.11 with PyMySQL 1.2.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import threading
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects import mysql, postgresql, sqlite

from ..errors import ConfigurationError, PersistenceError, StoreUnavailable
from ._drivers import mask_url, require
from .base import KEEP, BaseStore, Kind, Page, Status, StoredRecord, _Keep, dump_metadata, load_metadata

if TYPE_CHECKING:
    from sqlalchemy.engine import URL, Connection, Engine, Row

__all__ = ["SQLStore", "MIGRATIONS"]

logger = logging.getLogger(__name__)

_PREFIX = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,39}")
_BATCH = 1000
_POSTGRES = ("postgresql", "postgres")
_MYSQL = ("mysql", "mariadb")
# (module, extra) for the drivers we choose by default or know by name.
_DRIVERS: dict[str, tuple[str, str]] = {
    "psycopg": ("psycopg", "postgres"),
    "psycopg2": ("psycopg2", "postgres2"),
    "pymysql": ("pymysql", "mysql"),
}

_KEY = (
    sa.String(64)
    .with_variant(postgresql.VARCHAR(64, collation="C"), "postgresql")
    .with_variant(mysql.VARCHAR(64, charset="ascii", collation="ascii_bin"), "mysql", "mariadb")
)
_WORD = sa.String(16).with_variant(mysql.VARCHAR(16, charset="ascii", collation="ascii_bin"), "mysql", "mariadb")
_BLOB = sa.LargeBinary().with_variant(mysql.LONGBLOB(), "mysql", "mariadb")
_TEXT = sa.Text().with_variant(mysql.MEDIUMTEXT(), "mysql", "mariadb")


def _sqlalchemy_url(url: str) -> URL:
    """The URL SQLAlchemy should open, with our default driver filled in."""
    try:
        parsed = sa.make_url(url)
    except sa_exc.ArgumentError as exc:
        raise ConfigurationError(f"cannot parse SQL store URL {mask_url(url)!r}") from exc
    backend, _, driver = parsed.drivername.partition("+")
    backend = backend.lower()
    if backend == "postgres":
        backend = "postgresql"
    if backend == "sqlite":
        if not parsed.database or parsed.database == ":memory:" or parsed.database.startswith("file::memory:"):
            raise ConfigurationError("an in-memory SQLite database is private to one connection: use memory:// or sqlite:///path.db")
        return parsed.set(drivername="sqlite+pysqlite" if not driver else parsed.drivername)
    if backend == "postgresql" and not driver:
        try:
            require("psycopg", extra="postgres", store="postgresql")
            driver = "psycopg"
        except ConfigurationError:
            try:
                require("psycopg2", extra="postgres", store="postgresql")
            except ConfigurationError:
                raise ConfigurationError(
                    "the postgresql store needs the 'psycopg' package: pip install 'celery-persist[postgres]'",
                    store=mask_url(url),
                ) from None
            driver = "psycopg2"
    elif backend in _MYSQL and not driver:
        driver = "pymysql"
    if driver in _DRIVERS:
        module, extra = _DRIVERS[driver]
        require(module, extra=extra, store=backend)
    if backend in _MYSQL and "charset" not in parsed.query:
        parsed = parsed.update_query_dict({"charset": "utf8mb4"})
    return parsed.set(drivername=f"{backend}+{driver}" if driver else backend)


class SQLStore(BaseStore):
    """Records in one table of any SQL database SQLAlchemy speaks; see the module docstring.

    Args:
        url: ``sqlite:///path``, ``postgresql://...``, ``mysql://...`` or ``mariadb://...``.
        prefix: Table name prefix (letters, digits, ``_``; at most 40 characters).
        busy_timeout: Seconds an SQLite writer waits for the database lock.
        connect_timeout: Seconds to wait for a server connection.
        engine_options: Extra ``create_engine`` keyword arguments (pool sizes, ...).

    Example:
        >>> store = open_store("postgresql://127.0.0.1/app", prefix="shop_")
        >>> store.setup()   # creates shop_records, shop_migrations
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
        self.name = mask_url(url)
        self._url = _sqlalchemy_url(url)
        self.dialect = self._url.get_backend_name()
        self.driver = self._url.get_driver_name()
        self.prefix = prefix
        self._busy_timeout = float(busy_timeout)
        self._connect_timeout = float(connect_timeout)
        self._engine_options = dict(engine_options or {})
        self._eng: Engine | None = None
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._max_packet = 0  # MySQL only: learnt from the server on connect

        md = sa.MetaData()
        table_args: dict[str, Any] = {}
        if self.dialect in _MYSQL:
            table_args = {"mysql_engine": "InnoDB", "mysql_charset": "utf8mb4"}
        self.table = sa.Table(
            f"{prefix}records",
            md,
            sa.Column("key_hash", _KEY, primary_key=True),
            sa.Column("kind", _WORD, nullable=False),
            sa.Column("status", _WORD, nullable=False),
            sa.Column("blob", _BLOB, nullable=False),
            sa.Column("metadata", _TEXT, nullable=False),
            sa.Column("created_at", sa.Double(), nullable=False),
            sa.Column("expires_at", sa.Double(), nullable=True),
            sa.Column("due_at", sa.Double(), nullable=True),
            sa.Column("updated_at", sa.Double(), nullable=False),
            **table_args,
        )
        t = self.table
        sa.Index(f"{prefix}due_ix", t.c.due_at, t.c.key_hash)
        sa.Index(f"{prefix}scan_ix", t.c.kind, t.c.status, t.c.key_hash)
        self.migrations_table = sa.Table(
            f"{prefix}migrations",
            md,
            sa.Column("version", sa.Integer(), primary_key=True, autoincrement=False),
            sa.Column("name", sa.String(100), nullable=False),
            sa.Column("applied_at", sa.DateTime(), nullable=False, server_default=sa.func.current_timestamp()),
            **table_args,
        )
        self._columns = [c for c in t.c if c.name != "blob"]
        self._upsert = self._build_upsert()

    # -- engine and connections ---------------------------------------------------------------

    def _build_upsert(self) -> Any:
        t = self.table
        updated = [c.name for c in t.c if c.name != "key_hash"]
        if self.dialect == "postgresql":
            pg = postgresql.insert(t)
            return pg.on_conflict_do_update(index_elements=[t.c.key_hash], set_={n: pg.excluded[n] for n in updated})
        if self.dialect == "sqlite":
            lite = sqlite.insert(t)
            return lite.on_conflict_do_update(index_elements=[t.c.key_hash], set_={n: lite.excluded[n] for n in updated})
        if self.dialect in _MYSQL:
            my = mysql.insert(t)
            return my.on_duplicate_key_update({n: my.inserted[n] for n in updated})
        raise ConfigurationError(f"the SQL store supports sqlite, postgresql, mysql and mariadb, not {self.dialect!r}")

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
        options: dict[str, Any] = {}
        connect_args: dict[str, Any] = {}
        if self.dialect == "sqlite":
            database = self._url.database or ""
            if not database.startswith("file:"):
                os.makedirs(os.path.dirname(os.path.abspath(database)), exist_ok=True)
            connect_args = {"timeout": self._busy_timeout, "check_same_thread": False}
        else:
            options["pool_pre_ping"] = True
            if self.dialect == "postgresql":
                # Every operation but put_many() and setup() is one statement, atomic on
                # its own: autocommit saves the BEGIN and COMMIT round trips.
                options["isolation_level"] = "AUTOCOMMIT"
            connect_args["connect_timeout"] = max(1, int(round(self._connect_timeout)))
            if self.dialect in _MYSQL:
                # The server drops idle connections after wait_timeout (8 h by default).
                options["pool_recycle"] = 3600
        options.update(self._engine_options)
        options["connect_args"] = {**connect_args, **options.get("connect_args", {})}
        eng = sa.create_engine(self._url, **options)
        if self.dialect in _MYSQL:
            event.listen(eng, "connect", self._on_mysql_connect)
        if self.dialect == "sqlite":
            event.listen(eng, "connect", self._on_sqlite_connect)
            event.listen(eng, "begin", _on_sqlite_begin)
        elif self.driver == "psycopg":
            event.listen(eng, "before_cursor_execute", _on_psycopg_execute)
        return eng

    def _on_sqlite_connect(self, dbapi_conn: Any, _record: Any) -> None:
        # The driver's own transaction handling would BEGIN DEFERRED lazily; we
        # emit BEGIN ourselves (see _on_sqlite_begin) so writers take the lock up front.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        try:
            cur.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout * 1000)}")
            cur.execute("PRAGMA journal_mode = WAL")
        finally:
            cur.close()

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
        """The one place driver errors become store errors."""
        try:
            yield
        except PersistenceError:
            raise
        except sa_exc.DBAPIError as exc:
            text = str(exc.orig).lower()
            if isinstance(exc, sa_exc.ProgrammingError) or "no such table" in text:
                raise ConfigurationError(
                    f"SQL store schema or permissions problem ({type(exc.orig).__name__}); "
                    "run store.setup() (celery persist setup) and check the database user's rights",
                    store=self.name,
                ) from exc
            if exc.connection_invalidated or isinstance(exc, sa_exc.OperationalError | sa_exc.InterfaceError):
                raise StoreUnavailable(f"SQL store unavailable ({type(exc.orig).__name__})", store=self.name) from exc
            raise
        except (sa_exc.DisconnectionError, sa_exc.TimeoutError) as exc:
            raise StoreUnavailable(f"SQL store unavailable ({type(exc).__name__})", store=self.name) from exc
        except (sa_exc.ArgumentError, sa_exc.NoSuchModuleError) as exc:
            raise ConfigurationError(f"bad SQL store configuration: {exc}", store=self.name) from exc
        except OSError as exc:
            raise StoreUnavailable(f"SQL store unavailable ({type(exc).__name__})", store=self.name) from exc

    # -- rows -------------------------------------------------------------------------------

    @staticmethod
    def _row(record: StoredRecord) -> dict[str, Any]:
        return {
            "key_hash": record.key_hash,
            "kind": str(record.kind),
            "status": str(record.status),
            "blob": record.blob,
            "metadata": dump_metadata(record.metadata),
            "created_at": record.created_at,
            "expires_at": record.expires_at,
            "due_at": record.due_at,
            "updated_at": record.updated_at,
        }

    @staticmethod
    def _record(row: Row[Any], blob: Any = None) -> StoredRecord:
        m = row._mapping
        if blob is None:
            blob = m["blob"]
        return StoredRecord(
            key_hash=m["key_hash"],
            kind=Kind(m["kind"]),
            status=Status(m["status"]),
            blob=blob if isinstance(blob, bytes) else bytes(blob),
            metadata=load_metadata(m["metadata"]),
            created_at=m["created_at"],
            expires_at=m["expires_at"],
            due_at=m["due_at"],
            updated_at=m["updated_at"],
        )

    def _select(self, *, with_blob: bool) -> sa.Select[Any]:
        columns = list(self.table.c) if with_blob else self._columns
        # persist_binary: psycopg returns this result in binary (bytea as raw bytes, not hex text).
        return sa.select(*columns).execution_options(persist_binary=True)

    # -- the contract -----------------------------------------------------------------------

    def setup(self) -> None:
        """Create the tables and apply the migrations this database lacks, under a lock."""
        with self._connect(write=True, transaction=True) as conn:
            lock_name = f"celery_persist:{self.table.name}"
            if self.dialect == "postgresql":
                key = int.from_bytes(hashlib.sha256(lock_name.encode()).digest()[:8], "big", signed=True)
                conn.execute(sa.select(sa.func.pg_advisory_xact_lock(key)))
            elif self.dialect in _MYSQL:
                # Session-level: survives the implicit commits of MySQL DDL.
                got = conn.execute(sa.select(sa.func.get_lock(lock_name[:64], 60))).scalar()
                if got != 1:
                    raise StoreUnavailable("timed out waiting for the SQL store migration lock", store=self.name)
            try:
                self.migrations_table.create(conn, checkfirst=True)
                done = set(conn.execute(sa.select(self.migrations_table.c.version)).scalars())
                for version, name, migrate in MIGRATIONS:
                    if version in done:
                        continue
                    logger.info("celery-persist: applying SQL migration %d (%s) on %s", version, name, self.name)
                    migrate(self, conn)
                    conn.execute(sa.insert(self.migrations_table).values(version=version, name=name))
            finally:
                if self.dialect in _MYSQL:
                    conn.execute(sa.select(sa.func.release_lock(lock_name[:64])))

    def schema_version(self) -> int:
        """The highest migration applied (0 before :meth:`setup`)."""
        with self._connect() as conn:
            if not sa.inspect(conn).has_table(self.migrations_table.name):
                return 0
            return int(conn.execute(sa.select(sa.func.max(self.migrations_table.c.version))).scalar() or 0)

    def put(self, record: StoredRecord) -> None:
        with self._connect(write=True) as conn:
            self._check_packet([len(record.blob)])
            conn.execute(self._upsert, self._row(record))

    def put_many(self, records: Iterable[StoredRecord]) -> None:
        """Upsert in one transaction, ``executemany`` in batches of 1,000, in key order (fewer deadlocks)."""
        rows = {r.key_hash: r for r in records}  # last one wins, as with put() in a loop
        if not rows:
            return
        ordered = [self._row(rows[k]) for k in sorted(rows)]
        with self._connect(write=True, transaction=True) as conn:
            self._check_packet(len(r.blob) for r in rows.values())
            for i in range(0, len(ordered), _BATCH):
                conn.execute(self._upsert, ordered[i : i + _BATCH])

    def get(self, key_hash: str) -> StoredRecord | None:
        with self._connect() as conn:
            row = conn.execute(self._select(with_blob=True).where(self.table.c.key_hash == key_hash)).first()
        return None if row is None else self._record(row)

    def delete(self, key_hash: str) -> bool:
        with self._connect(write=True) as conn:
            result = conn.execute(sa.delete(self.table).where(self.table.c.key_hash == key_hash))
            return result.rowcount == 1

    def transition(
        self,
        key_hash: str,
        expect: Collection[Status],
        to: Status,
        *,
        due_at: float | None | _Keep = KEEP,
        now: float,
    ) -> bool:
        if not expect:
            return False
        t = self.table
        values: dict[str, Any] = {"status": str(to), "updated_at": now}
        if not isinstance(due_at, _Keep):
            values["due_at"] = due_at
        stmt = sa.update(t).where(t.c.key_hash == key_hash, t.c.status.in_(sorted(str(s) for s in expect))).values(**values)
        with self._connect(write=True) as conn:
            return conn.execute(stmt).rowcount == 1

    def replace_blob(self, key_hash: str, old_blob: bytes, new_blob: bytes, *, now: float) -> bool:
        t = self.table
        stmt = sa.update(t).where(t.c.key_hash == key_hash, t.c.blob == old_blob).values(blob=new_blob, updated_at=now)
        with self._connect(write=True) as conn:
            self._check_packet([len(old_blob) + len(new_blob)])
            return conn.execute(stmt).rowcount == 1

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
        return self._select(with_blob=True).where(t.c.due_at <= now).order_by(t.c.due_at, t.c.key_hash).limit(limit)

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
            self.table.drop(conn, checkfirst=True)
            self.migrations_table.drop(conn, checkfirst=True)

    def close(self) -> None:
        eng, self._eng = self._eng, None
        if eng is not None:
            # In a forked child the pool belongs to the parent: drop it, do not close it.
            eng.dispose(close=self._pid == os.getpid())


def _on_sqlite_begin(conn: Connection) -> None:
    conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("persist_write") else "BEGIN")


def _on_psycopg_execute(conn: Connection, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool) -> None:
    if context is not None and context.execution_options.get("persist_binary"):
        from psycopg import pq

        cursor.format = pq.Format.BINARY


# -- migrations ---------------------------------------------------------------------------------
# Each is idempotent (a crash between a migration and its row in <prefix>migrations
# re-runs it) and runs inside setup()'s lock. Append; never edit a released one.


def _create_records(store: SQLStore, conn: Connection) -> None:
    store.table.create(conn, checkfirst=True)
    existing = {ix["name"] for ix in sa.inspect(conn).get_indexes(store.table.name)}
    for index in store.table.indexes:
        if index.name not in existing:
            index.create(conn)


def _blob_storage_external(store: SQLStore, conn: Connection) -> None:
    if store.dialect == "postgresql":
        preparer = conn.dialect.identifier_preparer
        conn.exec_driver_sql(f"ALTER TABLE {preparer.format_table(store.table)} ALTER COLUMN {preparer.quote('blob')} SET STORAGE EXTERNAL")


#: (version, name, function(store, connection)): applied in order by :meth:`SQLStore.setup`.
MIGRATIONS: Sequence[tuple[int, str, Callable[[SQLStore, Connection], None]]] = (
    (1, "records table and indexes", _create_records),
    (2, "postgresql: blob storage external (no pglz on compressed blobs)", _blob_storage_external),
)
