"""Redis-specific behaviour of RedisStore, against real servers.

The shared server (``CELERY_PERSIST_TEST_REDIS_URL``, default db 15 on
127.0.0.1:6379) is only written under a per-test prefix and never restarted or
flushed. Tests that restart, misconfigure, cluster or sentinel a server start
their own throwaway ``redis-server`` on a free port in ``tmp_path``.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from celery_persist.errors import ConfigurationError, StoreUnavailable
from celery_persist.stores import open_store
from celery_persist.stores.base import Kind, Status, StoredRecord

redis = pytest.importorskip("redis")

from celery_persist.stores.redis import RedisStore  # noqa: E402
from celery_persist.stores.redis_conn import _SplitPacker  # noqa: E402

pytestmark = pytest.mark.integration

SHARED_URL = os.environ.get("CELERY_PERSIST_TEST_REDIS_URL") or "redis://127.0.0.1:6379/15"
IN_CI = os.environ.get("CI", "").lower() == "true"


def missing(reason: str) -> None:
    if IN_CI:
        pytest.fail(reason)
    pytest.skip(reason)


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.01)
    pytest.fail(f"timed out after {timeout}s waiting for {what}")


def free_port() -> int:
    # At most 55535: a cluster node also listens on its port + 10000.
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port <= 55535:
            return port
    pytest.fail("no free TCP port at or below 55535")


def record(
    i: int,
    *,
    blob: bytes | None = None,
    kind: Kind = Kind.SUSPENSION,
    status: Status = Status.SUSPENDED,
    due_at: float | None = None,
    now: float = 1_700_000_000.0,
) -> StoredRecord:
    return StoredRecord(
        key_hash=f"{i:064x}",
        kind=kind,
        status=status,
        blob=blob if blob is not None else f"blob-{i}".encode(),
        metadata={"i": i, "ratio": i / 7, "prompt": "approve? ✓"},
        created_at=now + i / 3,
        expires_at=None if due_at is None else due_at,
        due_at=due_at,
        updated_at=now + i / 3,
    )


def own_keys(url: str, prefix: str) -> list[bytes]:
    client = redis.Redis.from_url(url)
    try:
        return sorted(client.scan_iter(match="{" + prefix + "}*", count=1000))
    finally:
        client.close()


def drop_own_keys(url: str, prefix: str) -> None:
    keys = own_keys(url, prefix)
    client = redis.Redis.from_url(url)
    try:
        for i in range(0, len(keys), 500):
            client.delete(*keys[i : i + 500])
    finally:
        client.close()


@pytest.fixture(scope="module")
def shared_url() -> str:
    client = redis.Redis.from_url(SHARED_URL, socket_connect_timeout=2, socket_timeout=5)
    try:
        client.ping()
    except redis.RedisError as exc:
        missing(f"Redis at {SHARED_URL} is unreachable ({type(exc).__name__})")
    finally:
        client.close()
    return SHARED_URL


@pytest.fixture
def prefix() -> str:
    return f"t-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def store(shared_url: str, prefix: str) -> Iterator[RedisStore]:
    s = RedisStore(shared_url, prefix=prefix)
    s.setup()
    try:
        yield s
    finally:
        s.close()
        drop_own_keys(shared_url, prefix)


class RedisServer:
    """A throwaway redis-server (or sentinel) process owned by one test."""

    def __init__(self, workdir: Path, *, sentinel_of: RedisServer | None = None, **options: str) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            missing("redis-server is not installed")
        self.binary = str(binary)
        self.port = free_port()
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.sentinel_of = sentinel_of
        self.options = {"save": "", "appendonly": "no", **options}
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def command(self) -> list[str]:
        if self.sentinel_of is not None:
            conf = self.dir / "sentinel.conf"
            conf.write_text(
                f"port {self.port}\nbind 127.0.0.1\ndir {self.dir}\nsentinel monitor mymaster 127.0.0.1 {self.sentinel_of.port} 1\n"
            )
            return [self.binary, str(conf), "--sentinel"]
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir)]
        for name, value in self.options.items():
            args += [f"--{name}", value]
        return args

    def start(self) -> None:
        with open(self.dir / "server.log", "ab") as log:
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT)
        wait_until(self._ready, 15, f"redis-server on port {self.port}")

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            pytest.fail(f"redis-server exited: {(self.dir / 'server.log').read_text()[-2000:]}")
        client = redis.Redis(
            host="127.0.0.1", port=self.port, socket_timeout=1, socket_connect_timeout=1, password=self.options.get("requirepass")
        )
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False
        finally:
            client.close()

    def kill(self) -> None:
        """SIGKILL: the harshest restart; only what reached the AOF survives."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[Callable[..., RedisServer]]:
    started: list[RedisServer] = []

    def start(name: str = "redis", **options: Any) -> RedisServer:
        server = RedisServer(tmp_path / name, **options)
        started.append(server)
        server.start()
        return server

    try:
        yield start
    finally:
        for server in reversed(started):
            server.stop()


