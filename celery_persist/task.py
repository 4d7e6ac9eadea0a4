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

from typing import TYPE_CHECKING, Any, ClassVar

from celery import Task

from . import flow, handlers, journal
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
        """
        req = self.request
        index = getattr(req, "_persist_calls", 0)
        req._persist_calls = index + 1
        inputs = self._journal()["inputs"]
        if index < len(inputs):
            return inputs[index]
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
        flow.park(
            self,
            self.persist,
            state,
            prompt=prompt,
            timeout=self.await_timeout if timeout is None else timeout,
            on_timeout=on_timeout,
            notify=notify,
            journal_name=f"await:{req.id}:{index}",
        )
