"""MongoStore specifics: document layout, chunked blobs, indexes, driver errors.

The shared behaviour is in ``test_store_contract.py``; this file checks what only
the MongoDB store has. It runs on mongomock (in-process, given to the store as its
``client``), and on a real server too when ``CELERY_PERSIST_TEST_MONGODB_URL`` is set.
"""

from __future__ import annotations

import hashlib
import math
import os
import socket
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from celery_persist.errors import ConfigurationError, StoreUnavailable
from celery_persist.stores import Kind, Status, StoredRecord, open_store
from celery_persist.stores.mongodb import CHUNK_SIZE, INLINE_LIMIT, MongoStore
from tests.integration.backends.mongodb import MONGODB_URL, MONGOMOCK_URL, LockedMongomock, mongomock_store_options

pytestmark = pytest.mark.integration

NOW = 1_750_000_000.25
MiB = 1024 * 1024

SERVERS = ["mongomock"] + (["mongodb"] if MONGODB_URL else [])


def kh(*parts: object) -> str:
    return hashlib.sha256(":".join(map(str, parts)).encode()).hexdigest()


def record(key: str, blob: bytes = b"blob", **changes: Any) -> StoredRecord:
    rec = StoredRecord(
        key_hash=key,
        kind=Kind.SUSPENSION,
        status=Status.SUSPENDED,
        blob=blob,
        metadata={"task": "demo", "n": 1.0},
        created_at=NOW,
        expires_at=NOW + 60,
        due_at=NOW + 60,
        updated_at=NOW,
    )
    return rec.replace(**changes)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


#: One in-process mongomock server for this module, apart from the contract suite's.
MONGOMOCK_OPTIONS = mongomock_store_options()


def url_for(server: str) -> str:
    return MONGODB_URL if server == "mongodb" else MONGOMOCK_URL


def options_for(server: str) -> dict[str, Any]:
    return {} if server == "mongodb" else dict(MONGOMOCK_OPTIONS)