def exercise(s: RedisStore) -> None:
    """A short tour of the contract, for the URL forms the shared suite does not cover."""
    s.setup()
    now = time.time()
    recs = [record(i, due_at=now + i, blob=b"L" * 200_000 if i == 3 else None) for i in range(8)]
    s.put_many(recs)
    assert s.get(recs[3].key_hash) == recs[3]
    assert s.transition(recs[1].key_hash, {Status.SUSPENDED}, Status.CLAIMED, due_at=None, now=now) is True
    assert s.transition(recs[1].key_hash, {Status.SUSPENDED}, Status.CLAIMED, due_at=None, now=now) is False
    page = s.scan(status=Status.SUSPENDED, limit=4)
    assert [r.key_hash for r in page.items] == [recs[i].key_hash for i in (0, 2, 3, 4)]
    assert page.next_cursor == recs[4].key_hash
    assert [r.key_hash for r in s.due(now + 4.5, 10)] == [recs[i].key_hash for i in (0, 2, 3, 4)]
    assert s.replace_blob(recs[2].key_hash, recs[2].blob, b"rotated", now=now) is True
    assert s.get(recs[2].key_hash).blob == b"rotated"  # type: ignore[union-attr]
    assert s.delete(recs[0].key_hash) is True
    assert s.get(recs[0].key_hash) is None
    health = s.health()
    assert health["ok"] is True and health["records"] == 7 and health["server_version"]
    for rec in recs:
        s.delete(rec.key_hash)


# -- layout -------------------------------------------------------------------


def test_every_key_of_a_prefix_shares_one_hash_slot(store: RedisStore, shared_url: str, prefix: str) -> None:
    recs = [record(i, due_at=1_800_000_000.0 + i) for i in range(5)]
    store.put_many(recs)
    keys = {k.decode() for k in own_keys(shared_url, prefix)}
    tag = "{" + prefix + "}"
    expected = {f"{tag}:{name}" for name in ("all", "due", "ix", "layout")}
    expected |= {f"{tag}:r:{r.key_hash}" for r in recs} | {f"{tag}:b:{r.key_hash}" for r in recs}
    assert keys == expected
    assert len({redis.crc.key_slot(k.encode()) for k in keys}) == 1

    client = redis.Redis.from_url(shared_url)
    try:
        assert client.zscore(f"{tag}:due", recs[2].key_hash) == recs[2].due_at
        assert client.zrangebylex(f"{tag}:ix", "-", "+") == sorted(f"suspension:suspended:{r.key_hash}".encode() for r in recs)
        assert store.transition(recs[2].key_hash, {Status.SUSPENDED}, Status.CLAIMED, due_at=None, now=1.0)
        assert client.zscore(f"{tag}:due", recs[2].key_hash) is None
        assert client.zscore(f"{tag}:ix", f"suspension:claimed:{recs[2].key_hash}") == 0
        assert client.zscore(f"{tag}:ix", f"suspension:suspended:{recs[2].key_hash}") is None
        assert store.delete(recs[2].key_hash) is True
        for index in ("all", "due", "ix"):
            members = client.zrange(f"{tag}:{index}", 0, -1)
            assert not any(recs[2].key_hash.encode() in m for m in members)
        assert client.exists(f"{tag}:r:{recs[2].key_hash}", f"{tag}:b:{recs[2].key_hash}") == 0
    finally:
        client.close()


