"""The store contract, written once and run against every registered backend.

Only the :class:`~celery_persist.stores.BaseStore` API and the backend registry
are used here, so a new store passes or fails this suite unchanged. See
``tests/integration/backends/`` to register one and ``conftest.py`` for the
``backend`` / ``store`` fixtures.
"""

from __future__ import annotations

import hashlib
import math
import multiprocessing
import os
import queue
import random
import re
import socket
import threading
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest

from celery_persist.errors import IntegrityError, StoreUnavailable
from celery_persist.stores import KEEP, BaseStore, Kind, Status, StoredRecord, open_store
from tests.integration import contract_workers
from tests.integration.backends import BAD_METADATA, BAD_STATUS, Backend

pytestmark = pytest.mark.integration

NOW = 1_750_000_000.123456
LEASE = 60.0
TEN_MB = 10 * 1024 * 1024


def kh(*parts: object) -> str:
    return hashlib.sha256(":".join(map(str, parts)).encode()).hexdigest()


def make(
    key: str,
    *,
    kind: Kind = Kind.SUSPENSION,
    status: Status = Status.SUSPENDED,
    blob: bytes = b"sealed-bytes",
    metadata: dict[str, Any] | None = None,
    created_at: float = NOW,
    expires_at: float | None = NOW + 3600,
    due_at: float | None | str = "expires",
    updated_at: float = NOW,
    version: int = 0,
    seal: str = "",
) -> StoredRecord:
    return StoredRecord(
        key_hash=key,
        kind=kind,
        status=status,
        blob=blob,
        metadata={"task": "demo.step"} if metadata is None else metadata,
        created_at=created_at,
        expires_at=expires_at,
        due_at=expires_at if due_at == "expires" else due_at,  # type: ignore[arg-type]
        updated_at=updated_at,
        version=version,
        seal=seal,
    )


def walk(store: BaseStore, limit: int, **filters: Any) -> list[StoredRecord]:
    """Every record through scan pages; checks the page rules on the way."""
    out: list[StoredRecord] = []
    cursor: str | None = None
    for _ in range(100_000):
        page = store.scan(limit=limit, cursor=cursor, **filters)
        assert len(page.items) <= limit
        keys = [r.key_hash for r in page.items]
        assert keys == sorted(keys), "a page is not in key_hash order"
        if cursor is not None:
            assert all(k > cursor for k in keys), "a page returned keys at or before its cursor"
        out.extend(page.items)
        if page.next_cursor is None:
            return out
        assert len(page.items) == limit, "next_cursor given on a page that is not full"
        assert page.next_cursor == keys[-1]
        cursor = page.next_cursor
    raise AssertionError("scan never ended")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# -- put / get / delete -------------------------------------------------------------------------


def test_put_get_round_trip_is_exact(store: BaseStore) -> None:
    rng = random.Random(7)
    metadata = {
        "task": "shop.review",
        "prompt": 'approve? ✓ «ünïcode» \u2028 "quotes" \\ back',
        "floats": [0.1, 1 / 3, 1e-300, 123456789.12345679, -0.0, 2.5e18],
        "ints": [0, -1, 2**53, 2**31 + 1],
        "nested": {"b": [True, False, None], "a": {"deep": [1, {"x": "y"}]}},
        "empty": {},
    }
    records = [
        make(kh("rt", 1), metadata=metadata, created_at=NOW + rng.random(), expires_at=NOW + 3600 + rng.random()),
        make(kh("rt", 2), kind=Kind.CHECKPOINT, status=Status.ACTIVE, expires_at=None, due_at=None, metadata={}),
        make(kh("rt", 3), expires_at=None, due_at=NOW + math.pi, updated_at=NOW + math.e, blob=bytes(range(256)) * 3),
    ]
    for rec in records:
        store.put(rec)
    for rec in records:
        got = store.get(rec.key_hash)
        assert got == rec
        assert got is not None
        assert type(got.blob) is bytes
        assert dict(got.metadata) == rec.metadata
        for name in ("created_at", "updated_at", "expires_at", "due_at"):
            value = getattr(got, name)
            assert value is None or type(value) is float, name
        assert got.kind is rec.kind and got.status is rec.status


def test_get_and_delete_missing(store: BaseStore) -> None:
    assert store.get(kh("missing")) is None
    assert store.delete(kh("missing")) is False


