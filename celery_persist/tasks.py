"""The ``celery_persist.*`` tasks. Thin: they call the hub through ``Persist.of(app)``.

They are shared tasks (like ``@shared_task``), so every app that imports
celery-persist gets them, and a client that never imports celery-persist can
still call ``app.send_task("celery_persist.resume", args=[key, input])``.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from celery import shared_task, signature
from celery.exceptions import Ignore

from .errors import ConfigurationError, SuspensionNotFound
from .keys import fingerprint

if TYPE_CHECKING:
    from celery import Task

    from .persist import Persist

__all__ = ["await_input", "resume", "cleanup", "park"]

logger = logging.getLogger(__name__)

ON_TIMEOUT = ("fail", "default")


def _persist(task: Task) -> Persist:
    from .persist import Persist

    return Persist.of(task.app)


def _chain_summary(request: Any) -> tuple[list[str], list[str]]:
    ids, names = [], []
    for sig in reversed(request.chain or []):
        opts = sig.get("options") or {}
        if opts.get("task_id"):
            ids.append(str(opts["task_id"]))
        names.append(str(sig.get("task")))
    return ids, names


def park(
    task: Task,
    state: dict[str, Any],
    *,
    prompt: str | None,
    timeout: float | None,
    on_timeout: str,
    notify: Any,
    journal_name: str,
) -> None:
    """Persist ``state`` as the suspension of the running task, publish SUSPENDED, stop.

    Idempotent per (task id, journal name): a redelivered message finds the
    suspension it already wrote (its key is kept, encrypted, in a checkpoint
    record named ``journal_name``) instead of parking twice.

    Raises:
        celery.exceptions.Ignore: Always, once parked: the task ends without a
            result of its own, so Celery neither stores SUCCESS nor sends the chain on.
    """
    from .persist import SUSPENDED

    persist = _persist(task)
    hub = persist.ready()
    request = task.request
    if request.called_directly or request.is_eager:
        raise ConfigurationError("await_input parks a flow on a worker; it cannot run eagerly or be called directly")
    if on_timeout not in ON_TIMEOUT:
        raise ConfigurationError(f"on_timeout must be one of {ON_TIMEOUT}, not {on_timeout!r}")
    if timeout is None:
        timeout = persist.config.default_timeout
    key: str | None = hub.load_checkpoint(journal_name)
    expires_at: str | None = None
    if key is not None:
        # A redelivered message: this step already parked once. Reuse that suspension,
        # or, if it was already resumed/cancelled/expired, do nothing more.
        try:
            existing = hub.load(key)
        except SuspensionNotFound:
            key = None
        else:
            if existing.status != "suspended":
                logger.info("celery-persist: task %s was already parked and handled; ignoring redelivery", request.id)
                raise Ignore()
            expires_at = existing.expires_at.isoformat() if existing.expires_at else None
    if key is None:
        chain_ids, chain_tasks = _chain_summary(request)
        metadata = {
            "task_id": request.id,
            "task": request.task,
            "kind": state["kind"],
            "prompt": prompt,
            "root_id": request.root_id or request.id,
            "chain_ids": chain_ids,
            "chain_tasks": chain_tasks,
            "on_timeout": on_timeout,
        }
        ttl = timeout or None
        key = hub.suspend(state, ttl=ttl, metadata=metadata)
        if ttl:
            expires_at = datetime.fromtimestamp(time.time() + ttl, tz=timezone.utc).isoformat()
        hub.save_checkpoint(journal_name, key, ttl=(ttl + persist.config.retention) if ttl else persist.config.checkpoint_ttl)
    fp = fingerprint(key)
    info = {
        "suspension_key": key if persist.config.key_in_result else None,
        "fingerprint": fp,
        "prompt": prompt,
        "expires_at": expires_at,
    }
    task.update_state(state=SUSPENDED, meta=info)
    if persist.config.send_events:
        try:
            task.send_event("task-suspended", suspension=fp, prompt=prompt, expires_at=info["expires_at"])
        except Exception:  # noqa: BLE001 - monitoring must not lose the flow
            logger.warning("celery-persist: could not send task-suspended", exc_info=True)
    if notify:
        signature(notify, app=task.app).apply_async((key, {**info, "suspension_key": key}))
    logger.info("celery-persist: task %s parked as suspension %s", request.id, fp)
    raise Ignore()


@shared_task(name="celery_persist.await_input", bind=True, acks_late=True, reject_on_worker_lost=True)
def await_input(
    self: Task,
    previous: Any = None,
    *,
    prompt: str | None = None,
    timeout: float | None = None,
    on_timeout: str = "fail",
    default: Any = None,
    include_previous: bool = False,
    notify: Any = None,
) -> Any:
    """Chain step that parks the flow until ``persist.resume(key, input)``.

    Args:
        previous: The previous step's result (Celery passes it).
        prompt: What the resumer is asked; shown in listings and events (not secret).
        timeout: Seconds until expiry (None: ``persist_default_timeout``, else never).
        on_timeout: ``fail`` (FAILURE with AwaitTimeout, errbacks run) or
            ``default`` (the chain resumes with ``default``).
        default: The input used when ``on_timeout="default"``.
        include_previous: Pass ``{"previous": ..., "input": ...}`` on instead of the input.
        notify: A signature applied with ``(key, info)`` once parked.
    """
    from .canvas import capture

    state = capture(
        self.request,
        kind="chain",
        previous=previous,
        include_previous=bool(include_previous),
        on_timeout=on_timeout,
        default=default,
        prompt=prompt,
    )
    park(self, dict(state), prompt=prompt, timeout=timeout, on_timeout=on_timeout, notify=notify, journal_name=f"await:{self.request.id}")


@shared_task(name="celery_persist.resume", bind=True)
def resume(self: Task, key: str, input: Any = None) -> str:
    """Resume by name from any Celery client; returns the continuation's task id."""
    result = _persist(self).resume(key, input)
    return str(result.id)


@shared_task(name="celery_persist.cleanup", bind=True, ignore_result=True)
def cleanup(self: Task) -> int:
    """Apply timeouts, re-open lapsed leases and prune expired records."""
    return _persist(self).cleanup()
