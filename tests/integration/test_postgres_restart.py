"""PostgreSQL going away under the store: connections dropped mid-race, and a server restart.

``test_connections_dropped_mid_race`` uses ``pg_terminate_backend`` on the shared
server: that ends the server processes serving the store, which is what a
client sees of a server restart, without stopping the server other tests use.
The store must map the loss to ``StoreUnavailable``, reconnect on the next
call, lose no record, and never let two callers win the same claim (a claim
whose commit reply was lost may be reported lost to its caller: its lease then
re-opens it, which is safe).

The restart tests start a PRIVATE cluster (``initdb`` + ``pg_ctl`` in a temp
directory, on a free port, run as the ``postgres`` user when the tests run as
root) and restart or stop it with ``pg_ctl ... -m immediate``: the shared server
on 5432 is never restarted.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import psycopg
import pytest

from celery_persist import StoreUnavailable, open_store
from celery_persist.stores import BaseStore
from celery_persist.stores.base import Kind, Status, StoredRecord

pytestmark = pytest.mark.integration

URL = os.environ.get("CELERY_PERSIST_TEST_POSTGRESQL_URL", "postgresql://127.0.0.1/test")
N = 300
IN_CI = os.environ.get("CI", "").lower() == "true"


def missing(reason: str) -> None:
    if IN_CI:
        pytest.fail(reason)
    pytest.skip(reason)


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


# -- a private cluster, restarted -----------------------------------------------------------------


def _binary(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return candidates[-1] if candidates else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class PrivateCluster:
    """A throwaway PostgreSQL cluster in a temp directory, owned by one test module."""

    pg_ctl: str
    base: str
    port: int
    user: str | None  # run the server as this OS user (initdb refuses root)

    @property
    def data(self) -> str:
        return os.path.join(self.base, "data")

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def run(self, *args: str, timeout: float = 120) -> None:
        cmd = list(args) if self.user is None else ["runuser", "-u", self.user, "--", *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
        if proc.returncode != 0:
            log = ""
            with contextlib.suppress(OSError), open(os.path.join(self.base, "server.log")) as f:
                log = f.read()[-2000:]
            pytest.fail(f"{' '.join(args[:2])} failed ({proc.returncode}): {proc.stderr[-2000:]}\n{log}")

    def ctl(self, action: str, *extra: str) -> None:
        options = f"-p {self.port} -k {self.base} -c listen_addresses=127.0.0.1 -c fsync=off"
        self.run(self.pg_ctl, action, "-D", self.data, "-l", os.path.join(self.base, "server.log"), "-w", "-o", options, *extra)

    def restart(self) -> None:
        """``pg_ctl restart -m immediate``: every backend dies without a goodbye; waits until it accepts again."""
        self.ctl("restart", "-m", "immediate")

    def stop(self) -> None:
        self.run(self.pg_ctl, "stop", "-D", self.data, "-m", "immediate", "-w")

    def start(self) -> None:
        self.ctl("start")


@pytest.fixture(scope="module")
def private_pg() -> Iterator[PrivateCluster]:
    initdb, pg_ctl = _binary("initdb"), _binary("pg_ctl")
    if initdb is None or pg_ctl is None:
        missing("initdb / pg_ctl are not installed: the restart test needs a private PostgreSQL cluster")
    assert initdb is not None and pg_ctl is not None
    user: str | None = None
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            missing("running as root without a 'postgres' user to run a private cluster as")
        user = "postgres"
    # Straight under the temp dir, not under pytest's (0700, root's): the server's user must reach it.
    base = tempfile.mkdtemp(prefix="cp-pg-restart-")
    if user is not None:
        entry = pwd.getpwnam(user)
        os.chown(base, entry.pw_uid, entry.pw_gid)
    cluster = PrivateCluster(pg_ctl, base, _free_port(), user)
    try:
        cluster.run(initdb, "-D", cluster.data, "-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync", "--no-instructions")
        cluster.start()
        yield cluster
    finally:
        with contextlib.suppress(Exception):
            cluster.stop()
        shutil.rmtree(base, ignore_errors=True)


def _record(i: int, now: float) -> StoredRecord:
    return StoredRecord(f"{i:064x}", Kind.SUSPENSION, Status.SUSPENDED, b"blob-%d" % i, {"i": i}, now, now + 600, now + 600, now)


@pytest.fixture(params=[True, False], ids=["pre-ping", "no-pre-ping"])
def restart_store(request: pytest.FixtureRequest, private_pg: PrivateCluster) -> Iterator[BaseStore]:
    """The store as configured (``pool_pre_ping``), and without the ping: then the first call
    meets a dead connection, and the disconnect it sees must invalidate the whole pool."""
    options = {} if request.param else {"engine_options": {"pool_pre_ping": False}}
    store = open_store(private_pg.url, prefix=f"r{uuid.uuid4().hex[:10]}_", connect_timeout=5, **options)
    store.setup()
    try:
        yield store
    finally:
        with contextlib.suppress(Exception):
            store.drop()  # type: ignore[attr-defined]
        store.close()


def _names_its_cause(exc: StoreUnavailable) -> None:
    cause = exc.__cause__
    assert cause is not None, "StoreUnavailable must chain the driver's error"
    driver_error = getattr(cause, "orig", None) or cause
    assert f"({type(driver_error).__name__}: " in exc.message, exc.message
    assert "postgres@" not in exc.message


def test_the_store_recovers_from_a_server_restart(private_pg: PrivateCluster, restart_store: BaseStore) -> None:
    store, now = restart_store, time.time()
    records = [_record(i, now) for i in range(20)]
    store.put_many(records)
    # Several pooled connections, all of which the restart kills.
    threads = [threading.Thread(target=lambda: [store.get(r.key_hash) for r in records]) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)

    private_pg.restart()

    # The first operation may find a dead connection (then StoreUnavailable names the cause)...
    try:
        assert store.get(records[0].key_hash) == records[0]
    except StoreUnavailable as exc:
        _names_its_cause(exc)
    # ... the ones after it reconnect, with the same store object.
    for _ in range(3):
        assert store.get(records[1].key_hash) == records[1]
    assert store.transition(records[2].key_hash, {Status.SUSPENDED}, Status.CLAIMED, due_at=now + 60, now=now)
    store.put(_record(99, now))
    assert {r.key_hash for r in store.scan(limit=100).items} == {r.key_hash for r in records} | {_record(99, now).key_hash}


def test_a_stopped_server_is_store_unavailable_naming_the_cause_then_recovers(private_pg: PrivateCluster, restart_store: BaseStore) -> None:
    store, now = restart_store, time.time()
    rec = _record(1, now)
    store.put(rec)
    private_pg.stop()
    try:
        with pytest.raises(StoreUnavailable) as info:
            store.get(rec.key_hash)
        _names_its_cause(info.value)
        assert "refused" in info.value.message.lower() or "closed" in info.value.message.lower(), info.value.message
        assert store.health()["ok"] is False
    finally:
        private_pg.start()
    deadline = time.monotonic() + 30
    while True:  # the first call after the start may still meet a connection of the old server
        try:
            got = store.get(rec.key_hash)
            break
        except StoreUnavailable:
            assert time.monotonic() < deadline, "the store did not reconnect"
    assert got == rec
    assert store.get(rec.key_hash) == rec
