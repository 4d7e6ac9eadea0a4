"""Which settings, store and hub serve a Celery app: the app -> :class:`Binding` map.

A :class:`Binding` is what every module of the Celery layer works with: the
app, its frozen :class:`~celery_persist.config.PersistConfig` and the hub over
its store. :func:`bind` creates one per app (``Persist(app)`` calls it; so does
:func:`binding_of` for a worker that runs the shared tasks of an app that never
called ``Persist(app)``) and keeps it in a weak map, so the app object stays as
Celery made it.

Binding an app registers the ``persist_*`` defaults with ``app.add_defaults``,
adds the cleanup entry to ``beat_schedule``, and masks the store URL in
``app.conf`` when it carries a password: Celery's ``inspect conf`` and
``celery report`` censor only names that look secret (KEY, SECRET, PASS...),
and ``persist_store_url`` does not.

This is the bottom floor of the Celery layer: it imports only the library
layer, and the flow, journal, task and signal modules call down into it.
"""

from __future__ import annotations

import logging
import threading
import weakref
from typing import TYPE_CHECKING, Any

from .config import PersistConfig
from .hub import PersistenceHub
from .metrics import PrometheusMetrics
from .serializer import StateSerializer
from .stores import mask_url, open_store

if TYPE_CHECKING:
    from celery import Celery

__all__ = ["Binding", "bind", "binding_of", "lock", "CLEANUP_TASK", "BEAT_ENTRY"]

logger = logging.getLogger(__name__)

CLEANUP_TASK = "celery_persist.cleanup"
BEAT_ENTRY = "celery-persist-cleanup"

#: Guards the map and the one-per-process metrics; re-entrant because binding may build metrics.
lock = threading.RLock()
_bindings: weakref.WeakKeyDictionary[Any, Binding] = weakref.WeakKeyDictionary()
_metrics: PrometheusMetrics | None = None


class Binding:
    """celery-persist's settings, store and hub for one Celery app.

    Attributes:
        app: The Celery app.
        config: Its frozen ``persist_*`` settings.
        hub: The hub over its store (use :meth:`ready` to have the store set up).
    """

    def __init__(self, app: Celery, config: PersistConfig, hub: PersistenceHub) -> None:
        self.app = app
        self.config = config
        self.hub = hub
        self._store_ready = False
        self._setup_lock = threading.Lock()

    @classmethod
    def from_app(cls, app: Celery, **overrides: Any) -> Binding:
        """Read ``app.conf`` (``overrides`` win), open the store, build the hub."""
        app.add_defaults(PersistConfig.defaults())
        cfg = PersistConfig.from_app(app, **overrides)
        masked = mask_url(cfg.store_url)
        if masked != cfg.store_url and app.conf.get("persist_store_url") == cfg.store_url:
            app.conf["persist_store_url"] = masked
        keyring = cfg.keyring()
        serializer = StateSerializer(cfg.codec, cfg.compression, cfg.compression_threshold, max_size=cfg.max_state_size)
        store = open_store(cfg.store_url, **dict(cfg.store_options))
        hub = PersistenceHub(
            store,
            keyring=keyring,
            serializer=serializer,
            signing_secret=cfg.signing_secret,
            encryption=cfg.encryption,
            lease=cfg.lease,
            retention=cfg.retention,
            max_state_size=cfg.max_state_size,
        )
        if cfg.metrics:
            _shared_metrics().attach(hub)
        if cfg.cleanup_interval:
            schedule = dict(app.conf.beat_schedule or {})
            schedule.setdefault(BEAT_ENTRY, {"task": CLEANUP_TASK, "schedule": float(cfg.cleanup_interval)})
            app.conf.beat_schedule = schedule
        return cls(app, cfg, hub)

    def ready(self) -> PersistenceHub:
        """The hub, with the store's tables/indexes created (once per process)."""
        if not self._store_ready:
            with self._setup_lock:
                if not self._store_ready:
                    self.hub.store.setup()
                    self._store_ready = True
        return self.hub


def bind(app: Celery, **overrides: Any) -> Binding:
    """The binding of ``app``, created from ``app.conf`` and ``overrides`` on first call."""
    with lock:
        existing = _bindings.get(app)
        if existing is not None:
            if overrides:
                logger.debug("celery-persist: app already bound; overrides ignored")
            return existing
        binding = Binding.from_app(app, **overrides)
        _bindings[app] = binding
        return binding


def binding_of(app: Celery) -> Binding:
    """The binding of ``app`` (created from ``app.conf`` if ``Persist(app)`` was never called)."""
    with lock:
        existing = _bindings.get(app)
    return existing if existing is not None else bind(app)


def _shared_metrics() -> PrometheusMetrics:
    """One PrometheusMetrics per process (on the default registry) for every bound app."""
    global _metrics
    with lock:
        if _metrics is None:
            _metrics = PrometheusMetrics()
        return _metrics
