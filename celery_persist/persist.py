"""``Persist(app)``: bind celery-persist to one Celery app.

It reads the ``persist_*`` settings once (registering their defaults with
``app.add_defaults``), builds the hub over the configured store, makes sure the
``celery_persist.*`` tasks are registered with the app, connects the signal
handlers, and adds the cleanup entry to ``beat_schedule``. Calling it twice for
one app returns the same object; :meth:`Persist.of` finds it. Nothing happens
at import time.

The instance lives in a module-level weak map, not as an attribute on the
app, so the app object stays as Celery made it.

The store URL is masked in ``app.conf`` once read when it carries a password:
Celery's ``inspect conf`` and ``celery report`` censor only names that look
secret (KEY, SECRET, PASS...), and ``persist_store_url`` does not.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from .config import PersistConfig
from .crypto import Keyring
from .errors import ConfigurationError, PersistenceError, SuspensionNotFound
from .hub import PersistenceHub, Suspension
from .serializer import StateSerializer
from .stores import mask_url, open_store

if TYPE_CHECKING:
    from celery import Celery
    from celery.result import AsyncResult

__all__ = ["Persist", "SUSPENDED"]

logger = logging.getLogger(__name__)

#: Result-backend state of a parked task (Flower derives the same name from ``task-suspended``).
SUSPENDED = "SUSPENDED"
CLEANUP_TASK = "celery_persist.cleanup"
BEAT_ENTRY = "celery-persist-cleanup"

_instances: weakref.WeakKeyDictionary[Any, Persist] = weakref.WeakKeyDictionary()
_lock = threading.RLock()


class Persist:
    """celery-persist bound to one Celery app.

    Args:
        app: The Celery app.
        **overrides: Settings that win over ``app.conf``; short (``store_url``)
            or full (``persist_store_url``) names.

    Example:
        >>> app = Celery("shop", broker="redis://", backend="redis://")
        >>> app.conf.persist_store_url = "postgresql://127.0.0.1/test"
        >>> persist = Persist(app)
        >>> key = persist.suspension_key(flow.apply_async(), timeout=10)
        >>> persist.resume(key, {"approved": True})
    """

    app: Celery
    config: PersistConfig
    hub: PersistenceHub

    def __new__(cls, app: Celery, **overrides: Any) -> Persist:
        with _lock:
            existing = _instances.get(app)
            if existing is not None:
                if overrides:
                    logger.debug("celery-persist: Persist(app) already bound; overrides ignored")
                return existing
            self = super().__new__(cls)
            self._setup(app, **overrides)
            _instances[app] = self
            return self

    def __init__(self, app: Celery, **overrides: Any) -> None:
        # All work happens once, in __new__ (idempotent per app).
        pass

    @classmethod
    def of(cls, app: Celery) -> Persist:
        """The instance bound to ``app``, created from ``app.conf`` if there is none yet."""
        with _lock:
            existing = _instances.get(app)
        return existing if existing is not None else cls(app)

    def _setup(self, app: Celery, **overrides: Any) -> None:
        self.app = app
        app.add_defaults(PersistConfig.defaults())
        self.config = cfg = PersistConfig.from_app(app, **overrides)
        masked = mask_url(cfg.store_url)
        if masked != cfg.store_url and app.conf.get("persist_store_url") == cfg.store_url:
            app.conf["persist_store_url"] = masked
        keyring = Keyring.parse(cfg.keys) if cfg.keys and cfg.encryption != "off" else None
        serializer = StateSerializer(cfg.codec, cfg.compression, cfg.compression_threshold, max_size=cfg.max_state_size)
        store = open_store(cfg.store_url, **dict(cfg.store_options))
        self.hub = PersistenceHub(
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
            _shared_metrics().attach(self.hub)
        self._store_ready = False
        self._setup_lock = threading.Lock()
        # Importing the tasks module attaches the shared tasks to every app, this one included.
        from . import handlers, tasks  # noqa: F401

        handlers.connect()
        if cfg.cleanup_interval:
            schedule = dict(app.conf.beat_schedule or {})
            schedule.setdefault(BEAT_ENTRY, {"task": CLEANUP_TASK, "schedule": float(cfg.cleanup_interval)})
            app.conf.beat_schedule = schedule

    # -- store access --------------------------------------------------------------------------

    def ready(self) -> PersistenceHub:
        """The hub, with the store's tables/indexes created (once per process)."""
        if not self._store_ready:
            with self._setup_lock:
                if not self._store_ready:
                    self.hub.store.setup()
                    self._store_ready = True
        return self.hub

    # -- the public operations -----------------------------------------------------------------

    def resume(self, key: str, input: Any = None) -> AsyncResult:
        """Resume a parked flow with ``input``; exactly one caller per key wins.

        The claim happens here, in the caller's process; the continuation is
        sent to the broker with the task ids frozen when the flow started, so
        the caller's original ``AsyncResult`` completes.

        Returns:
            The AsyncResult of the continuation (the next task, or the resumed task).

        Raises:
            InvalidKey, SuspensionNotFound, AlreadyResumed, SuspensionExpired,
            SuspensionCancelled, StoreUnavailable.
        """
        from . import canvas

        hub = self.ready()
        with hub.claiming(key, input) as suspension:
            result = canvas.continue_flow(self, suspension, input)
        return result

    def cancel(self, key: str) -> Suspension:
        """End a suspension; the parked task (and what was chained after it) become REVOKED."""
        from . import canvas

        suspension = self.ready().cancel(key)
        canvas.revoke_flow(self, suspension)
        return suspension

    def load(self, key: str) -> Suspension:
        """Read a suspension (with its state) without changing it."""
        return self.ready().load(key)

    def cleanup(self, now: float | None = None) -> int:
        """Apply timeouts, re-open lapsed leases, prune expired records (what the beat task runs)."""
        from . import canvas

        return self.ready().cleanup(now, on_expired=lambda s: canvas.expire_flow(self, s))

    def suspension_key(self, result: AsyncResult, timeout: float | None = 10.0, interval: float = 0.05) -> str:
        """Wait until some step of ``result``'s flow is SUSPENDED and return its key.

        Walks ``result`` and its parents (as ``chain.apply_async()`` links them)
        and polls the result backend until one of them is SUSPENDED.

        Raises:
            TimeoutError: Nothing in the flow was suspended within ``timeout`` seconds.
            ConfigurationError: ``persist_key_in_result`` is off (deliver keys with ``notify``).
            SuspensionNotFound: The flow finished without suspending.
        """
        import time

        if not self.config.key_in_result:
            raise ConfigurationError("persist_key_in_result is off, so keys are not in the result backend; deliver them with notify=")
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            all_ready = True
            for r in _lineage(result):
                state = r.state
                if state == SUSPENDED:
                    info = r.info
                    if isinstance(info, dict) and info.get("suspension_key") and not self._spent(str(info["suspension_key"])):
                        return str(info["suspension_key"])
                if state not in ("SUCCESS", "FAILURE", "REVOKED"):
                    all_ready = False
            if all_ready:
                raise SuspensionNotFound("the flow finished without suspending")
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"no step of the flow was suspended within {timeout} s")
            time.sleep(interval)

    def _spent(self, key: str) -> bool:
        """Whether ``key`` was already claimed or resumed.

        A resumed PersistentTask keeps its SUSPENDED state (and the spent key) in
        the result backend until a worker re-runs it; that key must not be handed
        out as the task's current one.
        """
        from .keys import key_hash
        from .stores.base import Status

        try:
            record = self.ready().store.get(key_hash(key))
        except PersistenceError:
            return False  # let resume() report the store problem
        return record is not None and record.status in (Status.CLAIMED, Status.RESUMED)

    def checkpoint_state(self, task_id: str) -> Any:
        """The last state a PersistentTask with this id checkpointed, or None."""
        from .task import journal_name

        journal = self.ready().load_checkpoint(journal_name(task_id))
        return journal.get("state") if isinstance(journal, dict) else None

    def health(self) -> dict[str, Any]:
        try:
            return self.ready().health()
        except PersistenceError as exc:
            return {"ok": False, "store": self.hub.store.name, "error": str(exc)}

    def __repr__(self) -> str:
        return f"<Persist app={self.app.main!r} store={self.hub.store.name}>"


_metrics: Any = None


def _shared_metrics() -> Any:
    """One PrometheusMetrics per process (on the default registry) for every bound app."""
    global _metrics
    with _lock:
        if _metrics is None:
            from .metrics import PrometheusMetrics

            _metrics = PrometheusMetrics()
        return _metrics


def _lineage(result: AsyncResult) -> Iterator[AsyncResult]:
    seen: set[str] = set()
    node: AsyncResult | None = result
    while node is not None and node.id not in seen:
        seen.add(node.id)
        yield node
        node = node.parent
