"""The SQL store's tables, and the numbered migrations that bring a database to them.

Tables: ``<prefix>records(key_hash PK, kind, status, metadata (JSON text),
created_at, expires_at, due_at, updated_at, version, seal)`` with times as float8,
``version`` a big integer and ``seal`` a string of at most 255 characters (both
``NOT NULL``, default ``0`` / ``''``), an index on
``(due_at, key_hash)`` (so ``due()`` is an index range scan, O(due records)) and one
on ``(kind, status, key_hash)`` for filtered listings; ``<prefix>blobs(key_hash PK,
blob)``, written in the same transaction as its record; ``<prefix>migrations(version,
name, applied_at)``. The blob has a table of its own because SQLite rewrites a whole
row on any UPDATE: with the blob in the record row, every status change rewrote the
blob. On PostgreSQL the blob column is ``STORAGE EXTERNAL``: blobs arrive compressed
and encrypted, and TOAST's pglz pass over them costs time for nothing.

:meth:`SQLStore.setup() <celery_persist.stores.sql.SQLStore.setup>` applies the
:data:`MIGRATIONS` not yet recorded in ``<prefix>migrations``, in order, under a lock. Each
is idempotent (a crash between a migration and its row re-runs it). Append; never
edit a released one.

Upgrading from schema 2 (blobs in the records row): migration 3 creates ``<prefix>blobs``,
copies every blob into it, and removes the ``blob`` column. PostgreSQL and MySQL use
``ALTER TABLE ... DROP COLUMN`` (PostgreSQL frees the old values as rows are rewritten
and vacuumed; MariaDB may drop the column instantly and free them at the next table
rebuild, e.g. ``OPTIMIZE TABLE``). SQLite only gained ``DROP COLUMN`` in 3.35 and
Python 3.11 may be linked against an older one, so the records table is rebuilt the
way SQLite documents (create the new table, copy the small columns, drop the old one,
rename, re-create the indexes); the file keeps its size (``VACUUM`` shrinks it). On
SQLite and PostgreSQL the upgrade is one transaction (SQLite's WAL grows to the size
of the blobs until the next checkpoint); it copies every blob once. Stop the workers
of the previous release first: their writes fail once the column is gone (on
PostgreSQL they wait for the migration to finish; on MySQL, whose DDL commits on its
own, a blob written between the copy and the ``DROP COLUMN`` is lost).

Upgrading from schema 3: migration 4 adds ``version`` and ``seal`` with ``ALTER TABLE ...
ADD COLUMN ... NOT NULL DEFAULT``, which none of the three databases answers by rewriting
the table (PostgreSQL 11+ and MariaDB 10.3+ store the default in the catalogue, SQLite
in the schema). Existing records read back with version 0 and an empty seal, as records
written before those fields existed must. Workers of the previous release still write,
but an upsert of theirs leaves both columns as they were, so stop them first here too.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.dialects import mysql, postgresql, sqlite

from ..errors import ConfigurationError

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection

__all__ = ["Schema", "MIGRATIONS", "MYSQL"]

#: Dialect names served by the MySQL code paths.
MYSQL = ("mysql", "mariadb")

_KEY = (
    sa.String(64)
    .with_variant(postgresql.VARCHAR(64, collation="C"), "postgresql")
    .with_variant(mysql.VARCHAR(64, charset="ascii", collation="ascii_bin"), "mysql", "mariadb")
)
_WORD = sa.String(16).with_variant(mysql.VARCHAR(16, charset="ascii", collation="ascii_bin"), "mysql", "mariadb")
_BLOB = sa.LargeBinary().with_variant(mysql.LONGBLOB(), "mysql", "mariadb")
_TEXT = sa.Text().with_variant(mysql.MEDIUMTEXT(), "mysql", "mariadb")
_VERSION = sa.BigInteger()
# A string with a literal DEFAULT everywhere: MySQL refuses one on TEXT columns.
_SEAL = sa.String(255)
#: The columns migration 4 adds: name -> (type, SQL default).
_SEAL_COLUMNS: dict[str, tuple[sa.types.TypeEngine[Any], str]] = {"version": (_VERSION, "0"), "seal": (_SEAL, "''")}


@dataclass(frozen=True, slots=True)
class Schema:
    """The tables of one store prefix on one SQL dialect.

    Attributes:
        dialect: SQLAlchemy backend name (``sqlite``, ``postgresql``, ``mysql``, ``mariadb``).
        prefix: Table name prefix.
        table_args: Dialect keyword arguments every table gets (InnoDB, utf8mb4 on MySQL).
        records: ``<prefix>records``, as the latest migration leaves it.
        blobs: ``<prefix>blobs``.
        migrations: ``<prefix>migrations``: one row per applied migration.
    """

    dialect: str
    prefix: str
    table_args: dict[str, Any]
    records: sa.Table
    blobs: sa.Table
    migrations: sa.Table

    @classmethod
    def build(cls, dialect: str, prefix: str) -> Schema:
        md = sa.MetaData()
        table_args: dict[str, Any] = {"mysql_engine": "InnoDB", "mysql_charset": "utf8mb4"} if dialect in MYSQL else {}
        return cls(
            dialect,
            prefix,
            table_args,
            records_table(md, f"{prefix}records", prefix, table_args, with_blob=False, with_seal=True),
            sa.Table(
                f"{prefix}blobs",
                md,
                sa.Column("key_hash", _KEY, primary_key=True),
                sa.Column("blob", _BLOB, nullable=False),
                **table_args,
            ),
            sa.Table(
                f"{prefix}migrations",
                md,
                sa.Column("version", sa.Integer(), primary_key=True, autoincrement=False),
                sa.Column("name", sa.String(100), nullable=False),
                sa.Column("applied_at", sa.DateTime(), nullable=False, server_default=sa.func.current_timestamp()),
                **table_args,
            ),
        )

    def upsert(self, table: sa.Table, rows: sa.Select[Any] | None = None) -> Any:
        """``INSERT`` that replaces every column of an existing row with the same key.

        ``rows``: insert the result of this SELECT (same column order) instead of parameters.

        Raises:
            ConfigurationError: The dialect is not one this store supports.
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
        if self.dialect in MYSQL:
            my = mysql.insert(table)
            if rows is not None:
                my = my.from_select(names, rows)
            return my.on_duplicate_key_update({n: my.inserted[n] for n in updated})
        raise ConfigurationError(f"the SQL store supports sqlite, postgresql, mysql and mariadb, not {self.dialect!r}")

    def legacy_records(self) -> sa.Table:
        """The records table as migrations 1 and 2 left it: the blob in the row."""
        return records_table(sa.MetaData(), self.records.name, self.prefix, self.table_args, with_blob=True, with_seal=False)


