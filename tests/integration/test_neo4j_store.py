"""Neo4jStore specifics: graph layout, chunking, FalkorDB's limits, URL handling, the Bolt relay.

The shared behaviour is in ``test_store_contract.py``. These tests run against
FalkorDB's Bolt port (started for the session by ``backends/neo4j.py``), and
the Neo4j-only ones against a real Neo4j when ``CELERY_PERSIST_TEST_NEO4J_URL``
is set.
"""

from __future__ import annotations

import hashlib
import math
import os
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from celery_persist.errors import ConfigurationError
from celery_persist.stores import Kind, Status, StoredRecord, open_store
from celery_persist.stores.neo4j import CHUNK, RECORD, Neo4jStore
from tests.integration.backends import neo4j as neo4j_backends
from tests.integration.falkordb_server import FALKORDB_MAX_MESSAGE, BoltMessageSplitter, MessageTooLarge, is_goodbye

pytestmark = pytest.mark.integration

NOW = 1_750_000_000.125
CHUNK_SIZE = neo4j_backends.FALKORDB_CHUNK_SIZE
GOODBYE = b"\x00\x02\xb0\x02\x00\x00"


def kh(*parts: object) -> str:
    return hashlib.sha256(":".join(map(str, parts)).encode()).hexdigest()


def record(key: str, blob: bytes = b"blob", **changes: Any) -> StoredRecord:
    rec = StoredRecord(
        key_hash=key,
        kind=Kind.SUSPENSION,
        status=Status.SUSPENDED,
        blob=blob,
        metadata={"task": "demo", "prompt": 'ok? it\'s "fine" \\o/'},
        created_at=NOW,
        expires_at=NOW + 60,
        due_at=NOW + 60,
        updated_at=NOW,
    )
    return rec.replace(**changes)


@pytest.fixture
def falkordb_url() -> str:
    """Per test: after a crash the session server is replaced, and a module-wide URL would go stale."""
    reason = neo4j_backends._falkordb_available()
    if reason is not None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"FalkorDB is required under CI=true: {reason}")
        pytest.skip(f"FalkorDB unavailable: {reason}")
    return neo4j_backends.falkordb_url()


@pytest.fixture
def relay() -> Any:
    server = neo4j_backends.falkordb_server()
    if server is None:
        pytest.skip("FalkorDB was started outside this session (CELERY_PERSIST_TEST_FALKORDB_URL): no relay to read")
    return server.relay


@pytest.fixture
def open_falkor(falkordb_url: str) -> Iterator[Any]:
    prefix = f"t{uuid.uuid4().hex[:12]}_"
    opened: list[Neo4jStore] = []

    def _open(**options: Any) -> Neo4jStore:
        options.setdefault("chunk_size", CHUNK_SIZE)
        store = open_store(falkordb_url, prefix=prefix, **options)
        assert isinstance(store, Neo4jStore)
        opened.append(store)  # closed below even when setup() fails
        store.setup()
        return store

    yield _open
    if opened:
        opened[0].drop()
    for store in opened:
        store.close()


def cypher(store: Neo4jStore, statement: str, **params: Any) -> list[dict[str, Any]]:
    """Run a read statement through the store's own driver (to look at the stored graph)."""
    with store._transaction(write=False) as tx:
        return [dict(r) for r in store._run(tx, statement, params)]


def chunk_count(store: Neo4jStore, key: str) -> int:
    rows = cypher(store, f"MATCH (c:{CHUNK}) WHERE c.ns = $ns AND c.key_hash = $key RETURN count(c) AS n", ns=store._prefix, key=key)
    return int(rows[0]["n"])


# -- FalkorDB -------------------------------------------------------------------------------------


def test_detects_falkordb_and_reports_it(open_falkor: Any) -> None:
    store = open_falkor()
    assert store.dialect == "falkordb"
    assert store.chunk_size == CHUNK_SIZE
    default = open_store(store._uri, prefix=store._prefix)
    try:
        assert default.chunk_size == 1024, "FalkorDB's default chunk is 1 KiB"
    finally:
        default.close()
    health = store.health()
    assert health["ok"] is True and health["dialect"] == "falkordb" and "FalkorDB" in health["version"]


