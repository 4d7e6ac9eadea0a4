"""A timeout handler that keeps failing is retried a bounded number of times, then given up on, loudly."""

from __future__ import annotations

import logging

import pytest

from celery_persist import maintenance
from celery_persist.errors import SuspensionExpired
from celery_persist.hub import PersistenceHub, Suspension
from celery_persist.keys import key_hash
from celery_persist.stores.base import Kind, Status

from ._helpers import FakeClock, RecordingStore

ATTEMPTS = maintenance.TIMEOUT_HANDLER_ATTEMPTS
RETRY_AFTER = 30.0


def _checkpoints(store: RecordingStore) -> list[object]:
    return list(store.scan(kind=Kind.CHECKPOINT, limit=1000).items)


def _metrics(hub: PersistenceHub) -> tuple[object, object]:
    prometheus_client = pytest.importorskip("prometheus_client")
    from celery_persist.metrics import PrometheusMetrics

    registry = prometheus_client.CollectorRegistry()
    PrometheusMetrics(registry, gauge_ttl=0).attach(hub)
    return registry, hub.store.name


def _counter(registry: object, store: object, outcome: str) -> float:
    value = registry.get_sample_value(  # type: ignore[attr-defined]
        "celery_persist_timeout_handler_failures_total", {"store": store, "outcome": outcome}
    )
    return value or 0.0


def test_a_handler_that_always_raises_is_given_up_after_the_bounded_attempts(
    hub: PersistenceHub, store: RecordingStore, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    registry, name = _metrics(hub)
    key = hub.suspend({"flow": 1}, ttl=10)
    kh = key_hash(key)
    calls: list[float] = []

    def broken(s: Suspension) -> None:
        calls.append(clock.now)
        raise RuntimeError("errback backend down")

    caplog.set_level(logging.INFO)
    clock.advance(10)
    for _ in range(ATTEMPTS + 1):  # one run more than the attempts: the last must find nothing to do
        hub.cleanup(on_expired=broken, retry_after=RETRY_AFTER)
        clock.advance(RETRY_AFTER)

    assert len(calls) == ATTEMPTS, "retried a bounded number of times, then never again"
    rec = store.raw(kh)
    assert rec is not None and rec.status is Status.EXPIRED and rec.due_at is None, "kept, expired, out of the due index"
    assert _checkpoints(store) == [], "the attempt counter is gone"
    with pytest.raises(SuspensionExpired):
        hub.resume(key)  # the record still verifies (re-sealed, not tampered with) and is refused as expired

    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "giving up" in errors[0].getMessage() and errors[0].exc_info is not None
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "timeout handler failed" in r.getMessage()]
    assert len(warnings) == ATTEMPTS - 1
    trail = [(r.persist_action, r.persist_outcome) for r in caplog.records if r.name == "celery_persist.audit"]  # type: ignore[attr-defined]
    assert trail.count(("expire", "handler-failed")) == ATTEMPTS - 1 and trail.count(("expire", "gave-up")) == 1

    assert _counter(registry, name, "retry") == ATTEMPTS - 1
    assert _counter(registry, name, "gave-up") == 1

    assert hub.cleanup(on_expired=broken, retry_after=RETRY_AFTER, now=clock.now + 365 * 86400) == 0
    assert len(calls) == ATTEMPTS, "not even past retention: it is kept for inspection"


def test_a_handler_that_recovers_clears_its_attempt_count(hub: PersistenceHub, store: RecordingStore, clock: FakeClock) -> None:
    key = hub.suspend({"flow": 1}, ttl=10)
    failures = ATTEMPTS - 1
    handled: list[Suspension] = []

    def flaky(s: Suspension) -> None:
        nonlocal failures
        if failures:
            failures -= 1
            raise RuntimeError("not yet")
        handled.append(s)

    clock.advance(10)
    for _ in range(ATTEMPTS):
        hub.cleanup(on_expired=flaky, retry_after=RETRY_AFTER)
        clock.advance(RETRY_AFTER)
    assert len(handled) == 1 and handled[0].state == {"flow": 1}
    rec = store.raw(key_hash(key))
    assert rec is not None and rec.status is Status.EXPIRED and rec.due_at is not None, "pruned after retention as usual"
    assert _checkpoints(store) == []


def test_the_first_attempt_reads_no_counter(hub: PersistenceHub, store: RecordingStore, clock: FakeClock) -> None:
    hub.suspend({"flow": 1}, ttl=10)
    clock.advance(10)
    store.calls.clear()
    assert hub.cleanup(on_expired=lambda s: None) == 1
    assert "delete" not in store.calls and not [c for c in store.calls if c == "get"]


def test_attempts_are_configurable(hub: PersistenceHub, store: RecordingStore, clock: FakeClock) -> None:
    key = hub.suspend({"flow": 1}, ttl=10)
    calls = 0

    def broken(s: Suspension) -> None:
        nonlocal calls
        calls += 1
        raise RuntimeError("down")

    clock.advance(10)
    for _ in range(4):
        hub.cleanup(on_expired=broken, retry_after=RETRY_AFTER, handler_attempts=2)
        clock.advance(RETRY_AFTER)
    rec = store.raw(key_hash(key))
    assert calls == 2 and rec is not None and rec.status is Status.EXPIRED and rec.due_at is None
