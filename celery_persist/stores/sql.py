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
    ``<prefix>records``, ``<prefix>blobs`` and ``<prefix>migrations``.
    ``busy_timeout``: seconds an SQLite writer waits for the lock (default 30).
    ``connect_timeout``: seconds to wait for a server connection (default 10).
    ``engine_options``: extra keyword arguments for ``sqlalchemy.create_engine``.

Schema: ``<prefix>records(key_hash PK, kind, status, metadata (JSON text),
created_at, expires_at, due_at, updated_at)`` with times as float8, an index on
``(due_at, key_hash)`` (so :meth:`SQLStore.due` is an index range scan, O(due
records)) and one on ``(kind, status, key_hash)`` for filtered listings; the
blob sits in ``<prefix>blobs(key_hash PK, blob)``, written in the same
transaction as its record. Reads that want blobs (:meth:`SQLStore.get`,
:meth:`SQLStore.due`, ``scan(with_blob=True)``) join the two tables by primary
key in one statement, so a record and its blob always come from one snapshot;
``scan()`` without blobs reads the records table only.

Why two tables: SQLite rewrites a whole row on any UPDATE, so with the blob in
the record row a status change of a 10 MB record wrote 10 MB (~150 ms here;
a resume does two). Apart, a transition writes a few pages (~2 ms), whatever
the blob's size. PostgreSQL (TOAST) and InnoDB (off-page blobs) kept a big
blob in place already; they use the same schema because one layout is
simpler, and on 10 MB it costs them nothing this machine's noise can show
(put and get within it, before and after), while their transitions got ~1-3 ms
faster. Small
records pay a little for the second table: a 1 KB put takes ~0.15 ms longer
on SQLite and PostgreSQL, ~0.4 ms on MariaDB (one more round trip).

:meth:`SQLStore.setup` runs the numbered migrations in ``<prefix>migrations``
that are not yet recorded, under a lock (PostgreSQL advisory lock, MySQL
``GET_LOCK``, SQLite ``BEGIN IMMEDIATE``), so several processes may call it
at once and later releases upgrade existing tables. On PostgreSQL the blob
column is ``STORAGE EXTERNAL``: blobs arrive compressed and encrypted, and
TOAST's pglz pass over them costs time for nothing.

Upgrading from schema 2 (blobs in the records row): migration 3 creates
``<prefix>blobs``, copies every blob into it, and removes the ``blob``
column. PostgreSQL and MySQL use ``ALTER TABLE ... DROP COLUMN`` (PostgreSQL
frees the old values as rows are rewritten and vacuumed; MariaDB may drop the
column instantly and free them at the next table rebuild, e.g. ``OPTIMIZE
TABLE``). SQLite only gained ``DROP COLUMN`` in 3.35 and Python 3.11 may be
linked against an older one, so the records table is rebuilt the way SQLite
documents (create the new table, copy the small columns, drop the old one,
rename, re-create the indexes), which works on every version; the file keeps
its size (the freed pages are reused; ``VACUUM`` shrinks it). On SQLite and
PostgreSQL the upgrade is one transaction (SQLite's WAL grows to the size of
the blobs until the next checkpoint). It copies every blob once: 200 x 1 MB
and 10,000 x 1 KB records took ~8 s on SQLite, ~3 s on PostgreSQL and ~5 s on
MariaDB on a busy 2-core VM. Stop the workers of the previous release first:
their writes fail once the column is gone (on PostgreSQL they wait for the
migration to finish; on MySQL, whose DDL commits on its own, a blob written
between the copy and the ``DROP COLUMN`` is lost).

