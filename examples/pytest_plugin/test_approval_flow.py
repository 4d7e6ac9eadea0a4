"""Tests of the approval flow in ``tasks.py``, using celery-persist's pytest plugin only.

Run: ``pytest examples/pytest_plugin`` (the plugin loads itself when
celery-persist is installed; with plugin autoload off add ``-p celery_persist``).
Everything is in memory: broker, results and suspensions; the worker is a thread.
"""

from __future__ import annotations

import time

import pytest

from celery_persist import AlreadyResumed, AwaitTimeout, Persist
from celery_persist.testing import ResumeAndGet, WaitSuspended
from examples.pytest_plugin.tasks import approval_flow  # submit -> await_input -> book

# Every test here runs the flow on the plugin's in-thread worker.
pytestmark = pytest.mark.usefixtures("persist_worker")


def test_approved_expense_is_booked(wait_suspended: WaitSuspended, resume_and_get: ResumeAndGet) -> None:
    result = approval_flow(42, 1234.5).apply_async()
    key = wait_suspended(result)  # the flow is parked on await_input
    assert resume_and_get(key, {"approved": True, "by": "alice"}) == "expense #42 (EUR 1234.50) booked, approved by alice"
    assert result.get(timeout=10) == "expense #42 (EUR 1234.50) booked, approved by alice"  # the caller's result too


def test_parked_step_shows_the_prompt(persist: Persist, wait_suspended: WaitSuspended) -> None:
    result = approval_flow(7, 99.0).apply_async()
    key = wait_suspended(result)
    assert result.parent.state == "SUSPENDED"
    assert result.parent.info["prompt"] == "Approve expense #7 (EUR 99.00)?"
    assert persist.load(key).status == "suspended"


def test_rejected_expense(wait_suspended: WaitSuspended, resume_and_get: ResumeAndGet) -> None:
    key = wait_suspended(approval_flow(43, 10.0).apply_async())
    assert resume_and_get(key, {"approved": False, "by": "bob"}) == "expense #43 rejected by bob"


def test_a_decision_counts_once(persist: Persist, wait_suspended: WaitSuspended, resume_and_get: ResumeAndGet) -> None:
    key = wait_suspended(approval_flow(44, 10.0).apply_async())
    resume_and_get(key, {"approved": True, "by": "alice"})
    with pytest.raises(AlreadyResumed):
        persist.resume(key, {"approved": False, "by": "mallory"})


def test_undecided_expense_times_out(persist: Persist, wait_suspended: WaitSuspended) -> None:
    result = approval_flow(45, 10.0, timeout=3600).apply_async()
    wait_suspended(result)
    assert persist.cleanup(now=time.time() + 3601) == 1  # what the beat task runs, an hour later
    with pytest.raises(AwaitTimeout):
        result.get(timeout=10)
