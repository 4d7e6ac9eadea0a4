"""Indexed records (event waits, buffered signals) on every registered store.

:meth:`PersistenceHub.indexed` finds the records saved under a 24-hex key-hash
prefix by one ``scan(kind=checkpoint)`` from just below the prefix, and stops at
the first key past it. These tests hold every store to that: exactly the
prefix's records come back (none from the prefixes either side), and what it
costs in scan calls and rows read does not grow with the number of other
records. Like ``test_store_contract.py`` they run once per backend (the
``store`` fixture), so a new store gets them by registering in
``tests/integration/backends/``.

The cost is counted at the store API (scan calls, rows returned): what a store's
database reads to answer one scan is not visible here.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Callable
from typing import Any

import pytest

from celery_persist import Keyring, PersistenceHub
from celery_persist.stores import BaseStore, Kind, Page, Status, StoredRecord
from tests.integration.backends import Backend

pytestmark = pytest.mark.integration

NOW = 1_750_000_000.0
HEX24 = 16**24
LOW, HIGH = "0" * 40, "f" * 40


class Clock:
    """A hub clock the test moves."""

    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clock() -> Clock:
    return Clock(NOW)


@pytest.fixture
def hub(store: BaseStore, clock: Clock) -> PersistenceHub:
    return PersistenceHub(store, keyring=Keyring([("k", os.urandom(32))]), clock=clock)


def shift(prefix: str, by: int) -> str:
    """The 24-hex prefix ``by`` places after ``prefix`` (before, when negative)."""
    return format((int(prefix, 16) + by) % HEX24, "024x")


def tail(rng: random.Random) -> str:
    return format(rng.getrandbits(160), "040x")


def save(hub: PersistenceHub, records: dict[str, Any], *, ttl: float | None = 3600) -> None:
    for kh, state in records.items():
        hub.save_indexed(kh, state, ttl=ttl, metadata={"index": "test"})


def fill(hub: PersistenceHub, n: int, rng: random.Random, *, start: int = 0) -> None:
    """``n`` other records around the ones a test looks for.

    A tenth through the hub (suspensions, indexed records under 40 other prefixes,
    plain checkpoints), the rest written in batches straight to the store (records
    of both kinds, unsealed, a third under the same 40 prefixes): each is a row
    ``indexed`` must not read, and one it did read would not verify and be logged.
    """
    others = [hub.index_prefix("event", "other", str(i)) for i in range(40)]
    through_hub = n // 10
    for i in range(start, start + through_hub):
        if i % 3 == 0:
            hub.suspend({"n": i}, ttl=3600)
        elif i % 3 == 1:
            hub.save_indexed(others[i % 40] + tail(rng), {"n": i}, ttl=3600)
        else:
            hub.save_checkpoint(f"other-{i}", {"n": i})
    raw = []
    for i in range(n - through_hub):
        kh = others[i % 40] + tail(rng) if i % 3 == 0 else format(rng.getrandbits(256), "064x")
        kind, status = (Kind.SUSPENSION, Status.SUSPENDED) if i % 3 == 2 else (Kind.CHECKPOINT, Status.ACTIVE)
        raw.append(StoredRecord(kh, kind, status, b"opaque", {"n": i}, NOW, NOW + 3600, NOW + 3600, NOW))
    hub.store.put_many(raw)


def found(hub: PersistenceHub, prefix: str, batch: int = 500) -> list[tuple[str, Any]]:
    out = []
    for rec, state in hub.indexed(prefix, batch=batch):
        assert rec.kind is Kind.CHECKPOINT and rec.status is Status.ACTIVE and rec.poisoned is None
        assert rec.metadata == {"index": "test"}
        out.append((rec.key_hash, state))
    return out


def skipped_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "celery_persist.hub" and r.levelno == logging.WARNING]


def test_indexed_returns_exactly_the_prefix_records(hub: PersistenceHub, store: BaseStore, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="celery_persist.hub")
    rng = random.Random(1)
    p = hub.index_prefix("event", "orders", "42")
    q = hub.index_prefix("signal-buffer", "orders", "42")
    lo, hi = shift(p, -1), shift(p, 1)
    mine = {p + t: {"i": i, "t": t[:3]} for i, t in enumerate([LOW, "0" * 39 + "1", "7" * 40, "a" + "0" * 39, HIGH])}
    theirs = {q + t: {"q": i} for i, t in enumerate([LOW, tail(rng), HIGH])}
    below = {lo + t: {"lo": i} for i, t in enumerate([LOW, tail(rng), HIGH])}  # lo + HIGH is exactly indexed(p)'s cursor
    above = {hi + t: {"hi": i} for i, t in enumerate([LOW, tail(rng), HIGH])}
    save(hub, {**mine, **theirs, **below, **above})
    # A record of the other kind inside the prefix: the store's kind filter leaves it out.
    store.put(StoredRecord(p + "8" * 40, Kind.SUSPENSION, Status.SUSPENDED, b"x", {}, NOW, NOW + 3600, NOW + 3600, NOW))
    fill(hub, 2500, rng)

    for batch in (500, 4, 1):
        assert found(hub, p, batch) == sorted(mine.items()), f"batch={batch}"
        assert found(hub, q, batch) == sorted(theirs.items()), f"batch={batch}"
        assert found(hub, lo, batch) == sorted(below.items()), f"batch={batch}"
        assert found(hub, hi, batch) == sorted(above.items()), f"batch={batch}"
    assert found(hub, shift(p, 2)) == []
    assert skipped_warnings(caplog) == []  # nothing of another kind or another prefix was even looked at


def test_indexed_cost_follows_the_matches_not_the_store(hub: PersistenceHub, store: BaseStore, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(2)
    p = hub.index_prefix("event", "payments", "7")
    mine = {p + t: {"i": i} for i, t in enumerate([LOW, tail(rng), HIGH])}
    save(hub, mine)
    # Enough records right after the prefix that a page is always full past the matches.
    save(hub, {shift(p, 1) + format(i, "040x"): {"hi": i} for i in range(12)})
    save(hub, {shift(p, -1) + format(i, "040x"): {"lo": i} for i in range(12)})

    rows: list[int] = []
    real_scan: Callable[..., Page] = store.scan

    def counting_scan(*args: Any, **kwargs: Any) -> Page:
        page = real_scan(*args, **kwargs)
        rows.append(len(page.items))
        return page

    monkeypatch.setattr(store, "scan", counting_scan)

    def measure(batch: int) -> tuple[int, int]:
        rows.clear()
        assert found(hub, p, batch) == sorted(mine.items()), f"batch={batch}"
        calls, read = len(rows), sum(rows)
        assert calls <= 2, f"batch={batch}: {calls} scan calls for 3 matches"
        assert read <= len(mine) + batch, f"batch={batch}: {read} rows read for 3 matches"
        return calls, read

    batches = (3, 8, 500)
    fill(hub, 200, rng)
    small = {batch: measure(batch) for batch in batches}
    fill(hub, 2800, rng, start=200)
    large = {batch: measure(batch) for batch in batches}
    assert small[3] == large[3] == (2, 6)  # a page of exactly the matches, then one to see the next key
    assert small[8] == large[8] == (1, 8)
    assert small[500][0] == large[500][0] == 1


def test_expired_and_tampered_records_are_skipped(
    hub: PersistenceHub, store: BaseStore, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="celery_persist.hub")
    rng = random.Random(3)
    p = hub.index_prefix("event", "shipments", "x")
    kh = {name: p + format(i, "040x") for i, name in enumerate(["forever", "expired", "live", "forged_md", "forged_status", "extended"])}
    hub.save_indexed(kh["forever"], {"v": "forever"}, ttl=None, metadata={"index": "test"})
    hub.save_indexed(kh["expired"], {"v": "expired"}, ttl=60, metadata={"index": "test"})
    for name in ("live", "forged_md", "forged_status"):
        hub.save_indexed(kh[name], {"v": name}, ttl=600, metadata={"index": "test"})
    hub.save_indexed(kh["extended"], {"v": "extended"}, ttl=60, metadata={"index": "test"})
    fill(hub, 90, rng)

    def edit(name: str, **changes: Any) -> None:
        rec = store.get(kh[name])
        assert rec is not None
        store.put(rec.replace(**changes))

    edit("forged_md", metadata={"index": "forged"})  # authenticated data of the blob: does not open
    edit("forged_status", status=Status.CANCELLED)  # sealed field: does not verify
    edit("extended", expires_at=NOW + 86400, due_at=NOW + 86400)  # sealed field: does not verify

    assert [s["v"] for _, s in found(hub, p)] == ["forever", "expired", "live"]  # not yet expired
    clock.t = NOW + 120  # past the 60 s ttl, not the 600 s one
    for batch in (500, 1):
        caplog.clear()
        assert found(hub, p, batch) == [(kh["forever"], {"v": "forever"}), (kh["live"], {"v": "live"})]
        warned = skipped_warnings(caplog)
        assert len(warned) == 3, warned
        for name in ("forged_md", "forged_status", "extended"):
            assert any(kh[name][:12] in w for w in warned), (name, warned)
    clock.t = NOW + 601
    assert found(hub, p) == [(kh["forever"], {"v": "forever"})]


def test_undecodable_records_are_skipped(hub: PersistenceHub, store: BaseStore, backend: Backend) -> None:
    if backend.corrupt is None:
        pytest.skip(f"{backend.name} has no level below its API to edit")
    p = hub.index_prefix("event", "undecodable", "1")
    records = {p + format(i, "040x"): {"i": i} for i in range(4)}
    save(hub, records)
    fill(hub, 30, random.Random(4))
    keys = sorted(records)
    backend.corrupt(store, keys[1], "metadata")
    backend.corrupt(store, keys[2], "status")
    assert found(hub, p) == [(keys[0], {"i": 0}), (keys[3], {"i": 3})]
    assert found(hub, p, batch=1) == [(keys[0], {"i": 0}), (keys[3], {"i": 3})]


@pytest.mark.parametrize("edge", ["first", "last"])
def test_the_first_and_last_prefixes(hub: PersistenceHub, edge: str) -> None:
    rng = random.Random(5)
    p = "0" * 24 if edge == "first" else "f" * 24
    mine = {p + t: {"e": i} for i, t in enumerate([LOW, "0" * 39 + "1", tail(rng), HIGH])}
    other = shift(p, 1) if edge == "first" else shift(p, -1)
    neighbours = {other + t: {"n": i} for i, t in enumerate([LOW, tail(rng), HIGH])}
    save(hub, {**mine, **neighbours})
    fill(hub, 150, rng)
    for batch in (500, 3, 1):
        assert found(hub, p, batch) == sorted(mine.items()), f"batch={batch}"
        assert found(hub, other, batch) == sorted(neighbours.items()), f"batch={batch}"
