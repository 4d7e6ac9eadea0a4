"""PostgreSQL drops the store's connections in the middle of a claim race.

``pg_terminate_backend`` ends the server processes serving the store, which
is what a client sees of a server restart, without stopping the shared
server other tests use. The store must map the loss to ``StoreUnavailable``,
reconnect on the next call, lose no record, and never let two callers win
the same claim (a claim whose commit reply was lost may be reported lost to
its caller: its lease then re-opens it, which is safe).
"""

from __future__ import annotations

import os
import threading
import time
import uuid

import psycopg
import pytest

from celery_persist import StoreUnavailable, open_store
from celery_persist.stores.base import Kind, Status, StoredRecord

URL = os.environ.get("CELERY_PERSIST_TEST_POSTGRES_URL", "postgresql://127.0.0.1/test")
N = 300


def _dsn() -> str:
    return URL.replace("postgresql+psycopg://", "postgresql://").replace("postgresql+psycopg2://", "postgresql://")


@pytest.fixture
def app_name() -> str:
    return f"cp-restart-{uuid.uuid4().hex[:8]}"


def test_connections_dropped_mid_race(app_name: str) -> None:
    try:
        admin = psycopg.connect(_dsn(), autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as exc:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"PostgreSQL is required under CI=true: {exc}")
        pytest.skip(f"PostgreSQL unavailable: {exc}")
    sep = "&" if "?" in URL else "?"
    prefix = f"r{uuid.uuid4().hex[:10]}_"
    store = open_store(f"{URL}{sep}application_name={app_name}", prefix=prefix)
    store.setup()
    try:
        now = time.time()
        hashes = [uuid.uuid4().hex + uuid.uuid4().hex for _ in range(N)]
        store.put_many(
            StoredRecord(kh, Kind.SUSPENSION, Status.SUSPENDED, b"x" * 512, {"n": i}, now, None, None, now) for i, kh in enumerate(hashes)
        )
        wins: list[str] = []
        unavailable = 0
        lock = threading.Lock()
        progress = threading.Event()

        def claimer() -> None:
            nonlocal unavailable
            for i, kh in enumerate(hashes):
                deadline = time.monotonic() + 30
                while True:
                    try:
                        won = store.transition(kh, {Status.SUSPENDED}, Status.CLAIMED, due_at=None, now=time.time())
                    except StoreUnavailable:
                        with lock:
                            unavailable += 1
                        assert time.monotonic() < deadline, "the store did not reconnect"
                        continue
                    break
                with lock:
                    if won:
                        wins.append(kh)
                if i == N // 4:
                    progress.set()

        threads = [threading.Thread(target=claimer) for _ in range(3)]
        for t in threads:
            t.start()
        assert progress.wait(30)
        killed = 0
        deadline = time.monotonic() + 5
        while not killed and time.monotonic() < deadline:
            rows = admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s", (app_name,)
            ).fetchall()
            killed = sum(1 for (ok,) in rows if ok)
        for t in threads:
            t.join(60)
        assert killed >= 1, "no store connection was terminated"
        assert len(wins) == len(set(wins)), "a claim was won twice"
        statuses = {}
        cursor = None
        while True:
            page = store.scan(limit=200, cursor=cursor)
            statuses.update({r.key_hash: r.status for r in page.items})
            cursor = page.next_cursor
            if cursor is None:
                break
        assert set(statuses) == set(hashes), "a record was lost"
        assert all(s is Status.CLAIMED for s in statuses.values())
        # Every win is real; at most the claims whose reply was lost are missing from `wins`.
        assert len(wins) <= N and len(wins) >= N - unavailable
    finally:
        drop = getattr(store, "drop", None)
        if drop is not None:
            drop()
        store.close()
        admin.close()