@pytest.fixture(params=SERVERS)
def server(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def open_mongo(server: str) -> Iterator[Any]:
    """Opens MongoStores on a test-unique prefix; drops their collections afterwards."""
    prefix = f"t{uuid.uuid4().hex[:12]}_"
    opened: list[MongoStore] = []

    def _open(**options: Any) -> MongoStore:
        store = open_store(url_for(server), prefix=prefix, **options_for(server), **options)
        assert isinstance(store, MongoStore)
        store.setup()
        opened.append(store)
        return store

    yield _open
    if opened:
        opened[0].drop()
    for store in opened:
        store.close()


def raw(store: MongoStore) -> tuple[Any, Any]:
    """The store's (records, chunks) collections, to look at the stored layout."""
    return store._collections()


# -- layout ---------------------------------------------------------------------------------


def test_document_layout(open_mongo: Any) -> None:
    store = open_mongo()
    rec = record(kh("layout"), metadata={"b": 1.0, "a": [1, 2.5]}, due_at=None)
    store.put(rec)
    records, chunks = raw(store)
    doc = records.find_one({"_id": rec.key_hash})
    assert doc["metadata"] == '{"a":[1,2.5],"b":1.0}', "metadata is canonical JSON text"
    assert "due_at" not in doc, "a None due_at is left out, so the partial due index skips the record"
    assert doc["expires_at"] == NOW + 60 and isinstance(doc["created_at"], float)
    assert bytes(doc["blob"]) == b"blob" and "gen" not in doc
    assert doc["digest"] == hashlib.sha256(b"blob").hexdigest()
    assert chunks.count_documents({}) == 0
    assert store.get(rec.key_hash) == rec

    assert store.transition(rec.key_hash, {Status.SUSPENDED}, Status.CLAIMED, due_at=NOW + 5, now=NOW + 1)
    assert records.find_one({"_id": rec.key_hash})["due_at"] == NOW + 5
    assert store.transition(rec.key_hash, {Status.CLAIMED}, Status.RESUMED, due_at=None, now=NOW + 2)
    assert "due_at" not in records.find_one({"_id": rec.key_hash})


def test_document_without_version_or_seal_reads_as_version_0(open_mongo: Any) -> None:
    """A document written before records carried a version and a seal."""
    store = open_mongo()
    rec = record(kh("old-doc"))
    store.put(rec.replace(version=3, seal="ab" * 32))
    records, _ = raw(store)
    doc = records.find_one({"_id": rec.key_hash})
    assert (doc["version"], doc["seal"]) == (3, "ab" * 32)
    records.update_one({"_id": rec.key_hash}, {"$unset": {"version": "", "seal": ""}})
    assert store.get(rec.key_hash) == rec
    assert [(r.version, r.seal) for r in store.scan().items] == [(0, "")]
    assert store.transition(rec.key_hash, {Status.SUSPENDED}, Status.CLAIMED, now=NOW + 1, expect_version=1) is False
    assert store.transition(rec.key_hash, {Status.SUSPENDED}, Status.CLAIMED, now=NOW + 1, version=1, seal="s1", expect_version=0)
    assert store.get(rec.key_hash) == rec.replace(status=Status.CLAIMED, updated_at=NOW + 1, version=1, seal="s1")
    assert store.transition(rec.key_hash, {Status.CLAIMED}, Status.SUSPENDED, now=NOW + 2, expect_version=0) is False


def test_indexes(open_mongo: Any) -> None:
    store = open_mongo()
    store.setup()  # twice: idempotent
    records, chunks = raw(store)
    info = records.index_information()
    assert info["listing"]["key"] == [("kind", 1), ("status", 1), ("_id", 1)]
    assert info["due"]["key"] == [("due_at", 1), ("_id", 1)]
    assert info["due"]["partialFilterExpression"] == {"due_at": {"$exists": True}}
    assert not any("expireAfterSeconds" in ix for ix in info.values()), "no TTL index: expiry has side effects"
    assert chunks.index_information()["chunk"]["key"] == [("rec", 1), ("gen", 1), ("n", 1)]


def test_prefix_names_the_collections_and_isolates(open_mongo: Any, server: str) -> None:
    a = open_mongo()
    b = open_store(url_for(server), prefix=f"other{uuid.uuid4().hex[:8]}_", **options_for(server))
    try:
        a.put(record(kh("iso")))
        assert b.get(kh("iso")) is None
        assert raw(a)[0].name.endswith("_records") and raw(a)[1].name.endswith("_chunks")
        assert raw(a)[0].name != raw(b)[0].name
    finally:
        b.drop()
        b.close()


# -- chunked blobs ----------------------------------------------------------------------------


def test_chunked_blob_round_trip_and_cleanup(open_mongo: Any) -> None:
    store = open_mongo(inline_limit=1000, chunk_size=300)
    records, chunks = raw(store)
    key = kh("chunked")
    big = os.urandom(2000)
    store.put(record(key, big))
    doc = records.find_one({"_id": key})
    assert "blob" not in doc and doc["nchunks"] == math.ceil(2000 / 300) and doc["size"] == 2000
    parts = list(chunks.find({"rec": key}).sort("n", 1))
    assert [p["n"] for p in parts] == list(range(7)) and {p["gen"] for p in parts} == {doc["gen"]}
    assert all(len(p["data"]) <= 300 for p in parts)
    assert store.get(key) == record(key, big)

    # A second chunked write replaces the generation; the old chunks go.
    bigger = os.urandom(2500)
    store.put(record(key, bigger))
    assert store.get(key) == record(key, bigger)
    gens = {p["gen"] for p in chunks.find({"rec": key})}
    assert gens == {records.find_one({"_id": key})["gen"]} and chunks.count_documents({"rec": key}) == 9

    # Back to inline: no chunks left.
    store.put(record(key, b"small"))
    assert store.get(key) == record(key, b"small")
    assert chunks.count_documents({"rec": key}) == 0

    # replace_blob across both forms, compared by digest.
    assert store.replace_blob(key, b"small", big, now=NOW + 1, version=2, seal="s2")
    assert store.get(key) == record(key, big, updated_at=NOW + 1, version=2, seal="s2")
    store.put(record(key, b"small"))
    assert store.replace_blob(key, b"small", big, now=NOW + 1)
    assert store.get(key) == record(key, big, updated_at=NOW + 1)
    assert not store.replace_blob(key, b"small", b"x", now=NOW + 2)
    assert chunks.count_documents({"rec": key}) == 7, "a failed swap must remove the chunks it wrote"
    assert store.replace_blob(key, big, b"tiny", now=NOW + 3)
    assert chunks.count_documents({"rec": key}) == 0

    store.put_many([record(key, big), record(kh("chunked", 2), bigger), record(kh("chunked", 3))])
    assert store.get(key) == record(key, big)
    assert store.get(kh("chunked", 2)) == record(kh("chunked", 2), bigger)
    listed = store.scan(with_blob=True).items
    assert {r.key_hash: r.blob for r in listed}[key] == big
    assert [r.blob for r in store.due(NOW + 60) if r.key_hash == key] == [big]

    assert store.delete(key)
    assert chunks.count_documents({"rec": key}) == 0


def test_blob_over_the_16mb_document_limit(open_mongo: Any) -> None:
    """A 17 MiB (incompressible) blob cannot be one BSON document: it goes to chunks."""
    store = open_mongo()
    records, chunks = raw(store)
    key = kh("huge")
    blob = os.urandom(17 * MiB)
    store.put(record(key, blob))
    doc = records.find_one({"_id": key}, {"blob": 1, "nchunks": 1, "size": 1})
    assert "blob" not in doc and doc["size"] == len(blob)
    assert doc["nchunks"] == math.ceil(len(blob) / CHUNK_SIZE) == 3
    sizes = [len(p["data"]) for p in chunks.find({"rec": key})]
    assert sum(sizes) == len(blob) and max(sizes) <= CHUNK_SIZE < 16 * MiB
    got = store.get(key)
    assert got is not None and got.blob == blob
    assert [r.blob == blob for r in store.due(NOW + 60)] == [True]

    # Just under the limit stays inline.
    inline = os.urandom(INLINE_LIMIT)
    store.put(record(kh("inline"), inline))
    assert records.find_one({"_id": kh("inline")}, {"nchunks": 1}).get("nchunks") is None
    got = store.get(kh("inline"))
    assert got is not None and got.blob == inline


# -- driver and errors ------------------------------------------------------------------------


@pytest.mark.parametrize(("url", "hidden", "extra"), [("mongodb://127.0.0.1/x", "pymongo", "mongodb")])
def test_missing_driver_names_the_extra(monkeypatch: pytest.MonkeyPatch, url: str, hidden: str, extra: str) -> None:
    monkeypatch.setitem(sys.modules, hidden, None)
    with pytest.raises(ConfigurationError) as info:
        open_store(url)
    assert f"celery-persist[{extra}]" in str(info.value)


def test_unreachable_server_is_store_unavailable_quickly() -> None:
    """Real pymongo against a closed port: StoreUnavailable within the selection timeout."""
    store = open_store(f"mongodb://127.0.0.1:{free_port()}/x", server_selection_timeout=0.5)
    try:
        started = time.monotonic()
        with pytest.raises(StoreUnavailable) as info:
            store.get(kh("dead"))
        assert info.value.store == store.name
        with pytest.raises(StoreUnavailable):
            store.transition(kh("dead"), {Status.SUSPENDED}, Status.CLAIMED, now=NOW)
        health = store.health()
        assert health["ok"] is False and health["error"] == "StoreUnavailable"
        assert time.monotonic() - started < 15
    finally:
        store.close()


def test_url_options_win_and_password_is_masked() -> None:
    store = open_store("mongodb://app:s3cret@127.0.0.1:1/orders?serverSelectionTimeoutMS=250")
    assert isinstance(store, MongoStore)
    assert "s3cret" not in store.name and "s3cret" not in repr(store)
    assert store._database == "orders"
    assert "serverSelectionTimeoutMS" not in store._client_options, "the URL's timeout must win"
    assert open_store("mongodb://127.0.0.1:1")._database == "celery_persist"  # type: ignore[attr-defined]


def test_bad_options_are_configuration_errors() -> None:
    with pytest.raises(ConfigurationError):
        open_store(MONGOMOCK_URL, chunk_size=0, **mongomock_store_options())
    with pytest.raises(ConfigurationError):
        open_store(MONGOMOCK_URL, prefix="a$b", **mongomock_store_options())
    with pytest.raises(ConfigurationError, match="client_options"):
        open_store(MONGOMOCK_URL, client_options={"appname": "x"}, **mongomock_store_options())


class ClosingSpy(LockedMongomock):
    closed = 0

    def close(self) -> None:
        self.closed += 1


def test_a_given_client_stays_the_callers() -> None:
    """The store uses a given client as it is, and never closes it."""
    client = ClosingSpy()
    store = open_store(MONGOMOCK_URL, prefix=f"t{uuid.uuid4().hex[:12]}_", client=client, bulk=False)
    assert isinstance(store, MongoStore) and store._database == "celery_persist_test"
    try:
        store.put(record(kh("given")))
        assert store.get(kh("given")) == record(kh("given"))
        assert store.health()["ok"] is True
    finally:
        store.drop()
        store.close()
    assert client.closed == 0
