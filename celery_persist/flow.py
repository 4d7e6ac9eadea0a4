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

import logging
import time
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, TypedDict

from celery import group, signature
from celery.app.task import Context
from celery.exceptions import Ignore

from . import journal
from .errors import AwaitTimeout, ConfigurationError, SuspensionNotFound
from .hub import Suspension
from .keys import fingerprint
from .registry import Binding

if TYPE_CHECKING:
    from celery import Celery, Task
    from celery.result import AsyncResult

__all__ = [
    "FlowState",
    "SUSPENDED",
    "ON_TIMEOUT",
    "capture",
    "park",
    "continue_flow",
    "expire_flow",
    "revoke_flow",
    "request_context",
    "resume",
    "cancel",
    "cleanup",
]

logger = logging.getLogger(__name__)

FLOW_VERSION = 1
#: Result-backend state of a parked task (Flower derives the same name from ``task-suspended``).
SUSPENDED = "SUSPENDED"
ON_TIMEOUT = ("fail", "default")


class FlowState(TypedDict, total=False):
    v: int
    kind: str  # "chain" | "task"
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
        "priority": delivery.get("priority"),
        # Where the parked task was routed, so a re-run goes to the same queue
        # rather than through the resumer's (maybe different) router.
        "exchange": delivery.get("exchange"),
        "routing_key": delivery.get("routing_key"),
        "hostname": request.hostname,
    }
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
) -> None:
    """Persist ``state`` as the suspension of the running task, publish SUSPENDED, stop.

    Idempotent per (task id, journal name): a redelivered message finds the
    suspension it already wrote (its key is kept, encrypted, in a checkpoint
    record named ``journal_name``) instead of parking twice.

    Raises:
        celery.exceptions.Ignore: Always, once parked: the task ends without a
            result of its own, so Celery neither stores SUCCESS nor sends the chain on.
    """
    hub = binding.ready()
    request = task.request
    if request.called_directly or request.is_eager:
        raise ConfigurationError("await_input parks a flow on a worker; it cannot run eagerly or be called directly")
    if on_timeout not in ON_TIMEOUT:
        raise ConfigurationError(f"on_timeout must be one of {ON_TIMEOUT}, not {on_timeout!r}")
    if timeout is None:
        timeout = binding.config.default_timeout
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
        key = hub.suspend(dict(state), ttl=ttl, metadata=metadata)
        if ttl:
            expires_at = datetime.fromtimestamp(time.time() + ttl, tz=timezone.utc).isoformat()
        hub.save_checkpoint(journal_name, key, ttl=(ttl + binding.config.retention) if ttl else binding.config.checkpoint_ttl)
    fp = fingerprint(key)
    info = {
        "suspension_key": key if binding.config.key_in_result else None,
        "fingerprint": fp,
        "prompt": prompt,
        "expires_at": expires_at,
    }
    task.update_state(state=SUSPENDED, meta=info)
    if binding.config.send_events:
        try:
            task.send_event("task-suspended", suspension=fp, prompt=prompt, expires_at=info["expires_at"])
        except Exception:  # noqa: BLE001 - monitoring must not lose the flow
            logger.warning("celery-persist: could not send task-suspended", exc_info=True)
    if notify:
        signature(notify, app=task.app).apply_async((key, {**info, "suspension_key": key}))
    logger.info("celery-persist: task %s parked as suspension %s", request.id, fp)
    raise Ignore()


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
        chain=state.get("chain") if with_chain else None,
        errbacks=state.get("errbacks"),
        callbacks=state.get("callbacks"),
        chord=None,
        delivery_info={"priority": state.get("priority")},
        hostname=None,
    )


def _send_event(binding: Binding, type_: str, task_id: str, hostname: str | None = None, **fields: Any) -> None:
    _send_events(binding, task_id, hostname, [(type_, fields)])


def _send_events(binding: Binding, task_id: str, hostname: str | None, events: list[tuple[str, dict[str, Any]]]) -> None:
    """Send task events through one dispatcher (one producer, one connection checkout)."""
    if not binding.config.send_events:
        return
    try:
        # Sent as the worker that parked the task, so monitors keep it on that worker.
        with binding.app.events.default_dispatcher(hostname=hostname) as dispatcher:
            for type_, fields in events:
                dispatcher.send(type_, uuid=task_id, **fields)
    except Exception:  # noqa: BLE001 - monitoring must never break a resume
        logger.warning("celery-persist: could not send task events", exc_info=True)