def test_record_hash_without_version_or_seal_reads_as_version_0(store: RedisStore, shared_url: str, prefix: str) -> None:
    """A record hash written before records carried a version and a seal (layout 1 as first released)."""
    rec = record(1, due_at=1_800_000_000.0)
    store.put(rec.replace(version=3, seal="ab" * 32))
    key = "{" + prefix + "}:r:" + rec.key_hash
    client = redis.Redis.from_url(shared_url)
    try:
        assert client.hmget(key, "version", "seal") == [b"3", b"ab" * 32]
        client.hdel(key, "version", "seal")
    finally:
        client.close()
    assert store.get(rec.key_hash) == rec
    assert [(r.version, r.seal) for r in store.scan().items] == [(0, "")]
    assert store.transition(rec.key_hash, {Status.SUSPENDED}, Status.CLAIMED, now=2.0, expect_version=1) is False
    assert store.transition(rec.key_hash, {Status.SUSPENDED}, Status.CLAIMED, now=2.0, version=1, seal="s1", expect_version=0)
    assert store.get(rec.key_hash) == rec.replace(status=Status.CLAIMED, updated_at=2.0, version=1, seal="s1")


def test_floats_and_metadata_round_trip_exactly(store: RedisStore) -> None:
    awkward = [0.1 + 0.2, 5e-324, 1.7976931348623157e308, -0.0, 1_700_000_000.123456789, 2.0**53 + 1]
    for i, value in enumerate(awkward):
        rec = StoredRecord(
            f"{i:064x}",
            Kind.CHECKPOINT,
            Status.ACTIVE,
            b"\x00\xff" * 3,
            {"v": value, "nested": {"l": [value, None, True, "é"]}},
            created_at=value,
            expires_at=value,
            due_at=value,
            updated_at=value,
        )
        store.put(rec)
        got = store.get(rec.key_hash)
        assert got == rec
        assert got is not None and repr(got.due_at) == repr(value) and got.metadata == rec.metadata


def test_put_many_chunks_large_blobs_and_duplicates(store: RedisStore) -> None:
    # 2,600 records cross the 1,000-record MULTI chunks and 250-record script batches;
    # blobs over 64 KiB take the separate SET; a duplicate key keeps its last version.
    recs = [
        record(
            i,
            blob=(bytes([i % 251]) * 70_000) if i % 500 == 7 else None,
            kind=Kind.CHECKPOINT if i % 3 == 0 else Kind.SUSPENSION,
            status=Status.ACTIVE if i % 3 == 0 else (Status.SUSPENDED if i % 3 == 1 else Status.CLAIMED),
            due_at=1_800_000_000.0 + (i * 7919) % 2600,
        )
        for i in range(2600)
    ]
    recs.append(recs[10].replace(blob=b"L" * 100_000, status=Status.CANCELLED, kind=Kind.SUSPENSION))
    store.put_many(recs)
    final = {r.key_hash: r for r in recs}
    for i in (0, 7, 10, 507, 1999, 2599):
        assert store.get(f"{i:064x}") == final[f"{i:064x}"]

    def walk(**filters: Any) -> list[str]:
        seen: list[str] = []
        cursor = None
        while True:
            page = store.scan(limit=333, cursor=cursor, **filters)
            seen += [r.key_hash for r in page.items]
            assert all(r.blob == b"" for r in page.items)
            cursor = page.next_cursor
            if cursor is None:
                return seen

    for filters in (
        {},
        {"status": Status.SUSPENDED},
        {"kind": Kind.SUSPENSION},
        {"kind": Kind.CHECKPOINT, "status": Status.ACTIVE},
        {"status": Status.CANCELLED},
    ):
        want = sorted(
            kh for kh, r in final.items() if r.kind == filters.get("kind", r.kind) and r.status == filters.get("status", r.status)
        )
        assert walk(**filters) == want, filters

    due = store.due(1_800_000_000.0 + 99, 1000)
    assert [r.key_hash for r in due] == [
        kh for _, kh in sorted((r.due_at, kh) for kh, r in final.items() if r.due_at is not None and r.due_at <= 1_800_000_099)
    ]
    assert all(r.blob == final[r.key_hash].blob for r in due)


