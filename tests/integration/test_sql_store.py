"""What the SQL store promises beyond the generic contract: index use, migrations, drivers.

Runs on the SQL backends of the registry (sqlite, postgres, mariadb); the
driver tests need no server, as opening a store does not connect.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.dialects import mysql, postgresql

from celery_persist.errors import ConfigurationError
from celery_persist.stores import Kind, Status, StoredRecord, open_store
from celery_persist.stores.sql import SQLStore
from celery_persist.stores.sql_migrations import MIGRATIONS
from tests.integration.backends import Backend, all_backends

pytestmark = pytest.mark.integration

SQL_BACKENDS = [b for b in all_backends() if b.name in ("sqlite", "postgres", "mariadb")]
on_sql = pytest.mark.parametrize("backend", SQL_BACKENDS, ids=[b.name for b in SQL_BACKENDS], indirect=True)
NOW = 1_750_000_000.5


def kh(*parts: object) -> str:
    return hashlib.sha256(":".join(map(str, parts)).encode()).hexdigest()


def rec(key: str, due_at: float | None, blob: bytes = b"x" * 16) -> StoredRecord:
    return StoredRecord(key, Kind.SUSPENSION, Status.SUSPENDED, blob, {"t": 1}, NOW, due_at, due_at, NOW)


def as_sql(store: SQLStore, conn: sa.Connection, stmt: Any) -> str:
    return str(stmt.compile(dialect=conn.dialect, compile_kwargs={"literal_binds": True}))


def plan_nodes(node: Any) -> list[dict[str, Any]]:
    """Every node of a PostgreSQL JSON plan, depth first."""
    out = [node]
    for child in node.get("Plans", []):
        out.extend(plan_nodes(child))
    return out


@on_sql
def test_due_query_walks_the_due_index(backend: Backend, store: SQLStore) -> None:
    """due() reads the due records through the due index, and their blobs by primary key."""
    store.put_many(rec(kh("later", i), NOW + 10**6 + i) for i in range(20_000))
    store.put_many(rec(kh("due", i), NOW - i) for i in range(10))
    assert len(store.due(NOW, 100)) == 10
    index = f"{store.prefix}due_ix"
    records, blobs = store.table.name, store.blobs.name
    engine = store._engine()
    with engine.connect() as conn:
        sql = as_sql(store, conn, store.due_query(NOW, 100))
        if store.dialect == "sqlite":
            conn.exec_driver_sql("ANALYZE")
            steps = [str(row[-1]) for row in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + sql)]
            plan = " | ".join(steps)
            assert f"SEARCH {records} USING INDEX {index} (due_at<?)" in steps, plan
            assert f"SEARCH {blobs} USING INDEX sqlite_autoindex_{blobs}_1 (key_hash=?)" in steps, plan
            assert steps.index(f"SEARCH {records} USING INDEX {index} (due_at<?)") == 0, f"records must drive the join: {plan}"
            assert "TEMP B-TREE" not in plan, f"due() sorts instead of walking the index: {plan}"
        elif store.dialect == "postgresql":
            conn.exec_driver_sql(f"ANALYZE {records}")
            conn.exec_driver_sql(f"ANALYZE {blobs}")
            raw = conn.exec_driver_sql("EXPLAIN (ANALYZE, FORMAT JSON) " + sql).scalar()
            doc = raw if isinstance(raw, list) else json.loads(raw)
            nodes = plan_nodes(doc[0]["Plan"])
            scans = [n for n in nodes if n.get("Relation Name") == records]
            assert [n["Node Type"] for n in scans] in (["Index Scan"], ["Index Only Scan"]), nodes
            assert scans[0]["Index Name"] == index
            assert scans[0]["Actual Rows"] == 10, "the index scan touched rows that are not due"
            lookups = [n for n in nodes if n.get("Relation Name") == blobs]
            assert [n["Node Type"] for n in lookups] == ["Index Scan"], nodes
            assert lookups[0]["Index Name"] == f"{blobs}_pkey"
            assert lookups[0]["Actual Rows"] * lookups[0]["Actual Loops"] == 10, "blobs of records that are not due were read"
        else:
            conn.exec_driver_sql(f"ANALYZE TABLE {records}, {blobs}")
            rows = {r["table"]: r for r in (dict(r._mapping) for r in conn.exec_driver_sql("ANALYZE " + sql))}
            assert list(rows) == [records, blobs], f"records must drive the join: {rows}"
            assert rows[records]["key"] == index, rows
            assert float(rows[records]["r_rows"]) == 10, "the index range touched rows that are not due"
            assert (rows[blobs]["type"], rows[blobs]["key"]) == ("eq_ref", "PRIMARY"), rows


@on_sql
def test_migrations_rerun_on_the_current_schema(store: SQLStore) -> None:
    """Every migration is idempotent: with its rows lost, setup() re-runs them on a current schema."""
    assert store.schema_version() == MIGRATIONS[-1][0]
    store.put(rec(kh("kept"), NOW, b"kept blob"))
    mig = store.migrations_table
    engine = store._engine()
    index = next(ix for ix in store.table.indexes if ix.name and ix.name.endswith("due_ix"))
    # Only migration 1 recorded, the due index gone, the blob column compressible again.
    with engine.begin() as conn:
        conn.execute(sa.delete(mig).where(mig.c.version > 1))
        index.drop(conn)
        if store.dialect == "postgresql":
            conn.exec_driver_sql(f"ALTER TABLE {store.blobs.name} ALTER COLUMN blob SET STORAGE MAIN")
    assert store.health()["ok"] is False
    with engine.begin() as conn:
        conn.execute(sa.delete(mig))  # ... and even older: nothing recorded at all
    store.setup()
    assert store.schema_version() == MIGRATIONS[-1][0]
    with engine.connect() as conn:
        versions = list(conn.execute(sa.select(mig.c.version).order_by(mig.c.version)).scalars())
        assert versions == [m[0] for m in MIGRATIONS]
        names = {ix["name"] for ix in sa.inspect(conn).get_indexes(store.table.name)}
        assert index.name in names
        columns = {c["name"] for c in sa.inspect(conn).get_columns(store.table.name)}
        assert "blob" not in columns and {"version", "seal"} <= columns
        if store.dialect == "postgresql":
            assert blob_storage(conn, store.blobs.name) == "e", "blob column is not STORAGE EXTERNAL"
    assert store.get(kh("kept")) == rec(kh("kept"), NOW, b"kept blob")
    assert store.health()["ok"] is True


def blob_storage(conn: sa.Connection, table: str) -> str | None:
    return conn.exec_driver_sql(
        "SELECT attstorage FROM pg_attribute WHERE attrelid = %(t)s::regclass AND attname = 'blob'",
        {"t": table},
    ).scalar()


def release_2_tables(dialect: str, prefix: str) -> tuple[sa.Table, sa.Table]:
    """The records and migrations tables exactly as release 2 of the store created them.

    A frozen copy, deliberately not built from the store's code: the upgrade
    test must start from what deployments have, whatever the store does now.
    """
    key = (
        sa.String(64)
        .with_variant(postgresql.VARCHAR(64, collation="C"), "postgresql")
        .with_variant(mysql.VARCHAR(64, charset="ascii", collation="ascii_bin"), "mysql", "mariadb")
    )
    word = sa.String(16).with_variant(mysql.VARCHAR(16, charset="ascii", collation="ascii_bin"), "mysql", "mariadb")
    blob = sa.LargeBinary().with_variant(mysql.LONGBLOB(), "mysql", "mariadb")
    text = sa.Text().with_variant(mysql.MEDIUMTEXT(), "mysql", "mariadb")
    args: dict[str, Any] = {"mysql_engine": "InnoDB", "mysql_charset": "utf8mb4"} if dialect in ("mysql", "mariadb") else {}
    md = sa.MetaData()
    records = sa.Table(
        f"{prefix}records",
        md,
        sa.Column("key_hash", key, primary_key=True),
        sa.Column("kind", word, nullable=False),
        sa.Column("status", word, nullable=False),
        sa.Column("blob", blob, nullable=False),
        sa.Column("metadata", text, nullable=False),
        sa.Column("created_at", sa.Double(), nullable=False),
        sa.Column("expires_at", sa.Double(), nullable=True),
        sa.Column("due_at", sa.Double(), nullable=True),
        sa.Column("updated_at", sa.Double(), nullable=False),
        **args,
    )
    sa.Index(f"{prefix}due_ix", records.c.due_at, records.c.key_hash)
    sa.Index(f"{prefix}scan_ix", records.c.kind, records.c.status, records.c.key_hash)
    migrations = sa.Table(
        f"{prefix}migrations",
        md,
        sa.Column("version", sa.Integer(), primary_key=True, autoincrement=False),
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("applied_at", sa.DateTime(), nullable=False, server_default=sa.func.current_timestamp()),
        **args,
    )
    return records, migrations


@on_sql
def test_setup_upgrades_a_release_2_schema_with_records(backend: Backend, store_url: str, store_prefix: str) -> None:
    """A deployment at migration 2 (blobs in the records row) upgrades in place, every record intact."""
    prefix = store_prefix + "v2_"
    store = open_store(store_url, prefix=prefix, **backend.options)
    assert isinstance(store, SQLStore)
    ten_mb = os.urandom(10 * 1024 * 1024)
    old = [
        StoredRecord(kh("v2", "big"), Kind.SUSPENSION, Status.SUSPENDED, ten_mb, {"task": "t", "f": 1 / 3}, NOW, NOW + 60, NOW + 60, NOW),
        StoredRecord(kh("v2", "empty"), Kind.SUSPENSION, Status.CLAIMED, b"", {"p": "ünï ✓"}, NOW, NOW + 90, NOW - 5, NOW + 1),
        StoredRecord(kh("v2", "ckpt"), Kind.CHECKPOINT, Status.ACTIVE, bytes(range(256)) * 5, {}, NOW, None, None, NOW + 2),
        StoredRecord(kh("v2", "done"), Kind.SUSPENSION, Status.RESUMED, b"done", {"r": [1, None]}, NOW, NOW + 60, NOW + 86400, NOW + 3),
        *(rec(kh("v2", "many", i), NOW + 10 + i, b"b%d" % i) for i in range(50)),
    ]
    try:
        with store._engine().begin() as conn:
            records, migrations = release_2_tables(store.dialect, prefix)
            records.metadata.create_all(conn)
            if store.dialect == "postgresql":
                conn.exec_driver_sql(f"ALTER TABLE {records.name} ALTER COLUMN blob SET STORAGE EXTERNAL")
            conn.execute(
                sa.insert(migrations),
                [{"version": 1, "name": "records table and indexes"}, {"version": 2, "name": "postgresql: blob storage external"}],
            )
            for r in old:
                conn.execute(
                    sa.insert(records).values(
                        key_hash=r.key_hash,
                        kind=str(r.kind),
                        status=str(r.status),
                        blob=r.blob,
                        metadata=json.dumps(dict(r.metadata), sort_keys=True, separators=(",", ":"), ensure_ascii=False),
                        created_at=r.created_at,
                        expires_at=r.expires_at,
                        due_at=r.due_at,
                        updated_at=r.updated_at,
                    )
                )
        assert store.schema_version() == 2
        assert store.health()["ok"] is False

        store.setup()

        assert store.schema_version() == MIGRATIONS[-1][0]
        assert store.health()["ok"] is True
        with store._engine().connect() as conn:
            inspector = sa.inspect(conn)
            assert "blob" not in {c["name"] for c in inspector.get_columns(store.table.name)}
            assert {ix["name"] for ix in inspector.get_indexes(store.table.name)} >= {f"{prefix}due_ix", f"{prefix}scan_ix"}
            assert conn.execute(sa.select(sa.func.count()).select_from(store.blobs)).scalar() == len(old)
            if store.dialect == "postgresql":
                assert blob_storage(conn, store.blobs.name) == "e"
        for r in old:
            assert store.get(r.key_hash) == r, r.key_hash
        by_key = sorted(old, key=lambda r: r.key_hash)
        assert list(store.scan(limit=1000, with_blob=True).items) == by_key
        assert list(store.scan(limit=1000).items) == [r.replace(blob=b"") for r in by_key]
        due = [r for r in old if r.due_at is not None and r.due_at <= NOW + 60]
        assert len(due) == 52
        assert store.due(NOW + 60) == sorted(due, key=lambda r: (r.due_at, r.key_hash))

        # The upgraded store works as a new one does, and setup() stays idempotent.
        assert store.transition(kh("v2", "big"), {Status.SUSPENDED}, Status.CLAIMED, due_at=NOW + 120, now=NOW + 4)
        assert store.replace_blob(kh("v2", "done"), b"done", b"rotated", now=NOW + 5)
        assert store.delete(kh("v2", "ckpt"))
        store.setup()
        assert store.get(kh("v2", "big")) == old[0].replace(status=Status.CLAIMED, due_at=NOW + 120, updated_at=NOW + 4)
        assert store.get(kh("v2", "done")) == old[3].replace(blob=b"rotated", updated_at=NOW + 5)
        assert store.get(kh("v2", "ckpt")) is None
    finally:
        store.drop()
        store.close()


def release_3_tables(dialect: str, prefix: str) -> tuple[sa.Table, sa.Table, sa.Table]:
    """The records, blobs and migrations tables as release 3 of the store left them (a frozen copy,
    as :func:`release_2_tables`): the blob in a table of its own, no version or seal."""
    records, migrations = release_2_tables(dialect, prefix)
    md = sa.MetaData()
    records_3 = sa.Table(records.name, md, *(c._copy() for c in records.c if c.name != "blob"), **records.kwargs)
    sa.Index(f"{prefix}due_ix", records_3.c.due_at, records_3.c.key_hash)
    sa.Index(f"{prefix}scan_ix", records_3.c.kind, records_3.c.status, records_3.c.key_hash)
    blobs = sa.Table(f"{prefix}blobs", md, records.c.key_hash._copy(), records.c.blob._copy(), **records.kwargs)
    migrations_3 = migrations.to_metadata(md)
    return records_3, blobs, migrations_3


@on_sql
def test_setup_upgrades_a_release_3_schema_with_records(backend: Backend, store_url: str, store_prefix: str) -> None:
    """A deployment at migration 3 gains version and seal in place; its records read back as version 0, seal ""."""
    prefix = store_prefix + "v3_"
    store = open_store(store_url, prefix=prefix, **backend.options)
    assert isinstance(store, SQLStore)
    old = [
        StoredRecord(kh("v3", "a"), Kind.SUSPENSION, Status.SUSPENDED, b"a-blob", {"task": "t"}, NOW, NOW + 60, NOW + 60, NOW),
        StoredRecord(kh("v3", "b"), Kind.SUSPENSION, Status.CLAIMED, b"", {}, NOW, NOW + 90, NOW - 5, NOW + 1),
        StoredRecord(kh("v3", "c"), Kind.CHECKPOINT, Status.ACTIVE, bytes(range(256)), {"n": None}, NOW, None, None, NOW + 2),
    ]
    try:
        with store._engine().begin() as conn:
            records, blobs, migrations = release_3_tables(store.dialect, prefix)
            records.metadata.create_all(conn)
            conn.execute(
                sa.insert(migrations),
                [
                    {"version": 1, "name": "records table and indexes"},
                    {"version": 2, "name": "postgresql: blob storage external (no pglz on compressed blobs)"},
                    {"version": 3, "name": "blobs in their own table (a status change no longer rewrites the blob)"},
                ],
            )
            for r in old:
                conn.execute(
                    sa.insert(records).values(
                        key_hash=r.key_hash,
                        kind=str(r.kind),
                        status=str(r.status),
                        metadata=json.dumps(dict(r.metadata), sort_keys=True, separators=(",", ":"), ensure_ascii=False),
                        created_at=r.created_at,
                        expires_at=r.expires_at,
                        due_at=r.due_at,
                        updated_at=r.updated_at,
                    )
                )
                conn.execute(sa.insert(blobs).values(key_hash=r.key_hash, blob=r.blob))
        assert store.schema_version() == 3
        assert store.health()["ok"] is False

        store.setup()

        assert store.schema_version() == MIGRATIONS[-1][0] == 4
        assert store.health()["ok"] is True
        with store._engine().connect() as conn:
            columns = {c["name"]: c for c in sa.inspect(conn).get_columns(store.table.name)}
            assert not columns["version"]["nullable"] and not columns["seal"]["nullable"]
        for r in old:
            got = store.get(r.key_hash)
            assert got == r and (got.version, got.seal) == (0, ""), r.key_hash
        by_key = sorted(old, key=lambda r: r.key_hash)
        assert list(store.scan(limit=10, with_blob=True).items) == by_key
        assert store.due(NOW + 60) == [old[1], old[0]]

        # The upgraded records take part in the version compare-and-set as version 0.
        a = old[0].key_hash
        assert not store.transition(a, {Status.SUSPENDED}, Status.CLAIMED, now=NOW + 3, version=2, seal="s2", expect_version=1)
        assert store.transition(a, {Status.SUSPENDED}, Status.CLAIMED, now=NOW + 3, version=1, seal="s1", expect_version=0)
        assert store.get(a) == old[0].replace(status=Status.CLAIMED, updated_at=NOW + 3, version=1, seal="s1")
        store.setup()  # idempotent
        assert store.get(a) == old[0].replace(status=Status.CLAIMED, updated_at=NOW + 3, version=1, seal="s1")
    finally:
        store.drop()
        store.close()


def test_sqlite_files_and_directories_are_private(tmp_path: Path) -> None:
    """The database, its -wal / -shm / -journal files 0600 and the directories the store creates 0700,
    whatever the umask would have allowed."""
    old_umask = os.umask(0o022)
    try:
        path = tmp_path / "new" / "parents" / "persist.db"
        store = open_store(f"sqlite:///{path}")
        try:
            store.setup()
            store.put(rec(kh("private"), NOW))
            assert store.transition(kh("private"), {Status.SUSPENDED}, Status.CLAIMED, now=NOW, version=1, seal="s")
            files = sorted(path.parent.glob(path.name + "*"))
            assert {f.name for f in files} >= {"persist.db", "persist.db-wal", "persist.db-shm"}
            assert {f.name: oct(f.stat().st_mode & 0o777) for f in files if f.stat().st_mode & 0o777 != 0o600} == {}
        finally:
            store.close()
    finally:
        os.umask(old_umask)
    for directory in (tmp_path / "new", tmp_path / "new" / "parents"):
        assert directory.stat().st_mode & 0o777 == 0o700, directory
    # A rollback journal (another client in journal_mode=DELETE) gets the database's mode too.
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode = DELETE")
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("CREATE TABLE journal_probe (x)")
        journal = path.parent / (path.name + "-journal")
        assert journal.stat().st_mode & 0o777 == 0o600
        conn.execute("ROLLBACK")
    finally:
        conn.close()
    assert path.stat().st_mode & 0o777 == 0o600


def test_sqlite_keeps_the_mode_of_an_existing_database(tmp_path: Path) -> None:
    """An operator's choice stands: only files the store creates are made private."""
    path = tmp_path / "shared.db"
    path.touch()
    path.chmod(0o640)
    store = open_store(f"sqlite:///{path}")
    try:
        store.setup()
    finally:
        store.close()
    assert path.stat().st_mode & 0o777 == 0o640


