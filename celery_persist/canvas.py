"""Capture what comes after a parked step, and send it on when the step resumes.

A parked flow is one suspension whose (encrypted) state is a
:class:`FlowState` dict: the rest of the chain exactly as Celery carries it in
``request.chain`` (signature dicts, next step last, task ids frozen), the
parked task's link callbacks and errbacks, its root/parent/group ids, the
previous step's result and the timeout policy. Because the continuation lives
inside the authenticated blob, someone who can write to the store cannot
redirect what runs on resume.

Two kinds of flow:

* ``chain``: an ``await_input`` step. On resume the parked step is marked
  SUCCESS with the value it passes on, its callbacks run, and the next chain
  step is sent with that value as its first argument, exactly as Celery's
  tracer would have done had the step returned it.
* ``task``: ``PersistentTask.await_input()`` inside a task. The resume input
  is appended to the task's journal (beside its checkpoint) and the task is
  sent again with the same id, arguments, chain and callbacks; its n-th
  ``await_input`` call then returns the n-th input.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any, TypedDict

from .errors import AwaitTimeout

if TYPE_CHECKING:
    from celery import Celery
    from celery.result import AsyncResult

    from .hub import Suspension
    from .persist import Persist

__all__ = ["FlowState", "capture", "continue_flow", "expire_flow", "revoke_flow", "request_context"]

logger = logging.getLogger(__name__)

FLOW_VERSION = 1
#: Result-backend (and Flower) state of a resumed PersistentTask until its re-run starts.
RESUMED = "RESUMED"


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


def request_context(app: Celery, state: FlowState, *, with_chain: bool) -> Any:
    """A Celery ``Context`` standing in for the parked task's request (for the result backend)."""
    from celery.app.task import Context

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


def _send_event(persist: Persist, type_: str, task_id: str, hostname: str | None = None, **fields: Any) -> None:
    _send_events(persist, task_id, hostname, [(type_, fields)])


def _send_events(persist: Persist, task_id: str, hostname: str | None, events: list[tuple[str, dict[str, Any]]]) -> None:
    """Send task events through one dispatcher (one producer, one connection checkout)."""
    if not persist.config.send_events:
        return
    try:
        # Sent as the worker that parked the task, so monitors keep it on that worker.
        with persist.app.events.default_dispatcher(hostname=hostname) as dispatcher:
            for type_, fields in events:
                dispatcher.send(type_, uuid=task_id, **fields)
    except Exception:  # noqa: BLE001 - monitoring must never break a resume
        logger.warning("celery-persist: could not send task events", exc_info=True)


def _dispatch(app: Celery, value: Any, state: FlowState) -> AsyncResult | None:
    """Send callbacks and the next chain step with ``value``, as Celery's tracer does on success."""
    from celery import group, signature

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


def continue_flow(persist: Persist, suspension: Suspension, value: Any) -> AsyncResult:
    """Send on the flow parked in ``suspension`` with ``value`` as the resume input."""
    app = persist.app
    state: FlowState = suspension.state
    task_id = state["task_id"]
    if state.get("kind") == "task":
        result = _rerun_task(persist, state, value, suspension.fingerprint)
    else:
        passed = {"previous": state.get("previous"), "input": value} if state.get("include_previous") else value
        nxt = _dispatch(app, passed, state)
        app.backend.mark_as_done(task_id, passed, request=request_context(app, state, with_chain=False))
        _send_events(
            persist,
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


def _rerun_task(persist: Persist, state: FlowState, value: Any, fingerprint: str) -> AsyncResult:
    from celery import signature

    from .task import journal_record_input

    app = persist.app
    task_id = state["task_id"]
    journal_record_input(persist, task_id, state.get("call_index", 0), value)
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
    _send_event(persist, "task-resumed", task_id, suspension=fingerprint, prompt=state.get("prompt"))
    result: AsyncResult = sig.apply_async(**options)
    return result


def expire_flow(persist: Persist, suspension: Suspension) -> None:
    """Apply the timeout policy of an expired suspension (called by cleanup)."""
    state: FlowState = suspension.state
    if not isinstance(state, dict) or "task_id" not in state:
        return  # a plain hub suspension, not a Celery flow: nothing to run
    if state.get("on_timeout") == "default":
        continue_flow(persist, suspension, state.get("default"))
        return
    app = persist.app
    exc = AwaitTimeout(
        f"await_input timed out before it was resumed (prompt: {state.get('prompt')!r})",
        key=suspension.fingerprint,
    )
    app.backend.mark_as_failure(state["task_id"], exc, request=request_context(app, state, with_chain=True), call_errbacks=True)
    _send_event(persist, "task-failed", state["task_id"], exception=repr(exc), traceback="")
    logger.info("celery-persist: suspension %s timed out (task %s)", suspension.fingerprint, state["task_id"])


def revoke_flow(persist: Persist, suspension: Suspension) -> None:
    """Mark a cancelled flow's parked task and the chain after it REVOKED."""
    task_id = suspension.metadata.get("task_id")
    if not task_id:
        return
    app = persist.app
    ids = [task_id, *suspension.metadata.get("chain_ids", [])]
    for tid in ids:
        app.backend.mark_as_revoked(tid, reason="celery-persist: suspension cancelled")
    try:
        app.control.revoke(ids)
    except Exception:  # noqa: BLE001 - the backend state is what callers see; broadcast is best effort
        logger.warning("celery-persist: could not broadcast revoke for %s", task_id, exc_info=True)
    _send_event(persist, "task-revoked", task_id, terminated=False, signum=None, expired=False)


def now() -> float:
    return time.time()