def test_delete(store: BaseStore) -> None:
    a, b = kh("del", "a"), kh("del", "b")
    store.put(make(a))
    store.put(make(b))
    assert store.delete(a) is True
    assert store.get(a) is None
    assert store.delete(a) is False
    assert store.get(b) is not None
    assert [r.key_hash for r in walk(store, 10)] == [b]
    assert [r.key_hash for r in store.due(NOW + 10**6)] == [b], "a deleted record is still due"


def test_put_is_an_upsert_of_the_whole_record(store: BaseStore) -> None:
    key = kh("upsert")
    store.put(make(key, metadata={"v": 1, "gone": True}, blob=b"one"))
    second = make(
        key,
        kind=Kind.CHECKPOINT,
        status=Status.ACTIVE,
        blob=b"two",
        metadata={"v": 2},
        created_at=NOW + 1,
        expires_at=None,
        due_at=NOW + 5,
        updated_at=NOW + 2,
    )
    store.put(second)
    assert store.get(key) == second
    assert [r.key_hash for r in walk(store, 10)] == [key]
    assert [r.due_at for r in store.due(NOW + 10**6)] == [NOW + 5], "the old due_at is still indexed"


@pytest.mark.parametrize("size", [0, 1, TEN_MB], ids=["0B", "1B", "10MB"])
def test_blob_sizes_round_trip(store: BaseStore, size: int) -> None:
    blob = os.urandom(size)
    key = kh("blob", size)
    store.put(make(key, blob=blob))
    got = store.get(key)
    assert got is not None
    assert len(got.blob) == size
    assert got.blob == blob
    assert store.due(NOW + 10**6)[0].blob == blob


def test_put_many(store: BaseStore) -> None:
    records = [make(kh("many", i), metadata={"i": i}, due_at=NOW + i) for i in range(250)]
    replaced = make(kh("many", 3), metadata={"i": "last"}, blob=b"last wins", due_at=NOW + 1000)
    store.put_many([*records, replaced])
    store.put_many([])
    for rec in records:
        got = store.get(rec.key_hash)
        expected = replaced if rec.key_hash == replaced.key_hash else rec
        assert got == expected
    assert len(walk(store, 100)) == 250


# -- transition ---------------------------------------------------------------------------------


def test_transition_compare_and_set(store: BaseStore) -> None:
    key = kh("cas")
    rec = make(key, metadata={"m": 1.5}, blob=b"blob")
    store.put(rec)

    assert store.transition(kh("cas", "missing"), {Status.SUSPENDED}, Status.CLAIMED, now=NOW) is False
    assert store.get(kh("cas", "missing")) is None

    assert store.transition(key, {Status.CLAIMED, Status.RESUMED}, Status.CANCELLED, now=NOW + 1) is False
    assert store.get(key) == rec, "a failed transition changed the record"

    assert store.transition(key, {Status.SUSPENDED}, Status.CLAIMED, now=NOW + 2) is True
    got = store.get(key)
    assert got == rec.replace(status=Status.CLAIMED, updated_at=NOW + 2), "KEEP must leave due_at as it was"

    assert store.transition(key, {Status.SUSPENDED}, Status.CLAIMED, now=NOW + 3) is False
    assert store.transition(key, {Status.SUSPENDED, Status.CLAIMED}, Status.RESUMED, due_at=NOW + 99, now=NOW + 4)
    got = store.get(key)
    assert got == rec.replace(status=Status.RESUMED, due_at=NOW + 99, updated_at=NOW + 4)

    assert store.transition(key, {Status.RESUMED}, Status.RESUMED, due_at=KEEP, now=NOW + 5) is True
    assert store.get(key) == rec.replace(status=Status.RESUMED, due_at=NOW + 99, updated_at=NOW + 5)
    assert store.transition(key, (), Status.CANCELLED, now=NOW + 6) is False


def test_transition_due_at_none_leaves_the_index(store: BaseStore) -> None:
    key = kh("due-none")
    store.put(make(key, due_at=NOW + 10))
    assert [r.key_hash for r in store.due(NOW + 10)] == [key]
    assert store.transition(key, {Status.SUSPENDED}, Status.CANCELLED, due_at=None, now=NOW + 1)
    got = store.get(key)
    assert got is not None and got.due_at is None and got.status is Status.CANCELLED
    assert store.due(NOW + 10**9) == []
    assert store.transition(key, {Status.CANCELLED}, Status.EXPIRED, due_at=NOW + 20, now=NOW + 2)
    assert [r.key_hash for r in store.due(NOW + 20)] == [key]
    assert store.due(NOW + 19.999) == []


