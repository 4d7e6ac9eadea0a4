"""How :class:`~celery_persist.stores.sql.SQLStore` reaches its database: the URL and the engine.

:class:`SQLTarget` is the store URL resolved for SQLAlchemy once, when the store is
opened: ``postgres`` is ``postgresql``; PostgreSQL gets psycopg 3 when it is installed,
else psycopg2; MySQL and MariaDB get PyMySQL and ``utf8mb4``; in-memory SQLite is
refused. :meth:`SQLTarget.create_engine` builds the engine, in the process that will
use it: SQLite in WAL mode with ``BEGIN IMMEDIATE`` for writers and its file created
private (0600), PostgreSQL in autocommit, psycopg 3 reading ``bytea`` in binary where a
statement asks for it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy import exc as sa_exc

from ..errors import ConfigurationError
from .drivers import describe, mask_url, require
from .filesystem import make_private_dirs
from .sql_migrations import MYSQL

if TYPE_CHECKING:
    from sqlalchemy.engine import URL, Connection, Engine

__all__ = ["SQLTarget"]

# (module, extra) for the drivers we choose by default or know by name.
_DRIVERS: dict[str, tuple[str, str]] = {
    "psycopg": ("psycopg", "postgres"),
    "psycopg2": ("psycopg2", "psycopg2"),
    "pymysql": ("pymysql", "mysql"),
}


@dataclass(frozen=True, slots=True)
class SQLTarget:
    """The store URL, resolved for SQLAlchemy with our default driver filled in.

    Attributes:
        url: What SQLAlchemy opens, e.g. ``postgresql+psycopg://...``.
        name: The URL as given, password masked, for messages.
        dialect: SQLAlchemy backend name (``sqlite``, ``postgresql``, ``mysql``, ``mariadb``).
        driver: DBAPI driver name (``pysqlite``, ``psycopg``, ``psycopg2``, ``pymysql``...).
    """

    url: URL
    name: str
    dialect: str
    driver: str

    @classmethod
    def parse(cls, url: str) -> SQLTarget:
        """Resolve ``url``; imports nothing but checks that the driver is installed.

        Raises:
            ConfigurationError: Unparsable URL, in-memory SQLite, or a missing driver
                (the message names the extra to install).
        """
        try:
            parsed = sa.make_url(url)
        except (sa_exc.ArgumentError, ValueError) as exc:  # ValueError: a port that is not a number
            raise ConfigurationError(f"cannot parse SQL store URL {mask_url(url)!r} ({describe(exc, url=url)})") from exc
        backend, _, driver = parsed.drivername.partition("+")
        backend = backend.lower()
        if backend == "postgres":
            backend = "postgresql"
        if backend == "sqlite":
            if not parsed.database or parsed.database == ":memory:" or parsed.database.startswith("file::memory:"):
                raise ConfigurationError("an in-memory SQLite database is private to one connection: use memory:// or sqlite:///path.db")
            resolved = parsed.set(drivername="sqlite+pysqlite" if not driver else parsed.drivername)
        else:
            if backend == "postgresql" and not driver:
                driver = _postgres_driver(url)
            elif backend in MYSQL and not driver:
                driver = "pymysql"
            if driver in _DRIVERS:
                module, extra = _DRIVERS[driver]
                require(module, extra=extra, store=backend)
            if backend in MYSQL and "charset" not in parsed.query:
                parsed = parsed.update_query_dict({"charset": "utf8mb4"})
            resolved = parsed.set(drivername=f"{backend}+{driver}" if driver else backend)
        return cls(resolved, mask_url(url), resolved.get_backend_name(), resolved.get_driver_name())

    def create_engine(self, *, busy_timeout: float, connect_timeout: float, engine_options: dict[str, Any]) -> Engine:
        """A new engine (no connection yet); ``engine_options`` win over ours."""
        options: dict[str, Any] = {}
        connect_args: dict[str, Any] = {}
        if self.dialect == "sqlite":
            database = self.url.database or ""
            if not database.startswith("file:"):
                _create_private_file(os.path.abspath(database))
            connect_args = {"timeout": busy_timeout, "check_same_thread": False}
        else:
            options["pool_pre_ping"] = True
            if self.dialect == "postgresql":
                # Every operation but put_many() and setup() is one statement, atomic on
                # its own: autocommit saves the BEGIN and COMMIT round trips.
                options["isolation_level"] = "AUTOCOMMIT"
            connect_args["connect_timeout"] = max(1, int(round(connect_timeout)))
            if self.dialect in MYSQL:
                # The server drops idle connections after wait_timeout (8 h by default).
                options["pool_recycle"] = 3600
        options.update(engine_options)
        options["connect_args"] = {**connect_args, **options.get("connect_args", {})}
        eng = sa.create_engine(self.url, **options)
        if self.dialect == "sqlite":
            event.listen(eng, "connect", _on_sqlite_connect(busy_timeout))
            event.listen(eng, "begin", _on_sqlite_begin)
        elif self.driver == "psycopg":
            event.listen(eng, "before_cursor_execute", _on_psycopg_execute)
        return eng


def _create_private_file(path: str) -> None:
    """Create the SQLite database file (and its directory) readable by its owner only, if missing.

    SQLite would create it with 0644 less the umask; it gives the ``-wal``, ``-shm`` and
    ``-journal`` files it makes later the mode of the database file, so creating that
    one 0600 first makes them all private. An existing file keeps its mode.
    """
    make_private_dirs(os.path.dirname(path))
    os.close(os.open(path, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o600))


def _postgres_driver(url: str) -> str:
    """psycopg 3 when installed (binary bytea both ways), else psycopg2."""
    try:
        require("psycopg", extra="postgres", store="postgresql")
        return "psycopg"
    except ConfigurationError:
        try:
            require("psycopg2", extra="postgres", store="postgresql")
        except ConfigurationError:
            raise ConfigurationError(
                "the postgresql store needs the 'psycopg' package: pip install 'celery-persist[postgres]'",
                store=mask_url(url),
            ) from None
        return "psycopg2"


def _on_sqlite_connect(busy_timeout: float) -> Callable[[Any, Any], None]:
    """The ``connect`` hook of an SQLite engine: WAL mode and the busy timeout."""

    def on_connect(dbapi_conn: Any, _record: Any) -> None:
        # The driver's own transaction handling would BEGIN DEFERRED lazily; we
        # emit BEGIN ourselves (see _on_sqlite_begin) so writers take the lock up front.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        try:
            cur.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
            cur.execute("PRAGMA journal_mode = WAL")
        finally:
            cur.close()

    return on_connect


def _on_sqlite_begin(conn: Connection) -> None:
    conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("persist_write") else "BEGIN")


def _on_psycopg_execute(conn: Connection, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool) -> None:
    if context is not None and context.execution_options.get("persist_binary"):
        # Inside the hook: psycopg is an optional driver, and this hook is only
        # installed on engines that use it (so the import cannot fail here).
        from psycopg import pq

        cursor.format = pq.Format.BINARY
