"""How a parked flow ends other than by resume: timeout (fail or default), cancel, bad keys."""

from __future__ import annotations

import time
from datetime import datetime

import pytest
from celery import chain
from celery.exceptions import TaskRevokedError
from celery.result import AsyncResult

from celery_persist import (
    AlreadyResumed,
    AwaitTimeout,
    InvalidKey,
    SuspensionCancelled,
    SuspensionExpired,
    SuspensionNotFound,
    new_suspension_key,
)
from celery_persist.persist import SUSPENDED
from tests.e2e.harness import Stack, wait_for, wait_state

pytestmark = pytest.mark.e2e


def park(stack: Stack, tag: str, link_error: object = None, **await_kwargs: object) -> tuple[AsyncResult, AsyncResult, str]:
    await_kwargs.setdefault("prompt", f"approve {tag}?")
    await_kwargs.setdefault("timeout", 120)
    flow = chain(stack.sig("e2e.review", tag), stack.await_input(**await_kwargs), stack.sig("e2e.publish", tag=tag))
    res = flow.apply_async(link_error=link_error) if link_error is not None else flow.apply_async()
    key = stack.persist.suspension_key(res, timeout=20)
    assert res.parent is not None
    return res, res.parent, key


def wait_until_expired(awaiting: AsyncResult) -> None:
    """Wait for the wall clock to pass the step's expires_at (a deadline, not a synchronisation)."""
    expires = datetime.fromisoformat(awaiting.info["expires_at"]).timestamp()
    wait_for(lambda: time.time() > expires + 0.05, 10, "the suspension's expiry to pass")


def assert_nothing_dispatched(stack: Stack, tag: str, res: AsyncResult, state: str = "PENDING") -> None:
    """The continuation never ran and was never queued.

    Absence can only be shown with a bounded wait: a sentinel sent now reaches the
    worker after anything queued before it, so once the sentinel has run, a
    continuation dispatched by the failed resume would have run too.
    """
    sentinel = f"{tag}:sentinel"
    stack.sig("e2e.publish", "sentinel", tag=sentinel).apply_async()
    stack.wait_recorded(sentinel, 1, timeout=20)
    assert stack.recorded(tag) == []
    assert res.state == state


def test_timeout_fails_the_step_and_runs_the_errback(stack: Stack) -> None:
    tag = stack.tag()
    res, awaiting, key = park(stack, tag, timeout=1, link_error=stack.sig("e2e.on_error", tag=f"{tag}:err"))
    wait_until_expired(awaiting)

    assert stack.persist.cleanup() >= 1

    wait_state(awaiting, "FAILURE")
    assert isinstance(awaiting.result, AwaitTimeout)
    with pytest.raises(AwaitTimeout):
        res.get(timeout=10)
    assert stack.wait_recorded(f"{tag}:err", 1) == [awaiting.id]
    with pytest.raises(SuspensionExpired):
        stack.persist.resume(key, "too late")
    assert_nothing_dispatched(stack, tag, res, state="FAILURE")
    assert stack.recorded(f"{tag}:err") == [awaiting.id], "the errback runs once, for the step that timed out"


def test_timeout_through_the_cleanup_task_on_the_worker(stack: Stack) -> None:
    tag = stack.tag()
    res, awaiting, _ = park(stack, tag, timeout=1, link_error=stack.sig("e2e.on_error", tag=f"{tag}:err"))
    wait_until_expired(awaiting)

    stack.app.send_task("celery_persist.cleanup")

    wait_state(awaiting, "FAILURE")
    assert isinstance(awaiting.result, AwaitTimeout)
    with pytest.raises(AwaitTimeout):
        res.get(timeout=10)
    assert stack.wait_recorded(f"{tag}:err", 1) == [awaiting.id]


def test_timeout_with_default_completes_the_chain(stack: Stack) -> None:
    tag = stack.tag()
    res, awaiting, key = park(stack, tag, timeout=1, on_timeout="default", default={"approved": False})
    wait_until_expired(awaiting)

    stack.persist.cleanup()

    assert res.get(timeout=20) == {"published": {"approved": False}}
    assert awaiting.state == "SUCCESS"
    assert stack.recorded(tag) == [{"approved": False}]
    with pytest.raises(SuspensionExpired):
        stack.persist.resume(key, "too late")


def test_cancel_revokes_the_flow(stack: Stack) -> None:
    tag = stack.tag()
    res, awaiting, key = park(stack, tag)

    suspension = stack.persist.cancel(key)

    assert suspension.status == "cancelled"
    assert awaiting.state == "REVOKED"
    assert res.state == "REVOKED"
    with pytest.raises(TaskRevokedError):
        res.get(timeout=5)
    with pytest.raises(SuspensionCancelled):
        stack.persist.resume(key, "after cancel")
    assert_nothing_dispatched(stack, tag, res, state="REVOKED")


class TestRefusedResumes:
    """Refused keys raise the documented error and dispatch nothing."""

    def test_expired(self, stack: Stack) -> None:
        tag = stack.tag()
        res, awaiting, key = park(stack, tag, timeout=1)
        wait_until_expired(awaiting)
        with pytest.raises(SuspensionExpired):
            stack.persist.resume(key, "late")
        assert awaiting.state == SUSPENDED
        assert_nothing_dispatched(stack, tag, res)

    def test_unknown(self, stack: Stack) -> None:
        with pytest.raises(SuspensionNotFound):
            stack.persist.resume(new_suspension_key(stack.config["secret"]), "x")

    def test_forged_and_malformed(self, stack: Stack) -> None:
        tag = stack.tag()
        res, awaiting, key = park(stack, tag)
        body, _, tag_part = key.rpartition(".")
        forged = f"{body}.{'A' * len(tag_part)}" if not tag_part.startswith("A") else f"{body}.{'B' * len(tag_part)}"
        other_secret = new_suspension_key("some other secret")
        for bad in (forged, body, other_secret, "not-a-key", key + "x"):
            with pytest.raises(InvalidKey):
                stack.persist.resume(bad, "forged")
        assert_nothing_dispatched(stack, tag, res)
        # None of it touched the genuine suspension: it still resumes.
        assert awaiting.state == SUSPENDED
        stack.persist.resume(key, "genuine")
        assert res.get(timeout=20) == {"published": "genuine"}


def test_a_lapsed_claim_is_reopened_by_cleanup(stack: Stack) -> None:
    """A resumer that dies between claim and dispatch does not lose the flow."""
    tag = stack.tag()
    res, awaiting, key = park(stack, tag)
    hub = stack.persist.ready()
    hub.claim(key, "lost", lease=0.5)  # claimed, never dispatched: the caller "crashed"
    with pytest.raises(AlreadyResumed):
        stack.persist.resume(key, "while claimed")
    lapse = time.time() + 0.5
    wait_for(lambda: time.time() > lapse + 0.05, 5, "the lease to lapse")

    assert stack.persist.cleanup() >= 1

    assert hub.load(key).status == "suspended"
    stack.persist.resume(key, "after reopen")
    assert res.get(timeout=20) == {"published": "after reopen"}
    assert stack.recorded(tag) == ["after reopen"]
    assert awaiting.state == "SUCCESS"