def count_blob_writes(store: SQLStore, conn: sa.Connection, counter: str) -> list[str]:
    """Triggers adding a row to ``counter`` for every row inserted, updated or deleted in the blobs table.

    Returns the statements that remove what the blobs table's own drop does not.
    """
    blobs = store.blobs.name
    conn.exec_driver_sql(f"CREATE TABLE {counter} (op VARCHAR(8) NOT NULL)")
    events = ("INSERT", "UPDATE", "DELETE")
    if store.dialect == "sqlite":
        for ev in events:
            conn.exec_driver_sql(
                f"CREATE TRIGGER {counter}_{ev.lower()} AFTER {ev} ON {blobs} BEGIN INSERT INTO {counter} VALUES ('{ev}'); END"
            )
        return [f"DROP TABLE {counter}"]
    if store.dialect == "postgresql":
        conn.exec_driver_sql(
            f"CREATE FUNCTION {counter}_fn() RETURNS trigger LANGUAGE plpgsql AS "
            f"$$ BEGIN INSERT INTO {counter} VALUES (TG_OP); RETURN NULL; END $$"
        )
        conn.exec_driver_sql(
            f"CREATE TRIGGER {counter}_trg AFTER INSERT OR UPDATE OR DELETE ON {blobs} FOR EACH ROW EXECUTE FUNCTION {counter}_fn()"
        )
        return [f"DROP TABLE {counter}", f"DROP FUNCTION IF EXISTS {counter}_fn() CASCADE"]
    for ev in events:  # MySQL: one event per trigger
        conn.exec_driver_sql(
            f"CREATE TRIGGER {counter}_{ev.lower()} AFTER {ev} ON {blobs} FOR EACH ROW INSERT INTO {counter} VALUES ('{ev}')"
        )
    return [f"DROP TABLE {counter}"]


