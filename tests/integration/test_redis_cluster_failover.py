"""The Redis store on a real Redis Cluster while the master of its slot fails over.

A private cluster of 3 masters with one replica each (``cluster-node-timeout``
1000 ms, ``appendonly yes``, ``appendfsync always``) runs on loopback ports for
this module (see ``redis_cluster.py``). All keys of one store prefix share a
hash tag, so one master serves them all; the tests fail that master over while
claimer threads race to claim the same records and a writer keeps putting new
ones, then check that no record was claimed twice (the winner's own version
number is the one stored) and that every put that returned is still there.

* A coordinated ``CLUSTER FAILOVER`` (the master stops writes until its replica
  has caught up) loses nothing, with the store's defaults.
* A master killed with SIGKILL is replaced by its replica, which has only what
  had been replicated: Redis replicates asynchronously, so an acknowledged
  write can be missing there. ``test_..._without_wait_replicas_...`` shows it
  happening (a put lost, a claim won twice); with ``wait_replicas=1`` the store
  returns only once the replica has the write, and the race through a kill
  loses nothing and doubles nothing.
"""

from __future__ import annotations

import collections
import os
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from celery_persist.errors import ConfigurationError, StoreUnavailable
from celery_persist.stores.base import Kind, Status, StoredRecord
from tests.integration.redis_cluster import LocalRedisCluster, cluster_unavailable, free_cluster_port
from tests.integration.test_redis_store import wait_until

pytestmark = pytest.mark.integration

IN_CI = os.environ.get("CI", "").strip().lower() == "true"
NOW = 1_750_000_000.0
CLAIMERS = 4
RECORDS = 1200


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalRedisCluster]:
    reason = cluster_unavailable()
    if reason is not None:
        if IN_CI:
            pytest.fail(f"a Redis Cluster is required under CI=true: {reason}")
        pytest.skip(reason)
    with LocalRedisCluster(masters=3, replicas=1, node_timeout_ms=1000) as c:
        yield c


@pytest.fixture
def prefix() -> str:
    return f"fo-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def heal(cluster: LocalRedisCluster) -> Iterator[None]:
    """After the test: every node running again (a killed one rejoins as a replica) and the cluster ok."""
    yield
    for node in cluster.nodes:
        node.resume()
        if not node.alive():
            cluster.restart(node)
    cluster.wait_ok(60)


def store(cluster: LocalRedisCluster, prefix: str, **options: Any) -> Any:
    from celery_persist.stores.redis import RedisStore

    return RedisStore(cluster.url, prefix=prefix, **options)


def record(name: str, i: int) -> StoredRecord:
    key = f"{name}-{i}".encode().hex().ljust(64, "0")[:64]
    return StoredRecord(
        key_hash=key,
        kind=Kind.SUSPENSION,
        status=Status.SUSPENDED,
        blob=os.urandom(64) + f"{name}-{i}".encode(),
        metadata={"i": i, "who": name},
        created_at=NOW + i / 7,
        expires_at=NOW + 3600,
        due_at=NOW + 3600,
        updated_at=NOW + i / 7,
    )


