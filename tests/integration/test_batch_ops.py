"""``transition_many`` and ``delete_many``, the batch forms cleanup and ``resume_many`` use, on every store.

Written once against the :class:`~celery_persist.stores.BaseStore` API (the ``store``
fixture runs it on every registered backend): exactly the records whose status and
version match move (and only they are returned), mismatches are left alone, the
indexes follow, and of concurrent batch callers over the same records each record
moves (or is deleted) once in total.
"""

from __future__ import annotations

import os
import random
import traceback
from typing import Any

import pytest

from celery_persist.stores import KEEP, BaseStore, Kind, Status, TransitionSpec, open_store
from tests.integration.backends import Backend
from tests.integration.test_store_contract import LEASE, NOW, SEAL, kh, make, race

pytestmark = pytest.mark.integration

OTHER_SEAL = "c" * 64


def claim_spec(key: str, *, version: int | None = None, expect_version: int | None = None) -> TransitionSpec:
    return TransitionSpec(
        key, frozenset({Status.SUSPENDED}), Status.CLAIMED, due_at=NOW + LEASE, version=version, seal=None, expect_version=expect_version
    )


# -- transition_many -------------------------------------------------------------------------------


def test_transition_many_moves_exactly_the_matching_records(store: BaseStore) -> None:
    keys = {name: kh("tm", name) for name in ("a", "b", "stale", "wrong-status", "missing", "c", "any-version")}
    originals = {
        "a": make(keys["a"], version=3, seal=SEAL),
        "b": make(keys["b"], version=7, seal=SEAL),
        "stale": make(keys["stale"], version=4, seal=SEAL),  # asked with version 3: someone moved it on
        "wrong-status": make(keys["wrong-status"], status=Status.CANCELLED, version=3, seal=SEAL),
        "c": make(keys["c"], status=Status.CLAIMED, version=1, seal=SEAL),
        "any-version": make(keys["any-version"], version=9, seal=SEAL),
    }
    store.put_many(originals.values())
    due = NOW + 7 * 86400
    specs = [
        TransitionSpec(keys["b"], frozenset({Status.SUSPENDED}), Status.EXPIRED, due_at=due, version=8, seal="b" * 64, expect_version=7),
        TransitionSpec(
            keys["stale"], frozenset({Status.SUSPENDED}), Status.EXPIRED, due_at=due, version=4, seal="x" * 64, expect_version=3
        ),
        TransitionSpec(keys["a"], frozenset({Status.SUSPENDED}), Status.EXPIRED, due_at=due, version=4, seal="a" * 64, expect_version=3),
        TransitionSpec(keys["wrong-status"], frozenset({Status.SUSPENDED}), Status.EXPIRED, due_at=due, version=4, expect_version=3),
        TransitionSpec(keys["missing"], frozenset({Status.SUSPENDED}), Status.EXPIRED, due_at=due, version=1, expect_version=0),
        # Several statuses allowed; due_at None takes it out of the due index.
        TransitionSpec(keys["c"], frozenset({Status.SUSPENDED, Status.CLAIMED}), Status.RESUMED, due_at=None, version=2, seal="c" * 64),
        # No version check, and version / seal / due_at left as they are.
        TransitionSpec(keys["any-version"], frozenset({Status.SUSPENDED}), Status.CANCELLED),
    ]
    moved = store.transition_many(specs, now=NOW + 5)
    assert moved == [keys["b"], keys["a"], keys["c"], keys["any-version"]], "the winners, in the order asked"

    assert store.get(keys["a"]) == originals["a"].replace(status=Status.EXPIRED, due_at=due, version=4, seal="a" * 64, updated_at=NOW + 5)
    assert store.get(keys["b"]) == originals["b"].replace(status=Status.EXPIRED, due_at=due, version=8, seal="b" * 64, updated_at=NOW + 5)
    assert store.get(keys["c"]) == originals["c"].replace(status=Status.RESUMED, due_at=None, version=2, seal="c" * 64, updated_at=NOW + 5)
    assert store.get(keys["any-version"]) == originals["any-version"].replace(status=Status.CANCELLED, updated_at=NOW + 5)
    for name in ("stale", "wrong-status"):
        assert store.get(keys[name]) == originals[name], f"{name}: a mismatch must leave the record exactly as it was"
    assert store.get(keys["missing"]) is None

    # The indexes follow: listing by status and the due index.
    expired = {r.key_hash for r in store.scan(kind=Kind.SUSPENSION, status=Status.EXPIRED, limit=100).items}
    assert expired == {keys["a"], keys["b"]}
    due_now = {r.key_hash for r in store.due(NOW + 3600, limit=100)}
    assert due_now == {keys["stale"], keys["wrong-status"], keys["any-version"]}, "c left the index, a and b are due next week"
    assert {r.key_hash for r in store.due(due, limit=100)} == due_now | {keys["a"], keys["b"]}