@on_sql
def test_transition_never_writes_the_blob(store: SQLStore) -> None:
    """Status changes touch the record row only; the 10 MB blob row is not rewritten."""
    key = kh("big")
    blob = os.urandom(10 * 1024 * 1024)
    counter = f"{store.prefix}blob_writes"
    engine = store._engine()
    with engine.begin() as conn:
        cleanup = count_blob_writes(store, conn, counter)
    try:

        def writes() -> list[str]:
            with engine.begin() as conn:
                ops = [str(op) for op in conn.exec_driver_sql(f"SELECT op FROM {counter}").scalars()]
                conn.exec_driver_sql(f"DELETE FROM {counter}")
            return ops

        store.put(rec(key, NOW + 60, blob))
        assert writes() == ["INSERT"], "the counting triggers do not see the store's writes"
        assert store.transition(key, {Status.SUSPENDED}, Status.CLAIMED, due_at=NOW + 90, now=NOW + 1)
        assert store.transition(key, {Status.CLAIMED}, Status.SUSPENDED, now=NOW + 2)
        assert store.transition(key, {Status.SUSPENDED}, Status.CLAIMED, due_at=None, now=NOW + 3)
        assert store.transition(key, {Status.CLAIMED}, Status.RESUMED, due_at=NOW + 86400, now=NOW + 4)
        assert not store.transition(key, {Status.SUSPENDED}, Status.CLAIMED, now=NOW + 5)
        assert writes() == [], "a transition wrote to the blobs table"
        got = store.get(key)
        assert got is not None and got.blob == blob and got.status is Status.RESUMED and got.updated_at == NOW + 4
        # The same triggers do count a blob change, so the empty list above means something.
        assert store.replace_blob(key, blob, b"rotated", now=NOW + 6)
        assert writes() == ["UPDATE"]
        assert store.delete(key)
        assert writes() == ["DELETE"]
    finally:
        with engine.begin() as conn:
            for stmt in cleanup:
                conn.exec_driver_sql(stmt)