def test_replace_blob(store: BaseStore) -> None:
    key = kh("rotate")
    rec = make(key, blob=b"old-ciphertext", metadata={"k": "v"})
    store.put(rec)
    assert store.replace_blob(key, b"not-the-blob", b"new", now=NOW + 1) is False
    assert store.get(key) == rec
    assert store.replace_blob(key, b"old-ciphertext", b"new-ciphertext", now=NOW + 2) is True
    assert store.get(key) == rec.replace(blob=b"new-ciphertext", updated_at=NOW + 2)
    assert store.replace_blob(key, b"old-ciphertext", b"again", now=NOW + 3) is False
    assert store.replace_blob(kh("rotate", "missing"), b"", b"x", now=NOW) is False
    assert store.get(kh("rotate", "missing")) is None


# -- version and seal ---------------------------------------------------------------------------

SEAL = hashlib.sha256(b"seal").hexdigest()


def test_version_and_seal_round_trip(store: BaseStore) -> None:
    records = [
        make(kh("vs", 1), version=1, seal=SEAL, due_at=NOW - 3),
        make(kh("vs", 2), version=2**40 + 3, seal="0" * 64, due_at=NOW - 2),
        make(kh("vs", 3), due_at=NOW - 1),  # version 0, empty seal: as records written before they existed
        make(kh("vs", 4), kind=Kind.CHECKPOINT, status=Status.ACTIVE, version=7, seal="ab" * 32, expires_at=None, due_at=None),
    ]
    store.put(records[0])
    store.put_many(records[1:])
    by_key = sorted(records, key=lambda r: r.key_hash)
    for rec in records:
        got = store.get(rec.key_hash)
        assert got == rec
        assert got is not None and type(got.version) is int and type(got.seal) is str
    assert walk(store, 2, with_blob=True) == by_key
    assert walk(store, 3) == [r.replace(blob=b"") for r in by_key]
    assert walk(store, 10, kind=Kind.CHECKPOINT) == [records[3].replace(blob=b"")]
    assert store.due(NOW) == records[:3]
    # put() replaces both, down to 0 and "" too.
    store.put(records[0].replace(version=0, seal=""))
    assert store.get(records[0].key_hash) == records[0].replace(version=0, seal="")


def test_transition_compares_the_version(store: BaseStore) -> None:
    key = kh("cas-version")
    rec = make(key, version=5, seal=SEAL, due_at=NOW + 10)
    store.put(rec)
    for wrong in (0, 4, 6):
        moved = store.transition(
            key, {Status.SUSPENDED}, Status.CLAIMED, due_at=NOW + 99, now=NOW + 1, version=9, seal="f" * 64, expect_version=wrong
        )
        assert moved is False, f"expect_version={wrong} matched version 5"
        assert store.get(key) == rec, "a transition refused on its version changed the record"
    assert store.due(NOW + 10) == [rec], "a refused transition moved the due index"
    # The status still has to match as well.
    assert store.transition(key, {Status.CLAIMED}, Status.RESUMED, now=NOW + 1, version=6, seal="e" * 64, expect_version=5) is False
    assert store.get(key) == rec

    assert store.transition(
        key, {Status.SUSPENDED}, Status.CLAIMED, due_at=NOW + 60, now=NOW + 2, version=6, seal="c" * 64, expect_version=5
    )
    claimed = rec.replace(status=Status.CLAIMED, due_at=NOW + 60, updated_at=NOW + 2, version=6, seal="c" * 64)
    assert store.get(key) == claimed
    # The same call again: the version it expected is gone.
    assert store.transition(key, {Status.CLAIMED}, Status.RESUMED, now=NOW + 3, version=6, seal="d" * 64, expect_version=5) is False
    assert store.get(key) == claimed
    assert [r.key_hash for r in store.due(NOW + 60)] == [key]