# -- health -------------------------------------------------------------------


def test_health_on_the_shared_server_reports_its_durability(store: RedisStore, shared_url: str) -> None:
    client = redis.Redis.from_url(shared_url)
    try:
        version = client.info("server")["redis_version"]
        config = client.config_get("save") | client.config_get("appendonly") | client.config_get("maxmemory-policy")
    finally:
        client.close()
    health = store.health()
    assert health["ok"] is True
    assert health["server_version"] == version
    assert health["mode"] == "standalone"
    persistence_off = config["save"].strip() == "" and config["appendonly"] == "no"
    assert any("persistence is off" in w for w in health["warnings"]) is persistence_off
    assert any("maxmemory-policy" in w for w in health["warnings"]) is (config["maxmemory-policy"] != "noeviction")


def test_health_warns_about_eviction_and_missing_persistence(servers: Callable[..., RedisServer]) -> None:
    risky = servers("risky", **{"maxmemory-policy": "allkeys-lru", "maxmemory": "64mb"})
    safe = servers("safe", appendonly="yes")
    with RedisStore(risky.url, prefix="h") as s:
        health = s.health()
        assert health["ok"] is True and health["maxmemory_policy"] == "allkeys-lru"
        assert len(health["warnings"]) == 2
        assert "allkeys-lru" in health["warnings"][0] and "persistence is off" in health["warnings"][1]
    with RedisStore(safe.url, prefix="h") as s:
        health = s.health()
        assert health["ok"] is True and health["appendonly"] is True
        assert health["warnings"] == []


def test_unreachable_server_is_store_unavailable_and_health_does_not_raise() -> None:
    s = RedisStore(f"redis://127.0.0.1:{free_port()}/0", prefix="down", retries=1, socket_connect_timeout=1)
    health = s.health()
    assert health["ok"] is False and health["error"].startswith("StoreUnavailable")
    with pytest.raises(StoreUnavailable) as info:
        s.put(record(1))
    assert info.value.store == s.name
    with pytest.raises(StoreUnavailable):
        s.transition(record(1).key_hash, {Status.SUSPENDED}, Status.CLAIMED, now=1.0)
    s.close()


# -- errors and configuration ----------------------------------------------------


def test_foreign_value_under_the_prefix_is_a_clear_configuration_error(store: RedisStore, shared_url: str, prefix: str) -> None:
    store.put(record(1))
    client = redis.Redis.from_url(shared_url)
    try:
        client.delete("{" + prefix + "}:ix")
        client.set("{" + prefix + "}:ix", "not a sorted set")
    finally:
        client.close()
    with pytest.raises(ConfigurationError, match="another prefix"):
        store.setup()
    with pytest.raises(ConfigurationError, match="another prefix") as info:
        store.scan(status=Status.SUSPENDED)
    # redis-py's pipeline message quotes the command's arguments; none may leak.
    assert "ZRANGEBYLEX" not in str(info.value) and "ZRANGEBYLEX" not in str(info.value.__cause__)
    with pytest.raises(ConfigurationError):
        store.transition(record(1).key_hash, {Status.SUSPENDED}, Status.CLAIMED, now=1.0)


def test_out_of_memory_is_store_unavailable_and_writes_nothing(servers: Callable[..., RedisServer]) -> None:
    server = servers("oom", maxmemory="3mb", **{"maxmemory-policy": "noeviction"})
    with RedisStore(server.url, prefix="o") as s:
        small = record(1)
        s.put(small)
        big = record(2, blob=b"x" * 4_000_000)
        with pytest.raises(StoreUnavailable, match="out of memory") as info:
            s.put(big)
        # The blob's SET was refused while queued, so EXEC discarded the whole MULTI.
        assert s.get(big.key_hash) is None
        assert [r.key_hash for r in s.scan().items] == [small.key_hash]
        assert "SET" not in str(info.value.__cause__) and "{o}" not in str(info.value.__cause__)