@pytest.mark.parametrize("backend", [b for b in SQL_BACKENDS if b.name == "sqlite"], ids=["sqlite"], indirect=True)
def test_sqlite_transition_of_a_10mb_record_writes_a_few_pages(store: SQLStore) -> None:
    """SQLite rewrites a whole row on UPDATE: with the blob in the row a transition wrote ~2,600 pages."""
    key = kh("big")
    store.put(rec(key, NOW + 60, os.urandom(10 * 1024 * 1024)))
    with store._engine().connect() as conn:
        page_size = int(conn.exec_driver_sql("PRAGMA page_size").scalar() or 0)
        busy, _, _ = conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)").one()
        assert busy == 0, "another connection kept the WAL from being emptied"
        conn.commit()
        assert store.transition(key, {Status.SUSPENDED}, Status.CLAIMED, due_at=NOW + 90, now=NOW + 1)
        _, frames, _ = conn.exec_driver_sql("PRAGMA wal_checkpoint(PASSIVE)").one()
    assert 0 < frames <= 16, f"a transition wrote {frames} pages of {page_size} bytes"


@on_sql
def test_replace_blob_race_has_one_winner(backend: Backend, store: SQLStore, store_url: str, store_prefix: str) -> None:
    key = kh("rotate")
    old = os.urandom(64 * 1024)
    store.put(rec(key, NOW, old))
    racers = [open_store(store_url, prefix=store_prefix, **backend.options) for _ in range(6)]
    barrier = threading.Barrier(len(racers))
    won: list[int] = []
    errors: list[BaseException] = []

    def run(i: int, s: Any) -> None:
        try:
            barrier.wait(timeout=30)
            if s.replace_blob(key, old, b"new-%d" % i, now=NOW + i):
                won.append(i)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i, s)) for i, s in enumerate(racers)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    finally:
        for s in racers:
            s.close()
    assert not errors, errors
    assert len(won) == 1, won
    assert store.get(key) == rec(key, NOW, b"new-%d" % won[0]).replace(updated_at=NOW + won[0])


