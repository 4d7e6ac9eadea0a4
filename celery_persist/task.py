"""``PersistentTask``: a Task base class that checkpoints and can wait for input mid-task.

The task's progress lives in its journal (:mod:`celery_persist.journal`):

* ``self.checkpoint(state)`` rewrites the journal before returning, so a
  re-execution of the same task id (retry, redelivery after the worker was
  killed, resume) starts with ``self.checkpoint_state`` equal to it.
* ``self.await_input()`` returns the n-th recorded input on its n-th call;
  past the end it parks the task (:func:`celery_persist.flow.park`: args,
  kwargs, chain, callbacks and the journal stay stored), frees the worker
  slot, and on resume the input is appended and the task is sent again with
  the same id and arguments.
* On success the journal is deleted (by the ``task_postrun`` receiver in
  :mod:`celery_persist.handlers`); on failure it stays until
  ``persist_checkpoint_ttl`` for inspection.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, ClassVar

from celery import Task

from . import flow, handlers, journal, waits
from .keys import key_hash
from .registry import Binding, binding_of

if TYPE_CHECKING:
    from celery import Celery

__all__ = ["PersistentTask"]


class PersistentTask(Task):  # type: ignore[misc]
    """Base class for tasks whose progress must survive crashes and waits.

    Example:
        >>> @app.task(base=PersistentTask, bind=True, acks_late=True)
        ... def crunch(self, items):
        ...     state = self.checkpoint_state or {"done": 0}
        ...     for i in range(state["done"], len(items)):
        ...         work(items[i]); state["done"] = i + 1
        ...         self.checkpoint(state)
        ...     return self.await_input(prompt="publish?")
    """

    #: Redeliver the message if the worker process dies mid-task, so the
    #: re-execution can pick up the checkpoint (needs ``acks_late=True``).
    reject_on_worker_lost = True

    #: Seconds an ``await_input`` inside this task waits when it gets no
    #: ``timeout`` (None: the app's ``persist_default_timeout``).
    await_timeout: float | None = None

    #: Tells the signal receivers to keep this task's run record and journal.
    persist_journal: ClassVar[bool] = True

    @classmethod
    def bind(cls, app: Celery) -> Any:
        # Celery binds every task class to its app when the app is finalized:
        # the receivers that keep the run record must be connected by then.
        handlers.connect()
        return super().bind(app)

    @property
    def persist(self) -> Binding:
        """The celery-persist binding (settings, store, hub) of this task's app."""
        return binding_of(self.app)

    def _journal(self) -> journal.Journal:
        req = self.request
        current: journal.Journal | None = getattr(req, "_persist_journal", None)
        if current is None:
            current = journal.load(self.persist, req.id)
            req._persist_journal = current
        return current

    @property
    def checkpoint_state(self) -> Any:
        """The last state passed to :meth:`checkpoint` for this task id, or None."""
        return self._journal()["state"]

    def checkpoint(self, state: Any) -> None:
        """Durably store ``state`` for this task id before returning.

        Raises:
            StateTooLarge, SerializationError: ``state`` cannot be stored.
            StoreUnavailable: The store is down (the previous checkpoint stays).
        """
        req = self.request
        req._persist_journal = journal.save_state(self.persist, req.id, self._journal(), state, getattr(req, "_persist_run", None))

    def await_input(
        self,
        prompt: str | None = None,
        *,
        timeout: float | None = None,
        on_timeout: str = "fail",
        default: Any = None,
        notify: Any = None,
        schema: Any = None,
        approvals: int = 1,
        approvers: list[str] | None = None,
    ) -> Any:
        """Wait for outside input; the n-th call returns the n-th resume input.

        When no input is recorded yet for this call, the task is parked: it
        shows SUSPENDED, its worker slot is freed, and it runs again from the
        top with the same id and arguments once resumed. Code before the
        call therefore runs again: make it idempotent or guard it with
        :attr:`checkpoint_state`.

        Args:
            prompt: What the resumer is asked (not secret).
            timeout: Seconds until expiry (default :attr:`await_timeout`).
            on_timeout: ``fail`` or ``default``.
            default: Input used on timeout with ``on_timeout="default"``.
            notify: Signature applied with ``(key, info)`` once parked.
            schema: JSON Schema dict or pydantic model the input must match.
            approvals: Distinct approvers to wait for; the call then returns ``[{"by", "input"}, ...]``.
            approvers: Who may approve (default: anyone who names themselves).
        """
        return self._wait(
            prompt=prompt,
            timeout=self.await_timeout if timeout is None else timeout,
            on_timeout=on_timeout,
            default=default,
            notify=notify,
            wait="input",
            details=flow.people_details(schema, approvals, approvers),
        )

    def sleep(self, seconds: float) -> None:
        """Wait ``seconds`` in the store (no ETA message), then run again from the top.

        Like :meth:`await_input`, the task is parked and re-run with the same
        id; on the re-run this call returns at once. A time already past
        (``seconds <= 0``) returns at once.
        """
        wake_at = waits.wake_time(seconds)
        delay = wake_at - time.time()
        self._wait(
            prompt=None,
            timeout=delay,
            on_timeout="default",
            default=None,
            notify=None,
            wait="timer",
            details={"wake_at": datetime.fromtimestamp(wake_at, tz=timezone.utc).isoformat()},
            at_once=delay <= 0,
        )

    def await_event(self, topic: str, *, key: str, timeout: float | None = None, on_timeout: str = "fail", default: Any = None) -> Any:
        """Wait for ``persist.signal(topic, key=key, payload=...)``; returns the payload.

        The n-th wait of the task returns the n-th payload (or ``default`` on
        timeout with ``on_timeout="default"``); see :meth:`await_input`.
        """
        topic = waits.check_name("topic", topic)
        event_key = waits.check_name("key", key)
        binding = self.persist
        ttl = self.await_timeout if timeout is None else timeout

        def index(journal_name: str, suspension_key: str) -> None:
            limit = ttl if ttl is not None else binding.config.default_timeout
            waits.index_wait(binding, topic, event_key, journal_name=journal_name, suspension_hash=key_hash(suspension_key), ttl=limit)
            waits.take_buffered(binding, topic, event_key, suspension_key)

        return self._wait(
            prompt=None,
            timeout=ttl,
            on_timeout=on_timeout,
            default=default,
            notify=None,
            wait="event",
            details={"topic": topic, "event_key": event_key},
            on_parked=index,
        )

    def _wait(
        self,
        *,
        prompt: str | None,
        timeout: float | None,
        on_timeout: str,
        default: Any,
        notify: Any,
        wait: str,
        details: dict[str, Any] | None = None,
        on_parked: Callable[[str, str], None] | None = None,
        at_once: bool = False,
    ) -> Any:
        """The n-th wait of this run: the n-th recorded input, or park the task for it."""
        req = self.request
        index = getattr(req, "_persist_calls", 0)
        req._persist_calls = index + 1
        inputs = self._journal()["inputs"]
        if index < len(inputs):
            return inputs[index]
        if at_once:
            journal.record_input(self.persist, req.id, index, default)
            self._journal()["inputs"] = [*inputs[:index], default]
            return default
        state = flow.capture(
            req,
            kind="task",
            args=list(req.args or ()),
            kwargs=dict(req.kwargs or {}),
            call_index=index,
            on_timeout=on_timeout,
            default=default,
            prompt=prompt,
        )
        journal_name = f"await:{req.id}:{index}"
        flow.park(
            self,
            self.persist,
            state,
            prompt=prompt,
            timeout=timeout,
            on_timeout=on_timeout,
            notify=notify,
            journal_name=journal_name,
            wait=wait,
            details=details,
            on_parked=None if on_parked is None else (lambda key: on_parked(journal_name, key)),
        )