class Race:
    """Claimer threads and one writer against one prefix; records who won what and what was acknowledged."""

    def __init__(self, cluster: LocalRedisCluster, prefix: str, **options: Any) -> None:
        self.cluster, self.prefix, self.options = cluster, prefix, options
        self.records = [record("claim", i) for i in range(RECORDS)]
        self.lock = threading.Lock()
        self.wins: dict[str, list[int]] = collections.defaultdict(list)
        self.unknown: set[str] = set()  # a call raised: its outcome is not known
        self.acked: list[StoredRecord] = []  # puts that returned
        self.errors = 0
        self.failures: list[BaseException] = []
        self.disturbed = threading.Event()
        self.wins_after = 0
        self.stop_writer = threading.Event()
        self.threads: list[threading.Thread] = []

    def seed(self) -> None:
        with store(self.cluster, self.prefix, **self.options) as s:
            s.setup()
            s.put_many(self.records)

    def _retrying(self, call: Callable[[], Any], key: str | None) -> Any:
        deadline = time.monotonic() + 90
        while True:
            try:
                return call()
            except StoreUnavailable:
                with self.lock:
                    self.errors += 1
                    if key is not None:
                        self.unknown.add(key)
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def claimer(self, n: int) -> None:
        order = self.records[:]
        random.Random(n).shuffle(order)
        try:
            with store(self.cluster, self.prefix, **self.options) as s:
                for rec in order:
                    # The claimer's own version number: the stored version names the winner.
                    won = self._retrying(
                        lambda rec=rec: s.transition(
                            rec.key_hash, {Status.SUSPENDED}, Status.CLAIMED, due_at=NOW + 60, now=NOW + 1, version=1000 + n
                        ),
                        rec.key_hash,
                    )
                    if won:
                        with self.lock:
                            self.wins[rec.key_hash].append(n)
                            self.wins_after += self.disturbed.is_set()
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            self.failures.append(exc)

    def writer(self) -> None:
        try:
            with store(self.cluster, self.prefix, **self.options) as s:
                i = 0
                while not self.stop_writer.is_set():
                    rec = record("put", i)
                    self._retrying(lambda rec=rec: s.put(rec), None)
                    with self.lock:
                        self.acked.append(rec)
                    i += 1
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            self.failures.append(exc)

    def run(self, disturb: Callable[[], None]) -> dict[str, Any]:
        self.seed()
        self.threads = [threading.Thread(target=self.claimer, args=(n,)) for n in range(CLAIMERS)]
        self.threads.append(threading.Thread(target=self.writer))
        for t in self.threads:
            t.start()
        started = time.monotonic()
        try:
            wait_until(lambda: len(self.wins) >= RECORDS // 4, 120, "a quarter of the claims")
            at_disturb, acked_at_disturb = len(self.wins), len(self.acked)
            disturb()
            self.disturbed.set()
        finally:
            for t in self.threads[:-1]:
                t.join(timeout=300)
            self.stop_writer.set()
            self.threads[-1].join(timeout=120)
        assert not any(t.is_alive() for t in self.threads), "a racer hung"
        assert not self.failures, self.failures
        return {"at_disturb": at_disturb, "acked_at_disturb": acked_at_disturb, "seconds": time.monotonic() - started}

    def check(self, report: dict[str, Any]) -> None:
        assert report["at_disturb"] < RECORDS, "the race ended before the failover; the test proved nothing"
        assert self.wins_after > 0, "no claim succeeded after the failover"
        assert len(self.acked) > report["acked_at_disturb"], "no put succeeded after the failover"
        doubles = {k: w for k, w in self.wins.items() if len(w) > 1}
        assert not doubles, f"{len(doubles)} records were claimed twice: {list(doubles.items())[:5]}"
        assert {r.key_hash for r in self.records} - self.wins.keys() <= self.unknown, "a record nobody won without an unknown outcome"
        with store(self.cluster, self.prefix) as s:
            for rec in self.records:
                got = s.get(rec.key_hash)
                assert got is not None, "a seeded record was lost"
                assert got.status is Status.CLAIMED, f"an acknowledged claim was lost: {rec.key_hash} is {got.status}"
                if rec.key_hash in self.wins:
                    (winner,) = self.wins[rec.key_hash]
                    assert got.version == 1000 + winner, "the stored claim is not the acknowledged winner's"
                assert (got.blob, got.metadata) == (rec.blob, rec.metadata)
            for rec in self.acked:
                assert s.get(rec.key_hash) == rec, "an acknowledged put was lost"


def test_coordinated_failover_mid_race_doubles_no_claim_and_loses_no_write(cluster: LocalRedisCluster, prefix: str, heal: None) -> None:
    master = cluster.master_of("{" + prefix + "}:all")
    (replica,) = cluster.replicas_of(master)
    race = Race(cluster, prefix)
    report = race.run(lambda: cluster.failover(replica))
    assert cluster.master_of("{" + prefix + "}:all") is replica
    race.check(report)
    print(f"coordinated failover: {len(race.acked)} puts, {race.errors} StoreUnavailable retried, {report['seconds']:.1f}s")


def test_master_killed_mid_race_with_wait_replicas_doubles_no_claim_and_loses_no_acknowledged_write(
    cluster: LocalRedisCluster, prefix: str, heal: None
) -> None:
    master = cluster.master_of("{" + prefix + "}:all")
    (replica,) = cluster.replicas_of(master)

    def kill_and_recover() -> None:
        cluster.kill(master)
        cluster.wait_master(replica)
        # The killed node comes back as the new master's replica, so WAIT 1 can be met again.
        cluster.restart(master)
        cluster.wait_ok(60)

    race = Race(cluster, prefix, wait_replicas=1, wait_timeout=1.0)
    report = race.run(kill_and_recover)
    assert cluster.master_of("{" + prefix + "}:all") is replica
    race.check(report)
    print(f"kill -9 failover: {len(race.acked)} puts, {race.errors} StoreUnavailable retried, {report['seconds']:.1f}s")


def test_a_killed_master_loses_acknowledged_writes_without_wait_replicas_and_none_with_it(
    cluster: LocalRedisCluster, prefix: str, heal: None
) -> None:
    """Deterministic: the replica is cut off (frozen, its link dropped) before the writes, then the master dies.

    Without ``wait_replicas`` the store acknowledged a put and a claim that the promoted
    replica never had: the put is gone and the claim is won a second time. With
    ``wait_replicas=1`` the same writes are not acknowledged (StoreUnavailable: outcome
    unknown), so nothing acknowledged is lost.
    """
    key = "{" + prefix + "}:all"
    master = cluster.master_of(key)
    (replica,) = cluster.replicas_of(master)
    plain, waiting = store(cluster, prefix), store(cluster, prefix, wait_replicas=1, wait_timeout=0.2, retries=1)
    try:
        plain.setup()
        claim_plain, claim_waiting = record("claim", 1), record("claim", 2)
        waiting.put_many([claim_plain, claim_waiting])  # both replicated before the cut
        put_plain, put_waiting = record("put", 1), record("put", 2)

        replica.pause()
        with cluster.node(master.port).client() as admin:
            assert admin.execute_command("CLIENT KILL", "TYPE", "replica") == 1
        plain.put(put_plain)  # acknowledged by the master alone
        assert plain.transition(claim_plain.key_hash, {Status.SUSPENDED}, Status.CLAIMED, due_at=NOW + 60, now=NOW, version=1)
        with pytest.raises(StoreUnavailable, match="not confirmed by 1 replica"):
            waiting.put(put_waiting)
        with pytest.raises(StoreUnavailable, match="not confirmed by 1 replica"):
            waiting.transition(claim_waiting.key_hash, {Status.SUSPENDED}, Status.CLAIMED, due_at=NOW + 60, now=NOW, version=1)
        cluster.kill(master)
        replica.resume()
        cluster.wait_master(replica)

        # The limit: acknowledged, yet gone, and the claim is open to a second winner.
        assert plain.get(put_plain.key_hash) is None
        again = store(cluster, prefix)
        try:
            assert again.transition(claim_plain.key_hash, {Status.SUSPENDED}, Status.CLAIMED, now=NOW, version=2)
        finally:
            again.close()
        # With wait_replicas nothing had been acknowledged; once a replica is back the writes go through.
        cluster.restart(master)
        cluster.wait_ok(60)
        waiting.put(put_waiting)
        assert waiting.get(put_waiting.key_hash) == put_waiting
        assert waiting.transition(claim_waiting.key_hash, {Status.SUSPENDED}, Status.CLAIMED, now=NOW, version=1)
    finally:
        plain.close()
        waiting.close()


def test_redis_url_with_cluster_option_and_prefixes_spread_over_the_masters(cluster: LocalRedisCluster) -> None:
    """``redis://node`` + ``cluster=True`` works too; each prefix lives on one master, prefixes spread."""
    masters: set[int] = set()
    for i in range(12):
        prefix = f"spread-{i}-{uuid.uuid4().hex[:6]}"
        masters.add(cluster.master_of("{" + prefix + "}:all").port)
        from celery_persist.stores.redis import RedisStore

        with RedisStore(cluster.seed_url, prefix=prefix, cluster=True) as s:
            rec = record("spread", i)
            s.put(rec)
            assert s.get(rec.key_hash) == rec
            assert s.transition(rec.key_hash, {Status.SUSPENDED}, Status.CLAIMED, now=NOW)
            assert s.delete(rec.key_hash)
    assert len(masters) > 1


def test_a_cluster_url_naming_several_nodes_needs_only_one_to_answer(cluster: LocalRedisCluster) -> None:
    from celery_persist.stores import open_store

    url = f"redis+cluster://127.0.0.1:{free_cluster_port()},{cluster.nodes[1].address}"
    with open_store(url, prefix=f"seed-{uuid.uuid4().hex[:6]}") as s:
        assert s.mode == "cluster"  # type: ignore[attr-defined]
        rec = record("seed", 1)
        s.put(rec)
        assert s.get(rec.key_hash) == rec


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("redis+cluster://127.0.0.1:7000/3", "only database 0"),
        ("redis+cluster:///0", "must look like"),
        ("redis+cluster://127.0.0.1:x", "bad port"),
    ],
)
def test_bad_cluster_urls_are_refused_before_connecting(url: str, message: str) -> None:
    from celery_persist.stores.redis import RedisStore

    with pytest.raises(ConfigurationError, match=message):
        RedisStore(url)


def test_cluster_url_becomes_a_seed_url_and_startup_nodes() -> None:
    from celery_persist.stores.redis import RedisStore

    target = RedisStore("rediss+cluster://u:pw@h1,[::1]:7001,h3:7002/?ssl_cert_reqs=none&socket_timeout=3")._target
    assert target.mode == "cluster"
    assert target.cluster_url == "rediss://u:pw@h1:6379?ssl_cert_reqs=none&socket_timeout=3"
    assert target.cluster_nodes == (("::1", 7001), ("h3", 7002))
    assert target.url_options["socket_timeout"] == 3.0