def test_node_layout_and_exact_values(open_falkor: Any) -> None:
    store = open_falkor()
    rec = record(
        kh("layout"), created_at=0.1 + 0.2, due_at=None, updated_at=1e-9, metadata={"x": 0.1 + 0.2, "q": 'it\'s \\ "quoted" \u2028'}
    )
    store.put(rec)
    rows = cypher(store, f"MATCH (n:{RECORD}) WHERE n.ns = $ns RETURN properties(n) AS p", ns=store._prefix)
    assert len(rows) == 1
    props = rows[0]["p"]
    assert props["key_hash"] == rec.key_hash and props["kind"] == "suspension" and props["status"] == "suspended"
    assert props["created_at"] == 0.1 + 0.2 and props["updated_at"] == 1e-9, "floats are written exactly"
    assert "due_at" not in props, "None is an absent property"
    assert props["meta"].startswith("b64:"), "FalkorDB gets metadata as base64 text"
    assert props["digest"] == hashlib.sha256(b"blob").hexdigest()
    assert "_lock" not in props
    assert store.get(rec.key_hash) == rec


def test_node_without_version_or_seal_reads_as_version_0(open_falkor: Any) -> None:
    """A node written before records carried a version and a seal."""
    store = open_falkor()
    rec = record(kh("old-node"))
    store.put(rec.replace(version=3, seal="ab" * 32))
    props = cypher(store, f"MATCH (n:{RECORD}) WHERE n.ns = $ns RETURN properties(n) AS p", ns=store._prefix)[0]["p"]
    assert (props["version"], props["seal"]) == (3, "ab" * 32)
    with store._transaction(write=True) as tx:
        store._run(
            tx,
            f"MATCH (n:{RECORD}) WHERE n.ns = $ns AND n.key_hash = $key REMOVE n.version, n.seal",
            {"ns": store._prefix, "key": rec.key_hash},
        )
    assert store.get(rec.key_hash) == rec
    assert [(r.version, r.seal) for r in store.scan().items] == [(0, "")]
    assert store.transition(rec.key_hash, {Status.SUSPENDED}, Status.CLAIMED, now=NOW + 1, expect_version=1) is False
    assert store.transition(rec.key_hash, {Status.SUSPENDED}, Status.CLAIMED, now=NOW + 1, version=1, seal="s1", expect_version=0)
    assert store.get(rec.key_hash) == rec.replace(status=Status.CLAIMED, updated_at=NOW + 1, version=1, seal="s1")
    # An empty seal is stored as an empty string, not as an absent property.
    assert store.transition(rec.key_hash, {Status.CLAIMED}, Status.SUSPENDED, now=NOW + 2, version=2, seal="", expect_version=1)
    assert store.get(rec.key_hash) == rec.replace(updated_at=NOW + 2, version=2, seal="")


def test_chunked_blob_round_trip_and_cleanup(open_falkor: Any) -> None:
    store = open_falkor()
    key = kh("chunks")
    big = os.urandom(10 * CHUNK_SIZE + 17)
    store.put(record(key, big))
    assert chunk_count(store, key) == 11
    assert store.get(key) == record(key, big)

    bigger = os.urandom(12 * CHUNK_SIZE)
    store.put(record(key, bigger))
    assert chunk_count(store, key) == 12, "the replaced generation's chunks must go"
    assert store.get(key) == record(key, bigger)

    store.put(record(key, b"x" * CHUNK_SIZE))  # exactly chunk_size: inline
    assert chunk_count(store, key) == 0

    assert store.replace_blob(key, b"x" * CHUNK_SIZE, big, now=NOW + 1, version=2, seal="s2")
    assert chunk_count(store, key) == 11
    assert not store.replace_blob(key, b"wrong", bigger, now=NOW + 2, version=3, seal="s3")
    assert chunk_count(store, key) == 11, "a failed swap removes the chunks it wrote"
    assert store.get(key) == record(key, big, updated_at=NOW + 1, version=2, seal="s2")

    other = kh("chunks", 2)
    store.put_many([record(other, bigger), record(kh("chunks", 3), b"small")])
    assert {r.key_hash: r.blob for r in store.scan(with_blob=True).items}[other] == bigger
    assert {r.key_hash: r.blob for r in store.due(NOW + 60)}[key] == big

    assert store.delete(key)
    assert chunk_count(store, key) == 0 and chunk_count(store, other) == 12


def test_messages_stay_under_falkordbs_limit(open_falkor: Any, relay: Any) -> None:
    """Writes of big blobs and many records never send FalkorDB a message of 4 KB or more."""
    store = open_falkor()
    refused_before = relay.refused
    messages_before = relay.messages
    store.put(record(kh("size", 1), os.urandom(40 * CHUNK_SIZE)))
    store.put_many(record(kh("size", 2, i), os.urandom(i * 97)) for i in range(40))
    assert store.replace_blob(kh("size", 1), store.get(kh("size", 1)).blob, os.urandom(5000), now=NOW)  # type: ignore[union-attr]
    assert len(store.due(NOW + 60, limit=100)) == 41
    assert relay.messages - messages_before > 40, "the relay did not see the traffic"
    assert relay.refused == refused_before
    assert 2 * CHUNK_SIZE < relay.largest_message < FALKORDB_MAX_MESSAGE


