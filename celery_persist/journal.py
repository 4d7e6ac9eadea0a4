"""The journal of a :class:`~celery_persist.PersistentTask` run: its checkpoint and its inputs.

Each task id has one *journal* record in the store (a checkpoint, encrypted
like every state): ``{"state": <last checkpoint>, "has_state": bool,
"inputs": [<resume inputs>]}``, with the run record (who ran what, where,
when, with which outcome) as clear metadata beside it.

* ``PersistentTask.checkpoint(state)`` rewrites the journal (:func:`save_state`)
  before returning, so a re-execution of the same task id (retry, redelivery
  after the worker was killed, resume) starts from it.
* The n-th ``await_input`` call of a task returns the n-th recorded input;
  resuming a parked task appends its input (:func:`record_input`) before the
  task is sent again with the same id.
* The signal receivers stamp the run record (:func:`stamp`) and delete the
  journal when the task succeeds (:func:`discard`).

Every function takes the app's :class:`~celery_persist.registry.Binding`;
nothing here knows about Celery messages.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from .registry import Binding
from .retry import with_store_retry

__all__ = ["Journal", "name_of", "load", "save_state", "record_input", "stamp", "discard", "checkpoint_state", "checkpoint_record"]

Journal = dict[str, Any]


def name_of(task_id: str) -> str:
    """The checkpoint name of the journal of ``task_id``."""
    return f"task:{task_id}"


def _empty() -> Journal:
    return {"state": None, "has_state": False, "inputs": []}


def load(binding: Binding, task_id: str) -> Journal:
    """The journal of ``task_id``, or an empty one."""
    journal = binding.ready().load_checkpoint(name_of(task_id))
    return journal if isinstance(journal, dict) else _empty()


def checkpoint_state(binding: Binding, task_id: str) -> Any:
    """The last state checkpointed by the task ``task_id``, or None."""
    journal = binding.ready().load_checkpoint(name_of(task_id))
    return journal.get("state") if isinstance(journal, dict) else None


def checkpoint_record(binding: Binding, task_id: str) -> Any:
    """The stored journal record of ``task_id`` (metadata readable without keys), or None."""
    return binding.ready().checkpoint_record(name_of(task_id))


def save_state(binding: Binding, task_id: str, journal: Journal, state: Any, run: Mapping[str, Any] | None) -> Journal:
    """Durably store ``state`` as the checkpoint of ``task_id``; returns the new journal."""
    updated = {**journal, "state": state, "has_state": True}
    metadata = {**(run or {}), "checkpoint_at": time.time()}
    hub = binding.ready()
    with_store_retry(
        lambda: hub.save_checkpoint(name_of(task_id), updated, ttl=binding.config.checkpoint_ttl, metadata=metadata),
        binding.config.store_retry,
        what=f"the checkpoint of task {task_id}",
    )
    return updated


def record_input(binding: Binding, task_id: str, index: int, value: Any) -> None:
    """Store ``value`` as the input of the ``index``-th await of ``task_id`` (idempotent)."""
    hub = binding.ready()
    name = name_of(task_id)
    journal = hub.load_checkpoint(name) or _empty()
    journal["inputs"] = [*list(journal.get("inputs", []))[:index], value]
    record = hub.checkpoint_record(name)
    hub.save_checkpoint(name, journal, ttl=binding.config.checkpoint_ttl, metadata=dict(record.metadata) if record else None)


def stamp(binding: Binding, task_id: str, outcome: str, run: Mapping[str, Any] | None) -> None:
    """Record the outcome (and end time) of a run on its journal, if it has one."""
    hub = binding.ready()
    name = name_of(task_id)
    record = hub.checkpoint_record(name)
    if record is None:
        return
    metadata = {**record.metadata, **(run or {}), "outcome": outcome, "ended_at": time.time()}
    hub.save_checkpoint(name, hub.load_checkpoint(name), ttl=binding.config.checkpoint_ttl, metadata=metadata)


def discard(binding: Binding, task_id: str) -> None:
    """Delete the journal of a task that succeeded: the work is done."""
    binding.ready().delete_checkpoint(name_of(task_id))