@on_sql
def test_writers_of_both_tables_do_not_deadlock(backend: Backend, store: SQLStore, store_url: str, store_prefix: str) -> None:
    """put, delete, replace_blob and transition hammer the same keys; one lock order means no deadlock errors."""
    keys = [kh("hot", i) for i in range(3)]
    rounds = 150
    errors: list[BaseException] = []
    done = [0, 0, 0, 0]

    def worker(role: int) -> None:
        s = open_store(store_url, prefix=store_prefix, **backend.options)
        try:
            for n in range(rounds):
                k = keys[n % len(keys)]
                if role == 0:
                    s.put(rec(k, NOW + n, b"put-%d" % n))
                elif role == 1:
                    s.delete(k)
                elif role == 2:
                    current = s.get(k)
                    if current is not None:
                        s.replace_blob(k, current.blob, b"rotated-%d" % n, now=NOW + n)
                else:
                    s.transition(k, {Status.SUSPENDED, Status.CLAIMED}, Status.CLAIMED, due_at=NOW + n, now=NOW + n)
                done[role] += 1
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        finally:
            s.close()

    threads = [threading.Thread(target=worker, args=(role,)) for role in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=240)
    assert not errors, errors
    assert done == [rounds] * 4
    for k in keys:  # whatever survived is whole: a record never lacks its blob, nor a blob its record
        got = store.get(k)
        listed = [r.key_hash for r in store.scan(limit=10).items]
        assert (got is None) == (k not in listed)
    with store._engine().connect() as conn:
        orphans = conn.execute(
            sa.select(sa.func.count()).select_from(store.blobs).where(~store.blobs.c.key_hash.in_(sa.select(store.table.c.key_hash)))
        ).scalar()
    assert orphans == 0