def test_transition_without_version_or_seal_keeps_them(store: BaseStore) -> None:
    key = kh("keep-token")
    rec = make(key, version=3, seal=SEAL)
    store.put(rec)
    assert store.transition(key, {Status.SUSPENDED}, Status.CLAIMED, due_at=NOW + 60, now=NOW + 1)
    assert store.get(key) == rec.replace(status=Status.CLAIMED, due_at=NOW + 60, updated_at=NOW + 1)
    # expect_version alone checks without writing; version alone writes without a seal, and the reverse.
    assert store.transition(key, {Status.CLAIMED}, Status.SUSPENDED, now=NOW + 2, expect_version=3)
    assert store.get(key) == rec.replace(due_at=NOW + 60, updated_at=NOW + 2)
    assert store.transition(key, {Status.SUSPENDED}, Status.SUSPENDED, now=NOW + 3, version=4)
    assert store.get(key) == rec.replace(due_at=NOW + 60, updated_at=NOW + 3, version=4)
    assert store.transition(key, {Status.SUSPENDED}, Status.SUSPENDED, now=NOW + 4, seal="")
    assert store.get(key) == rec.replace(due_at=NOW + 60, updated_at=NOW + 4, version=4, seal="")
    # A record written before versions existed (version 0) matches expect_version=0.
    old = kh("keep-token", "old")
    store.put(make(old))
    assert store.transition(old, {Status.SUSPENDED}, Status.CLAIMED, now=NOW + 5, expect_version=1) is False
    assert store.transition(old, {Status.SUSPENDED}, Status.CLAIMED, now=NOW + 5, version=1, seal=SEAL, expect_version=0)
    assert store.get(old) == make(old, status=Status.CLAIMED, updated_at=NOW + 5, version=1, seal=SEAL)


def test_replace_blob_sets_version_and_seal(store: BaseStore) -> None:
    key = kh("rotate-token")
    rec = make(key, blob=b"old-ciphertext", version=8, seal=SEAL)
    store.put(rec)
    assert store.replace_blob(key, b"not-the-blob", b"new", now=NOW + 1, version=9, seal="a" * 64) is False
    assert store.get(key) == rec
    assert store.replace_blob(key, b"old-ciphertext", b"new-ciphertext", now=NOW + 2, version=9, seal="a" * 64) is True
    rotated = rec.replace(blob=b"new-ciphertext", updated_at=NOW + 2, version=9, seal="a" * 64)
    assert store.get(key) == rotated
    assert store.replace_blob(key, b"new-ciphertext", b"again", now=NOW + 3) is True
    assert store.get(key) == rotated.replace(blob=b"again", updated_at=NOW + 3)
    # Larger than a chunk where a store chunks small blobs (FalkorDB: 1 KiB).
    big = os.urandom(64 * 1024 + 17)
    assert store.replace_blob(key, b"again", big, now=NOW + 4, version=10, seal="b" * 64) is True
    assert store.get(key) == rotated.replace(blob=big, updated_at=NOW + 4, version=10, seal="b" * 64)


# -- atomic claim across processes ----------------------------------------------------------------


def race(
    backend: Backend,
    url: str,
    options: dict[str, Any],
    keys: list[str],
    racers: int = 8,
    target: Callable[..., None] = contract_workers.claim_all,
    extra: tuple[Any, ...] = (),
) -> list[list[Any]]:
    """``racers`` processes (threads for in-process stores) run ``target`` on the same keys; returns each one's wins.

    ``target`` is a :mod:`contract_workers` function taking ``(url, options, keys, barrier, results,
    now, lease, *extra)``.
    """
    args: tuple[Any, ...]
    if backend.cross_process:
        # fork is quick (no re-import); spawn when threads are alive, as forking them is unsafe.
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() and threading.active_count() == 1 else "spawn"
        ctx = multiprocessing.get_context(method)
        barrier: Any = ctx.Barrier(racers)
        results: Any = ctx.Queue()
        workers: list[Any] = [
            ctx.Process(target=target, args=(url, options, keys, barrier, results, NOW, LEASE, *extra)) for _ in range(racers)
        ]
    else:
        barrier = threading.Barrier(racers)
        results = queue.Queue()
        args = (url, options, keys, barrier, results, NOW, LEASE, *extra)
        workers = [threading.Thread(target=target, args=args) for _ in range(racers)]
    for w in workers:
        w.start()
    reports = []
    # Inside pytest's 300 s per-test timeout, so a slow store fails here with racers stopped.
    deadline = time.monotonic() + 240
    try:
        for _ in workers:
            reports.append(results.get(timeout=max(1.0, deadline - time.monotonic())))
    finally:
        for w in workers:
            w.join(timeout=max(1.0, deadline - time.monotonic()))
            if backend.cross_process and w.is_alive():
                w.kill()  # a racer left running would load the server for every later test
                w.join(timeout=10)
    errors = [r[2] for r in reports if r[0] != "ok"]
    assert not errors, "a racer failed:\n" + "\n".join(errors)
    if backend.cross_process:
        assert len({r[1] for r in reports}) == racers, "racers did not run in separate processes"
    return [r[2] for r in reports]


