"""Monitoring: ``task-suspended`` / ``task-resumed`` events reach a real event receiver."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from celery import chain

from celery_persist.keys import fingerprint
from tests.e2e.harness import Stack, wait_for

pytestmark = pytest.mark.e2e

PROBE = "worker-e2e-probe"


class EventLog:
    """An ``app.events.Receiver`` in a thread, feeding a ``celery.events.state.State``."""

    def __init__(self, stack: Stack) -> None:
        self.app = stack.app
        self.state = stack.app.events.State()
        self.events: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self.error: BaseException | None = None
        self.receiver: Any = None
        self.thread = threading.Thread(target=self._run, name="e2e-events", daemon=True)

    def _on_event(self, event: dict[str, Any]) -> None:
        with self.lock:
            self.events.append(event)
            if event["type"] != PROBE:
                self.state.event(event)

    def _run(self) -> None:
        try:
            with self.app.connection_for_read() as conn:
                self.receiver = self.app.events.Receiver(conn, handlers={"*": self._on_event})
                self.receiver.capture(limit=None, timeout=None, wakeup=False)
        except BaseException as exc:  # noqa: BLE001 - surfaced by the test, not lost in the thread
            self.error = exc

    def start(self) -> None:
        self.thread.start()
        # Subscribing is asynchronous, and a fanout message sent before it is lost:
        # send probes until one comes back, then the receiver is known to listen.
        probe = uuid.uuid4().hex

        def heard() -> bool:
            assert self.error is None, self.error
            with self.app.events.default_dispatcher() as dispatcher:
                dispatcher.send(PROBE, probe=probe)
            return any(e.get("probe") == probe for e in self.of_type(PROBE))

        wait_for(heard, 20, "the event receiver to listen", interval=0.2)

    def stop(self) -> None:
        if self.receiver is not None:
            self.receiver.should_stop = True
        self.thread.join(timeout=10)

    def of_type(self, type_: str, uuid_: str | None = None) -> list[dict[str, Any]]:
        with self.lock:
            return [e for e in self.events if e["type"] == type_ and (uuid_ is None or e.get("uuid") == uuid_)]

    def task_state(self, task_id: str) -> str | None:
        with self.lock:
            task = self.state.tasks.get(task_id)
            return None if task is None else str(task.state)


@pytest.fixture
def events(stack: Stack) -> Iterator[EventLog]:
    log = EventLog(stack)
    log.start()
    yield log
    log.stop()
    assert log.error is None, log.error


def test_suspended_and_resumed_events(stack: Stack, events: EventLog) -> None:
    tag = stack.tag()
    flow = chain(stack.sig("e2e.review", tag), stack.await_input(prompt="ship it?", timeout=300), stack.sig("e2e.publish", tag=tag))
    res = flow.apply_async()
    key = stack.persist.suspension_key(res, timeout=20)
    awaiting = res.parent
    assert awaiting is not None

    (suspended,) = wait_for(lambda: events.of_type("task-suspended", awaiting.id), 20, "a task-suspended event")
    assert suspended["suspension"] == fingerprint(key)
    assert suspended["prompt"] == "ship it?"
    assert key not in str(suspended), "events carry the fingerprint, never the key"
    wait_for(lambda: events.task_state(awaiting.id) == "SUSPENDED", 10, "celery's State to show SUSPENDED")

    stack.persist.resume(key, "yes")
    assert res.get(timeout=20) == {"published": "yes"}

    (resumed,) = wait_for(lambda: events.of_type("task-resumed", awaiting.id), 20, "a task-resumed event")
    assert resumed["suspension"] == fingerprint(key)
    assert resumed["prompt"] == "ship it?"
    wait_for(lambda: events.task_state(awaiting.id) == "SUCCESS", 10, "celery's State to show SUCCESS after resume")
    wait_for(lambda: events.task_state(res.id) == "SUCCESS", 10, "the continuation to succeed in celery's State")


def test_persistent_task_events(stack: Stack, events: EventLog) -> None:
    tag = stack.tag()
    res = stack.sig("e2e.two_awaits", tag).apply_async()
    key = stack.persist.suspension_key(res, timeout=20)

    (suspended,) = wait_for(lambda: events.of_type("task-suspended", res.id), 20, "a task-suspended event")
    assert suspended["prompt"] == "first?"
    wait_for(lambda: events.task_state(res.id) == "SUSPENDED", 10, "celery's State to show SUSPENDED")

    stack.persist.resume(key, "one")
    (resumed,) = wait_for(lambda: events.of_type("task-resumed", res.id), 20, "a task-resumed event")
    assert resumed["suspension"] == fingerprint(key) == suspended["suspension"]
    assert resumed["prompt"] == "first?"
    second = wait_for(lambda: events.of_type("task-suspended", res.id)[1:], 20, "the second task-suspended event")
    assert second[0]["prompt"] == "second?"
    assert second[0]["suspension"] != suspended["suspension"]
    wait_for(lambda: events.task_state(res.id) == "SUSPENDED", 10, "celery's State to show SUSPENDED again")
    stack.persist.cancel(stack.app.backend.get_task_meta(res.id)["result"]["suspension_key"])