@on_sql
def test_concurrent_setup_on_a_fresh_prefix(backend: Backend, store_url: str, store_prefix: str) -> None:
    prefix = store_prefix + "c_"
    stores = [open_store(store_url, prefix=prefix, **backend.options) for _ in range(6)]
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(stores))

    def run(s: Any) -> None:
        try:
            barrier.wait(timeout=30)
            s.setup()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(s,)) for s in stores]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not errors, errors
        assert all(s.schema_version() == MIGRATIONS[-1][0] for s in stores)
        stores[0].put(rec(kh("c"), NOW))
        assert stores[-1].get(kh("c")) is not None
    finally:
        stores[0].drop()
        for s in stores:
            s.close()


@on_sql
def test_missing_schema_is_a_configuration_error(backend: Backend, store_url: str, store_prefix: str) -> None:
    s = open_store(store_url, prefix=store_prefix + "none_", **backend.options)
    try:
        with pytest.raises(ConfigurationError, match="setup"):
            s.get(kh("x"))
        health = s.health()
        assert health["ok"] is False and "setup" in health["error"]
    finally:
        s.close()


@on_sql
def test_health_reports_the_server(store: SQLStore) -> None:
    info = store.health()
    assert info["ok"] is True
    assert info["server_version"][0].isdigit()
    assert info["schema_version"] == MIGRATIONS[-1][0]


