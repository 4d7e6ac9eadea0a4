"""A parked flow: capture what comes after a step, park it, and send it on when it resumes.

A parked flow is one suspension whose (encrypted) state is a
:class:`FlowState` dict: the rest of the chain exactly as Celery carries it in
``request.chain`` (signature dicts, next step last, task ids frozen), the
parked task's link callbacks and errbacks, its root/parent/group ids, the
previous step's result and the timeout policy. Because the continuation lives
inside the authenticated blob, someone who can write to the store cannot
redirect what runs on resume.

The life of a flow, one function each: :func:`capture` (what to run later),
:func:`park` (store it, show SUSPENDED, stop the chain), :func:`continue_flow`
(on resume), :func:`expire_flow` (on timeout, from cleanup) and
:func:`revoke_flow` (on cancel). :func:`resume`, :func:`cancel` and
:func:`cleanup` wrap them in the hub's claim, cancel and cleanup; both
``Persist`` and the shared tasks call those three.

Two kinds of flow:

* ``chain``: an ``await_input`` step. On resume the parked step is marked
  SUCCESS with the value it passes on, its callbacks run, and the next chain
  step is sent with that value as its first argument, exactly as Celery's
  tracer would have done had the step returned it.
* ``task``: ``PersistentTask.await_input()`` inside a task. The resume input
  is appended to the task's journal (see :mod:`celery_persist.journal`) and
  the task is sent again with the same id, arguments, chain and callbacks; its
  n-th ``await_input`` call then returns the n-th input.

A new kind of wait (a timer, an event) is a new ``kind`` here: its own
``park`` metadata and its own branch in :func:`continue_flow`.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import partial
from typing import TYPE_CHECKING, Any, TypedDict

from celery import group, signature
from celery.app.task import Context
from celery.exceptions import Ignore, NotRegistered
from celery.utils.functional import arity_greater

from . import journal, tracing
from .errors import AlreadyResumed, AwaitTimeout, ConfigurationError, SuspensionCancelled, SuspensionExpired, SuspensionNotFound
from .hub import PersistenceHub, Suspension
from .keys import fingerprint, key_hash, masked_key, now_ms
from .registry import Binding
from .retry import with_store_retry
from .schemas import MAX_SCHEMA_BYTES, to_json_schema
from .stores.base import dump_metadata as dump_json

if TYPE_CHECKING:
    from celery import Celery, Task
    from celery.result import AsyncResult

__all__ = [
    "FlowState",
    "Parked",
    "SUSPENDED",
    "ON_TIMEOUT",
    "capture",
    "park",
    "continue_flow",
    "expire_flow",
    "revoke_flow",
    "request_context",
    "key_of",
    "resume",
    "send_on",
    "cancel",
    "cleanup",
]

logger = logging.getLogger(__name__)

FLOW_VERSION = 1
#: Result-backend state of a parked task (Flower derives the same name from ``task-suspended``).
SUSPENDED = "SUSPENDED"
ON_TIMEOUT = ("fail", "default")


class Parked(Ignore):  # type: ignore[misc]
    """What :func:`park` raises once the flow is stored: an ``Ignore``, so Celery ends the task
    without a result of its own and sends nothing on.

    Celery's tracer keeps the exception (in a ``TraceInfo``) and an ``ExceptionInfo`` in
    ``trace_task``'s frame while the exception's traceback points back at that frame: a
    reference cycle that only a full (generation 2) collection frees, which on a busy worker
    runs once every few hundred tasks. Each one holds billiard's picklable copy of the
    traceback, ~0.4 MB on Python 3.11+ (``_Code._co_positions``: a tuple per bytecode
    instruction of every frame, ~2,300 of them for ``trace_task``). The ``task_postrun``
    receiver in :mod:`celery_persist.handlers` drops the traceback of this class, which
    breaks the cycle: reference counting frees it all when the task returns.
    """


class FlowState(TypedDict, total=False):
    v: int
    kind: str  # "chain" | "task" (what resumes); the wait itself (input/timer/event) is in the record's metadata
    task_id: str
    task_name: str
    args: list[Any]
    kwargs: dict[str, Any]
    chain: list[dict[str, Any]] | None
    callbacks: list[dict[str, Any]] | None
    errbacks: list[dict[str, Any]] | None
    root_id: str | None
    parent_id: str | None
    group_id: str | None
    group_index: int | None
    chord: dict[str, Any] | None
    priority: int | None
    exchange: str | None
    routing_key: str | None
    hostname: str | None
    previous: Any
    include_previous: bool
    on_timeout: str
    default: Any
    prompt: str | None
    call_index: int
    topic: str  # await_event: what a signal names
    event_key: str
    trace: dict[str, str]  # W3C trace context of the parked task's span (see celery_persist.tracing)


def capture(request: Any, *, kind: str, **extra: Any) -> FlowState:
    """The continuation of the task running under ``request`` (a Celery task Context)."""
    delivery = getattr(request, "delivery_info", None) or {}
    state: FlowState = {
        "v": FLOW_VERSION,
        "kind": kind,
        "task_id": request.id,
        "task_name": request.task,
        "chain": _plain(request.chain),
        "callbacks": _plain(request.callbacks),
        "errbacks": _plain(request.errbacks),
        "root_id": request.root_id or request.id,
        "parent_id": request.parent_id,
        "group_id": request.group,
        "group_index": getattr(request, "group_index", None),
        # A chord header member reports to its chord when it resumes (see request_context).
        "chord": _plain_sig(request.chord) if getattr(request, "chord", None) else None,
        "priority": delivery.get("priority"),
        # Where the parked task was routed, so a re-run goes to the same queue
        # rather than through the resumer's (maybe different) router.
        "exchange": delivery.get("exchange"),
        "routing_key": delivery.get("routing_key"),
        "hostname": request.hostname,
    }
    trace = tracing.capture_context()
    if trace is not None:
        state["trace"] = trace  # in the authenticated state: no store writer can graft the flow onto another trace
    state.update(extra)  # type: ignore[typeddict-item]
    return state


def _plain(sigs: Any) -> list[dict[str, Any]] | None:
    # Signatures are dict subclasses; store them as plain dicts so every codec can encode them.
    if not sigs:
        return None
    return [_plain_sig(s) for s in sigs]


def _plain_sig(sig: Any) -> dict[str, Any]:
    out = {}
    for k, v in dict(sig).items():
        if k == "options" and isinstance(v, dict):
            v = {ok: (_plain(ov) if ok in ("link", "link_error") and ov else ov) for ok, ov in v.items()}
        elif k == "kwargs" and isinstance(v, dict):
            v = dict(v)
        elif k == "args":
            v = list(v)
        out[k] = v
    return out


def park(
    task: Task,
    binding: Binding,
    state: FlowState,
    *,
    prompt: str | None,
    timeout: float | None,
    on_timeout: str,
    notify: Any,
    journal_name: str,
    wait: str = "input",
    details: Mapping[str, Any] | None = None,
    on_parked: Callable[[str], None] | None = None,
) -> None:
    """Persist ``state`` as the suspension of the running task, publish SUSPENDED, stop.

    Idempotent per (task id, journal name): a redelivered message finds the
    suspension it already wrote (through the park journal ``journal_name``,
    which holds the key's hash, never the key) and announces it again instead
    of parking twice.

    Args:
        wait: What the flow waits for: ``input``, ``timer`` or ``event`` (listed,
            shown and counted by it).
        details: Non-secret facts of the wait (``wake_at``, ``topic``...), kept in
            the record's clear metadata and in the SUSPENDED state's info.
        on_parked: Called with the key once the flow is stored, before it is
            announced (an event wait indexes itself there: a client that signals
            as soon as it sees SUSPENDED finds it).

    Raises:
        Parked: (an ``Ignore``) Always, once parked: the task ends without a
            result of its own, so Celery neither stores SUCCESS nor sends the chain on.
    """
    hub = binding.ready()
    request = task.request
    if request.called_directly or request.is_eager:
        raise ConfigurationError("await_input parks a flow on a worker; it cannot run eagerly or be called directly")
    if on_timeout not in ON_TIMEOUT:
        raise ConfigurationError(f"on_timeout must be one of {ON_TIMEOUT}, not {on_timeout!r}")
    _check_parallel(task, request)
    if timeout is None:
        timeout = binding.config.default_timeout
    ttl = timeout or None
    key, expires_at = with_store_retry(
        lambda: _store_park(
            hub,
            binding,
            request,
            state,
            prompt=prompt,
            ttl=ttl,
            on_timeout=on_timeout,
            journal_name=journal_name,
            wait=wait,
            details=details,
        ),
        binding.config.store_retry,
        what=f"the park of task {request.id}",
    )
    fp = fingerprint(key)
    if on_parked is not None:
        # Before the announcement: whoever sees SUSPENDED can already signal it. If this
        # resumes the flow at once (a buffered signal), the result backend keeps the
        # SUCCESS it stores: Celery's backends do not overwrite SUCCESS with a later state.
        on_parked(key)
    info = {
        # Wrapped: what the result backend (and Flower) hold resumes nothing without the keys.
        "suspension_key": hub.wrap_key(key) if binding.config.key_in_result else None,
        "fingerprint": fp,
        "prompt": prompt,
        "expires_at": expires_at,
        "wait": wait,
        **(details or {}),
    }
    task.update_state(state=SUSPENDED, meta=info)
    if binding.config.send_events:
        try:
            task.send_event("task-suspended", suspension=fp, prompt=prompt, expires_at=info["expires_at"])
        except Exception:  # noqa: BLE001 - monitoring must not lose the flow
            logger.warning("celery-persist: could not send task-suspended", exc_info=True)
    if notify:
        # The notify task needs the key itself; events, Flower and worker logs show the
        # masked argsrepr instead, and no result is stored (result_extended would store the args).
        masked = {**info, "suspension_key": masked_key(fp)}
        signature(notify, app=task.app).apply_async(
            (key, {**info, "suspension_key": key}), argsrepr=repr((masked_key(fp), masked)), ignore_result=True
        )
    logger.info("celery-persist: task %s parked as suspension %s (%s)", request.id, fp, wait)
    raise Parked()


def people_details(schema: Any, approvals: Any, approvers: Any) -> dict[str, Any]:
    """The clear metadata of an input wait's schema and approvals, checked; empty when there are none.

    Raises:
        ConfigurationError: A schema that is not a JSON Schema, an approvals count
            that is not a positive integer, approvers that are not distinct
            non-empty strings, or more approvals than approvers.
    """
    details: dict[str, Any] = {}
    json_schema = to_json_schema(schema)
    if json_schema is not None:
        if len(dump_json(json_schema)) > MAX_SCHEMA_BYTES:
            raise ConfigurationError(f"schema= is larger than {MAX_SCHEMA_BYTES} bytes once encoded")
        details["schema"] = json_schema
    if isinstance(approvals, bool) or not isinstance(approvals, int) or approvals < 1:
        raise ConfigurationError(f"approvals= must be a positive integer, not {approvals!r}")
    if approvers is not None:
        if not isinstance(approvers, list | tuple) or not all(isinstance(a, str) and a.strip() for a in approvers):
            raise ConfigurationError("approvers= must be a list of non-empty strings")
        if len(set(approvers)) != len(approvers):
            raise ConfigurationError("approvers= lists someone twice")
        if approvals > len(approvers):
            raise ConfigurationError(f"approvals={approvals} can never be reached by {len(approvers)} approvers")
        details["approvers"] = list(approvers)
    if approvals > 1 or approvers is not None:
        details["approvals"] = approvals
    return details


def _check_parallel(task: Task, request: Any) -> None:
    """Refuse, at park time, what a parked group or chord member could not report to.

    A member of a ``group`` or a chord header parks like any step; its resume
    (or its timeout) stores its result with the request's group, index and
    chord, which is how Celery counts chord members, so the body runs once,
    after the last one, with the results in order. That needs a result backend
    and the group id Celery gives every member; without them the body could
    never run, so parking is refused instead of hanging.
    """
    chord = getattr(request, "chord", None)
    if not (request.group or chord):
        return
    if chord and not request.group:
        raise ConfigurationError(f"{request.task} is in a chord header without a group id: a parked member could never be counted")
    if type(task.backend).__name__ == "DisabledBackend":
        raise ConfigurationError(f"{request.task} cannot park inside a group or chord without a result backend to report to")


def _store_park(
    hub: PersistenceHub,
    binding: Binding,
    request: Any,
    state: FlowState,
    *,
    prompt: str | None,
    ttl: float | None,
    on_timeout: str,
    journal_name: str,
    wait: str = "input",
    details: Mapping[str, Any] | None = None,
) -> tuple[str, str | None]:
    """Write the suspension (or find the one this step wrote before): its key and expiry.

    Safe to repeat after any failure: the key is derived from the step, and a
    second attempt finds the first one's journal and suspension.
    """
    journal_ttl = (ttl + binding.config.retention) if ttl else binding.config.checkpoint_ttl
    key, expires_at = _parked_before(hub, journal_name, journal_ttl, request.id)
    if key is not None:
        return key, expires_at
    # Derive the key from the step's identity: a redelivery of this message can then
    # announce the same key again, though neither the key nor a way to read it is stored.
    ms = now_ms()
    key = hub.new_key(journal_name.encode("utf-8"), ms)
    hub.save_checkpoint(journal_name, {"hash": key_hash(key), "ms": ms}, ttl=journal_ttl)
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
        "wait": wait,
        # The park journal's name (a task id, not secret): how the holder of the keys
        # finds this suspension's key again (resume by fingerprint, resume links, signals).
        "journal": journal_name,
        **(details or {}),
    }
    hub.suspend(dict(state), ttl=ttl, metadata=metadata, key=key)
    return key, datetime.fromtimestamp(time.time() + ttl, tz=timezone.utc).isoformat() if ttl else None


def _parked_before(hub: PersistenceHub, journal_name: str, journal_ttl: float | None, task_id: str) -> tuple[str | None, str | None]:
    """For a redelivered park: the key to announce again and its expiry, or (None, None) to park anew.

    Raises:
        Parked: (an ``Ignore``) The step was parked and already resumed, cancelled or expired.
    """
    entry = hub.load_checkpoint(journal_name)
    if not isinstance(entry, dict) or not isinstance(entry.get("hash"), str):
        return None, None
    parked = hub.peek(entry["hash"])
    if parked is None:
        return None, None
    if parked.status != "suspended":
        logger.info("celery-persist: task %s was already parked and handled; ignoring redelivery", task_id)
        raise Parked()
    try:
        key = key_of(hub, journal_name, journal_ttl)
    except (AlreadyResumed, SuspensionCancelled, SuspensionExpired, SuspensionNotFound):
        logger.info("celery-persist: task %s was already parked and handled; ignoring redelivery", task_id)
        raise Parked() from None
    return key, parked.expires_at.isoformat() if parked.expires_at else None


def key_of(hub: PersistenceHub, journal_name: str, journal_ttl: float | None) -> str | None:
    """The key of the suspension parked under ``journal_name``, or None when there is no such park.

    The park journal holds the suspension's key hash and the time its key was
    derived at, never the key: the key is derived again, or, where no secret
    exists to derive it (encryption off, no signing secret) or the secret
    changed, the suspension is moved to a new key (:meth:`PersistenceHub.reissue`)
    and the journal follows it.

    Raises:
        AlreadyResumed, SuspensionCancelled, SuspensionExpired, SuspensionNotFound:
            It had to be moved to a new key, and is no longer suspended.
    """
    entry = hub.load_checkpoint(journal_name)
    if not isinstance(entry, dict) or not isinstance(entry.get("hash"), str):
        return None
    ms = entry.get("ms")
    key = hub.derived_key(journal_name.encode("utf-8"), ms) if isinstance(ms, int) else None
    if key is None or key_hash(key) != entry["hash"]:
        key = hub.reissue(entry["hash"])
        hub.save_checkpoint(journal_name, {"hash": key_hash(key), "ms": None}, ttl=journal_ttl)
    return key


def _chain_summary(request: Any) -> tuple[list[str], list[str]]:
    """The frozen task ids and the task names of the chain after the parked step (clear metadata)."""
    ids, names = [], []
    for sig in reversed(request.chain or []):
        opts = sig.get("options") or {}
        if opts.get("task_id"):
            ids.append(str(opts["task_id"]))
        names.append(str(sig.get("task")))
    return ids, names


def request_context(app: Celery, state: FlowState, *, with_chain: bool) -> Any:
    """A Celery ``Context`` standing in for the parked task's request (for the result backend)."""
    return Context(
        id=state["task_id"],
        task=state.get("task_name"),
        args=state.get("args", []),
        kwargs=state.get("kwargs", {}),
        root_id=state.get("root_id"),
        parent_id=state.get("parent_id"),
        group=state.get("group_id"),
        group_index=state.get("group_index"),
        chain=state.get("chain") if with_chain else None,
        errbacks=state.get("errbacks"),
        callbacks=state.get("callbacks"),
        # The parked member's chord: storing its result (or its failure) counts it, as Celery's
        # tracer would have when the member returned; the last one to report runs the body.
        chord=state.get("chord"),
        delivery_info={"priority": state.get("priority")},
        hostname=None,
    )


def _send_event(binding: Binding, type_: str, task_id: str, hostname: str | None = None, **fields: Any) -> None:
    _send_events(binding, task_id, hostname, [(type_, fields)])


def _send_events(binding: Binding, task_id: str, hostname: str | None, events: list[tuple[str, dict[str, Any]]]) -> None:
    """Send task events through one dispatcher (one producer, one connection checkout)."""
    if not binding.config.send_events:
        return
    together = _together.get()
    try:
        if together is not None and together.dispatcher is not None:
            # Inside sending_together(): through its producer, in its batch.
            dispatcher = together.dispatcher
            dispatcher.hostname = hostname or together.hostname
            dispatcher.headers = {"hostname": dispatcher.hostname}
            for type_, fields in events:
                dispatcher.publish(type_, {"uuid": task_id, **fields}, together.producer)
            return
        # Sent as the worker that parked the task, so monitors keep it on that worker.
        with binding.app.events.default_dispatcher(hostname=hostname) as dispatcher:
            for type_, fields in events:
                dispatcher.send(type_, uuid=task_id, **fields)
    except Exception:  # noqa: BLE001 - monitoring must never break a resume
        logger.warning("celery-persist: could not send task events", exc_info=True)


@dataclass
class _Together:
    producer: Any
    dispatcher: Any
    hostname: str


_together: ContextVar[_Together | None] = ContextVar("celery_persist_sending_together", default=None)


@contextlib.contextmanager
def sending_together(binding: Binding) -> Iterator[None]:
    """Send the messages and task events of many continuations as one batch.

    Inside the block, continuations (and their events) go through one producer and,
    where the transport can (kombu's ``Producer.batch``: Redis), are pipelined: a
    page of fired timers costs a few broker round trips instead of three per timer.
    Everything is flushed when the block exits cleanly, and the exit raises if that
    fails; on an exception nothing unflushed is sent. So a caller must not count
    anything as sent until the block has exited (cleanup finishes its records only
    after it, see :func:`celery_persist.maintenance._fire`).
    """
    app = binding.app
    with app.producer_or_acquire() as producer:
        batch = producer.batch() if hasattr(producer, "batch") else contextlib.nullcontext()
        with batch:
            dispatcher = None
            if binding.config.send_events:
                # Used only through publish(..., producer): it needs no producer of its own.
                dispatcher = app.events.Dispatcher(producer.connection, enabled=False, channel=producer.channel)
            token = _together.set(_Together(producer, dispatcher, dispatcher.hostname if dispatcher is not None else ""))
            try:
                yield
            finally:
                _together.reset(token)


def _producer() -> dict[str, Any]:
    """``apply_async`` options that send through :func:`sending_together`'s producer, if inside it."""
    together = _together.get()
    return {} if together is None else {"producer": together.producer}


#: Message header that tags a continuation with its dispatch (see PersistenceHub.take_delivery).
DELIVERY_HEADER = "persist_delivery"


def _dispatch(app: Celery, value: Any, state: FlowState, delivery: str | None) -> AsyncResult | None:
    """Send callbacks and the next chain step with ``value``, as Celery's tracer does on success."""
    parent_id, root_id, priority = state["task_id"], state.get("root_id"), state.get("priority")
    callbacks = state.get("callbacks") or []
    if callbacks:
        sigs = [signature(s, app=app) for s in callbacks]
        if len(sigs) == 1:
            sigs[0].apply_async((value,), parent_id=parent_id, root_id=root_id, priority=priority, **_producer())
        else:
            group(sigs, app=app).apply_async((value,), parent_id=parent_id, root_id=root_id, priority=priority, **_producer())
    chain = list(state.get("chain") or [])
    if chain:
        nxt = signature(chain[-1], app=app)
        result: AsyncResult = nxt.apply_async(
            (value,),
            chain=chain[:-1] or None,
            parent_id=parent_id,
            root_id=root_id,
            priority=priority,
            headers={DELIVERY_HEADER: delivery} if delivery else None,
            **_producer(),
        )
        return result
    return None


def rename_tasks(state: Any, aliases: Mapping[str, str]) -> tuple[Any, int]:
    """``state`` with every task name in ``aliases`` replaced (chain, callbacks, errbacks, nested
    links, the re-run task); returns the new state and how many names changed."""
    if not aliases or not isinstance(state, dict):
        return state, 0
    changed = 0

    def sig(d: Any) -> Any:
        nonlocal changed
        if not isinstance(d, dict):
            return d
        out = dict(d)
        if isinstance(out.get("task"), str) and out["task"] in aliases:
            out["task"] = aliases[out["task"]]
            changed += 1
        options = out.get("options")
        if isinstance(options, dict):
            out["options"] = {k: (sigs(v) if k in ("link", "link_error") else v) for k, v in options.items()}
        return out

    def sigs(items: Any) -> Any:
        return [sig(i) for i in items] if isinstance(items, list) else items

    new = {**state, "chain": sigs(state.get("chain")), "callbacks": sigs(state.get("callbacks")), "errbacks": sigs(state.get("errbacks"))}
    if state.get("kind") == "task" and state.get("task_name") in aliases:
        new["task_name"] = aliases[state["task_name"]]
        changed += 1
    return new, changed


def continue_flow(binding: Binding, suspension: Suspension, value: Any, *, delivery: str | None = None) -> AsyncResult:
    """Send on the flow parked in ``suspension`` with ``value`` as the resume input.

    ``delivery`` (from :meth:`~celery_persist.hub.PersistenceHub.record_dispatch`) rides
    in the continuation message's headers, so a worker runs one copy of it only.
    Task renames in ``persist_task_aliases`` are applied first: flows parked before
    a deploy that renamed a task continue under the new name. With OpenTelemetry,
    the continuation is sent in the trace of the task that parked
    (:func:`celery_persist.tracing.trace_resume`).
    """
    app = binding.app
    state: FlowState
    state, _ = rename_tasks(suspension.state, binding.config.task_aliases)
    task_id = state["task_id"]
    # Sent from a span in the parked task's trace: the continuation joins that trace.
    with tracing.trace_resume(state.get("trace"), task_name=state.get("task_name"), fingerprint=suspension.fingerprint):
        if state.get("kind") == "task":
            result = _rerun_task(binding, state, value, suspension.fingerprint, delivery)
        else:
            passed = {"previous": state.get("previous"), "input": value} if state.get("include_previous") else value
            nxt = _dispatch(app, passed, state, delivery)
            app.backend.mark_as_done(task_id, passed, request=request_context(app, state, with_chain=False))
            _send_events(
                binding,
                task_id,
                state.get("hostname"),
                [
                    ("task-resumed", {"suspension": suspension.fingerprint, "prompt": state.get("prompt")}),
                    ("task-succeeded", {"result": "<resumed>", "runtime": 0.0}),
                ],
            )
            result = nxt if nxt is not None else app.AsyncResult(task_id)
    logger.info("celery-persist: resumed suspension %s (task %s)", suspension.fingerprint, task_id)
    return result


def _rerun_task(binding: Binding, state: FlowState, value: Any, fp: str, delivery: str | None) -> AsyncResult:
    app = binding.app
    task_id = state["task_id"]
    journal.record_input(binding, task_id, state.get("call_index", 0), value)
    sig = signature(state["task_name"], args=state.get("args", []), kwargs=state.get("kwargs", {}), app=app)
    options: dict[str, Any] = {
        "task_id": task_id,
        "root_id": state.get("root_id"),
        "parent_id": state.get("parent_id"),
        "group_id": state.get("group_id"),
        "priority": state.get("priority"),
    }
    if state.get("chord"):
        # A chord header member: the re-run reports to the chord when it finishes.
        options["chord"] = state["chord"]
        options["group_index"] = state.get("group_index")
    if state.get("exchange") is not None or state.get("routing_key"):
        options["exchange"] = state.get("exchange")
        options["routing_key"] = state.get("routing_key")
    if state.get("chain"):
        options["chain"] = state["chain"]
    if state.get("callbacks"):
        options["link"] = state["callbacks"]
    if state.get("errbacks"):
        options["link_error"] = state["errbacks"]
    _send_event(binding, "task-resumed", task_id, suspension=fp, prompt=state.get("prompt"))
    if delivery:
        options["headers"] = {DELIVERY_HEADER: delivery}
    result: AsyncResult = sig.apply_async(**options, **_producer())
    return result


def expire_flow(binding: Binding, suspension: Suspension) -> None:
    """Apply the timeout policy of an expired suspension (called by cleanup)."""
    state: FlowState = suspension.state
    if not isinstance(state, dict) or "task_id" not in state:
        return  # a plain hub suspension, not a Celery flow: nothing to run
    if state.get("on_timeout") == "default":
        continue_flow(binding, suspension, state.get("default"), delivery=suspension.delivery)
        return
    app = binding.app
    if state.get("topic"):
        what = f"await_event {state['topic']!r} timed out before a signal came"
    else:
        what = f"await_input timed out before it was resumed (prompt: {state.get('prompt')!r})"
    exc = AwaitTimeout(what, key=suspension.fingerprint)
    request = request_context(app, state, with_chain=True)
    app.backend.mark_as_failure(state["task_id"], exc, request=request, call_errbacks=False)
    _call_errbacks(app, request, exc)
    _send_event(binding, "task-failed", state["task_id"], exception=repr(exc), traceback="")
    logger.info("celery-persist: suspension %s timed out (task %s)", suspension.fingerprint, state["task_id"])


def _call_errbacks(app: Celery, request: Any, exc: BaseException) -> None:
    """Run a timed-out step's errbacks as Celery 5.7's result backend does, on every supported Celery.

    Celery before 5.7 tells a new-style errback ``(request, exc, traceback)`` from an
    old-style one ``(task_id)`` by its task's whole signature: an old-style errback with a
    bound argument (``on_error.s(tag=...)`` for ``def on_error(task_id, tag)``) is called
    inline with three arguments and raises TypeError, each time cleanup retries the timeout.
    Only the arguments the failure still supplies are counted here. An inline errback that
    raises is logged (as Celery 5.7 does), not re-raised: the timeout has been applied.
    """
    task_id = request.id
    by_task_id = []
    for errback in request.errbacks or ():
        sig = signature(errback, app=app)
        try:
            inline = _takes_request(sig)
        except NotRegistered:  # unknown in this process: sent on, for a worker that knows it
            inline = False
        if not inline:
            by_task_id.append(sig)
            continue
        try:
            sig(request, exc, None)
        except Exception:  # noqa: BLE001 - one broken errback must not re-run the timeout
            logger.exception("celery-persist: errback %s of timed-out task %s raised", sig.get("task"), task_id)
    if by_task_id:
        group(by_task_id, app=app).apply_async((task_id,), parent_id=task_id, root_id=request.root_id or task_id)


def _takes_request(sig: Any) -> bool:
    """Whether errback ``sig`` is new-style: it takes ``(request, exc, traceback)`` besides its own arguments."""
    header = getattr(sig.type, "__header__", None)  # tasks made by @app.task have one
    if header is None or isinstance(header, partial):
        return False
    if not sig.immutable and (sig.args or sig.kwargs):
        with contextlib.suppress(TypeError, ValueError):  # arguments the task cannot take: judged as Celery does
            return bool(arity_greater(partial(header, *sig.args, **sig.kwargs), 1))
    return bool(arity_greater(header, 1))


def revoke_flow(binding: Binding, suspension: Suspension) -> None:
    """Mark a cancelled flow's parked task and the chain after it REVOKED.

    The task ids come from the suspension's authenticated state, never from its
    clear metadata: a store writer must not be able to make ``cancel`` revoke
    another task.
    """
    state = suspension.state
    if not isinstance(state, dict) or not state.get("task_id"):
        return  # a plain hub suspension, not a Celery flow
    app = binding.app
    task_id = str(state["task_id"])
    chain = state.get("chain") or []
    ids = [task_id, *(str(s["options"]["task_id"]) for s in reversed(chain) if (s.get("options") or {}).get("task_id"))]
    for tid in ids:
        app.backend.mark_as_revoked(tid, reason="celery-persist: suspension cancelled")
    try:
        app.control.revoke(ids)
    except Exception:  # noqa: BLE001 - the backend state is what callers see; broadcast is best effort
        logger.warning("celery-persist: could not broadcast revoke for %s", task_id, exc_info=True)
    _send_event(binding, "task-revoked", task_id, terminated=False, signum=None, expired=False)


def resume(binding: Binding, key: str, input: Any, *, by: str | None = None) -> AsyncResult | None:
    """Claim ``key`` in this process and send its flow on with ``input``.

    The claim is completed once the continuation is sent (retrying through a
    brief store outage), and released (the suspension is resumable again) if
    sending raises. A suspension that waits for several approvals records
    ``by``'s and returns None until the last one, which sends the flow on with
    the list of approvals.
    """
    hub = binding.ready()
    return send_on(binding, key, hub.claim(key, input, by=by))


def send_on(binding: Binding, key: str, suspension: Suspension) -> AsyncResult | None:
    """Send on the flow of ``suspension``, which this process has just claimed under ``key``.

    The dispatch is recorded first (from then on the claim is finished, never
    re-opened), the continuation sent, and the claim completed (retrying
    through a brief store outage); the claim is released if recording fails.
    None when the claim was an approval that did not complete the quorum.
    """
    hub = binding.ready()
    token = suspension.claim_token
    if token is None:
        return None  # an approval was recorded; more are needed
    value = suspension.input
    refuse_timer(hub, key, suspension, token)
    try:
        delivery = hub.record_dispatch(key, value)
    except BaseException:
        hub.release(key, token=token)
        raise
    result = continue_flow(binding, suspension, value, delivery=delivery)
    try:
        with_store_retry(lambda: hub.complete(key, token=token), binding.config.store_retry, what="completing a resume")
    except AlreadyResumed:
        # The lease lapsed while this resumer was slow and cleanup finished the dispatch:
        # the flow goes on (a worker runs one copy of the continuation).
        logger.info("celery-persist: suspension %s was completed by cleanup meanwhile", suspension.fingerprint)
    return result


def refuse_timer(hub: PersistenceHub, key: str, suspension: Suspension, token: int) -> None:
    """Give back the claim of a sleeping flow and raise: a timer is not resumed by key."""
    if suspension.metadata.get("wait") == "timer":
        hub.release(key, token=token)
        raise ConfigurationError("a sleeping flow is not resumed by key: its timer fires at wake_at (cancel it to stop the flow)")


def finish_dispatch(binding: Binding, suspension: Suspension, input: Any, delivery: str) -> None:
    """Send again the continuation whose resumer died after recording it (cleanup calls this)."""
    continue_flow(binding, suspension, input, delivery=delivery)


def cancel(binding: Binding, key: str) -> Suspension:
    """End a suspension; its parked task (and what was chained after it) become REVOKED."""
    suspension = binding.ready().cancel(key)
    revoke_flow(binding, suspension)
    return suspension


def cleanup(binding: Binding, now: float | None = None) -> int:
    """Apply timeouts, finish or re-open lapsed leases, prune expired records; returns the number handled."""
    return binding.ready().cleanup(
        now,
        on_expired=lambda s: expire_flow(binding, s),
        on_unfinished=lambda s, value, delivery: finish_dispatch(binding, s, value, delivery),
        around_handlers=lambda: sending_together(binding),
    )