def test_transition_many_edge_cases(store: BaseStore) -> None:
    assert store.transition_many([], now=NOW) == []
    key = kh("tm-edge")
    store.put(make(key, version=2, seal=SEAL))
    with pytest.raises(ValueError):
        store.transition_many([claim_spec(key), claim_spec(key)], now=NOW)
    assert store.get(key) == make(key, version=2, seal=SEAL), "a refused batch changes nothing"
    # An empty expect set never matches (as transition()).
    assert store.transition_many([TransitionSpec(key, frozenset(), Status.CLAIMED)], now=NOW) == []
    # due_at KEEP keeps it; the spec takes any collection of statuses.
    spec = TransitionSpec(key, {Status.SUSPENDED}, Status.SUSPENDED, due_at=KEEP, version=3, seal=OTHER_SEAL, expect_version=2)  # type: ignore[arg-type]
    assert store.transition_many([spec], now=NOW + 1) == [key]
    assert store.get(key) == make(key, version=3, seal=OTHER_SEAL, updated_at=NOW + 1)
    assert store.transition_many([spec], now=NOW + 2) == [], "the same compare-and-set again: the version moved on"


def test_transition_many_over_many_records(store: BaseStore) -> None:
    """More records than one statement or pipeline of any store takes, a third of them stale."""
    keys = [kh("tm-many", i) for i in range(1200)]
    store.put_many(make(k, version=5, seal=SEAL) for k in keys)
    rng = random.Random(3)
    stale = set(rng.sample(keys, 400))
    specs = [claim_spec(k, version=6, expect_version=4 if k in stale else 5) for k in keys]
    rng.shuffle(specs)
    moved = store.transition_many(specs, now=NOW)
    assert moved == [s.key_hash for s in specs if s.key_hash not in stale]
    claimed = {r.key_hash for r in store.due(NOW + LEASE, limit=2000) if r.status is Status.CLAIMED}
    assert claimed == set(keys) - stale
    assert all(store.get(k).version == (5 if k in stale else 6) for k in rng.sample(keys, 50))  # type: ignore[union-attr]


def batch_claim_all(url: str, options: dict[str, Any], keys: list[str], barrier: Any, results: Any, now: float, lease: float) -> None:
    """A racer (see ``test_store_contract.race``): ``transition_many`` over every key, in batches of 100
    in an order of its own; reports the keys it moved."""
    try:
        store = open_store(url, **options)
        try:
            store.get(keys[0])
            order = list(keys)
            random.Random(os.getpid() ^ id(order)).shuffle(order)
            barrier.wait(timeout=120)
            wins: list[str] = []
            for i in range(0, len(order), 100):
                specs = [
                    TransitionSpec(k, frozenset({Status.SUSPENDED}), Status.CLAIMED, due_at=now + lease, version=6, seal=f"{os.getpid():x}")
                    for k in order[i : i + 100]
                ]
                wins += store.transition_many(specs, now=now)
        finally:
            store.close()
        results.put(("ok", os.getpid(), wins))
    except BaseException:  # noqa: BLE001 - reported to the parent, which fails the test
        results.put(("error", os.getpid(), traceback.format_exc()))


def batch_delete_all(url: str, options: dict[str, Any], keys: list[str], barrier: Any, results: Any, now: float, lease: float) -> None:
    """A racer: ``delete_many`` over every key in batches of 100; reports how many it deleted."""
    try:
        store = open_store(url, **options)
        try:
            store.get(keys[0])
            order = list(keys)
            random.Random(os.getpid() ^ id(order)).shuffle(order)
            barrier.wait(timeout=120)
            gone = sum(store.delete_many(order[i : i + 100]) for i in range(0, len(order), 100))
        finally:
            store.close()
        results.put(("ok", os.getpid(), [gone]))
    except BaseException:  # noqa: BLE001 - reported to the parent, which fails the test
        results.put(("error", os.getpid(), traceback.format_exc()))


def test_concurrent_batches_move_each_record_once(
    backend: Backend, store: BaseStore, store_url: str, store_options: dict[str, Any]
) -> None:
    keys = [kh("tm-race", i) for i in range(500)]
    store.put_many(make(k, version=5, seal=SEAL) for k in keys)
    wins = race(backend, store_url, store_options, keys, racers=4, target=batch_claim_all)
    flat = [k for w in wins for k in w]
    assert len(flat) == len(set(flat)), f"{len(flat) - len(set(flat))} records moved twice"
    assert set(flat) == set(keys), f"{len(set(keys) - set(flat))} records moved by nobody"
    for k in random.Random(1).sample(keys, 50):
        got = store.get(k)
        assert got is not None and got.status is Status.CLAIMED and got.due_at == NOW + LEASE and got.version == 6


