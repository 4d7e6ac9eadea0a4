"""``PersistentTask``: a Task base class that checkpoints and can wait for input mid-task.

Each task id has one *journal* record in the store (a checkpoint, encrypted
like every state): ``{"state": <last checkpoint>, "inputs": [<resume inputs>]}``.

* ``self.checkpoint(state)`` rewrites the journal before returning, so a
  re-execution of the same task id (retry, redelivery after the worker was
  killed, resume) starts with ``self.checkpoint_state`` equal to it.
* ``self.await_input()`` returns the n-th recorded input on its n-th call;
  past the end it parks the task (args, kwargs, chain, callbacks and the
  journal stay stored), frees the worker slot, and on resume the input is
  appended and the task is sent again with the same id and arguments.
* On success the journal is deleted (by the ``task_postrun`` handler); on
  failure it stays until ``persist_checkpoint_ttl`` for inspection.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from celery import Task

if TYPE_CHECKING:
    from .persist import Persist

__all__ = ["PersistentTask", "journal_name", "journal_record_input"]

_MISSING = object()


def journal_name(task_id: str) -> str:
    return f"task:{task_id}"


def _empty() -> dict[str, Any]:
    return {"state": None, "has_state": False, "inputs": []}


def journal_record_input(persist: Persist, task_id: str, index: int, value: Any) -> None:
    """Store ``value`` as the input of the ``index``-th await of ``task_id`` (idempotent)."""
    hub = persist.ready()
    name = journal_name(task_id)
    journal = hub.load_checkpoint(name) or _empty()
    inputs = list(journal.get("inputs", []))[:index]
    inputs.append(value)
    journal["inputs"] = inputs
    record = hub.checkpoint_record(name)
    hub.save_checkpoint(name, journal, ttl=persist.config.checkpoint_ttl, metadata=dict(record.metadata) if record else None)


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

    @property
    def persist(self) -> Persist:
        """The :class:`~celery_persist.Persist` bound to this task's app."""
        from .persist import Persist

        return Persist.of(self.app)

    def _journal(self) -> dict[str, Any]:
        req = self.request
        journal = getattr(req, "_persist_journal", None)
        if journal is None:
            journal = self.persist.ready().load_checkpoint(journal_name(req.id)) or _empty()
            req._persist_journal = journal
        return journal

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
        journal = dict(self._journal())
        journal["state"] = state
        journal["has_state"] = True
        metadata = dict(getattr(self.request, "_persist_run", None) or {})
        metadata["checkpoint_at"] = time.time()
        self.persist.ready().save_checkpoint(
            journal_name(self.request.id), journal, ttl=self.persist.config.checkpoint_ttl, metadata=metadata
        )
        self.request._persist_journal = journal

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
        from .canvas import capture
        from .tasks import park

        req = self.request
        index = getattr(req, "_persist_calls", 0)
        req._persist_calls = index + 1
        inputs = self._journal()["inputs"]
        if index < len(inputs):
            return inputs[index]
        state = capture(
            req,
            kind="task",
            args=list(req.args or ()),
            kwargs=dict(req.kwargs or {}),
            call_index=index,
            on_timeout=on_timeout,
            default=default,
            prompt=prompt,
        )
        park(
            self,
            dict(state),
            prompt=prompt,
            timeout=self.await_timeout if timeout is None else timeout,
            on_timeout=on_timeout,
            notify=notify,
            journal_name=f"await:{req.id}:{index}",
        )