@pytest.mark.parametrize("backend", [b for b in SQL_BACKENDS if b.name == "sqlite"], ids=["sqlite"], indirect=True)
def test_sqlite_runs_in_wal_mode(store: SQLStore) -> None:
    with store._engine().connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30_000


@pytest.mark.parametrize("backend", [b for b in SQL_BACKENDS if b.name == "postgres"], ids=["postgres"], indirect=True)
def test_postgres_drivers(backend: Backend, store: SQLStore, store_url: str, store_prefix: str) -> None:
    assert store.driver == "psycopg", "psycopg 3 is installed, so it must be the default"
    blob = bytes(range(256)) * 40_960  # 10 MB, every byte value
    old = open_store(store_url.replace("postgresql://", "postgresql+psycopg2://", 1), prefix=store_prefix)
    alias = open_store(store_url.replace("postgresql://", "postgres://", 1), prefix=store_prefix)
    try:
        assert isinstance(old, SQLStore) and old.driver == "psycopg2"
        assert isinstance(alias, SQLStore) and alias.driver == "psycopg"
        old.put(rec(kh("p2"), NOW, blob))
        got = store.get(kh("p2"))
        assert got is not None and got.blob == blob
        again = old.get(kh("p2"))
        assert again is not None and again.blob == blob
        assert alias.scan().items[0].key_hash == kh("p2")
    finally:
        old.close()
        alias.close()