def check_exactly_one_winner(store: BaseStore, keys: list[str], wins: list[list[str]]) -> None:
    flat = [k for w in wins for k in w]
    assert len(flat) == len(set(flat)), f"{len(flat) - len(set(flat))} keys were claimed twice"
    assert set(flat) == set(keys), f"{len(set(keys) - set(flat))} keys were claimed by nobody"
    for k in keys:
        got = store.get(k)
        assert got is not None and got.status is Status.CLAIMED and got.due_at == NOW + LEASE


@pytest.mark.parametrize("count", [100, 1000])
def test_claim_race_has_exactly_one_winner_per_key(
    backend: Backend, store: BaseStore, store_url: str, store_options: dict[str, Any], count: int
) -> None:
    if count > 100 and backend.name == "mongomock":
        # Threads over one in-process fake that serialises every call: 1,000 keys take 40 s
        # and interleave no differently from 100. Real MongoDB runs both sizes.
        pytest.skip("mongomock: the 100-key race covers the in-process fake")
    keys = [kh("race", i) for i in range(count)]
    store.put_many(make(k) for k in keys)
    wins = race(backend, store_url, store_options, keys)
    check_exactly_one_winner(store, keys, wins)


def test_version_race_has_exactly_one_winner_per_key(
    backend: Backend, store: BaseStore, store_url: str, store_options: dict[str, Any]
) -> None:
    """Racers that all read version 5 re-seal each key in place (suspended -> suspended): the
    status check lets every one of them through, so only the version check can stop all but one."""
    keys = [kh("version-race", i) for i in range(100)]
    store.put_many(make(k, version=5, seal=SEAL) for k in keys)
    wins = race(backend, store_url, store_options, keys, target=contract_workers.reseal_all, extra=(5,))
    flat = [k for w in wins for k, _ in w]
    assert len(flat) == len(set(flat)), f"{len(flat) - len(set(flat))} keys were won twice"
    assert set(flat) == set(keys), f"{len(set(keys) - set(flat))} keys were won by nobody"
    winner_seal = {k: seal for w in wins for k, seal in w}
    for k in keys:
        got = store.get(k)
        assert got is not None and got.status is Status.SUSPENDED and got.due_at == NOW + LEASE
        assert (got.version, got.seal) == (6, winner_seal[k]), "the record does not carry the winner's version and seal"


# -- leases -------------------------------------------------------------------------------------


def test_lease_expiry_and_reopen(store: BaseStore, open_test_store: Callable[[], BaseStore]) -> None:
    key = kh("lease")
    expires = NOW + 3600
    store.put(make(key, expires_at=expires))
    other = open_test_store()

    assert store.transition(key, {Status.SUSPENDED}, Status.CLAIMED, due_at=NOW + LEASE, now=NOW)
    assert not other.transition(key, {Status.SUSPENDED}, Status.CLAIMED, due_at=NOW + LEASE, now=NOW)
    assert store.due(NOW + LEASE - 0.001) == [], "a live lease is due"

    # The claimant died: once the lease lapses cleanup sees the claim and re-opens it, once.
    lapsed = store.due(NOW + LEASE)
    assert [(r.key_hash, r.status) for r in lapsed] == [(key, Status.CLAIMED)]
    assert other.transition(key, {Status.CLAIMED}, Status.SUSPENDED, due_at=expires, now=NOW + LEASE)
    assert not store.transition(key, {Status.CLAIMED}, Status.SUSPENDED, due_at=expires, now=NOW + LEASE)
    got = store.get(key)
    assert got is not None and got.status is Status.SUSPENDED and got.due_at == expires
    assert store.due(NOW + LEASE + 1) == []

    # ... and a new resume can claim it again.
    assert store.transition(key, {Status.SUSPENDED}, Status.CLAIMED, due_at=NOW + 2 * LEASE, now=NOW + LEASE + 1)
    assert [r.key_hash for r in store.due(expires)] == [key]


# -- scan ---------------------------------------------------------------------------------------


