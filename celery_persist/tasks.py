"""The ``celery_persist.*`` tasks. Thin: each calls down into :mod:`~celery_persist.flow` or the hub.

They are shared tasks (like ``@shared_task``), so every app that imports
celery-persist gets them, and a client that never imports celery-persist can
still call ``app.send_task("celery_persist.resume", args=[key, input])``.
Resume and cleanup call :func:`celery_persist.flow.resume` and
:func:`celery_persist.flow.cleanup`, exactly as ``Persist.resume`` and
``Persist.cleanup`` do.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import Any

from celery import Task, shared_task

from . import flow, waits
from .errors import AlreadyResumed, ConfigurationError, InvalidInput, InvalidKey, SuspensionCancelled, SuspensionExpired, SuspensionNotFound
from .hub import WRAPPED_KEY_PREFIX
from .keys import fingerprint, key_hash, masked_key
from .registry import TIMER_TASK, binding_of
from .schemas import to_json_schema

__all__ = ["await_input", "resume", "cleanup", "fire_timers", "sleep", "await_event", "signal"]


class _AwaitInputTask(Task):  # type: ignore[misc]
    """``await_input``'s task class: a pydantic model given as ``schema=`` becomes its JSON Schema
    where the signature is made, so the message carries JSON and no worker or resumer needs the class."""

    def signature(self, args: Any = None, *starargs: Any, **starkwargs: Any) -> Any:
        if starargs and isinstance(starargs[0], dict) and "schema" in starargs[0]:
            starargs = ({**starargs[0], "schema": to_json_schema(starargs[0]["schema"])}, *starargs[1:])
        if isinstance(starkwargs.get("kwargs"), dict) and "schema" in starkwargs["kwargs"]:
            starkwargs["kwargs"] = {**starkwargs["kwargs"], "schema": to_json_schema(starkwargs["kwargs"]["schema"])}
        return super().signature(args, *starargs, **starkwargs)

    def apply_async(self, args: Any = None, kwargs: Any = None, *rest: Any, **options: Any) -> Any:
        if isinstance(kwargs, dict) and "schema" in kwargs:
            kwargs = {**kwargs, "schema": to_json_schema(kwargs["schema"])}
        return super().apply_async(args, kwargs, *rest, **options)


@shared_task(name="celery_persist.await_input", base=_AwaitInputTask, bind=True, acks_late=True, reject_on_worker_lost=True)
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
    schema: Any = None,
    approvals: int = 1,
    approvers: list[str] | None = None,
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
        schema: A JSON Schema dict or a pydantic model the input must match
            (checked by ``persist.resume`` before any claim; ``InvalidInput`` otherwise).
        approvals: How many distinct approvers (``persist.resume(..., by=...)``)
            it waits for; the flow goes on after the last with ``[{"by", "input"}, ...]``.
        approvers: Who may approve (default: anyone who names themselves).

    Raises:
        ConfigurationError: A bad schema, approvals count or approvers list.
    """
    people = flow.people_details(schema, approvals, approvers)
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
        details=people,
    )


#: Refusals a resumer can expect: the worker logs each as one INFO line, not an ERROR with a traceback.
EXPECTED_REFUSALS = (InvalidKey, InvalidInput, SuspensionNotFound, AlreadyResumed, SuspensionExpired, SuspensionCancelled)


@shared_task(name="celery_persist.resume", bind=True, throws=EXPECTED_REFUSALS)
def resume(self: Task, key: str, input: Any = None, by: str | None = None) -> str | None:
    """Resume by name from any Celery client; returns the continuation's task id.

    With ``by`` (a suspension that waits for approvals), records that approval;
    returns None until the last one.

    Takes the key itself (as ``notify`` delivers it), not the wrapped form the
    result backend holds: that one resumes only through ``persist.resume`` in
    a process that has the keys, so a reader of the result backend or of
    Flower cannot resume a flow by sending this task.
    """
    if isinstance(key, str) and key.startswith(WRAPPED_KEY_PREFIX):
        raise InvalidKey("this is the wrapped key from the result backend: resume it with persist.resume(), or send the key itself")
    _mask_key_argument(self.request, key)
    result = flow.resume(binding_of(self.app), key, input, by=by)
    return None if result is None else str(result.id)


@shared_task(name="celery_persist.cleanup", bind=True, ignore_result=True)
def cleanup(self: Task) -> int:
    """Apply timeouts, re-open lapsed leases and prune expired records."""
    return flow.cleanup(binding_of(self.app))