def test_wrong_password_is_a_configuration_error_and_never_shown(servers: Callable[..., RedisServer]) -> None:
    server = servers("auth", requirepass="s3cret-pw")
    bad = RedisStore(f"redis://:wrong-pw@127.0.0.1:{server.port}/0", prefix="a", retries=0)
    assert "wrong-pw" not in bad.name
    with pytest.raises(ConfigurationError) as info:
        bad.get(record(1).key_hash)
    assert "wrong-pw" not in str(info.value)
    bad.close()
    with RedisStore(f"redis://:s3cret-pw@127.0.0.1:{server.port}/0", prefix="a") as good:
        good.put(record(1))
        assert good.get(record(1).key_hash) == record(1)


@pytest.mark.parametrize(
    ("url", "options"),
    [
        ("redis://127.0.0.1/0", {"prefix": "a{b}"}),
        ("redis://127.0.0.1/0", {"prefix": ""}),
        ("unix:///tmp/x.sock", {"cluster": True}),
        ("redis://127.0.0.1/3", {"cluster": True}),
        ("redis+sentinel://127.0.0.1:26379", {}),
        ("redis+sentinel://127.0.0.1:26379/m", {"cluster": True}),
        ("redis://127.0.0.1/0?decode_responses=true", {}),
        ("redis://127.0.0.1/0?socket_timeout=soon", {}),
        ("redis://127.0.0.1/0", {"retries": -1}),
    ],
)
def test_bad_configuration_is_refused_before_connecting(url: str, options: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        RedisStore(url, **options)


def test_missing_driver_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "redis", None)
    with pytest.raises(ConfigurationError, match=r"celery-persist\[redis\]"):
        open_store("redis://127.0.0.1:6379/0")


# -- the command packer ----------------------------------------------------------


def test_large_values_bypass_the_copying_hiredis_packer(store: RedisStore) -> None:
    pool = store._connection().client.connection_pool
    packer = pool.connection_kwargs["command_packer"]
    assert isinstance(packer, _SplitPacker)
    big = os.urandom(10 * 1024 * 1024)
    # The value object itself is handed to sendall: no 10 MB copy into a command buffer.
    assert any(chunk is big for chunk in packer.pack("SET", "k", big))
    small = packer.pack("HGETALL", "k")
    assert b"".join(small) == b"*2\r\n$7\r\nHGETALL\r\n$1\r\nk\r\n"
    conn = pool.get_connection()
    try:
        assert conn._command_packer is packer
        if redis.utils.HIREDIS_AVAILABLE:
            assert len(small) == 1  # hiredis packed it in one buffer
            assert type(conn._parser).__name__ == "_HiredisParser"  # replies still parsed by hiredis
    finally:
        pool.release(conn)
    rec = record(1, blob=big)
    store.put(rec)
    assert store.get(rec.key_hash) == rec


# -- failures in flight --------------------------------------------------------------