def records_table(
    md: sa.MetaData, name: str, prefix: str, table_args: dict[str, Any], *, with_blob: bool, with_seal: bool, indexes: bool = True
) -> sa.Table:
    """The records table; ``with_blob``: as migrations 1 and 2 left it, the blob in the row;
    ``with_seal``: with the ``version`` and ``seal`` columns of migration 4."""
    blob = [sa.Column("blob", _BLOB, nullable=False)] if with_blob else []
    sealed = (
        [sa.Column(col, kind, nullable=False, server_default=sa.text(default)) for col, (kind, default) in _SEAL_COLUMNS.items()]
        if with_seal
        else []
    )
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
        *sealed,
        **table_args,
    )
    if indexes:
        sa.Index(f"{prefix}due_ix", t.c.due_at, t.c.key_hash)
        sa.Index(f"{prefix}scan_ix", t.c.kind, t.c.status, t.c.key_hash)
    return t


# -- the migrations -------------------------------------------------------------------------------
# Each runs inside setup()'s lock and transaction, and must be idempotent.


def _has_column(conn: Connection, table: str, column: str) -> bool:
    return any(c["name"] == column for c in sa.inspect(conn).get_columns(table))


def _create_records(schema: Schema, conn: Connection) -> None:
    # Released with the blob in the row; a new database gets that table too and
    # migration 3 moves the blobs out, so old and new databases take one path.
    records = schema.legacy_records()
    records.create(conn, checkfirst=True)
    existing = {ix["name"] for ix in sa.inspect(conn).get_indexes(records.name)}
    for index in records.indexes:
        if index.name not in existing:
            index.create(conn)