# -- delete_many -----------------------------------------------------------------------------------


def test_delete_many(store: BaseStore) -> None:
    assert store.delete_many([]) == 0
    doomed = [kh("dm", i) for i in range(30)]
    kept = [kh("dm-kept", i) for i in range(5)]
    store.put_many(make(k, expires_at=NOW - 10, blob=os.urandom(100)) for k in doomed + kept)
    store.put(make(kh("dm-cp"), kind=Kind.CHECKPOINT, status=Status.ACTIVE, expires_at=None, due_at=None))
    asked = [*doomed, kh("dm", "missing"), doomed[0], kh("dm-cp")]
    assert store.delete_many(asked) == len(doomed) + 1, "each record that existed counted once"
    assert all(store.get(k) is None for k in [*doomed, kh("dm-cp")])
    assert {r.key_hash for r in store.due(NOW, limit=100)} == set(kept), "deleted records left the due index"
    assert {r.key_hash for r in store.scan(limit=100).items} == set(kept)
    assert store.delete_many(doomed) == 0


@pytest.mark.parametrize("how", ["status", "metadata", "field"])
def test_delete_many_removes_records_that_do_not_decode(backend: Backend, store: BaseStore, how: str) -> None:
    if backend.corrupt is None:
        pytest.skip(f"{backend.name} has no level below its API to edit")
    bad, good = kh("dm-bad", how), kh("dm-good", how)
    store.put_many([make(bad, expires_at=NOW - 5), make(good, expires_at=NOW - 5)])
    backend.corrupt(store, bad, how)
    assert store.delete_many([bad, good]) == 2
    assert store.get(bad) is None and store.get(good) is None
    assert store.due(NOW + 3600, limit=10) == [] and store.scan(limit=10).items == []
    assert all(store.scan(kind=kind, status=status, limit=10).items == [] for kind in Kind for status in Status)


def test_delete_many_over_many_records(store: BaseStore) -> None:
    keys = [kh("dm-many", i) for i in range(1500)]
    store.put_many(make(k) for k in keys)
    assert store.delete_many(keys[:1400]) == 1400
    assert {r.key_hash for r in store.scan(limit=1000).items} == set(keys[1400:])


def test_concurrent_batch_deletes_delete_each_record_once(
    backend: Backend, store: BaseStore, store_url: str, store_options: dict[str, Any]
) -> None:
    keys = [kh("dm-race", i) for i in range(400)]
    store.put_many(make(k) for k in keys)
    counts = race(backend, store_url, store_options, keys, racers=4, target=batch_delete_all)
    assert sum(c[0] for c in counts) == len(keys)
    assert store.scan(limit=10).items == []


# -- MongoDB's bulk path (mongomock stands in for a server) ------------------------------------------


def test_mongodb_bulk_path(backend: Backend, store: BaseStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """The mongomock backend runs with ``bulk=False`` (its ``bulk_write`` rejects the ``sort`` pymongo
    gives ``UpdateOne``); teach it to ignore that argument so the one ``bulk_write`` path runs here too."""
    if backend.name != "mongomock":
        pytest.skip("mongomock only: a real server runs the bulk path in the tests above")
    import mongomock.collection

    builder = mongomock.collection.BulkOperationBuilder
    for name in ("add_update", "add_replace"):
        original = getattr(builder, name)

        def without_sort(self: Any, *args: Any, sort: Any = None, __original: Any = original, **kwargs: Any) -> Any:
            return __original(self, *args, **kwargs)

        monkeypatch.setattr(builder, name, without_sort)
    monkeypatch.setattr(store, "_bulk", True)
    test_transition_many_moves_exactly_the_matching_records(store)


# -- Redis: a server that lost its scripts (restart, SCRIPT FLUSH, failover) -------------------------


def test_redis_batch_does_not_depend_on_the_script_cache(backend: Backend, store: BaseStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """transition_many sends its script's text (EVAL): a server that lost its scripts still runs it."""
    if not backend.name.startswith("redis"):
        pytest.skip("Redis only")
    keys = [kh("noscript", i) for i in range(20)]
    store.put_many(make(k) for k in keys)
    conn = store._connection()  # type: ignore[attr-defined]
    # The same script with a comment no server has seen: its first EVALSHA answers NOSCRIPT.
    unseen = conn.client.register_script(conn.transition.script + f"\n-- {os.urandom(8).hex()}\n")
    monkeypatch.setattr(store, "_conn", type(conn)(conn.client, conn.pid, unseen, conn.replace_blob))
    assert store.transition_many([claim_spec(k) for k in keys], now=NOW) == keys
    assert all(store.get(k).status is Status.CLAIMED for k in keys)  # type: ignore[union-attr]