def test_oversized_metadata_is_refused_before_it_reaches_falkordb(open_falkor: Any, relay: Any) -> None:
    store = open_falkor()
    with pytest.raises(ConfigurationError, match="too large for FalkorDB"):
        store.put(record(kh("fat"), metadata={"blob": "y" * 5000}))
    assert relay.refused == 0
    store.put(record(kh("thin")))  # the server is still there
    assert store.get(kh("thin")) is not None


def test_text_falkordb_cannot_carry_is_refused(open_falkor: Any) -> None:
    store = open_falkor()
    with pytest.raises(ConfigurationError, match="A-Za-z0-9"):
        store.get("it's")
    assert store.get(kh("fine")) is None


def test_setup_creates_the_indexes_once(open_falkor: Any) -> None:
    store = open_falkor()
    store.setup()
    rows = cypher(store, "CALL db.indexes() YIELD label, properties RETURN label, properties")
    indexed = {(r["label"], p) for r in rows for p in r["properties"]}
    assert {(RECORD, "key_hash"), (RECORD, "due_at"), (CHUNK, "key_hash")} <= indexed


def test_falkordb_runs_statements_without_transactions(open_falkor: Any) -> None:
    """Pins the FalkorDB behaviour the store relies on: BEGIN/ROLLBACK undo nothing.

    This is why the store writes chunk generations before pointing a record at
    them, and why its compare-and-set is one statement there.
    """
    store = open_falkor()
    key = kh("rollback")
    store.put(record(key))
    driver = store._driver()
    with driver.session() as session:
        tx = session.begin_transaction()
        tx.run(f"MATCH (n:{RECORD} {{ns: '{store._prefix}', key_hash: '{key}'}}) SET n.status = 'cancelled'").consume()
        tx.rollback()
    got = store.get(key)
    assert got is not None and got.status is Status.CANCELLED


def test_relay_survives_falkordbs_goodbye_bug(falkordb_url: str, relay: Any) -> None:
    """Drivers that close (and send GOODBYE) one after another all connect again.

    Straight to FalkorDB every second connection after a GOODBYE hung; the relay
    drops GOODBYE so none is ever parked.
    """
    import neo4j

    goodbyes, parked = relay.goodbyes, relay.parked
    deadline = time.monotonic() + 60
    for _ in range(6):
        driver = neo4j.GraphDatabase.driver(falkordb_url, auth=None, connection_acquisition_timeout=10)
        try:
            with driver.session() as session:
                assert session.run("RETURN 1 AS x").single()["x"] == 1  # type: ignore[index]
        finally:
            driver.close()
        assert time.monotonic() < deadline
    # The driver sends its GOODBYE as it closes; the relay counts it when it arrives.
    while relay.goodbyes - goodbyes < 6 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert relay.goodbyes - goodbyes >= 6 and relay.parked == parked
    assert neo4j_backends.current_falkordb() is not None and neo4j_backends.current_falkordb().alive()


def test_bolt_message_splitter() -> None:
    splitter = BoltMessageSplitter(limit=100)

    def frame(payload: bytes, chunk: int) -> bytes:
        out = b""
        for at in range(0, len(payload), chunk):
            piece = payload[at : at + chunk]
            out += len(piece).to_bytes(2, "big") + piece
        return out + b"\x00\x00"

    first, second = frame(b"a" * 30, 7), frame(b"b" * 90, 50)
    stream = b"\x00\x00" + first + second + GOODBYE
    got: list[bytes] = []
    for at in range(0, len(stream), 3):  # arbitrary TCP segment boundaries
        got += splitter.feed(stream[at : at + 3])
    assert got == [first, second, GOODBYE], "NOOPs are dropped, messages come out whole"
    assert [is_goodbye(m) for m in got] == [False, False, True]
    assert (splitter.messages, splitter.largest) == (3, 90)
    with pytest.raises(MessageTooLarge):
        splitter.feed(frame(b"c" * 101, 60))


# -- URL, options, driver ---------------------------------------------------------------------------