def populate(store: BaseStore, n: int, tag: str) -> list[StoredRecord]:
    kinds = [Kind.SUSPENSION, Kind.SUSPENSION, Kind.CHECKPOINT]
    statuses = [Status.SUSPENDED, Status.CLAIMED, Status.RESUMED, Status.CANCELLED]
    records = []
    for i in range(n):
        kind = kinds[i % 3]
        status = Status.ACTIVE if kind is Kind.CHECKPOINT else statuses[(i // 3) % 4]
        records.append(make(kh(tag, i), kind=kind, status=status, metadata={"i": i}, blob=b"b%d" % i))
    store.put_many(records)
    return records


@pytest.mark.parametrize(
    "filters",
    [
        {},
        {"kind": Kind.SUSPENSION},
        {"status": Status.CLAIMED},
        {"kind": Kind.CHECKPOINT, "status": Status.ACTIVE},
        {"kind": Kind.CHECKPOINT, "status": Status.SUSPENDED},
    ],
    ids=["all", "kind", "status", "kind+status", "none-match"],
)
def test_scan_pages_cover_everything_once(store: BaseStore, filters: dict[str, Any]) -> None:
    records = populate(store, 301, "scan")
    expected = sorted((r for r in records if all(getattr(r, f) is v for f, v in filters.items())), key=lambda r: r.key_hash)
    for limit in (1, 7, 100, 1000):
        got = walk(store, limit, **filters)
        assert [r.key_hash for r in got] == [r.key_hash for r in expected], f"limit={limit}"
    without = walk(store, 50, **filters)
    assert without == [r.replace(blob=b"") for r in expected], "with_blob=False must keep everything but the blob"
    assert walk(store, 50, with_blob=True, **filters) == expected


def test_scan_empty_store_and_cursor_past_the_end(store: BaseStore) -> None:
    page = store.scan()
    assert list(page.items) == [] and page.next_cursor is None
    store.put(make(kh("one")))
    assert store.scan(cursor="f" * 64).items == []
    page = store.scan(limit=1)
    assert [r.key_hash for r in page.items] == [kh("one")]
    if page.next_cursor is not None:  # a store may not know yet that the walk has ended
        assert store.scan(limit=1, cursor=page.next_cursor).items == []


def test_scan_under_concurrent_writes_has_no_gaps_or_duplicates(store: BaseStore, open_test_store: Callable[[], BaseStore]) -> None:
    stable = {r.key_hash for r in populate(store, 200, "stable")}
    volatile = [kh("volatile", i) for i in range(200)]
    store.put_many(make(k) for k in volatile[:100])
    writer_store = open_test_store()
    stop = threading.Event()
    failures: list[BaseException] = []
    writes = 0

    def churn() -> None:
        nonlocal writes
        rng = random.Random(3)
        try:
            while not stop.is_set():
                k = rng.choice(volatile)
                if rng.random() < 0.5:
                    writer_store.put(make(k))
                else:
                    writer_store.delete(k)
                writes += 1
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test thread
            failures.append(exc)

    thread = threading.Thread(target=churn)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while writes < 20 and time.monotonic() < deadline and not failures:
            time.sleep(0.005)  # poll: start scanning only once the writer is really running
        walks = [walk(store, limit) for limit in (3, 17)]
    finally:
        stop.set()
        thread.join(timeout=60)
    assert not failures, failures
    assert writes >= 20, "the concurrent writer never got going"
    for seen in walks:
        keys = [r.key_hash for r in seen]
        assert len(keys) == len(set(keys)), "a record was returned twice"
        assert stable <= set(keys), f"{len(stable - set(keys))} records present throughout were skipped"
        assert set(keys) <= stable | set(volatile)


# -- due index ----------------------------------------------------------------------------------


def test_due_order_limit_and_boundary(store: BaseStore) -> None:
    dues = [NOW - 100, NOW - 50.5, NOW - 50.25, NOW - 1, NOW, NOW + 1e-3, NOW + 10]
    rng = random.Random(11)
    order = list(range(len(dues)))
    rng.shuffle(order)  # written out of order
    for i in order:
        store.put(make(kh("due", i), due_at=dues[i], blob=b"blob-%d" % i))
    store.put(make(kh("due", "never"), expires_at=None, due_at=None))
    ties = [kh("tie", i) for i in range(3)]
    for k in ties:
        store.put(make(k, due_at=NOW - 75))

    got = store.due(NOW, limit=100)
    assert [r.due_at for r in got] == sorted(r.due_at for r in got if r.due_at is not None), "not earliest first"
    assert {r.key_hash for r in got} == {kh("due", i) for i in range(5)} | set(ties), "due_at <= now is due"
    assert all(r.blob.startswith(b"blob-") or r.key_hash in ties for r in got)
    assert store.get(kh("due", 0)) == got[0]

    first = store.due(NOW, limit=1)
    assert [r.key_hash for r in first] == [kh("due", 0)]
    four = store.due(NOW, limit=4)
    assert [r.key_hash for r in four][0] == kh("due", 0) and {r.key_hash for r in four[1:]} == set(ties)
    assert store.due(NOW - 1000) == []
    assert store.due(NOW, limit=0) == []


def test_due_touches_only_due_records(store: BaseStore) -> None:
    """20,000 records not due and 10 due: due() returns exactly the 10 (the index, not a scan, finds them).

    Store-specific tests prove the index is used (EXPLAIN for SQL, read counts
    for files); this one holds every store to the result.
    """
    n = 20_000
    batch = 1000
    for start in range(0, n, batch):
        store.put_many(
            make(kh("later", i), due_at=None if i % 10 == 0 else NOW + 10**6 + i, blob=b"x" * 16) for i in range(start, start + batch)
        )
    due_keys = {kh("now", i) for i in range(10)}
    store.put_many(make(k, due_at=NOW - i) for i, k in enumerate(sorted(due_keys)))
    got = store.due(NOW, limit=100)
    assert {r.key_hash for r in got} == due_keys
    assert len(got) == 10
    assert store.due(NOW, limit=3) == got[:3]


# -- records that do not decode -----------------------------------------------------------------

#: What each ``corrupt`` edit makes the store report (``field`` differs by what a database can hold).
POISON_REASONS = {
    "metadata": r"^metadata is not (JSON|base64 JSON text)$",
    "status": rf"^unknown status '{BAD_STATUS}'$",
    "field": r"^(created_at is missing|created_at is not a number|unknown kind 'gadget')$",
}


@pytest.mark.parametrize("how", sorted(POISON_REASONS))
def test_a_record_that_does_not_decode_poisons_only_itself(backend: Backend, store: BaseStore, how: str) -> None:
    """One row edited below the API: get() refuses it, scan() and due() still return every
    other record and a placeholder for it, quarantine() takes it out of due(), delete() removes it."""
    if backend.corrupt is None:
        pytest.skip(f"{backend.name} has no level below its API to corrupt")
    good = [make(kh("poison", i), due_at=NOW - 30 + i, metadata={"i": i}) for i in range(4)]
    bad = make(kh("poison", "bad"), due_at=NOW - 20.5, metadata={"secret-ish": "state"})
    store.put_many([*good, bad])
    backend.corrupt(store, bad.key_hash, how)

    with pytest.raises(IntegrityError) as info:
        store.get(bad.key_hash)
    assert info.value.store == store.name
    assert info.value.key == bad.key_hash[:12]
    reason = info.value.message
    assert re.fullmatch(POISON_REASONS[how], reason), reason
    for content in (BAD_METADATA, "secret-ish", "demo.step"):
        assert content not in str(info.value), "the error quotes the row's content"
    for rec in good:
        assert store.get(rec.key_hash) == rec

    def check(listed: list[StoredRecord], *, with_blob: bool) -> None:
        by_key = {r.key_hash: r for r in listed}
        assert len(by_key) == len(listed) == len(good) + 1, "a record was hidden or repeated"
        for rec in good:
            assert by_key[rec.key_hash] == (rec if with_blob else rec.replace(blob=b""))
        placeholder = by_key[bad.key_hash]
        assert placeholder.poisoned == reason
        assert placeholder == StoredRecord(bad.key_hash, Kind.SUSPENSION, Status.SUSPENDED, b"", poisoned=reason)

    for limit in (1, 2, 100):
        check(walk(store, limit), with_blob=False)
    check(walk(store, 3, with_blob=True), with_blob=True)
    due = store.due(NOW)
    check(due, with_blob=True)
    assert [r.key_hash for r in due if r.poisoned is None] == [r.key_hash for r in good], "the good records lost their order"
    assert [r.key_hash for r in store.due(NOW, limit=2)] == [good[0].key_hash, good[1].key_hash]

    # Taken out of the due index, kept for inspection: cleanup never sees it again.
    assert store.quarantine(bad.key_hash) is True
    for _ in range(2):
        assert store.due(NOW + 10**6) == good
    assert bad.key_hash in {r.key_hash for r in walk(store, 100)}
    with pytest.raises(IntegrityError):
        store.get(bad.key_hash)
    assert store.quarantine(bad.key_hash) is True  # still there: it existed
    assert store.quarantine(kh("poison", "missing")) is False

    assert store.delete(bad.key_hash) is True
    assert store.get(bad.key_hash) is None
    assert walk(store, 100) == [r.replace(blob=b"") for r in sorted(good, key=lambda r: r.key_hash)]
    assert store.due(NOW) == good


def test_quarantine_keeps_a_record_that_decodes_but_takes_it_out_of_due(store: BaseStore) -> None:
    rec = make(kh("quarantine"), due_at=NOW - 1, version=3, seal=SEAL, blob=os.urandom(70_000))
    other = make(kh("quarantine", "other"), due_at=NOW - 2)
    store.put_many([rec, other])
    assert store.quarantine(rec.key_hash) is True
    assert store.get(rec.key_hash) == rec.replace(due_at=None), "quarantine changed more than due_at"
    assert store.due(NOW + 10**6) == [other]
    # A later write that sets due_at again puts it back: quarantine is not a tombstone.
    assert store.transition(rec.key_hash, {Status.SUSPENDED}, Status.CLAIMED, due_at=NOW + 5, now=NOW)
    assert [r.key_hash for r in store.due(NOW + 10)] == [other.key_hash, rec.key_hash]
    assert store.quarantine(kh("quarantine", "missing")) is False


# -- health, fork, outages ----------------------------------------------------------------------


def test_health_ok(store: BaseStore) -> None:
    info = store.health()
    assert info["ok"] is True, info
    assert info["store"] == store.name
    assert "://" in info["store"]


def test_fork_child_uses_its_own_connection(backend: Backend, store: BaseStore) -> None:
    if not hasattr(os, "fork"):
        pytest.skip("no fork() on this platform")
    parent_key, child_key = kh("fork", "parent"), kh("fork", "child")
    store.put(make(parent_key))
    assert store.get(parent_key) is not None  # the parent's connection is open and in use

    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child, which reports through its exit code
        code = 1
        try:
            ok = store.get(parent_key) is not None
            store.put(make(child_key, blob=b"from the child"))
            ok = ok and store.transition(child_key, {Status.SUSPENDED}, Status.CLAIMED, now=NOW)
            ok = ok and store.get(child_key) is not None
            store.close()
            code = 0 if ok else 2
        finally:
            os._exit(code)

    deadline = time.monotonic() + 60
    status = None
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.01)
    else:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        pytest.fail("the forked child did not finish within 60 s")
    assert status is not None and os.waitstatus_to_exitcode(status) == 0, "the child could not use the store"
    # The parent's own connection survived the child.
    assert store.get(parent_key) is not None
    store.put(make(kh("fork", "after")))
    if backend.cross_process:
        got = store.get(child_key)
        assert got is not None and got.status is Status.CLAIMED and got.blob == b"from the child"


def dead_url(backend: Backend, url: str) -> str:
    """The backend's URL pointed at a closed port on this host."""
    if not backend.cross_process:
        pytest.skip(f"{backend.name} runs in-process: there is no server to lose")
    parts = urlsplit(url)
    if not parts.hostname or parts.scheme.endswith("+srv"):
        pytest.skip(f"{backend.name} has no host:port in its URL")
    userinfo, _, _ = parts.netloc.rpartition("@")
    netloc = f"{userinfo}@127.0.0.1:{free_port()}" if userinfo else f"127.0.0.1:{free_port()}"
    return urlunsplit(parts._replace(netloc=netloc))


def test_unreachable_server_raises_store_unavailable(backend: Backend, store_url: str, store_options: dict[str, Any]) -> None:
    url = dead_url(backend, store_url)
    dead = open_store(url, **store_options)  # connecting is lazy: opening must not fail
    try:
        started = time.monotonic()
        with pytest.raises(StoreUnavailable) as info:
            dead.get(kh("dead"))
        assert info.value.store == dead.name
        with pytest.raises(StoreUnavailable):
            dead.put(make(kh("dead")))
        with pytest.raises(StoreUnavailable):
            dead.transition(kh("dead"), {Status.SUSPENDED}, Status.CLAIMED, now=NOW)
        health = dead.health()
        assert health["ok"] is False and health["store"] == dead.name
        assert time.monotonic() - started < 60, "giving up on a dead server took over a minute"
    finally:
        dead.close()
