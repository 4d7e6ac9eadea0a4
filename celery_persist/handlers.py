"""Receivers for Celery's task signals: the run record of every PersistentTask.

* ``task_prerun``: remember who runs what (task, id, args fingerprint,
  worker, start time) on the request; ``checkpoint()`` stores it with the
  checkpoint as clear metadata, so ``celery persist show`` can tell what ran
  where without decrypting anything.
* ``task_postrun``: on SUCCESS delete the journal (the work is done); otherwise
  stamp the outcome and end time on it, and keep it until its ttl. For every
  task that parked (``await_input`` steps included), drop the traceback of the
  :class:`~celery_persist.flow.Parked` it raised, so what Celery's tracer keeps
  of it is freed at once rather than by the next full gc collection.
* ``task_revoked``: stamp the outcome.
* ``task_received`` (in the worker's main process, before a task reaches the
  pool): a continuation tagged with a delivery (``persist_delivery`` header)
  runs only if it is the first copy to arrive; a second copy, sent again by
  cleanup after its resumer died, is acknowledged and dropped without running.
* ``task_unknown``: a continuation naming a task this worker does not know
  (a deploy renamed it while the flow was parked) is not lost: its suspension
  goes back to ``suspended`` with an audit record naming the task, so the same
  key resumes it once the code or ``persist_task_aliases`` is fixed; and the
  worker's log line for it does not print the message body (the resume input).
* ``after_setup_logger`` / ``after_setup_task_logger``: put a
  :class:`~celery_persist.keys.KeyRedactingFilter` on the worker's log
  handlers, so a message body logged at DEBUG (a notify or resume task carries
  a key) shows the key's fingerprint instead.

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
from .flow import DELIVERY_HEADER, Parked
from .keys import KeyRedactingFilter
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


def on_postrun(
    sender: Any = None, task_id: str | None = None, task: Any = None, state: str | None = None, retval: Any = None, **_: Any
) -> None:
    if isinstance(retval, Parked):
        # Break the trace_task frame <-> traceback cycle (see Parked): ~0.4 MB a park otherwise
        # waits for a full collection, and a pool child grew by ~100 MB before one came.
        retval.__traceback__ = None
        retval.__context__ = None  # set when a redelivered park raises it from an except block
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


_redactor = KeyRedactingFilter("celery_persist.redact")


def redact_handlers(logger: Any = None, **_: Any) -> None:
    """Install the key-redacting filter on every handler of ``logger`` (default: the root logger)."""
    target = logger if isinstance(logger, logging.Logger) else logging.getLogger()
    for handler in target.handlers:
        if _redactor not in handler.filters:
            handler.addFilter(_redactor)


def on_received(sender: Any = None, request: Any = None, **_: Any) -> None:
    delivery = (getattr(request, "request_dict", None) or {}).get(DELIVERY_HEADER)
    if not isinstance(delivery, str):
        return
    try:
        first = binding_of(request.task.app).ready().take_delivery(delivery)
    except Exception:  # noqa: BLE001 - on any doubt run it: at least once beats never
        logger.warning("celery-persist: could not check continuation %s for copies; running it", request.id, exc_info=True)
        return
    if first:
        return
    logger.info("celery-persist: dropped a second copy of continuation %s[%s]", request.name, request.id)
    request.acknowledge()
    # Celery's own way to skip a received request without recording a result: the
    # first copy's result (maybe SUCCESS already) must not be overwritten by REVOKED.
    request._already_revoked = True


def on_unknown(sender: Any = None, message: Any = None, name: str | None = None, id: str | None = None, **_: Any) -> None:
    delivery = (getattr(message, "headers", None) or {}).get(DELIVERY_HEADER)
    if not isinstance(delivery, str):
        return
    kh, _sep, nonce = delivery.rpartition(":")
    if nonce.startswith("t"):
        # A timeout's continuation (see PersistenceHub.timeout_tag): put back, its suspension
        # would be due at once and fired again, over and over. Said loudly instead.
        logger.error(
            "celery-persist: timeout continuation %s of suspension %s names task %r, which this worker does not know",
            id,
            kh[:12],
            name,
        )
        return
    try:
        app = sender.app
        stranded = binding_of(app).ready().strand(kh, f"missing-task:{name}")
    except Exception:  # noqa: BLE001 - a handler must not take the consumer down
        logger.error("celery-persist: continuation %s names unknown task %s and could not be put back", id, name, exc_info=True)
        return
    if stranded:
        logger.error(
            "celery-persist: continuation %s names task %r, which this worker does not know; suspension %s is "
            "suspended again: deploy the task (or set persist_task_aliases / run `celery persist migrate "
            "--rename OLD=NEW`) and resume it with the same key",
            id,
            name,
            kh[:12],
        )


class _QuietPark(logging.Filter):
    """Drop Celery's "Task ...[id] ignored" line for a task that parked.

    Parking ends the task with :class:`~celery_persist.flow.Parked` (an
    ``Ignore``), which Celery logs at INFO; :func:`celery_persist.flow.park`
    already logged the one line that says what happened (task id and suspension
    fingerprint). Other ignored tasks are logged as before.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        return not (isinstance(args, dict) and args.get("description") == "ignored" and str(args.get("exc", "")).startswith("Parked("))


_quiet_park = _QuietPark("celery_persist.quiet_park")


def connect() -> None:
    """Connect the receivers (once per process)."""
    global _connected
    if _connected:
        return
    signals.task_prerun.connect(on_prerun, weak=False, dispatch_uid="celery_persist.prerun")
    signals.task_postrun.connect(on_postrun, weak=False, dispatch_uid="celery_persist.postrun")
    signals.task_revoked.connect(on_revoked, weak=False, dispatch_uid="celery_persist.revoked")
    signals.task_received.connect(on_received, weak=False, dispatch_uid="celery_persist.received")
    signals.task_unknown.connect(on_unknown, weak=False, dispatch_uid="celery_persist.unknown")
    signals.after_setup_logger.connect(redact_handlers, weak=False, dispatch_uid="celery_persist.redact")
    signals.after_setup_task_logger.connect(redact_handlers, weak=False, dispatch_uid="celery_persist.redact_task")
    redact_handlers()
    trace_logger = logging.getLogger("celery.app.trace")
    if _quiet_park not in trace_logger.filters:
        trace_logger.addFilter(_quiet_park)
    _connected = True
