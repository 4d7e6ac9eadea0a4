"""Parking and resuming chains with ``await_input`` on a real worker, broker and store."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from datetime import datetime, timedelta

import pytest
from celery import chain
from celery.result import AsyncResult

from celery_persist import PersistentTask
from celery_persist.journal import name_of as journal_name
from celery_persist.persist import SUSPENDED
from tests.e2e.harness import Stack, wait_for

pytestmark = pytest.mark.e2e


def park(stack: Stack, tag: str, **await_kwargs: object) -> tuple[AsyncResult, AsyncResult, str]:
    """Start review -> await_input -> publish; return (last result, await result, key)."""
    await_kwargs.setdefault("prompt", f"approve {tag}?")
    await_kwargs.setdefault("timeout", 120)
    flow = chain(stack.sig("e2e.review", tag), stack.await_input(**await_kwargs), stack.sig("e2e.publish", tag=tag))
    res = flow.apply_async()
    key = stack.persist.suspension_key(res, timeout=20)
    assert res.parent is not None
    return res, res.parent, key


def test_park_and_resume_chain(stack: Stack) -> None:
    tag = stack.tag()
    res, awaiting, key = park(stack, tag, prompt="approve the doc?", timeout=600)

    assert awaiting.state == SUSPENDED
    info = awaiting.info
    assert isinstance(info, dict)
    assert info["suspension_key"] != key  # the result backend holds the key wrapped, never as it is
    assert stack.persist.hub.unwrap_key(info["suspension_key"]) == key
    assert info["prompt"] == "approve the doc?"
    expires = datetime.fromisoformat(info["expires_at"])
    assert expires.utcoffset() == timedelta(0), "ISO 8601 in UTC"
    assert 590 < expires.timestamp() - time.time() <= 600
    assert res.state == "PENDING"
    assert res.parent.parent is not None and res.parent.parent.get(timeout=10) == f"reviewed:{tag}"
    assert stack.recorded(tag) == []

    cont = stack.persist.resume(key, {"approved": True})

    assert cont.id == res.id, "resume returns the AsyncResult of the next chain step (its frozen id)"
    assert res.get(timeout=20) == {"published": {"approved": True}}
    assert stack.recorded(tag) == [{"approved": True}]
    assert awaiting.state == "SUCCESS"
    assert awaiting.result == {"approved": True}


def test_include_previous(stack: Stack) -> None:
    tag = stack.tag()
    res, awaiting, key = park(stack, tag, include_previous=True)

    stack.persist.resume(key, "yes")

    expected = {"previous": f"reviewed:{tag}", "input": "yes"}
    assert res.get(timeout=20) == {"published": expected}
    assert awaiting.get(timeout=5) == expected


def test_notify_gets_key_and_info(stack: Stack) -> None:
    tag = stack.tag()
    res, _, key = park(stack, tag, notify=stack.sig("e2e.notify", tag=f"{tag}:notify"))

    (note,) = stack.wait_recorded(f"{tag}:notify", 1)
    assert note == {"key": key, "prompt": f"approve {tag}?"}
    stack.persist.resume(key, 7)
    assert res.get(timeout=20) == {"published": 7}


def test_resume_by_name_from_bare_client(stack: Stack) -> None:
    """A plain Celery client (celery_persist never imported) resumes with send_task."""
    tag = stack.tag()
    res, awaiting, key = park(stack, tag)
    cfg = stack.config
    script = textwrap.dedent(
        f"""
        import sys
        from celery import Celery
        app = Celery("bare", broker={cfg["broker"]!r}, backend={cfg["backend"]!r})
        app.conf.broker_transport_options = {cfg["broker_options"]!r}
        r = app.send_task("celery_persist.resume", args=[{key!r}, {{"by": "bare"}}], queue={cfg["queue"]!r})
        print(r.get(timeout=30))
        assert not any(m == "celery_persist" or m.startswith("celery_persist.") for m in sys.modules), "imported celery_persist"
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd="/")
    assert out.returncode == 0, out.stderr

    assert out.stdout.strip() == res.id, "the resume task returns the continuation's task id"
    assert res.get(timeout=20) == {"published": {"by": "bare"}}
    assert awaiting.state == "SUCCESS"


class TestPersistentTask:
    def test_two_awaits_same_task_id(self, stack: Stack) -> None:
        tag = stack.tag()
        res = stack.sig("e2e.two_awaits", tag).apply_async()
        hub = stack.persist.hub

        key1 = stack.persist.suspension_key(res, timeout=20)
        assert res.state == SUSPENDED and res.info["prompt"] == "first?"
        assert stack.persist.resume(key1, "one").id == res.id

        # The backend still shows the spent first key until the worker re-runs the
        # task; suspension_key must wait for the second one, not hand back the first.
        key2 = stack.persist.suspension_key(res, timeout=20)
        assert key2 != key1
        assert res.info["prompt"] == "second?"
        assert hub.load_checkpoint(journal_name(res.id)) is not None, "the journal lives while the task is parked"
        assert stack.persist.resume(key2, "two").id == res.id

        assert AsyncResult(res.id, app=stack.app).get(timeout=20) == {"first": "one", "second": "two", "task_id": res.id}
        runs = stack.recorded(tag)
        assert [r["run"] for r in runs] == [res.id] * 3, "parked twice, so the body ran three times, always with one id"
        assert [r["checkpoint"] for r in runs] == [None, None, {"first": "one"}]
        wait_for(lambda: hub.load_checkpoint(journal_name(res.id)) is None, 10, "the checkpoint to be deleted on success")

    def test_checkpoint_kept_on_failure(self, stack: Stack) -> None:
        tag = stack.tag()
        res = stack.sig("e2e.checkpoint_then_fail", tag).apply_async()
        with pytest.raises(RuntimeError, match="on purpose"):
            res.get(timeout=20)
        hub = stack.persist.hub
        journal = hub.load_checkpoint(journal_name(res.id))
        assert journal is not None and journal["state"] == {"step": 1, "tag": tag}
        record = wait_for(
            lambda: (r := hub.checkpoint_record(journal_name(res.id))) and r.metadata.get("outcome") == "failure" and r,
            10,
            "the failure to be stamped on the kept checkpoint",
        )
        assert record.metadata["task"] == "e2e.checkpoint_then_fail"
        assert isinstance(stack.app.tasks["e2e.checkpoint_then_fail"], PersistentTask)
