"""Optional Prometheus metrics (``pip install 'celery-persist[metrics]'``, ``persist_metrics = True``).

The hub reports every audited action to an observer; :class:`PrometheusMetrics`
turns those reports into:

* counters ``celery_persist_suspended_total``, ``_waits_total{wait}`` (input,
  timer, event), ``_timers_fired_total``, ``_signals_total``,
  ``_signal_woken_total``, ``_resumed_total``,
  ``_expired_total``, ``_cancelled_total``, ``_resume_denied_total{reason}``,
  ``_timeout_handler_failures_total{outcome}`` (``retry``: a timeout policy
  raised and cleanup will try again; ``gave-up``: it raised once too often);
* histograms ``celery_persist_suspend_seconds``, ``_resume_seconds`` (claim:
  read, authenticate, decrypt, transition) and ``_state_bytes`` (sealed size);
* gauge ``celery_persist_suspensions{status}``, computed from the store when
  scraped (at most every ``gauge_ttl`` seconds, since it scans the store).

Every metric has a ``store`` label (the masked store URL). With Celery's
prefork pool each child counts for itself: run prometheus_client in
multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``) to aggregate, as for any
Celery metrics.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from .stores.drivers import require

if TYPE_CHECKING:
    from .hub import PersistenceHub

__all__ = ["PrometheusMetrics"]

_SIZE_BUCKETS = (256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864)
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class PrometheusMetrics:
    """Prometheus metrics for one or more hubs.

    Args:
        registry: Where to register (default: prometheus_client's global registry).
        namespace: Metric name prefix.
        gauge_ttl: Seconds a computed ``suspensions`` gauge is reused between scrapes.

    Example:
        >>> metrics = PrometheusMetrics()
        >>> metrics.attach(hub)
        >>> prometheus_client.start_http_server(9808)
    """

    def __init__(self, registry: Any = None, *, namespace: str = "celery_persist", gauge_ttl: float = 30.0) -> None:
        pc = require("prometheus_client", extra="metrics", store="metrics")
        self._pc = pc
        self._core = require("prometheus_client.core", extra="metrics", store="metrics")
        registry = pc.REGISTRY if registry is None else registry
        kw = {"namespace": namespace, "registry": registry}
        self.suspended = pc.Counter("suspended", "Suspensions written.", ["store"], **kw)
        self.resumed = pc.Counter("resumed", "Suspensions resumed.", ["store"], **kw)
        self.expired = pc.Counter("expired", "Suspensions that timed out.", ["store"], **kw)
        self.cancelled = pc.Counter("cancelled", "Suspensions cancelled.", ["store"], **kw)
        self.denied = pc.Counter("resume_denied", "Resume or cancel attempts refused.", ["store", "reason"], **kw)
        self.timeout_handler_failures = pc.Counter(
            "timeout_handler_failures",
            "Timeout policies that raised in cleanup (outcome retry or gave-up).",
            ["store", "outcome"],
            **kw,
        )
        self.waits = pc.Counter("waits", "Suspensions written, by what they wait for (input, timer, event).", ["store", "wait"], **kw)
        self.timers_fired = pc.Counter("timers_fired", "Timers (sleep) that fired.", ["store"], **kw)
        self.signals = pc.Counter("signals", "Signals sent (persist.signal).", ["store"], **kw)
        self.signal_woken = pc.Counter("signal_woken", "Flows woken by signals.", ["store"], **kw)
        self.suspend_seconds = pc.Histogram(
            "suspend_seconds", "Time to serialize, seal and store a state.", ["store"], buckets=_LATENCY_BUCKETS, **kw
        )
        self.resume_seconds = pc.Histogram(
            "resume_seconds", "Time to read, open and claim a suspension.", ["store"], buckets=_LATENCY_BUCKETS, **kw
        )
        self.state_bytes = pc.Histogram("state_bytes", "Sealed state size in bytes.", ["store"], buckets=_SIZE_BUCKETS, **kw)
        self._hubs: list[PersistenceHub] = []
        self._gauge_ttl = gauge_ttl
        self._gauge_cache: dict[str, tuple[float, dict[str, int]]] = {}
        self._lock = threading.Lock()
        self._namespace = namespace
        registry.register(self)

    def attach(self, hub: PersistenceHub) -> None:
        """Count what ``hub`` does (sets its observer) and report its gauge."""
        store = hub.store.name

        def observe(action: str, outcome: str, extra: dict[str, Any]) -> None:
            self.observe(store, action, outcome, extra)

        hub.observer = observe
        with self._lock:
            self._hubs.append(hub)

    def observe(self, store: str, action: str, outcome: str, extra: dict[str, Any]) -> None:
        seconds, size = extra.get("seconds"), extra.get("size")
        if outcome.startswith("denied:"):
            self.denied.labels(store, outcome.partition(":")[2]).inc()
        elif action == "suspend":
            self.suspended.labels(store).inc()
            self.waits.labels(store, str(extra.get("wait", "input"))).inc()
            if seconds is not None:
                self.suspend_seconds.labels(store).observe(seconds)
        elif action == "claim":
            if seconds is not None:
                self.resume_seconds.labels(store).observe(seconds)
        elif action == "resume" and outcome == "ok":
            self.resumed.labels(store).inc()
        elif action == "expire" and outcome == "handler-failed":
            self.timeout_handler_failures.labels(store, "retry").inc()
        elif action == "expire":
            if outcome == "gave-up":
                self.timeout_handler_failures.labels(store, "gave-up").inc()
            self.expired.labels(store).inc()
            if outcome == "ok" and extra.get("wait") == "timer":
                self.timers_fired.labels(store).inc()
        elif action == "cancel" and outcome == "ok":
            self.cancelled.labels(store).inc()
        elif action == "signal":
            self.signals.labels(store).inc()
            self.signal_woken.labels(store).inc(int(extra.get("woken", 0)))
        if size is not None and action == "suspend":
            self.state_bytes.labels(store).observe(size)

    # prometheus_client custom collector protocol
    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        family = self._core.GaugeMetricFamily(
            f"{self._namespace}_suspensions", "Suspensions in the store by status.", labels=["store", "status"]
        )
        with self._lock:
            hubs = list(self._hubs)
        for hub in hubs:
            for status, count in self._counts(hub).items():
                family.add_metric([hub.store.name, status], count)
        yield family

    def _counts(self, hub: PersistenceHub) -> dict[str, int]:
        now = time.monotonic()
        cached = self._gauge_cache.get(hub.store.name)
        if cached is not None and now - cached[0] < self._gauge_ttl:
            return cached[1]
        try:
            counts = dict(hub.stats()["suspensions"])
        except Exception:  # noqa: BLE001 - a scrape must not fail because the store is down
            return cached[1] if cached else {}
        self._gauge_cache[hub.store.name] = (now, counts)
        return counts
