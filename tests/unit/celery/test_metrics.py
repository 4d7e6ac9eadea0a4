"""Prometheus metrics, scraped over HTTP from a real prometheus_client server."""

from __future__ import annotations

import os
import urllib.request

import pytest
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.parser import text_string_to_metric_families

from celery_persist import AlreadyResumed, InvalidKey, Keyring, PersistenceHub, open_store
from celery_persist.metrics import PrometheusMetrics


def _scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def test_metrics_are_scraped(tmp_path: pytest.TempPathFactory) -> None:
    registry = CollectorRegistry()
    metrics = PrometheusMetrics(registry, gauge_ttl=0)
    hub = PersistenceHub(open_store("memory://"), keyring=Keyring([("k", os.urandom(32))]))
    metrics.attach(hub)
    keys = [hub.suspend({"n": i}) for i in range(3)]
    hub.resume(keys[0])
    with pytest.raises(AlreadyResumed):
        hub.resume(keys[0])
    with pytest.raises(InvalidKey):
        hub.resume("forged")
    hub.cancel(keys[1])
    hub.suspend(1, ttl=0.001)
    hub.cleanup(now=hub.clock() + 1)
    server, thread = start_http_server(0, addr="127.0.0.1", registry=registry)
    try:
        samples = _scrape(server.server_port)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
    store = (("store", "memory://"),)
    assert samples[("celery_persist_suspended_total", store)] == 4
    assert samples[("celery_persist_resumed_total", store)] == 1
    assert samples[("celery_persist_cancelled_total", store)] == 1
    assert samples[("celery_persist_expired_total", store)] == 1
    assert samples[("celery_persist_resume_denied_total", (("reason", "AlreadyResumed"), ("store", "memory://")))] == 1
    assert samples[("celery_persist_resume_denied_total", (("reason", "InvalidKey"), ("store", "memory://")))] == 1
    assert samples[("celery_persist_suspend_seconds_count", store)] == 4
    assert samples[("celery_persist_resume_seconds_count", store)] == 1
    assert samples[("celery_persist_state_bytes_count", store)] == 4
    assert samples[("celery_persist_suspensions", (("status", "suspended"), ("store", "memory://")))] == 1
    assert samples[("celery_persist_suspensions", (("status", "expired"), ("store", "memory://")))] == 1


def test_a_failing_observer_never_breaks_the_hub() -> None:
    def broken(action: str, outcome: str, extra: dict[str, object]) -> None:
        raise RuntimeError("metrics backend down")

    hub = PersistenceHub(open_store("memory://"), keyring=Keyring([("k", os.urandom(32))]), observer=broken)
    key = hub.suspend({"a": 1})
    assert hub.resume(key).state == {"a": 1}


def test_waits_timers_and_signals_are_counted(caplog: pytest.LogCaptureFixture) -> None:
    registry = CollectorRegistry()
    metrics = PrometheusMetrics(registry, gauge_ttl=0)
    hub = PersistenceHub(open_store("memory://"), keyring=Keyring([("k", os.urandom(32))]))
    metrics.attach(hub)
    caplog.set_level("DEBUG", logger="celery_persist.audit")
    hub.suspend({"n": 1}, metadata={"wait": "input"})
    hub.suspend({"n": 2}, ttl=0.001, metadata={"wait": "timer", "wake_at": "2026-01-01T00:00:00+00:00"})
    hub.suspend({"n": 3}, metadata={"wait": "event", "topic": "t", "event_key": "k"})
    hub.cleanup(now=hub.clock() + 1)
    hub.audit("signal", hub.index_prefix("event", "t", "k")[:12], "ok", woken=3, buffered=False)
    value = lambda name, **labels: registry.get_sample_value(name, {"store": "memory://", **labels})  # noqa: E731
    assert value("celery_persist_waits_total", wait="input") == 1
    assert value("celery_persist_waits_total", wait="timer") == 1
    assert value("celery_persist_waits_total", wait="event") == 1
    assert value("celery_persist_timers_fired_total") == 1
    assert value("celery_persist_signals_total") == 1 and value("celery_persist_signal_woken_total") == 3
    trail = [(r.persist_action, r.persist_outcome, getattr(r, "wait", None)) for r in caplog.records if r.name == "celery_persist.audit"]
    assert ("suspend", "ok", "timer") in trail and ("expire", "ok", "timer") in trail and ("signal", "ok", None) in trail


def test_pruning_a_finished_event_wait_drops_its_index_record() -> None:
    hub = PersistenceHub(open_store("memory://"), keyring=Keyring([("k", os.urandom(32))]), retention=1)
    key = hub.suspend({"n": 1}, metadata={"wait": "event", "topic": "t", "event_key": "k"})
    from celery_persist.keys import key_hash

    index = hub.event_index_hash("t", "k", key_hash(key))
    hub.save_indexed(index, {"journal": "event:x", "hash": key_hash(key)}, ttl=None)
    assert [rec.key_hash for rec, _ in hub.indexed(hub.index_prefix("event", "t", "k"))] == [index]
    hub.cancel(key)
    hub.cleanup(now=hub.clock() + 5)  # past retention: the suspension and its index record go
    assert hub.store.get(key_hash(key)) is None and hub.store.get(index) is None