@pytest.mark.parametrize("backend", [b for b in SQL_BACKENDS if b.name == "mariadb"], ids=["mariadb"], indirect=True)
def test_mysql_refuses_a_blob_over_max_allowed_packet(store: SQLStore) -> None:
    with store._engine().connect() as conn:
        packet = int(conn.exec_driver_sql("SELECT @@max_allowed_packet").scalar() or 0)
    with pytest.raises(ConfigurationError, match="max_allowed_packet"):
        store.put(rec(kh("huge"), NOW, b"\0" * (packet // 2 + 1)))
    assert store.get(kh("huge")) is None
    assert store.health()["ok"] is True, "the refusal must not break the connection"


# -- drivers and configuration (no server needed: opening a store does not connect) -------------


def test_missing_postgres_driver_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "psycopg", None)
    fallback = open_store("postgresql://127.0.0.1/test")
    assert isinstance(fallback, SQLStore) and fallback.driver == "psycopg2"
    monkeypatch.setitem(sys.modules, "psycopg2", None)
    with pytest.raises(ConfigurationError, match=r"celery-persist\[postgres\]"):
        open_store("postgresql://127.0.0.1/test")
    with pytest.raises(ConfigurationError, match=r"celery-persist\[postgres\]"):
        open_store("postgresql+psycopg://127.0.0.1/test")
    with pytest.raises(ConfigurationError, match=r"celery-persist\[psycopg2\]"):
        open_store("postgresql+psycopg2://127.0.0.1/test")


@pytest.mark.parametrize("url", ["mysql://root@127.0.0.1/test", "mariadb://root@127.0.0.1/test"])
def test_missing_mysql_driver_names_the_extra(monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    monkeypatch.setitem(sys.modules, "pymysql", None)
    with pytest.raises(ConfigurationError, match=r"celery-persist\[mysql\]"):
        open_store(url)


@pytest.mark.parametrize(
    "url, options",
    [
        ("sqlite://", {}),
        ("sqlite:///:memory:", {}),
        ("sqlite:///x.db", {"prefix": "bad-prefix"}),
        ("sqlite:///x.db", {"prefix": "x" * 41}),
        ("sqlite:///x.db", {"prefix": "1starts_with_digit"}),
    ],
)
def test_bad_configuration(url: str, options: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        open_store(url, **options)


def test_url_password_is_masked() -> None:
    s = open_store("postgresql://app:s3cret@127.0.0.1:1/test")
    assert "s3cret" not in s.name and "s3cret" not in repr(s)
    health = s.health()
    assert health["ok"] is False and "s3cret" not in json.dumps(health)
