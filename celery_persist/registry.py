"""Which settings, store and hub serve a Celery app: the app -> :class:`Binding` map.

A :class:`Binding` is what every module of the Celery layer works with: the
app, its frozen :class:`~celery_persist.config.PersistConfig` and the hub over
its store. :func:`bind` creates one per app (``Persist(app)`` calls it; so does
:func:`binding_of` for a worker that runs the shared tasks of an app that never
called ``Persist(app)``) and keeps it in a weak map, so the app object stays as
Celery made it.

Binding an app reads nothing until the app is configured (see
:class:`Binding`). Then it reads and validates the ``persist_*`` settings,
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
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from .config import SETTINGS, PersistConfig
from .errors import ConfigurationError
from .hub import PersistenceHub
from .metrics import PrometheusMetrics
from .serializer import StateSerializer
from .stores import mask_url, open_store

if TYPE_CHECKING:
    from celery import Celery

__all__ = ["Binding", "bind", "binding_of", "lock", "CLEANUP_TASK", "BEAT_ENTRY", "TIMER_TASK", "TIMER_BEAT_ENTRY"]

logger = logging.getLogger(__name__)

CLEANUP_TASK = "celery_persist.cleanup"
BEAT_ENTRY = "celery-persist-cleanup"
TIMER_TASK = "celery_persist.fire_timers"
TIMER_BEAT_ENTRY = "celery-persist-timers"

#: Guards the map and the one-per-process metrics; re-entrant because binding may build metrics.
lock = threading.RLock()
_bindings: weakref.WeakKeyDictionary[Any, Binding] = weakref.WeakKeyDictionary()
_metrics: PrometheusMetrics | None = None


class Binding:
    """celery-persist's settings, store and hub for one Celery app.

    Nothing is read when a binding is made: Celery apps are configured
    lazily, and reading ``app.conf`` early would freeze the configuration
    before ``config_from_object()`` (Django's ``namespace="CELERY"`` included)
    has had its say. The settings are read when the app is configured
    (Celery's ``on_after_configure``), or at first use, whichever comes
    first; a later reconfiguration reads them again, as long as the store
    has not been opened yet.

    Attributes:
        app: The Celery app.
        overrides: Settings given to ``Persist(app, **overrides)``; they win over ``app.conf``.
    """

    def __init__(self, app: Celery, **overrides: Any) -> None:
        self.app = app
        self.overrides = dict(overrides)
        self._config: PersistConfig | None = None
        self._hub: PersistenceHub | None = None
        self._store_ready = False
        self._setup_lock = threading.RLock()
        # Bad values set so far are refused here, not at first use, without configuring the app:
        # before configuration, app.conf.changes holds what was set directly on app.conf, and
        # both `in` and setdefault (of a name that is there) read it without finalizing.
        pending: dict[str, Any] = {}
        if not app.configured:
            changes = getattr(app.conf, "changes", {})
            pending = {s.name: changes.setdefault(s.name) for s in SETTINGS if s.name in changes}
            _refuse_rpc(changes.setdefault("result_backend") if "result_backend" in changes else None)
        PersistConfig.from_mapping(pending, **self.overrides)

    @property
    def config(self) -> PersistConfig:
        """The app's frozen ``persist_*`` settings (reads ``app.conf`` on first access)."""
        config = self._config
        if config is None:
            with self._setup_lock:
                if self._config is None:
                    # Touching app.conf configures the app, which calls configured() below.
                    self.app.conf  # noqa: B018
                    if self._config is None:
                        self.configured()
                config = self._config
                assert config is not None
        return config

    @property
    def hub(self) -> PersistenceHub:
        """The hub over the app's store (opened on first access; :meth:`ready` also sets it up)."""
        hub = self._hub
        if hub is None:
            with self._setup_lock:
                if self._hub is None:
                    self._hub = _open_hub(self.config)
                hub = self._hub
        return hub

    def configured(self) -> None:
        """Read the settings from the (now configured) app: validate them, add the beat entry, mask the URL.

        Called from Celery's ``on_after_configure`` signal, or at once when
        the app was configured before ``Persist(app)``. Raises
        :class:`~celery_persist.errors.ConfigurationError` for a bad value.
        """
        app = self.app
        with self._setup_lock:
            _refuse_rpc(app.conf.result_backend)
            cfg = PersistConfig.from_app(app, **self.overrides)
            old = self._config
            if old is not None and cfg.store_url == mask_url(old.store_url) != old.store_url:
                cfg = replace(cfg, store_url=old.store_url)  # app.conf holds the URL masked by the last call
            cfg.check_keys()
            if self._hub is not None and self._config is not None and cfg != self._config:
                logger.warning("celery-persist: the app was reconfigured after its store was opened; the old settings stay in use")
                return
            self._config = cfg
            masked = mask_url(cfg.store_url)
            if masked != cfg.store_url and app.conf.get("persist_store_url") == cfg.store_url:
                app.conf["persist_store_url"] = masked
            schedule = dict(app.conf.beat_schedule or {})
            if cfg.cleanup_interval:
                schedule.setdefault(BEAT_ENTRY, {"task": CLEANUP_TASK, "schedule": float(cfg.cleanup_interval)})
            if cfg.timer_interval:
                # A fire that waited longer than one interval is stale: the next one does its work.
                every = float(cfg.timer_interval)
                schedule.setdefault(TIMER_BEAT_ENTRY, {"task": TIMER_TASK, "schedule": every, "options": {"expires": max(every, 1.0)}})
            if schedule != (app.conf.beat_schedule or {}):
                app.conf.beat_schedule = schedule

    def ready(self) -> PersistenceHub:
        """The hub, with the store's tables/indexes created (once per process)."""
        if not self._store_ready:
            with self._setup_lock:
                if not self._store_ready:
                    self.hub.store.setup()
                    self._store_ready = True
        return self.hub


def _refuse_rpc(backend: Any) -> None:
    """Refuse the ``rpc://`` result backend, which cannot carry a parked flow's states.

    ``rpc://`` sends a task's states as messages to the one client that sent
    it, and only while that client listens: a step parked hours later, or
    resumed from another process, is never seen as SUSPENDED or SUCCESS there.
    """
    if isinstance(backend, str) and backend.partition(":")[0].lower() == "rpc":
        raise ConfigurationError(
            "celery-persist cannot use the rpc:// result backend: it delivers a task's states only to the client "
            "that sent it, while it listens, so a parked step would stay PENDING to everyone else and its "
            "resumed result would never arrive. Use a result backend that stores states (redis://, "
            "db+postgresql://, mongodb://, ...) alongside RabbitMQ."
        )


def _open_hub(cfg: PersistConfig) -> PersistenceHub:
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
        history=cfg.history,
    )
    if cfg.metrics:
        _shared_metrics().attach(hub)
    return hub


def _on_after_configure(sender: Any = None, **_: Any) -> None:
    with lock:
        binding = _bindings.get(sender)
    if binding is not None:
        binding.configured()


def bind(app: Celery, **overrides: Any) -> Binding:
    """The binding of ``app``, created from ``app.conf`` and ``overrides`` on first call."""
    with lock:
        existing = _bindings.get(app)
        if existing is not None:
            if overrides:
                logger.debug("celery-persist: app already bound; overrides ignored")
            return existing
        binding = Binding(app, **overrides)
        _bindings[app] = binding
    if app.configured:
        binding.configured()
    else:
        # weak=False: the receiver is a module function; the app's signal holds no binding.
        app.on_after_configure.connect(_on_after_configure, sender=app, weak=False)
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
