"""SQL backends: SQLite in a temp dir, PostgreSQL and MariaDB servers.

URLs come from ``CELERY_PERSIST_TEST_SQLITE_URL``, ``CELERY_PERSIST_TEST_POSTGRESQL_URL``
(default ``postgresql://127.0.0.1/test``) and ``CELERY_PERSIST_TEST_MARIADB_URL``
(default ``mysql://root@127.0.0.1:3306/test``). Each test gets its own table
prefix; teardown drops that test's tables.
"""

from __future__ import annotations

import atexit
import functools
import importlib
import os
import shutil
import socket
import tempfile
from typing import Any

import sqlalchemy as sa
from sqlalchemy import make_url

from . import BAD_METADATA, BAD_STATUS, Backend

POSTGRES_URL = os.environ.get("CELERY_PERSIST_TEST_POSTGRESQL_URL", "postgresql://127.0.0.1/test")
MARIADB_URL = os.environ.get("CELERY_PERSIST_TEST_MARIADB_URL", "mysql://root@127.0.0.1:3306/test")
#: The 10 MB contract test needs 2 x 10 MB + headroom: PyMySQL sends bytes as hex.
MARIADB_MIN_PACKET = 64 * 1024 * 1024


@functools.cache
def _sqlite_dir() -> str:
    path = tempfile.mkdtemp(prefix="celery-persist-sqlite-")
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def sqlite_url() -> str:
    return os.environ.get("CELERY_PERSIST_TEST_SQLITE_URL") or f"sqlite:///{_sqlite_dir()}/contract.db"


def _reachable(url: str, default_port: int, driver: str) -> str | None:
    try:
        importlib.import_module(driver)
    except ImportError:
        return f"driver {driver!r} is not installed"
    parsed = make_url(url)
    host, port = parsed.host or "127.0.0.1", parsed.port or default_port
    try:
        socket.create_connection((host, port), timeout=2).close()
    except OSError as exc:
        return f"no server at {host}:{port} ({exc.strerror or exc})"
    return None


@functools.cache
def mariadb_url() -> str:
    """The MariaDB URL, after making sure the server accepts a 10 MB blob.

    A test server started with defaults has ``max_allowed_packet`` = 16 MB, too
    small for PyMySQL's hex-encoded 10 MB blob; raise it (root on a test server).
    """
    import pymysql

    parsed = make_url(MARIADB_URL)
    conn = pymysql.connect(
        host=parsed.host or "127.0.0.1",
        port=parsed.port or 3306,
        user=parsed.username or "root",
        password=parsed.password or "",
        database=parsed.database,
    )
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT @@GLOBAL.max_allowed_packet")
            row = cur.fetchone()
            if row is not None and int(row[0]) < MARIADB_MIN_PACKET:
                cur.execute(f"SET GLOBAL max_allowed_packet = {MARIADB_MIN_PACKET}")
    finally:
        conn.close()
    return MARIADB_URL


def drop_tables(store: Any) -> None:
    store.drop()


def corrupt(store: Any, key_hash: str, how: str) -> None:
    """One UPDATE of the record row. Every column is NOT NULL or typed, so ``field`` stores
    text in ``created_at`` where SQLite's dynamic typing keeps it, and an unknown kind elsewhere."""
    t = store.table
    with store._connect(write=True) as conn:
        if how == "field" and store.dialect == "sqlite":
            conn.execute(sa.text(f"UPDATE {t.name} SET created_at = 'soon' WHERE key_hash = :k"), {"k": key_hash})
            return
        values = {"metadata": {"metadata": BAD_METADATA}, "status": {"status": BAD_STATUS}, "field": {"kind": "gadget"}}[how]
        conn.execute(sa.update(t).where(t.c.key_hash == key_hash).values(**values))


BACKENDS = [
    Backend("sqlite", url=sqlite_url, teardown=drop_tables, corrupt=corrupt),
    Backend(
        "postgres",
        url=lambda: POSTGRES_URL,
        available=lambda: _reachable(POSTGRES_URL, 5432, "psycopg"),
        teardown=drop_tables,
        corrupt=corrupt,
    ),
    Backend(
        "mariadb",
        url=mariadb_url,
        available=lambda: _reachable(MARIADB_URL, 3306, "pymysql"),
        teardown=drop_tables,
        corrupt=corrupt,
    ),
]