@shared_task(name=TIMER_TASK, bind=True, ignore_result=True)
def fire_timers(self: Task) -> int:
    """Fire due timers (and every other due record): what the ``celery-persist-timers`` beat entry runs.

    The same pass as ``celery_persist.cleanup``, through the store's due index:
    with nothing due it is one index read.
    """
    return flow.cleanup(binding_of(self.app))


@shared_task(name="celery_persist.sleep", bind=True, acks_late=True, reject_on_worker_lost=True)
def sleep(self: Task, previous: Any = None, *, seconds: float | None = None, until: Any = None) -> Any:
    """Chain step that waits ``seconds`` (or until ``until``) in the store, then passes ``previous`` on.

    No ETA or countdown message is involved: the flow is parked with its wake
    time as its timeout, and the ``celery-persist-timers`` beat entry fires it
    once it is due. A time already past passes ``previous`` on at once.

    Raises:
        ConfigurationError: Neither or both of ``seconds``/``until``, a naive ``until``, a bad value.
    """
    wake_at = waits.wake_time(seconds, until)
    delay = wake_at - time.time()
    if delay <= 0:
        return previous
    state = flow.capture(self.request, kind="chain", previous=previous, on_timeout="default", default=previous, prompt=None)
    flow.park(
        self,
        binding_of(self.app),
        state,
        prompt=None,
        timeout=delay,
        on_timeout="default",
        notify=None,
        journal_name=f"sleep:{self.request.id}",
        wait="timer",
        details={"wake_at": datetime.fromtimestamp(wake_at, tz=timezone.utc).isoformat()},
    )


@shared_task(name="celery_persist.await_event", bind=True, acks_late=True, reject_on_worker_lost=True)
def await_event(
    self: Task,
    *args: Any,
    key: str | None = None,
    timeout: float | None = None,
    on_timeout: str = "fail",
    default: Any = None,
    notify: Any = None,
) -> Any:
    """Chain step that parks the flow until ``persist.signal(topic, key=key, payload=...)``.

    Called as ``await_event.s(topic, key=...)``: the topic is the last
    positional argument (a chain puts the previous result before it). The
    signal's payload becomes the next step's input.

    Args:
        key: The correlation key (e.g. an order id); with the topic, what a signal names.
        timeout: Seconds until expiry (None: ``persist_default_timeout``, else never).
        on_timeout: ``fail`` (FAILURE with AwaitTimeout, errbacks run) or
            ``default`` (the chain goes on with ``default``).
        default: The input used when ``on_timeout="default"``.
        notify: A signature applied with ``(key, info)`` once parked.

    Raises:
        ConfigurationError: No topic, or a topic or key that is not a string of 1-256 characters.
    """
    if not 1 <= len(args) <= 2:
        raise ConfigurationError("await_event takes the topic as its one positional argument: await_event.s(topic, key=...)")
    previous = args[0] if len(args) == 2 else None
    topic = waits.check_name("topic", args[-1])
    event_key = waits.check_name("key", key)
    binding = binding_of(self.app)
    journal_name = f"event:{self.request.id}"
    state = flow.capture(
        self.request,
        kind="chain",
        previous=previous,
        on_timeout=on_timeout,
        default=default,
        prompt=None,
        topic=topic,
        event_key=event_key,
    )

    def index(suspension_key: str) -> None:
        ttl = timeout if timeout is not None else binding.config.default_timeout
        waits.index_wait(binding, topic, event_key, journal_name=journal_name, suspension_hash=key_hash(suspension_key), ttl=ttl)
        waits.take_buffered(binding, topic, event_key, suspension_key)

    flow.park(
        self,
        binding,
        state,
        prompt=None,
        timeout=timeout,
        on_timeout=on_timeout,
        notify=notify,
        journal_name=journal_name,
        wait="event",
        details={"topic": topic, "event_key": event_key},
        on_parked=index,
    )


@shared_task(name="celery_persist.signal", bind=True)
def signal(self: Task, topic: str, key: str, payload: Any = None, buffer: float | None = None) -> int:
    """Wake every flow waiting on ``(topic, key)`` with ``payload``; returns how many were woken.

    Any Celery client can send it: ``send_task("celery_persist.signal", args=[topic, key, payload])``.
    """
    return waits.signal(binding_of(self.app), topic, key, payload, buffer=buffer)


def _mask_key_argument(request: Any, key: Any) -> None:
    """Replace the key in the request's arguments, which a ``result_extended`` backend stores."""
    if not isinstance(key, str):
        return
    masked = masked_key(fingerprint(key))
    if request.args and request.args[0] == key:
        request.args = [masked, *list(request.args)[1:]]
    if isinstance(request.kwargs, dict) and request.kwargs.get("key") == key:
        request.kwargs = {**request.kwargs, "key": masked}
