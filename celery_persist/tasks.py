"""The ``celery_persist.*`` tasks. Thin: each calls down into :mod:`~celery_persist.flow` or the hub.

They are shared tasks (like ``@shared_task``), so every app that imports
celery-persist gets them, and a client that never imports celery-persist can
still call ``app.send_task("celery_persist.resume", args=[key, input])``.
Resume and cleanup call :func:`celery_persist.flow.resume` and
:func:`celery_persist.flow.cleanup`, exactly as ``Persist.resume`` and
``Persist.cleanup`` do.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from celery import shared_task

from . import flow
from .errors import AlreadyResumed, InvalidKey, SuspensionCancelled, SuspensionExpired, SuspensionNotFound
from .hub import WRAPPED_KEY_PREFIX
from .keys import fingerprint, masked_key
from .registry import binding_of

if TYPE_CHECKING:
    from celery import Task

__all__ = ["await_input", "resume", "cleanup"]


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
    state = flow.capture(
        self.request,
        kind="chain",
        previous=previous,
        include_previous=bool(include_previous),
        on_timeout=on_timeout,
        default=default,
        prompt=prompt,
    )
    flow.park(
        self,
        binding_of(self.app),
        state,
        prompt=prompt,
        timeout=timeout,
        on_timeout=on_timeout,
        notify=notify,
        journal_name=f"await:{self.request.id}",
    )


#: Refusals a resumer can expect: the worker logs each as one INFO line, not an ERROR with a traceback.
EXPECTED_REFUSALS = (InvalidKey, SuspensionNotFound, AlreadyResumed, SuspensionExpired, SuspensionCancelled)


@shared_task(name="celery_persist.resume", bind=True, throws=EXPECTED_REFUSALS)
def resume(self: Task, key: str, input: Any = None) -> str:
    """Resume by name from any Celery client; returns the continuation's task id.

    Takes the key itself (as ``notify`` delivers it), not the wrapped form the
    result backend holds: that one resumes only through ``persist.resume`` in
    a process that has the keys, so a reader of the result backend or of
    Flower cannot resume a flow by sending this task.
    """
    if isinstance(key, str) and key.startswith(WRAPPED_KEY_PREFIX):
        raise InvalidKey("this is the wrapped key from the result backend: resume it with persist.resume(), or send the key itself")
    _mask_key_argument(self.request, key)
    result = flow.resume(binding_of(self.app), key, input)
    return str(result.id)


@shared_task(name="celery_persist.cleanup", bind=True, ignore_result=True)
def cleanup(self: Task) -> int:
    """Apply timeouts, re-open lapsed leases and prune expired records."""
    return flow.cleanup(binding_of(self.app))


def _mask_key_argument(request: Any, key: Any) -> None:
    """Replace the key in the request's arguments, which a ``result_extended`` backend stores."""
    if not isinstance(key, str):
        return
    masked = masked_key(fingerprint(key))
    if request.args and request.args[0] == key:
        request.args = [masked, *list(request.args)[1:]]
    if isinstance(request.kwargs, dict) and request.kwargs.get("key") == key:
        request.kwargs = {**request.kwargs, "key": masked}