Atomicity: :meth:`SQLStore.transition` is one ``UPDATE ... SET status = :to
WHERE key_hash = :k AND status IN (:expect)`` on the records table and wins
iff one row changed. Row locks make it atomic on PostgreSQL (READ COMMITTED
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
old blob, which PyMySQL would otherwise send hex-encoded (a 10 MB swap takes
~300 ms instead of ~650 on MariaDB).

Transactions: PostgreSQL runs in autocommit, as every operation except
:meth:`SQLStore.put_many`, :meth:`SQLStore.replace_blob` and
:meth:`SQLStore.setup` is one statement (this saves the BEGIN/COMMIT round
trips; :meth:`SQLStore.put` and :meth:`SQLStore.delete` write both tables with
a data-modifying ``WITH``); those three run in one transaction. SQLite and
MySQL run each operation in one transaction.

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
        self._table_args = table_args
        self.table = _records_table(md, f"{prefix}records", prefix, table_args, with_blob=False)
        # Blobs live apart from the record row: SQLite rewrites a whole row on any
        # UPDATE, so a status change of a record holding 10 MB would rewrite 10 MB.
        self.blobs = sa.Table(
            f"{prefix}blobs",
            md,
            sa.Column("key_hash", _KEY, primary_key=True),
            sa.Column("blob", _BLOB, nullable=False),
            **table_args,
        )
        self.migrations_table = sa.Table(
            f"{prefix}migrations",
            md,
            sa.Column("version", sa.Integer(), primary_key=True, autoincrement=False),
            sa.Column("name", sa.String(100), nullable=False),
            sa.Column("applied_at", sa.DateTime(), nullable=False, server_default=sa.func.current_timestamp()),
            **table_args,
        )
        self._upsert = self._build_upsert(self.table)
        self._upsert_blob = self._build_upsert(self.blobs)
        t, b = self.table, self.blobs
        # persist_binary: psycopg returns these results in binary (bytea as raw bytes, not hex text).
        self._with_blob: sa.Select[Any] = (
            sa.select(*t.c, b.c.blob).join_from(t, b, t.c.key_hash == b.c.key_hash).execution_options(persist_binary=True)
        )
        self._without_blob: sa.Select[Any] = sa.select(*t.c).execution_options(persist_binary=True)
        self._put_one = self._build_put_one() if self.dialect == "postgresql" else None
        self._delete_one = self._build_delete_one() if self.dialect == "postgresql" else None

    # -- statements ---------------------------------------------------------------------------

    def _build_upsert(self, table: sa.Table, rows: sa.Select[Any] | None = None) -> Any:
        """``INSERT`` that replaces every column of an existing row with the same key.

        ``rows``: insert the result of this SELECT (same column order) instead of parameters.
        """
        updated = [c.name for c in table.c if not c.primary_key]
        names = [c.name for c in table.c]
        if self.dialect == "postgresql":
            pg = postgresql.insert(table)
            if rows is not None:
                pg = pg.from_select(names, rows)
            return pg.on_conflict_do_update(index_elements=[table.c.key_hash], set_={n: pg.excluded[n] for n in updated})
        if self.dialect == "sqlite":
            lite = sqlite.insert(table)
            if rows is not None:
                # Without a WHERE, SQLite would parse ON CONFLICT as a join's ON.
                lite = lite.from_select(names, rows.where(sa.true()))
            return lite.on_conflict_do_update(index_elements=[table.c.key_hash], set_={n: lite.excluded[n] for n in updated})
        if self.dialect in _MYSQL:
            my = mysql.insert(table)
            if rows is not None:
                my = my.from_select(names, rows)
            return my.on_duplicate_key_update({n: my.inserted[n] for n in updated})
        raise ConfigurationError(f"the SQL store supports sqlite, postgresql, mysql and mariadb, not {self.dialect!r}")

    def _build_put_one(self) -> Any:
        """PostgreSQL: :meth:`put` as one statement, so it keeps autocommit's single round trip.

        The blob insert reads the key from the record upsert's RETURNING: that data
        dependency makes the record row be locked first, the lock order of every
        write (see :meth:`put`). A 1 KB put takes ~1.2 ms this way, ~2.2 ms as two
        statements in a transaction.
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
        return self._with_blob if with_blob else self._without_blob

    # -- the contract -----------------------------------------------------------------------

    def setup(self) -> None:
        """Create the tables and apply the migrations this database lacks, under a lock."""
        lock_name = f"celery_persist:{self.table.name}"
        with self._errors(), self._engine().connect() as conn:
            conn.execution_options(persist_write=True)
            if self.dialect == "postgresql":
                conn.execution_options(isolation_level="READ COMMITTED")
            if self.dialect in _MYSQL:
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
                if self.dialect in _MYSQL:
                    conn.execute(sa.select(sa.func.release_lock(lock_name[:64])))
                    conn.commit()

    def _migrate(self, conn: Connection) -> None:
        self.migrations_table.create(conn, checkfirst=True)
        done = set(conn.execute(sa.select(self.migrations_table.c.version)).scalars())
        for version, name, migrate in MIGRATIONS:
            if version in done:
                continue
            logger.info("celery-persist: applying SQL migration %d (%s) on %s", version, name, self.name)
            migrate(self, conn)
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
        return None if row is None else self._record(row)

    def delete(self, key_hash: str) -> bool:
        t, b = self.table, self.blobs
        if self._delete_one is not None:
            with self._connect(write=True) as conn:
                return conn.execute(self._delete_one, {"key_hash": key_hash}).rowcount == 1
        with self._connect(write=True, transaction=True) as conn:
            found = conn.execute(sa.delete(t).where(t.c.key_hash == key_hash)).rowcount == 1
            conn.execute(sa.delete(b).where(b.c.key_hash == key_hash))
            return found

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
        t, b = self.table, self.blobs
        if self.dialect in _MYSQL:
            # PyMySQL sends bytes as hex: comparing with old_blob would send 40 MB for
            # a 10 MB swap (~650 ms here); comparing digests, the server hashes the
            # stored blob and only the new one is sent (~300 ms).
            same = sa.func.unhex(sa.func.sha2(b.c.blob, 256)) == hashlib.sha256(old_blob).digest()
        else:
            # PostgreSQL gains little from the digest (~10%: binary parameters are cheap),
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
            conn.execute(sa.update(t).where(t.c.key_hash == key_hash).values(updated_at=now))
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


def _on_sqlite_begin(conn: Connection) -> None:
    conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("persist_write") else "BEGIN")


def _on_psycopg_execute(conn: Connection, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool) -> None:
    if context is not None and context.execution_options.get("persist_binary"):
        from psycopg import pq

        cursor.format = pq.Format.BINARY


# -- migrations ---------------------------------------------------------------------------------
# Each is idempotent (a crash between a migration and its row in <prefix>migrations
# re-runs it) and runs inside setup()'s lock. Append; never edit a released one.


def _records_table(
    md: sa.MetaData, name: str, prefix: str, table_args: dict[str, Any], *, with_blob: bool, indexes: bool = True
) -> sa.Table:
    """The records table; ``with_blob``: as migrations 1 and 2 left it, the blob in the row."""
    blob = [sa.Column("blob", _BLOB, nullable=False)] if with_blob else []
    t = sa.Table(
        name,
        md,
        sa.Column("key_hash", _KEY, primary_key=True),
        sa.Column("kind", _WORD, nullable=False),
        sa.Column("status", _WORD, nullable=False),
        *blob,
        sa.Column("metadata", _TEXT, nullable=False),
        sa.Column("created_at", sa.Double(), nullable=False),
        sa.Column("expires_at", sa.Double(), nullable=True),
        sa.Column("due_at", sa.Double(), nullable=True),
        sa.Column("updated_at", sa.Double(), nullable=False),
        **table_args,
    )
    if indexes:
        sa.Index(f"{prefix}due_ix", t.c.due_at, t.c.key_hash)
        sa.Index(f"{prefix}scan_ix", t.c.kind, t.c.status, t.c.key_hash)
    return t


def _legacy_records(store: SQLStore) -> sa.Table:
    return _records_table(sa.MetaData(), store.table.name, store.prefix, store._table_args, with_blob=True)


def _has_column(conn: Connection, table: str, column: str) -> bool:
    return any(c["name"] == column for c in sa.inspect(conn).get_columns(table))


def _create_records(store: SQLStore, conn: Connection) -> None:
    # Released with the blob in the row; a new database gets that table too and
    # migration 3 moves the blobs out, so old and new databases take one path.
    records = _legacy_records(store)
    records.create(conn, checkfirst=True)
    existing = {ix["name"] for ix in sa.inspect(conn).get_indexes(records.name)}
    for index in records.indexes:
        if index.name not in existing:
            index.create(conn)


def _blob_storage_external(store: SQLStore, conn: Connection) -> None:
    # The column is gone once migration 3 ran; a re-run (migration rows lost) skips it.
    if store.dialect == "postgresql" and _has_column(conn, store.table.name, "blob"):
        _storage_external(conn, store.table)


def _storage_external(conn: Connection, table: sa.Table) -> None:
    q = conn.dialect.identifier_preparer
    conn.exec_driver_sql(f"ALTER TABLE {q.format_table(table)} ALTER COLUMN {q.quote('blob')} SET STORAGE EXTERNAL")


def _move_blobs(store: SQLStore, conn: Connection) -> None:
    q = conn.dialect.identifier_preparer
    store.blobs.create(conn, checkfirst=True)
    if store.dialect == "postgresql":
        _storage_external(conn, store.blobs)
    if not _has_column(conn, store.table.name, "blob"):
        return
    old = _legacy_records(store)
    if store.dialect == "postgresql":
        # Writers of the previous release wait until the column is gone, rather
        # than writing a blob after the copy that the DROP COLUMN would lose.
        conn.exec_driver_sql(f"LOCK TABLE {q.format_table(old)} IN SHARE ROW EXCLUSIVE MODE")
    # An upsert: on MySQL the DROP below commits on its own, so a crash can leave
    # the copy done and the column still there; the re-run copies over it.
    conn.execute(store._build_upsert(store.blobs, sa.select(old.c.key_hash, old.c.blob)))
    if store.dialect != "sqlite":
        conn.exec_driver_sql(f"ALTER TABLE {q.format_table(old)} DROP COLUMN {q.quote('blob')}")
        return
    # SQLite gained DROP COLUMN in 3.35 (2021), and Python 3.11 may link an older
    # one (Ubuntu 20.04: 3.31, RHEL 8: 3.26). The rebuild SQLite documents works on
    # all of them, and writes only the small columns where DROP COLUMN would
    # rewrite every row, blob included. It runs inside setup()'s transaction.
    new = _records_table(sa.MetaData(), f"{store.prefix}records_v3", store.prefix, {}, with_blob=False, indexes=False)
    new.create(conn)
    names = [c.name for c in new.c]
    conn.execute(sa.insert(new).from_select(names, sa.select(*(old.c[n] for n in names))))
    old.drop(conn)
    conn.exec_driver_sql(f"ALTER TABLE {q.format_table(new)} RENAME TO {q.format_table(store.table)}")
    for index in store.table.indexes:
        index.create(conn)


#: (version, name, function(store, connection)): applied in order by :meth:`SQLStore.setup`.
MIGRATIONS: Sequence[tuple[int, str, Callable[[SQLStore, Connection], None]]] = (
    (1, "records table and indexes", _create_records),
    (2, "postgresql: blob storage external (no pglz on compressed blobs)", _blob_storage_external),
    (3, "blobs in their own table (a status change no longer rewrites the blob)", _move_blobs),
)
