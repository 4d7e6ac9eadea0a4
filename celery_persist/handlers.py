"""Receivers for Celery's task signals: the run record of every PersistentTask.

* ``task_prerun``: remember who runs what (task, id, args fingerprint,
  worker, start time) on the request; ``checkpoint()`` stores it with the
  checkpoint as clear metadata, so ``celery persist show`` can tell what ran
  where without decrypting anything.
* ``task_postrun``: on SUCCESS delete the journal (the work is done); otherwise
  stamp the outcome and end time on it, and keep it until its ttl.
* ``task_revoked``: stamp the outcome.

A task takes part when its class says ``persist_journal = True`` (as
``PersistentTask`` does), so this module needs nothing above the journal.
Connected once per process (signals are global), with dispatch uids so a
second ``Persist(app)`` does not connect twice.
"""

from __future__ import annotations

import hashlib
import logging
import time
from typing import Any

from celery import signals

from . import journal
from .errors import PersistenceError
from .registry import binding_of

__all__ = ["connect"]

logger = logging.getLogger(__name__)
_connected = False


def _is_persistent(task: Any) -> bool:
    return getattr(task, "persist_journal", False) is True


def _args_fingerprint(args: Any, kwargs: Any) -> str:
    # A fingerprint, not the arguments: they may hold personal data.
    return hashlib.sha256(repr((args, sorted((kwargs or {}).items()))).encode("utf-8", "replace")).hexdigest()[:12]


def on_prerun(sender: Any = None, task_id: str | None = None, task: Any = None, args: Any = None, kwargs: Any = None, **_: Any) -> None:
    if not _is_persistent(task):
        return
    req = task.request
    req._persist_run = {
        "task": task.name,
        "task_id": task_id,
        "args_fingerprint": _args_fingerprint(args, kwargs),
        "worker": req.hostname,
        "started_at": time.time(),
        "retries": req.retries,
    }


def _stamp(task: Any, task_id: str, outcome: str) -> None:
    try:
        journal.stamp(binding_of(task.app), task_id, outcome, getattr(task.request, "_persist_run", None))
    except PersistenceError:
        logger.warning("celery-persist: could not record the %s of task %s", outcome, task_id, exc_info=True)


def on_postrun(sender: Any = None, task_id: str | None = None, task: Any = None, state: str | None = None, **_: Any) -> None:
    if not _is_persistent(task) or task_id is None:
        return
    if state == "SUCCESS":
        try:
            journal.discard(binding_of(task.app), task_id)
        except PersistenceError:
            logger.warning("celery-persist: could not delete the checkpoint of task %s", task_id, exc_info=True)
    elif state in ("FAILURE", "RETRY", "REVOKED"):
        _stamp(task, task_id, state.lower())


def on_revoked(sender: Any = None, request: Any = None, terminated: bool = False, **_: Any) -> None:
    if _is_persistent(sender) and request is not None and getattr(request, "id", None):
        _stamp(sender, request.id, "revoked")


def connect() -> None:
    """Connect the receivers (once per process)."""
    global _connected
    if _connected:
        return
    signals.task_prerun.connect(on_prerun, weak=False, dispatch_uid="celery_persist.prerun")
    signals.task_postrun.connect(on_postrun, weak=False, dispatch_uid="celery_persist.postrun")
    signals.task_revoked.connect(on_revoked, weak=False, dispatch_uid="celery_persist.revoked")
    _connected = True