def _dispatch(app: Celery, value: Any, state: FlowState) -> AsyncResult | None:
    """Send callbacks and the next chain step with ``value``, as Celery's tracer does on success."""
    parent_id, root_id, priority = state["task_id"], state.get("root_id"), state.get("priority")
    callbacks = state.get("callbacks") or []
    if callbacks:
        sigs = [signature(s, app=app) for s in callbacks]
        if len(sigs) == 1:
            sigs[0].apply_async((value,), parent_id=parent_id, root_id=root_id, priority=priority)
        else:
            group(sigs, app=app).apply_async((value,), parent_id=parent_id, root_id=root_id, priority=priority)
    chain = list(state.get("chain") or [])
    if chain:
        nxt = signature(chain[-1], app=app)
        result: AsyncResult = nxt.apply_async((value,), chain=chain[:-1] or None, parent_id=parent_id, root_id=root_id, priority=priority)
        return result
    return None


def continue_flow(binding: Binding, suspension: Suspension, value: Any) -> AsyncResult:
    """Send on the flow parked in ``suspension`` with ``value`` as the resume input."""
    app = binding.app
    state: FlowState = suspension.state
    task_id = state["task_id"]
    if state.get("kind") == "task":
        result = _rerun_task(binding, state, value, suspension.fingerprint)
    else:
        passed = {"previous": state.get("previous"), "input": value} if state.get("include_previous") else value
        nxt = _dispatch(app, passed, state)
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


def _rerun_task(binding: Binding, state: FlowState, value: Any, fp: str) -> AsyncResult:
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
    result: AsyncResult = sig.apply_async(**options)
    return result


def expire_flow(binding: Binding, suspension: Suspension) -> None:
    """Apply the timeout policy of an expired suspension (called by cleanup)."""
    state: FlowState = suspension.state
    if not isinstance(state, dict) or "task_id" not in state:
        return  # a plain hub suspension, not a Celery flow: nothing to run
    if state.get("on_timeout") == "default":
        continue_flow(binding, suspension, state.get("default"))
        return
    app = binding.app
    exc = AwaitTimeout(
        f"await_input timed out before it was resumed (prompt: {state.get('prompt')!r})",
        key=suspension.fingerprint,
    )
    app.backend.mark_as_failure(state["task_id"], exc, request=request_context(app, state, with_chain=True), call_errbacks=True)
    _send_event(binding, "task-failed", state["task_id"], exception=repr(exc), traceback="")
    logger.info("celery-persist: suspension %s timed out (task %s)", suspension.fingerprint, state["task_id"])


def revoke_flow(binding: Binding, suspension: Suspension) -> None:
    """Mark a cancelled flow's parked task and the chain after it REVOKED."""
    task_id = suspension.metadata.get("task_id")
    if not task_id:
        return
    app = binding.app
    ids = [task_id, *suspension.metadata.get("chain_ids", [])]
    for tid in ids:
        app.backend.mark_as_revoked(tid, reason="celery-persist: suspension cancelled")
    try:
        app.control.revoke(ids)
    except Exception:  # noqa: BLE001 - the backend state is what callers see; broadcast is best effort
        logger.warning("celery-persist: could not broadcast revoke for %s", task_id, exc_info=True)
    _send_event(binding, "task-revoked", task_id, terminated=False, signum=None, expired=False)


def resume(binding: Binding, key: str, input: Any) -> AsyncResult:
    """Claim ``key`` in this process and send its flow on with ``input``.

    The claim is completed once the continuation is sent, and released (the
    suspension is resumable again) if sending raises.
    """
    with binding.ready().claiming(key, input) as suspension:
        return continue_flow(binding, suspension, input)


def cancel(binding: Binding, key: str) -> Suspension:
    """End a suspension; its parked task (and what was chained after it) become REVOKED."""
    suspension = binding.ready().cancel(key)
    revoke_flow(binding, suspension)
    return suspension


def cleanup(binding: Binding, now: float | None = None) -> int:
    """Apply timeouts, re-open lapsed leases, prune expired records; returns the number pruned."""
    return binding.ready().cleanup(now, on_expired=lambda s: expire_flow(binding, s))
