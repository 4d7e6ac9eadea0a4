"""What the SQL store promises beyond the generic contract: index use, migrations, drivers.

Runs on the SQL backends of the registry (sqlite, postgres, mariadb); the
driver tests need no server, as opening a store does not connect.
"""

from __future__ import annotations

import hashlib
import json
import sys
import threading
from typing import Any

import pytest
import sqlalchemy as sa

from celery_persist.errors import ConfigurationError
from celery_persist.stores import Kind, Status, StoredRecord, open_store
from celery_persist.stores.sql import MIGRATIONS, SQLStore
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
    store.put_many(rec(kh("later", i), NOW + 10**6 + i) for i in range(20_000))
    store.put_many(rec(kh("due", i), NOW - i) for i in range(10))
    assert len(store.due(NOW, 100)) == 10
    index = f"{store.prefix}due_ix"
    engine = store._engine()
    with engine.connect() as conn:
        sql = as_sql(store, conn, store.due_query(NOW, 100))
        if store.dialect == "sqlite":
            conn.exec_driver_sql("ANALYZE")
            plan = " | ".join(str(row[-1]) for row in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + sql))
            assert f"USING INDEX {index}" in plan, plan
            assert "TEMP B-TREE" not in plan, f"due() sorts instead of walking the index: {plan}"
        elif store.dialect == "postgresql":
            conn.exec_driver_sql(f"ANALYZE {store.table.name}")
            raw = conn.exec_driver_sql("EXPLAIN (ANALYZE, FORMAT JSON) " + sql).scalar()
            doc = raw if isinstance(raw, list) else json.loads(raw)
            nodes = plan_nodes(doc[0]["Plan"])
            scans = [n for n in nodes if n.get("Relation Name") == store.table.name]
            assert [n["Node Type"] for n in scans] in (["Index Scan"], ["Index Only Scan"]), nodes
            assert scans[0]["Index Name"] == index
            assert scans[0]["Actual Rows"] == 10, "the index scan touched rows that are not due"
        else:
            conn.exec_driver_sql(f"ANALYZE TABLE {store.table.name}")
            rows = [dict(r._mapping) for r in conn.exec_driver_sql("ANALYZE " + sql)]
            assert [r["key"] for r in rows] == [index], rows
            assert float(rows[0]["r_rows"]) == 10, "the index range touched rows that are not due"


@on_sql
def test_migrations_upgrade_an_older_schema(store: SQLStore) -> None:
    assert store.schema_version() == MIGRATIONS[-1][0]
    store.put(rec(kh("kept"), NOW))
    mig = store.migrations_table
    engine = store._engine()
    index = next(ix for ix in store.table.indexes if ix.name and ix.name.endswith("due_ix"))
    # An older deployment: only migration 1 recorded, the due index gone.
    with engine.begin() as conn:
        conn.execute(sa.delete(mig).where(mig.c.version > 1))
        index.drop(conn)
        if store.dialect == "postgresql":
            conn.exec_driver_sql(f"ALTER TABLE {store.table.name} ALTER COLUMN blob SET STORAGE MAIN")
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
        if store.dialect == "postgresql":
            storage = conn.exec_driver_sql(
                "SELECT attstorage FROM pg_attribute WHERE attrelid = %(t)s::regclass AND attname = 'blob'",
                {"t": store.table.name},
            ).scalar()
            assert storage == "e", "blob column is not STORAGE EXTERNAL"
    got = store.get(kh("kept"))
    assert got is not None and got.due_at == NOW
    assert store.health()["ok"] is True


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
    with pytest.raises(ConfigurationError, match=r"celery-persist\[postgres2\]"):
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