def _blob_storage_external(schema: Schema, conn: Connection) -> None:
    # The column is gone once migration 3 ran; a re-run (migration rows lost) skips it.
    if schema.dialect == "postgresql" and _has_column(conn, schema.records.name, "blob"):
        _storage_external(conn, schema.records)


def _storage_external(conn: Connection, table: sa.Table) -> None:
    q = conn.dialect.identifier_preparer
    conn.exec_driver_sql(f"ALTER TABLE {q.format_table(table)} ALTER COLUMN {q.quote('blob')} SET STORAGE EXTERNAL")


def _move_blobs(schema: Schema, conn: Connection) -> None:
    q = conn.dialect.identifier_preparer
    schema.blobs.create(conn, checkfirst=True)
    if schema.dialect == "postgresql":
        _storage_external(conn, schema.blobs)
    if not _has_column(conn, schema.records.name, "blob"):
        return
    old = schema.legacy_records()
    if schema.dialect == "postgresql":
        # Writers of the previous release wait until the column is gone, rather
        # than writing a blob after the copy that the DROP COLUMN would lose.
        conn.exec_driver_sql(f"LOCK TABLE {q.format_table(old)} IN SHARE ROW EXCLUSIVE MODE")
    # An upsert: on MySQL the DROP below commits on its own, so a crash can leave
    # the copy done and the column still there; the re-run copies over it.
    conn.execute(schema.upsert(schema.blobs, sa.select(old.c.key_hash, old.c.blob)))
    if schema.dialect != "sqlite":
        conn.exec_driver_sql(f"ALTER TABLE {q.format_table(old)} DROP COLUMN {q.quote('blob')}")
        return
    _rebuild_sqlite_records(schema, conn, old)


def _rebuild_sqlite_records(schema: Schema, conn: Connection, old: sa.Table) -> None:
    # SQLite gained DROP COLUMN in 3.35 (2021), and Python 3.11 may link an older
    # one (Ubuntu 20.04: 3.31, RHEL 8: 3.26). The rebuild SQLite documents works on
    # all of them, and writes only the small columns where DROP COLUMN would
    # rewrite every row, blob included. It runs inside setup()'s transaction.
    q = conn.dialect.identifier_preparer
    new = records_table(sa.MetaData(), f"{schema.prefix}records_v3", schema.prefix, {}, with_blob=False, with_seal=False, indexes=False)
    new.create(conn)
    names = [c.name for c in new.c]
    conn.execute(sa.insert(new).from_select(names, sa.select(*(old.c[n] for n in names))))
    old.drop(conn)
    conn.exec_driver_sql(f"ALTER TABLE {q.format_table(new)} RENAME TO {q.format_table(schema.records)}")
    for index in schema.records.indexes:
        index.create(conn)


def _add_version_and_seal(schema: Schema, conn: Connection) -> None:
    # One column at a time, each only if missing: MySQL commits every ALTER on its own,
    # so a crash between the two re-runs this with one of them already there.
    q = conn.dialect.identifier_preparer
    table = q.format_table(schema.records)
    for name, (kind, default) in _SEAL_COLUMNS.items():
        if _has_column(conn, schema.records.name, name):
            continue
        ddl = kind.compile(dialect=conn.dialect)
        conn.exec_driver_sql(f"ALTER TABLE {table} ADD COLUMN {q.quote(name)} {ddl} NOT NULL DEFAULT {default}")


#: (version, name, function(schema, connection)): applied in order by ``SQLStore.setup()``.
MIGRATIONS: Sequence[tuple[int, str, Callable[[Schema, Connection], None]]] = (
    (1, "records table and indexes", _create_records),
    (2, "postgresql: blob storage external (no pglz on compressed blobs)", _blob_storage_external),
    (3, "blobs in their own table (a status change no longer rewrites the blob)", _move_blobs),
    (4, "records carry the hub's version counter and seal", _add_version_and_seal),
)
