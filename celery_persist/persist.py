"""``Persist(app)``: celery-persist bound to one Celery app, and what its users call.

``Persist(app)`` binds the app (:func:`celery_persist.registry.bind`: reads the
``persist_*`` settings once, builds the hub over the configured store, adds
the cleanup entry to ``beat_schedule``), makes sure the ``celery_persist.*``
tasks are registered with the app (importing :mod:`celery_persist.tasks` does
that for every app), and connects the signal receivers. Calling it twice for
one app returns the same object; :meth:`Persist.of` finds it. Nothing happens
at import time.

This is the top floor of the Celery layer: its operations call down into
:mod:`~celery_persist.flow` (resume, cancel, cleanup) and
:mod:`~celery_persist.journal` (checkpoints); only the CLI sits above it.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from . import bulk, flow, handlers, journal, people, waits
from . import tasks as _tasks  # noqa: F401 - importing it attaches the shared tasks to every app
from .config import PersistConfig
from .errors import ConfigurationError, PersistenceError, SuspensionNotFound
from .flow import SUSPENDED
from .hub import PersistenceHub, Suspension
from .keys import key_hash
from .registry import BEAT_ENTRY, CLEANUP_TASK, Binding, bind, lock
from .stores.base import Status

if TYPE_CHECKING:
    from celery import Celery
    from celery.result import AsyncResult

__all__ = ["Persist", "SUSPENDED", "BEAT_ENTRY", "CLEANUP_TASK"]

_instances: weakref.WeakKeyDictionary[Any, Persist] = weakref.WeakKeyDictionary()


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

    binding: Binding

    def __new__(cls, app: Celery, **overrides: Any) -> Persist:
        with lock:
            existing = _instances.get(app)
            if existing is not None:
                bind(app, **overrides)  # logs that the overrides are ignored
                return existing
            self = super().__new__(cls)
            self.binding = bind(app, **overrides)
            handlers.connect()
            _instances[app] = self
            return self

    def __init__(self, app: Celery, **overrides: Any) -> None:
        # All work happens once, in __new__ (idempotent per app).
        pass

    @classmethod
    def of(cls, app: Celery) -> Persist:
        """The instance bound to ``app``, created from ``app.conf`` if there is none yet."""
        with lock:
            existing = _instances.get(app)
        return existing if existing is not None else cls(app)

    @property
    def app(self) -> Celery:
        """The Celery app."""
        return self.binding.app

    @property
    def config(self) -> PersistConfig:
        """The app's frozen ``persist_*`` settings."""
        return self.binding.config

    @property
    def hub(self) -> PersistenceHub:
        """The hub over the app's store (:meth:`ready` also sets the store up)."""
        return self.binding.hub

    # -- store access --------------------------------------------------------------------------

    def ready(self) -> PersistenceHub:
        """The hub, with the store's tables/indexes created (once per process)."""
        return self.binding.ready()

    # -- the public operations -----------------------------------------------------------------

    def resume(self, key: str, input: Any = None, *, by: str | None = None) -> AsyncResult | None:
        """Resume a parked flow with ``input``; exactly one caller per key wins.

        The claim happens here, in the caller's process; the continuation is
        sent to the broker with the task ids frozen when the flow started, so
        the caller's original ``AsyncResult`` completes. The input is checked
        against the suspension's ``schema`` first (nothing is claimed if it
        does not match). A suspension that waits for ``approvals=N`` records
        one approval per ``by`` identity and sends the flow on, with the list
        ``[{"by", "input"}, ...]``, after the N-th.

        Args:
            key: The suspension key (or the wrapped key from the result backend).
            input: The next step's input.
            by: Who resumes: required when the suspension waits for approvals.

        Returns:
            The AsyncResult of the continuation (the next task, or the resumed
            task); None when an approval was recorded and more are needed.

        Raises:
            InvalidKey: The key is malformed or was not issued with this deployment's secret (no store access).
            SuspensionNotFound: No suspension is stored under the key.
            AlreadyResumed: The suspension was already claimed or resumed.
            SuspensionExpired: Its timeout passed.
            SuspensionCancelled: It was cancelled.
            InvalidInput: The input does not match the schema, or ``by`` is missing or not an approver.
            StoreUnavailable: The store cannot be reached.
        """
        return flow.resume(self.binding, key, input, by=by)

    def resume_many(self, items: Iterable[tuple[str, Any]], *, batch: int = bulk.BATCH) -> list[bulk.Outcome]:
        """Resume many parked flows: claims go in batches (one compare-and-set round trip per batch).

        Args:
            items: ``(key, input)`` pairs.
            batch: Keys claimed per round trip.

        Returns:
            One outcome per pair, in order: the continuation's AsyncResult, None
            (an approval was recorded), or the error that key met
            (``AlreadyResumed``, ``SuspensionExpired``, ``InvalidKey``, ...).
        """
        return bulk.resume_many(self.binding, items, batch=batch)

    def resume_url(self, key: str, ttl: float | None = None, base_url: str | None = None, by: str | None = None) -> str:
        """A signed link to ``celery persist serve`` that resumes ``key``: it expires, works once, and
        can be bound to one approver (required when the suspension waits for several approvals).

        Args:
            ttl: Seconds the link works (default ``persist_link_ttl``).
            base_url: Where the server is reached (default ``persist_web_base_url``).
            by: The approver the link is for.
        """
        return people.resume_url(self.binding, key, ttl=ttl, base_url=base_url, by=by)

    def link_info(self, token: str) -> dict[str, Any]:
        """What a resume link's page shows (prompt, schema, approvals, whom it is for)."""
        return people.link_info(self.binding, token)

    def resume_link(self, token: str, input: Any = None, *, by: str | None = None) -> AsyncResult | None:
        """Resume through a resume-link token (see :meth:`resume_url`)."""
        return people.resume_link(self.binding, token, input, by=by)

    def resume_by_hash(self, key_hash: str, input: Any = None, *, by: str | None = None) -> AsyncResult | None:
        """Resume by key hash, for the holder of the deployment's keys (the inbox server)."""
        return people.resume_by_hash(self.binding, key_hash, input, by=by)

    def cancel_by_hash(self, key_hash: str) -> Suspension:
        """Cancel by key hash (the inbox's cancel button); the flow becomes REVOKED."""
        return people.cancel_by_hash(self.binding, key_hash)

    def describe(self, fingerprint: str) -> dict[str, Any]:
        """One suspension (by fingerprint or a unique prefix): prompt, schema, approvals, history."""
        return people.describe(self.binding, fingerprint)

    def inbox(
        self,
        status: str | None = "suspended",
        text: str | None = None,
        wait: str | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> tuple[list[dict[str, Any]], str | None]:
        """A page of suspensions for the inbox, and the cursor of the next page (None at the end)."""
        return people.inbox(self.binding, status=status, text=text, wait=wait, limit=limit, cursor=cursor)

    def signal(self, topic: str, key: str, payload: Any = None, *, buffer: float | None = None) -> int:
        """Wake every flow waiting on ``(topic, key)`` (``await_event``) with ``payload``.

        Each flow is woken once, through the same claim as a resume: a flow that
        two signals (or a signal and its timeout) race for ends one way only.

        Args:
            topic: What happened (``"payment.settled"``), 1-256 characters.
            key: Which one (an order id), 1-256 characters.
            payload: The next step's input (JSON-able with the default codec).
            buffer: Also keep the signal this many seconds for flows that start
                waiting later; each of them takes it once.

        Returns:
            How many flows were woken (0 when nobody waits; a buffered signal is kept).

        Raises:
            ConfigurationError: A topic or key that is not a string of 1-256 characters, or a bad buffer.
            StateTooLarge: The payload exceeds ``persist_max_state_size``; nothing changed.
            StoreUnavailable: The store cannot be reached.
        """
        return waits.signal(self.binding, topic, key, payload, buffer=buffer)

    def cancel(self, key: str) -> Suspension:
        """End a suspension; the parked task (and what was chained after it) become REVOKED."""
        return flow.cancel(self.binding, key)

    def load(self, key: str) -> Suspension:
        """Read a suspension (with its state) without changing it."""
        return self.ready().load(key)

    def cleanup(self, now: float | None = None) -> int:
        """Apply timeouts, re-open lapsed leases, prune expired records (what the beat task runs)."""
        return flow.cleanup(self.binding, now)

    def suspension_key(self, result: AsyncResult, timeout: float | None = 10.0, interval: float = 0.05) -> str:
        """Wait until some step of ``result``'s flow is SUSPENDED and return its key.

        Walks ``result`` and its parents (as ``chain.apply_async()`` links them)
        and polls the result backend until one of them is SUSPENDED.

        Raises:
            TimeoutError: Nothing in the flow was suspended within ``timeout`` seconds.
            ConfigurationError: ``persist_key_in_result`` is off (deliver keys with ``notify``).
            SuspensionNotFound: The flow finished without suspending.
        """
        if not self.config.key_in_result:
            raise ConfigurationError("persist_key_in_result is off, so keys are not in the result backend; deliver them with notify=")
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            all_ready = True
            for r in _lineage(result):
                state = r.state
                if state == SUSPENDED:
                    info = r.info
                    if isinstance(info, dict) and info.get("suspension_key"):
                        key = self.hub.unwrap_key(str(info["suspension_key"]))
                        if not self._spent(key):
                            return key
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
        try:
            record = self.ready().store.get(key_hash(key))
        except PersistenceError:
            return False  # let resume() report the store problem
        return record is not None and record.status in (Status.CLAIMED, Status.RESUMED)

    def checkpoint_state(self, task_id: str) -> Any:
        """The last state a PersistentTask with this id checkpointed, or None."""
        return journal.checkpoint_state(self.binding, task_id)

    def health(self) -> dict[str, Any]:
        try:
            return self.ready().health()
        except PersistenceError as exc:
            return {"ok": False, "store": self.hub.store.name, "error": str(exc)}

    def __repr__(self) -> str:
        return f"<Persist app={self.app.main!r} store={self.hub.store.name}>"


def _lineage(result: AsyncResult) -> Iterator[AsyncResult]:
    seen: set[str] = set()
    node: AsyncResult | None = result
    while node is not None and node.id not in seen:
        seen.add(node.id)
        yield node
        node = node.parent