class LossyProxy:
    """A TCP proxy in front of Redis that can lose exactly one reply.

    Once armed with a pattern, the next request containing it is forwarded to
    the server; the server's answer is then swallowed and the client's
    connection closed: the command ran, the caller never hears about it.
    """

    def __init__(self, host: str, port: int) -> None:
        self.upstream = (host, port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.accepted = 0
        self.swallowed = bytearray()
        self._pattern: bytes | None = None
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._spawn(self._accept)

    def arm(self, pattern: bytes) -> None:
        with self._lock:
            self._pattern = pattern

    def _spawn(self, target: Callable[..., None], *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.upstream)
            with self._lock:
                self.accepted += 1
                self._sockets += [client, server]
            lose = threading.Event()
            self._spawn(self._client_to_server, client, server, lose)
            self._spawn(self._server_to_client, client, server, lose)

    def _client_to_server(self, client: socket.socket, server: socket.socket, lose: threading.Event) -> None:
        try:
            while data := client.recv(65536):
                with self._lock:
                    if self._pattern is not None and self._pattern in data:
                        self._pattern = None
                        lose.set()
                server.sendall(data)
        except OSError:
            pass

    def _server_to_client(self, client: socket.socket, server: socket.socket, lose: threading.Event) -> None:
        try:
            while data := server.recv(65536):
                if lose.is_set():
                    self.swallowed += data
                    client.shutdown(socket.SHUT_RDWR)
                    server.shutdown(socket.SHUT_RDWR)
                    return
                client.sendall(data)
        except OSError:
            pass

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept() on Linux
        self.listener.close()
        with self._lock:
            for sock in self._sockets:
                # shutdown() wakes a pump thread blocked in recv(); close() alone does not.
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
        for thread in self._threads:
            thread.join(timeout=5)


@pytest.fixture
def lossy(shared_url: str) -> Iterator[tuple[LossyProxy, str]]:
    parts = redis.connection.parse_url(shared_url)
    if "path" in parts:
        missing("the lost-reply test needs a TCP Redis URL")
    proxy = LossyProxy(parts.get("host", "127.0.0.1"), int(parts.get("port", 6379)))
    try:
        yield proxy, f"redis://127.0.0.1:{proxy.port}/{parts.get('db', 0)}"
    finally:
        proxy.close()


def test_lost_reply_after_a_committed_claim_neither_loses_nor_doubles_it(
    store: RedisStore, lossy: tuple[LossyProxy, str], prefix: str
) -> None:
    proxy, proxied_url = lossy
    rec, warmup = record(1), record(2)
    store.put_many([rec, warmup])
    with RedisStore(proxied_url, prefix=prefix) as claimer:
        # Load the script first, so the armed EVALSHA is the one that commits.
        assert claimer.transition(warmup.key_hash, {Status.SUSPENDED}, Status.CLAIMED, now=1.0)
        proxy.arm(b"EVALSHA")
        won = claimer.transition(rec.key_hash, {Status.SUSPENDED}, Status.CLAIMED, due_at=99.0, now=2.0)
        # The server ran the script and answered 1; the caller never saw it, yet
        # redis-py's retry on a fresh connection gets the same answer.
        assert proxy.swallowed == b":1\r\n"
        assert proxy.accepted == 2
        assert won is True
    assert store.transition(rec.key_hash, {Status.SUSPENDED}, Status.CLAIMED, now=3.0) is False
    got = store.get(rec.key_hash)
    assert got is not None and got.status is Status.CLAIMED and got.due_at == 99.0 and got.updated_at == 2.0


def test_lost_reply_after_a_committed_versioned_claim_still_reports_the_win(
    store: RedisStore, lossy: tuple[LossyProxy, str], prefix: str
) -> None:
    """The re-sent call expects the version its own first attempt replaced: the token must
    answer before the version check does."""
    proxy, proxied_url = lossy
    rec, warmup = record(1).replace(version=4, seal="s4"), record(2)
    store.put_many([rec, warmup])
    with RedisStore(proxied_url, prefix=prefix) as claimer:
        assert claimer.transition(warmup.key_hash, {Status.SUSPENDED}, Status.CLAIMED, now=1.0)
        proxy.arm(b"EVALSHA")
        won = claimer.transition(
            rec.key_hash, {Status.SUSPENDED}, Status.CLAIMED, due_at=99.0, now=2.0, version=5, seal="s5", expect_version=4
        )
        assert proxy.swallowed == b":1\r\n"
        assert proxy.accepted == 2
        assert won is True
    assert store.transition(rec.key_hash, {Status.CLAIMED}, Status.SUSPENDED, now=3.0, version=5, seal="x", expect_version=4) is False
    assert store.get(rec.key_hash) == rec.replace(status=Status.CLAIMED, due_at=99.0, updated_at=2.0, version=5, seal="s5")


def test_lost_reply_after_a_committed_blob_swap_still_reports_the_swap(
    store: RedisStore, lossy: tuple[LossyProxy, str], prefix: str
) -> None:
    proxy, proxied_url = lossy
    rec, warmup = record(1), record(2)
    store.put_many([rec, warmup])
    with RedisStore(proxied_url, prefix=prefix) as rotator:
        assert rotator.replace_blob(warmup.key_hash, warmup.blob, b"w2", now=1.0)
        proxy.arm(b"EVALSHA")
        assert rotator.replace_blob(rec.key_hash, rec.blob, b"rotated", now=2.0, version=7, seal="s7") is True
        assert proxy.swallowed == b":1\r\n"
    assert store.replace_blob(rec.key_hash, rec.blob, b"other", now=3.0) is False
    assert store.get(rec.key_hash) == rec.replace(blob=b"rotated", updated_at=2.0, version=7, seal="s7")


def test_server_restart_mid_run_loses_no_record_and_doubles_no_claim(servers: Callable[..., RedisServer]) -> None:
    server = servers("restart", appendonly="yes", appendfsync="always")
    prefix = "restart"
    recs = [record(i, due_at=1_900_000_000.0 + i) for i in range(1200)]
    with RedisStore(server.url, prefix=prefix) as seed:
        seed.setup()
        seed.put_many(recs)

    lock = threading.Lock()
    wins: dict[str, list[int]] = collections.defaultdict(list)
    unknown: set[str] = set()  # calls that raised: their outcome is not known
    messages: list[str] = []  # of the StoreUnavailable raised on the way
    failures: list[BaseException] = []
    restarted = threading.Event()
    wins_after_restart = [0]

    def claimer(n: int) -> None:
        order = recs[:]
        random.Random(n).shuffle(order)
        try:
            with RedisStore(server.url, prefix=prefix) as s:
                for rec in order:
                    deadline = time.monotonic() + 60
                    while True:
                        try:
                            won = s.transition(rec.key_hash, {Status.SUSPENDED}, Status.CLAIMED, due_at=2e9, now=time.time())
                            break
                        except StoreUnavailable as exc:
                            with lock:
                                unknown.add(rec.key_hash)
                                messages.append(exc.message)
                            if time.monotonic() > deadline:
                                raise
                    if won:
                        with lock:
                            wins[rec.key_hash].append(n)
                            wins_after_restart[0] += restarted.is_set()
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            failures.append(exc)

    threads = [threading.Thread(target=claimer, args=(n,)) for n in range(3)]
    for t in threads:
        t.start()
    wait_until(lambda: len(wins) >= len(recs) // 4, 60, "a quarter of the claims")
    server.kill()
    at_kill = len(wins)
    server.start()
    restarted.set()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    assert not failures, failures
    assert at_kill < len(recs), "the run ended before the restart; the test proved nothing"
    assert wins_after_restart[0] > 0, "no claim succeeded after the restart"
    # Each outage report names redis-py's cause, not just "unreachable".
    for message in messages:
        assert re.search(r"\((ConnectionError|TimeoutError|BusyLoadingError|\w+Error): \S", message), message

    assert all(len(winners) == 1 for winners in wins.values()), "a record was claimed twice"
    # A record nobody won is possible only where a call's outcome was unknown.
    assert {r.key_hash for r in recs} - wins.keys() <= unknown
    with RedisStore(server.url, prefix=prefix) as check:
        assert check.health()["records"] == len(recs)
        for rec in recs:
            got = check.get(rec.key_hash)
            assert got is not None, "a record was lost"
            assert got.status is Status.CLAIMED
            assert (got.blob, got.metadata, got.created_at) == (rec.blob, rec.metadata, rec.created_at)


def test_a_stopped_server_is_store_unavailable_naming_the_cause_then_recovers(servers: Callable[..., RedisServer]) -> None:
    server = servers("stopped", appendonly="yes", appendfsync="always", requirepass="s3cret-pw")
    rec = record(1)
    with RedisStore(f"redis://:s3cret-pw@127.0.0.1:{server.port}/0", prefix="stop", retries=0, socket_connect_timeout=2) as s:
        s.put(rec)
        server.stop()
        with pytest.raises(StoreUnavailable) as info:
            s.get(rec.key_hash)
        message = info.value.message
        assert "ConnectionError: " in message and "refused" in message.lower(), message
        assert f"127.0.0.1:{server.port}" in message, "the cause names the host and port"
        assert "s3cret-pw" not in str(info.value)
        assert info.value.__cause__ is not None
        server.start()
        assert s.get(rec.key_hash) == rec  # the same store object reconnects


def test_url_options_redis_py_would_choke_on_are_a_configuration_error_naming_them() -> None:
    """redis-py 8 hands query options it has no parser for to the connection class, which raised
    a bare TypeError on the first command; the store names the option, never its value."""
    url = f"redis://127.0.0.1:{free_port()}/0?sentinel_password=S3NT&ssl_keyfile_password=KFP&socket_timeout=3"
    s = RedisStore(url, prefix="opts", retries=0)  # binding an application never fails on it
    with pytest.raises(ConfigurationError, match="'sentinel_password', 'ssl_keyfile_password'") as info:
        s.get(record(1).key_hash)
    assert "S3NT" not in str(info.value) and "KFP" not in str(info.value)
    assert s.health()["ok"] is False
    s.close()
    # What redis-py takes for the connection class at hand passes: TLS options on rediss://, not on redis://.
    RedisStore("rediss://127.0.0.1:1/0?ssl_cert_reqs=none&ssl_check_hostname=false", prefix="opts").close()
    with pytest.raises(ConfigurationError, match="rediss://"):
        RedisStore("redis://127.0.0.1:1/0?ssl_check_hostname=false", prefix="opts", retries=0).get(record(1).key_hash)
    with pytest.raises(ConfigurationError, match="'timeout'"):
        RedisStore("unix:///tmp/none.sock?timeout=3", prefix="opts", retries=0).get(record(1).key_hash)


# -- fork ------------------------------------------------------------------------------


def test_store_opened_before_fork_works_in_the_child_without_touching_the_parent_socket(
    store: RedisStore,
) -> None:
    rec, child_rec = record(1), record(2)
    store.put(rec)
    parent_id = store._connection().client.client_id()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 1
        try:
            os.close(read_end)
            child_id = store._connection().client.client_id()
            store.put(child_rec)
            won = store.transition(rec.key_hash, {Status.SUSPENDED}, Status.CLAIMED, now=5.0)
            os.write(write_end, json.dumps({"id": child_id, "won": won}).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    for _ in range(200):  # the parent keeps using its own socket meanwhile
        assert store.get(rec.key_hash) is not None
    _, status = os.waitpid(pid, 0)
    with os.fdopen(read_end, "rb") as pipe:
        report = json.loads(pipe.read() or b"{}")
    assert os.waitstatus_to_exitcode(status) == 0
    assert report["won"] is True
    assert report["id"] != parent_id
    assert store._connection().client.client_id() == parent_id  # same socket, never shut down by the child
    assert store.get(child_rec.key_hash) == child_rec
    assert store.get(rec.key_hash).status is Status.CLAIMED  # type: ignore[union-attr]


# -- other URL forms -----------------------------------------------------------------


def test_unix_socket_url(servers: Callable[..., RedisServer], tmp_path: Path) -> None:
    sock = tmp_path / "r.sock"
    servers("unix", unixsocket=str(sock), unixsocketperm="700")
    with RedisStore(f"unix://{sock}?db=2", prefix="u") as s:
        exercise(s)


def test_cluster_mode(servers: Callable[..., RedisServer], tmp_path: Path) -> None:
    server = servers("cluster", **{"cluster-enabled": "yes", "cluster-config-file": str(tmp_path / "nodes.conf")})
    admin = redis.Redis(port=server.port)
    try:
        admin.execute_command("CLUSTER ADDSLOTS", *range(16384))
        wait_until(lambda: admin.cluster("info")["cluster_state"] == "ok", 30, "cluster_state:ok")
    finally:
        admin.close()
    with RedisStore(server.url, prefix="c", cluster=True) as s:
        assert s.mode == "cluster"
        exercise(s)
        node = s._connection().client.get_node_from_key("{c}:all")
        packer = node.redis_connection.connection_pool.connection_kwargs["command_packer"]
        assert isinstance(packer, _SplitPacker)


def test_sentinel_url(servers: Callable[..., RedisServer]) -> None:
    master = servers("master")
    sentinel = servers("sentinel", sentinel_of=master)
    url = f"redis+sentinel://127.0.0.1:{sentinel.port},127.0.0.1:{free_port()}/mymaster/3"
    with RedisStore(url, prefix="s") as s:
        assert s.mode == "sentinel"
        exercise(s)
        s.put(record(42))
    direct = redis.Redis(port=master.port, db=3)
    try:
        assert direct.exists("{s}:r:" + record(42).key_hash) == 1
    finally:
        direct.close()