def test_url_credentials_database_and_masking() -> None:
    store = open_store("neo4j+s://app:p%40ss@db.example:7687/orders?policy=eu")
    assert isinstance(store, Neo4jStore)
    assert store._uri == "neo4j+s://db.example:7687?policy=eu"
    assert store._auth == ("app", "p@ss") and store._database == "orders"
    assert "p%40ss" not in store.name and "p@ss" not in store.name
    store = open_store("bolt://app:pw@db.example:7687/orders", user="ops", password="other", database="audit")
    assert store._auth == ("ops", "other") and store._database == "audit"  # type: ignore[attr-defined]
    assert open_store("bolt://127.0.0.1:7687")._auth is None  # type: ignore[attr-defined]


def test_bad_options_are_configuration_errors() -> None:
    with pytest.raises(ConfigurationError):
        open_store("bolt://127.0.0.1:1", prefix="it's")
    with pytest.raises(ConfigurationError):
        open_store("bolt://127.0.0.1:1", chunk_size=0)


def test_missing_driver_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "neo4j", None)
    with pytest.raises(ConfigurationError) as info:
        open_store("neo4j://127.0.0.1:7687")
    assert "celery-persist[neo4j]" in str(info.value)


# -- real Neo4j only ----------------------------------------------------------------------------------


@pytest.fixture
def neo4j_store() -> Iterator[Neo4jStore]:
    if not neo4j_backends.NEO4J_URL:
        pytest.skip("CELERY_PERSIST_TEST_NEO4J_URL is not set (no Neo4j server on this machine)")
    store = open_store(neo4j_backends.NEO4J_URL, prefix=f"t{uuid.uuid4().hex[:12]}_")
    assert isinstance(store, Neo4jStore)
    store.setup()
    try:
        yield store
    finally:
        store.drop()
        store.close()


def test_neo4j_schema_and_index_backed_due(neo4j_store: Neo4jStore) -> None:
    assert neo4j_store.dialect == "neo4j"
    names = {r["name"] for r in cypher(neo4j_store, "SHOW CONSTRAINTS YIELD name RETURN name")}
    assert "celery_persist_record_key" in names
    with neo4j_store._transaction(write=False) as tx:
        summary = tx.run(f"EXPLAIN MATCH (n:{RECORD}) WHERE n.ns = $ns AND n.due_at <= $now RETURN n", {"ns": "x", "now": 1.0}).consume()
    assert "IndexSeek" in str(summary.plan), "due() must seek the (ns, due_at) index"


def test_neo4j_blob_is_bytes_and_chunked_by_one_mib(neo4j_store: Neo4jStore) -> None:
    key = kh("neo4j-chunks")
    blob = os.urandom(3 * 1024 * 1024 + 5)
    neo4j_store.put(record(key, blob))
    assert chunk_count(neo4j_store, key) == math.ceil(len(blob) / (1024 * 1024))
    got = neo4j_store.get(key)
    assert got is not None and got.blob == blob
    neo4j_store.put(record(key, b"inline"))
    rows = cypher(
        neo4j_store, f"MATCH (n:{RECORD} {{ns: $ns, key_hash: $key}}) RETURN n.blob AS b, n.meta AS m", ns=neo4j_store._prefix, key=key
    )
    assert bytes(rows[0]["b"]) == b"inline" and rows[0]["m"].startswith("{")


def test_a_crashed_session_server_is_replaced_before_the_next_test(falkordb_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """One test that crashes FalkorDB costs that test only: the next one gets a new server.

    Before, the dead server stayed cached for the session and every later FalkorDB test
    spent pytest's whole timeout in the driver's retries (one CI run passed 90 minutes so).
    Runs on a private server standing in for the session's, which other tests keep using.
    """
    if neo4j_backends.current_falkordb() is None:
        pytest.skip("FalkorDB was started outside this session (CELERY_PERSIST_TEST_FALKORDB_URL)")
    from tests.integration.falkordb_server import FalkorDBServer

    private = FalkorDBServer()
    private.start()
    monkeypatch.setattr(neo4j_backends, "_server", private)  # restored after the test
    replacement = None
    try:
        assert private.process is not None
        private.process.kill()  # what a SIGSEGV in the server looks like from here
        private.process.wait(timeout=10)
        url = neo4j_backends.falkordb_url()
        replacement = neo4j_backends.current_falkordb()
        assert replacement is not private and replacement.alive() and url == replacement.url
        store = open_store(url, prefix=f"t{uuid.uuid4().hex[:12]}_", chunk_size=CHUNK_SIZE)
        try:
            store.put(record(kh("after-crash")))
            got = store.get(kh("after-crash"))
            assert got is not None and got.status is Status.SUSPENDED
        finally:
            store.close()
    finally:
        private.stop()
        if replacement is not None:
            replacement.stop()
