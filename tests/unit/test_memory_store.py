"""memory:// against the store contract of base.py (it is the reference implementation)."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from celery_persist.errors import IntegrityError
from celery_persist.stores.base import (
    KEEP,
    TERMINAL,
    BaseStore,
    Kind,
    Page,
    Status,
    StoredRecord,
    decode_record,
    decoded,
    dump_metadata,
    load_metadata,
    salvage,
)
from celery_persist.stores.memory import MemoryStore


def rec(kh: str, *, status: Status = Status.SUSPENDED, kind: Kind = Kind.SUSPENSION, due: float | None = None, **kw: Any) -> StoredRecord:
    return StoredRecord(kh, kind, status, kw.pop("blob", b"blob-" + kh.encode()), kw.pop("metadata", {"k": kh}), 1.0, due, due, 1.0)


def hx(i: int) -> str:
    return f"{i:064x}"


@pytest.fixture
def store() -> MemoryStore:
    return MemoryStore()


def test_put_get_delete_upsert(store: MemoryStore) -> None:
    assert store.get(hx(1)) is None
    store.put(rec(hx(1)))
    got = store.get(hx(1))
    assert got == rec(hx(1))
    store.put(rec(hx(1), blob=b"new", metadata={"v": 2}))
    got = store.get(hx(1))
    assert got is not None and got.blob == b"new" and dict(got.metadata) == {"v": 2}
    assert store.delete(hx(1)) is True and store.delete(hx(1)) is False and store.get(hx(1)) is None


def test_put_many(store: MemoryStore) -> None:
    store.put_many(rec(hx(i)) for i in range(5))
    assert [r.key_hash for r in store.scan().items] == [hx(i) for i in range(5)]


def test_times_and_metadata_round_trip_exactly(store: MemoryStore) -> None:
    md = {"f": 0.1, "big": 2**53 + 1, "s": "\u2713", "n": None, "nested": {"l": [1.5, True]}}
    r = StoredRecord(hx(1), Kind.CHECKPOINT, Status.ACTIVE, b"\x00" * 10, md, 1.0000000000000002, 1e10 + 0.1, 3.3, 4.4)
    store.put(r)
    assert store.get(hx(1)) == r


def test_metadata_is_not_shared_with_callers(store: MemoryStore) -> None:
    md: dict[str, Any] = {"tags": ["a"], "inner": {"x": 1}}
    store.put(rec(hx(1), metadata=md))
    md["tags"].append("mutated by the caller after put")
    md["inner"]["x"] = 2
    got = store.get(hx(1))
    assert got is not None and dict(got.metadata) == {"tags": ["a"], "inner": {"x": 1}}
    got.metadata["tags"].append("mutated by a reader")  # type: ignore[index]
    for view in (store.get(hx(1)), store.scan(with_blob=True).items[0]):
        assert view is not None and dict(view.metadata) == {"tags": ["a"], "inner": {"x": 1}}


def test_metadata_comes_back_as_json_would(store: MemoryStore) -> None:
    # Like every real store (JSON text): tuples become lists, keys become strings.
    store.put(rec(hx(1), metadata={"t": (1, 2), "d": {1: "one"}}))
    got = store.get(hx(1))
    assert got is not None and dict(got.metadata) == {"t": [1, 2], "d": {"1": "one"}}
    assert dump_metadata(got.metadata) == dump_metadata({"t": (1, 2), "d": {1: "one"}})


def test_transition_is_compare_and_set(store: MemoryStore) -> None:
    store.put(rec(hx(1), due=50.0))
    assert store.transition(hx(1), {Status.CLAIMED}, Status.RESUMED, now=2.0) is False
    assert store.transition(hx(2), {Status.SUSPENDED}, Status.CLAIMED, now=2.0) is False  # missing
    assert store.transition(hx(1), {Status.SUSPENDED, Status.CLAIMED}, Status.CLAIMED, due_at=60.0, now=2.0) is True
    got = store.get(hx(1))
    assert got is not None and (got.status, got.due_at, got.updated_at, got.expires_at) == (Status.CLAIMED, 60.0, 2.0, 50.0)
    assert store.transition(hx(1), {Status.CLAIMED}, Status.SUSPENDED, now=3.0) is True  # KEEP by default
    assert store.get(hx(1)).due_at == 60.0  # type: ignore[union-attr]
    assert store.transition(hx(1), {Status.SUSPENDED}, Status.CANCELLED, due_at=None, now=4.0) is True
    assert store.get(hx(1)).due_at is None  # type: ignore[union-attr]
    assert store.transition(hx(1), {Status.SUSPENDED}, Status.CLAIMED, due_at=KEEP, now=5.0) is False


def test_version_and_seal_default_and_round_trip(store: MemoryStore) -> None:
    old = rec(hx(1), due=5.0)
    assert (old.version, old.seal) == (0, "")  # a record written before they existed
    store.put(old)
    store.put(rec(hx(2), due=5.0).replace(version=7, seal="ab" * 32))
    assert store.get(hx(1)) == old
    got = store.get(hx(2))
    assert got is not None and (got.version, got.seal) == (7, "ab" * 32)
    assert [(r.version, r.seal) for r in store.scan().items] == [(0, ""), (7, "ab" * 32)]
    assert [(r.version, r.seal) for r in store.due(10.0)] == [(0, ""), (7, "ab" * 32)]


def test_transition_compares_the_version_and_sets_the_token(store: MemoryStore) -> None:
    before = rec(hx(1), due=50.0).replace(version=3, seal="s3")
    store.put(before)
    for wrong in (2, 4, 0):
        assert store.transition(hx(1), {Status.SUSPENDED}, Status.CLAIMED, now=2.0, version=9, seal="x", expect_version=wrong) is False
    assert store.get(hx(1)) == before, "a refused transition changed the record"
    assert store.transition(hx(1), {Status.CLAIMED}, Status.RESUMED, now=2.0, expect_version=3) is False  # status still decides
    assert store.transition(hx(1), {Status.SUSPENDED}, Status.CLAIMED, due_at=60.0, now=2.0, version=4, seal="s4", expect_version=3)
    assert store.get(hx(1)) == before.replace(status=Status.CLAIMED, due_at=60.0, updated_at=2.0, version=4, seal="s4")
    # Without version / seal both stay as they are; a seal may be set to "" and a version to 0.
    assert store.transition(hx(1), {Status.CLAIMED}, Status.SUSPENDED, now=3.0)
    got = store.get(hx(1))
    assert got is not None and (got.status, got.version, got.seal) == (Status.SUSPENDED, 4, "s4")
    assert store.transition(hx(1), {Status.SUSPENDED}, Status.SUSPENDED, now=4.0, version=0, seal="", expect_version=4)
    got = store.get(hx(1))
    assert got is not None and (got.version, got.seal) == (0, "")
    # A record written before versions existed is version 0.
    store.put(rec(hx(2)))
    assert store.transition(hx(2), {Status.SUSPENDED}, Status.CLAIMED, now=5.0, expect_version=1) is False
    assert store.transition(hx(2), {Status.SUSPENDED}, Status.CLAIMED, now=5.0, version=1, seal="s1", expect_version=0)


def test_transition_with_expect_version_has_one_winner_between_threads(store: MemoryStore) -> None:
    store.put(rec(hx(1)).replace(version=5))
    barrier = threading.Barrier(16)
    wins: list[bool] = []

    def claim(n: int) -> None:
        barrier.wait()
        # Every caller read version 5 and re-opens to SUSPENDED: only the version check stops the others.
        wins.append(store.transition(hx(1), {Status.SUSPENDED}, Status.SUSPENDED, now=1.0, version=6, seal=f"s{n}", expect_version=5))

    threads = [threading.Thread(target=claim, args=(n,)) for n in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert sorted(wins) == [False] * 15 + [True]
    got = store.get(hx(1))
    assert got is not None and got.version == 6


def test_transition_is_atomic_between_threads(store: MemoryStore) -> None:
    store.put(rec(hx(1)))
    barrier = threading.Barrier(16)
    wins: list[bool] = []

    def claim() -> None:
        barrier.wait()
        wins.append(store.transition(hx(1), {Status.SUSPENDED}, Status.CLAIMED, now=1.0))

    threads = [threading.Thread(target=claim) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert sorted(wins) == [False] * 15 + [True]


def test_replace_blob(store: MemoryStore) -> None:
    store.put(rec(hx(1), blob=b"old", due=9.0))
    assert store.replace_blob(hx(1), b"other", b"new", now=2.0) is False
    assert store.replace_blob(hx(2), b"old", b"new", now=2.0) is False
    assert store.replace_blob(hx(1), b"old", b"new", now=2.0) is True
    got = store.get(hx(1))
    assert got is not None and (got.blob, got.updated_at, got.due_at, got.status) == (b"new", 2.0, 9.0, Status.SUSPENDED)


def test_replace_blob_sets_version_and_seal(store: MemoryStore) -> None:
    store.put(rec(hx(1), blob=b"old").replace(version=2, seal="s2"))
    assert store.replace_blob(hx(1), b"other", b"new", now=2.0, version=3, seal="s3") is False
    got = store.get(hx(1))
    assert got is not None and (got.blob, got.version, got.seal) == (b"old", 2, "s2")
    assert store.replace_blob(hx(1), b"old", b"new", now=2.0, version=3, seal="s3") is True
    got = store.get(hx(1))
    assert got is not None and (got.blob, got.version, got.seal, got.updated_at) == (b"new", 3, "s3", 2.0)
    assert store.replace_blob(hx(1), b"new", b"newer", now=3.0) is True
    got = store.get(hx(1))
    assert got is not None and (got.blob, got.version, got.seal) == (b"newer", 3, "s3")


def test_base_replace_blob_default() -> None:
    class Plain(MemoryStore):
        replace_blob = BaseStore.replace_blob

    s = Plain()
    s.put(rec(hx(1), blob=b"old"))
    assert s.replace_blob(hx(1), b"x", b"new", now=2.0) is False
    assert s.replace_blob(hx(9), b"old", b"new", now=2.0) is False
    assert s.replace_blob(hx(1), b"old", b"new", now=2.0) is True
    assert s.get(hx(1)).blob == b"new"  # type: ignore[union-attr]
    assert s.replace_blob(hx(1), b"new", b"newer", now=3.0, version=4, seal="s4") is True
    got = s.get(hx(1))
    assert got is not None and (got.blob, got.version, got.seal, got.updated_at) == (b"newer", 4, "s4", 3.0)


def test_scan_pages_in_key_hash_order(store: MemoryStore) -> None:
    order = [7, 3, 9, 1, 5, 2, 8]
    for i in order:
        store.put(rec(hx(i), status=Status.CANCELLED if i % 2 == 0 else Status.SUSPENDED))
    store.put(rec(hx(4), kind=Kind.CHECKPOINT, status=Status.ACTIVE))
    p1 = store.scan(limit=3)
    assert [r.key_hash for r in p1.items] == [hx(1), hx(2), hx(3)] and p1.next_cursor == hx(3)
    assert all(r.blob == b"" for r in p1.items)
    p2 = store.scan(limit=3, cursor=p1.next_cursor)
    assert [r.key_hash for r in p2.items] == [hx(4), hx(5), hx(7)] and p2.next_cursor == hx(7)
    p3 = store.scan(limit=3, cursor=p2.next_cursor)
    assert [r.key_hash for r in p3.items] == [hx(8), hx(9)] and p3.next_cursor is None
    exact = store.scan(limit=8)
    assert len(exact.items) == 8 and exact.next_cursor is None  # full page, nothing after it
    assert [r.key_hash for r in store.scan(kind=Kind.CHECKPOINT).items] == [hx(4)]
    assert [r.key_hash for r in store.scan(status=Status.CANCELLED).items] == [hx(2), hx(8)]
    assert [r.key_hash for r in store.scan(kind=Kind.SUSPENSION, status=Status.SUSPENDED, limit=2).items] == [hx(1), hx(3)]
    assert store.scan(with_blob=True, limit=1).items[0].blob == b"blob-" + hx(1).encode()
    # A cursor that is not a stored key still means "strictly after".
    assert [r.key_hash for r in store.scan(cursor=hx(6)).items][:1] == [hx(7)]
    assert store.scan(cursor=hx(9)).items == [] and store.scan(cursor=hx(9)).next_cursor is None


def test_scan_with_filters_walks_everything(store: MemoryStore) -> None:
    for i in range(20):
        store.put(rec(hx(i), status=Status.RESUMED if i in (3, 17) else Status.SUSPENDED))
    found, cursor = [], None
    while True:
        page = store.scan(status=Status.RESUMED, limit=1, cursor=cursor)
        found += [r.key_hash for r in page.items]
        cursor = page.next_cursor
        if cursor is None:
            break
    assert found == [hx(3), hx(17)]


def test_due_earliest_first_with_limit(store: MemoryStore) -> None:
    for i, due in enumerate([30.0, 10.0, None, 20.0, 40.0]):
        store.put(rec(hx(i), due=due))
    assert [r.key_hash for r in store.due(25.0)] == [hx(1), hx(3)]
    assert [r.key_hash for r in store.due(100.0, limit=2)] == [hx(1), hx(3)]
    assert [r.due_at for r in store.due(100.0)] == [10.0, 20.0, 30.0, 40.0]
    assert store.due(5.0) == []
    assert all(r.blob for r in store.due(100.0))  # due() returns blobs
    assert len(store.due(100.0)) == 4  # reading does not consume


def test_due_follows_changes(store: MemoryStore) -> None:
    store.put(rec(hx(1), due=10.0))
    store.put(rec(hx(2), due=20.0))
    store.put(rec(hx(3), due=30.0))
    store.transition(hx(1), {Status.SUSPENDED}, Status.CLAIMED, due_at=50.0, now=1.0)  # moved later
    store.delete(hx(2))
    store.put(rec(hx(3), due=None))  # no longer due
    store.put(rec(hx(4), due=15.0))
    store.put(rec(hx(4), due=15.0))  # the same entry twice must not be returned twice
    assert [r.key_hash for r in store.due(40.0)] == [hx(4)]
    assert [(r.key_hash, r.status) for r in store.due(60.0)] == [(hx(4), Status.SUSPENDED), (hx(1), Status.CLAIMED)]
    store.transition(hx(1), {Status.CLAIMED}, Status.SUSPENDED, due_at=5.0, now=2.0)  # moved earlier
    assert [r.key_hash for r in store.due(60.0)] == [hx(1), hx(4)]


def test_named_stores_share_and_prefixes_separate() -> None:
    a = MemoryStore("memory://unit-shared-test")
    b = MemoryStore("memory://unit-shared-test/")
    c = MemoryStore("memory://unit-shared-test", prefix="other")
    d = MemoryStore("memory://")
    e = MemoryStore("memory://", prefix="p")
    a.put(rec(hx(1)))
    assert b.get(hx(1)) is not None
    assert c.get(hx(1)) is None and d.get(hx(1)) is None and e.get(hx(1)) is None
    assert MemoryStore().get(hx(1)) is None
    assert a.name == "memory://unit-shared-test" and d.name == "memory://"
    a.delete(hx(1))
    assert b.get(hx(1)) is None


def test_flags_health_close_and_context_manager(store: MemoryStore) -> None:
    assert MemoryStore.schemes == ("memory",) and not MemoryStore.durable and not MemoryStore.shared_across_processes
    assert store.health() == {"ok": True, "store": "memory://"}
    store.setup()
    store.setup()  # idempotent
    with store as s:
        s.put(rec(hx(1)))
    assert store.get(hx(1)) is not None  # close() of memory keeps the records
    assert repr(store) == "<MemoryStore memory://>"


def test_health_never_raises() -> None:
    class Down(MemoryStore):
        def scan(self, **kwargs: Any) -> Page:
            raise TimeoutError("no route")

    assert Down().health() == {"ok": False, "store": "memory://", "error": "TimeoutError"}


def test_base_types() -> None:
    assert str(Status.CLAIMED) == "claimed" and str(Kind.CHECKPOINT) == "checkpoint"
    assert Status("expired") is Status.EXPIRED and TERMINAL == {Status.RESUMED, Status.CANCELLED, Status.EXPIRED}
    r = rec(hx(1))
    assert r.replace(status=Status.CLAIMED).status is Status.CLAIMED and r.status is Status.SUSPENDED
    with pytest.raises(AttributeError):
        r.status = Status.CLAIMED  # type: ignore[misc]
    assert Page([]).next_cursor is None
    assert dump_metadata({"b": 1, "a": [0.1, "\u2713"]}) == '{"a":[0.1,"\u2713"],"b":1}'
    assert load_metadata(None) == {} and load_metadata("") == {} and load_metadata(b'{"a":1}') == {"a": 1}
    assert load_metadata("[1, 2]") == {}
    with pytest.raises(TypeError):
        BaseStore()  # type: ignore[abstract]


# -- records that do not decode ------------------------------------------------------------------


def plant(store: MemoryStore, kh: str, **fields: Any) -> None:
    """Replace the kept record with one whose fields are not what their types say (as an edit below the API)."""
    with store._lock:
        store._records[kh] = store._records[kh].replace(**fields)


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"metadata": "{not json"}, "metadata is not JSON"),
        ({"metadata": 7}, "metadata is not JSON text"),
        ({"status": "revived"}, "unknown status 'revived'"),
        ({"status": "x" * 100}, "unknown status 'xxxxxxxxxxxxxxxxxxxxxxxx...'"),
        ({"kind": None}, "kind is missing"),
        ({"kind": b"\xff"}, "kind is not UTF-8 text"),
        ({"created_at": None}, "created_at is missing"),
        ({"updated_at": "soon"}, "updated_at is not a number"),
        ({"expires_at": True}, "expires_at is not a number"),
        ({"version": "seven"}, "version is not an integer"),
        ({"version": 1.5}, "version is not an integer"),
        ({"seal": 7}, "seal is not text"),
        ({"blob": 10**12}, "blob is not bytes"),
    ],
)
def test_a_record_that_does_not_decode_is_poisoned_not_raised(store: MemoryStore, fields: dict[str, Any], reason: str) -> None:
    store.put_many([rec(hx(1), due=5.0), rec(hx(2), due=6.0, metadata={"secret": "state"}), rec(hx(3), due=7.0)])
    plant(store, hx(2), **fields)
    with pytest.raises(IntegrityError) as info:
        store.get(hx(2))
    assert info.value.message == reason and info.value.key == hx(2)[:12] and info.value.store == store.name
    assert "state" not in str(info.value)
    placeholder = StoredRecord(hx(2), Kind.SUSPENSION, Status.SUSPENDED, b"", poisoned=reason)
    assert store.scan(with_blob=True).items == [rec(hx(1), due=5.0), placeholder, rec(hx(3), due=7.0)]
    # A placeholder always matches a filter: its real kind and status are unknown.
    assert store.scan(kind=Kind.CHECKPOINT).items == [placeholder]
    assert store.due(10.0) == [rec(hx(1), due=5.0), placeholder, rec(hx(3), due=7.0)]
    assert store.quarantine(hx(2)) is True
    assert store.due(10.0) == store.due(10.0) == [rec(hx(1), due=5.0), rec(hx(3), due=7.0)]
    assert [r.poisoned for r in store.scan().items] == [None, reason, None]  # kept for inspection
    assert store.delete(hx(2)) is True and store.get(hx(2)) is None


def test_quarantine(store: MemoryStore) -> None:
    store.put(rec(hx(1), due=5.0))
    assert store.quarantine(hx(1)) is True
    assert store.get(hx(1)) == rec(hx(1), due=5.0).replace(due_at=None)
    assert store.due(100.0) == []
    assert store.quarantine(hx(1)) is True and store.quarantine(hx(2)) is False


def test_base_quarantine_default_moves_each_status_to_itself() -> None:
    class Plain(MemoryStore):
        quarantine = BaseStore.quarantine

    s = Plain()
    s.put(rec(hx(1), status=Status.CLAIMED, due=5.0).replace(version=2, seal="s"))
    assert s.quarantine(hx(1)) is True
    got = s.get(hx(1))
    assert got is not None and (got.status, got.due_at, got.version, got.seal) == (Status.CLAIMED, None, 2, "s")
    assert s.due(100.0) == []
    assert s.quarantine(hx(2)) is False


def test_decode_record_takes_what_drivers_hand_back() -> None:
    got = decode_record(
        hx(1),
        kind=b"checkpoint",
        status="active",
        metadata=b'{"a": [1, 2.5]}',
        created_at=b"1.5",
        updated_at=2,
        expires_at=None,
        due_at="3.25",
        blob=memoryview(b"xyz"),
        version=b"7",
        seal=b"abc",
    )
    assert got == StoredRecord(hx(1), Kind.CHECKPOINT, Status.ACTIVE, b"xyz", {"a": [1, 2.5]}, 1.5, None, 3.25, 2.0, 7, "abc")
    assert type(got.blob) is bytes and type(got.updated_at) is float
    # Rows written before version and seal existed; metadata absent or not an object.
    old = decode_record(hx(1), kind="suspension", status="suspended", metadata=None, created_at=1.0, updated_at=1.0)
    assert (old.version, old.seal, old.metadata, old.blob) == (0, "", {}, b"")
    assert decode_record(hx(1), kind="suspension", status="suspended", metadata="[1]", created_at=1, updated_at=1).metadata == {}


def test_salvage_turns_decode_errors_into_placeholders_only() -> None:
    def boom(exc: BaseException) -> Any:
        def decode() -> StoredRecord:
            raise exc

        return decode

    assert salvage(hx(1), boom(KeyError("created_at"))).poisoned == "created_at is missing"
    assert salvage(hx(1), boom(KeyError("the row's own text"))).poisoned == "record does not decode (KeyError)"
    assert salvage(hx(1), boom(UnicodeDecodeError("utf-8", b"\xff", 0, 1, "bad"))).poisoned == "record does not decode (UnicodeDecodeError)"
    assert salvage(hx(1), boom(IntegrityError("record file is truncated"))).poisoned == "record file is truncated"
    with pytest.raises(OSError):
        salvage(hx(1), boom(OSError("disk on fire")))  # driver and I/O errors pass through
    assert decoded(rec(hx(1)), store="s") == rec(hx(1))
