"""``flow.sending_together``: a batch of continuations and task events over a real Redis broker.

Cleanup fires a page of timers and ``resume_many`` sends a batch of resumes inside it.
Checked here on the wire: nothing leaves before the block exits, then every message
arrives, and every task event keeps the hostname of the worker that parked its task
(which is how Flower keeps the task on that worker).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery

from celery_persist import Persist, flow
from tests.e2e.harness import REDIS_URL, new_key, redis_up, wait_for

pytestmark = pytest.mark.e2e

DB = 7


@pytest.fixture
def app(tmp_path: Path) -> Iterator[Celery]:
    if reason := redis_up():
        pytest.skip(reason)
    ns = f"cp-together-{uuid.uuid4().hex[:8]}"
    url = f"{REDIS_URL.rstrip('/')}/{DB}"
    app = Celery("together", broker=url, set_as_current=False)
    app.conf.update(
        broker_transport_options={"global_keyprefix": f"{ns}:"},
        task_default_queue=f"{ns}.q",
        persist_store_url=f"sqlite:///{tmp_path}/store.db",
        persist_keys=new_key(),
        persist_cleanup_interval=0,
        persist_timer_interval=0,
    )
    yield app
    app.close()
    r = redis.Redis.from_url(url)
    for key in r.scan_iter(match=f"{ns}:*", count=1000):
        r.delete(key)
    r.close()


def _receive(app: Celery, got: list[dict[str, Any]], stop: threading.Event) -> threading.Thread:
    def run() -> None:
        with app.connection_for_read() as conn:
            receiver = app.events.Receiver(conn, handlers={"*": got.append})
            for _ in receiver.itercapture(limit=None, timeout=None, wakeup=False):
                if stop.is_set():
                    return

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_messages_and_events_leave_together_when_the_block_exits(app: Celery) -> None:
    binding = Persist(app).binding
    got: list[dict[str, Any]] = []
    stop = threading.Event()
    _receive(app, got, stop)

    def probe_seen() -> bool:
        # Task events are published, not queued: send probes until the receiver listens.
        with app.events.default_dispatcher(hostname="probe@here") as d:
            d.send("task-probe", uuid="probe")
        time.sleep(0.05)
        return any(e.get("type") == "task-probe" for e in got)

    wait_for(probe_seen, 20, "the event receiver to listen")
    queue = app.conf.task_default_queue
    r = redis.Redis.from_url(app.conf.broker_url)
    queued = f"{app.conf.broker_transport_options['global_keyprefix']}{queue}"
    try:
        with flow.sending_together(binding):
            for n in range(3):
                app.signature("together.next", args=(n,)).apply_async(queue=queue, **flow._producer())
                flow._send_events(binding, f"task-{n}", f"parker-{n}@host", [("task-resumed", {"suspension": f"s{n}"})])
            assert r.llen(queued) == 0, "a message left before the block exited"
        assert r.llen(queued) == 3, "every message left when the block exited"
        wait_for(lambda: len([e for e in got if e.get("type") == "task-resumed"]) == 3, 20, "the three events")
        events = sorted((e for e in got if e.get("type") == "task-resumed"), key=lambda e: str(e["uuid"]))
        assert [(e["uuid"], e["hostname"], e["suspension"]) for e in events] == [
            (f"task-{n}", f"parker-{n}@host", f"s{n}") for n in range(3)
        ]
    finally:
        stop.set()
        r.close()


def test_an_exception_in_the_block_sends_nothing(app: Celery) -> None:
    binding = Persist(app).binding
    queue = app.conf.task_default_queue
    r = redis.Redis.from_url(app.conf.broker_url)
    queued = f"{app.conf.broker_transport_options['global_keyprefix']}{queue}"
    try:
        with pytest.raises(RuntimeError, match="half way"), flow.sending_together(binding):
            app.signature("together.next", args=(1,)).apply_async(queue=queue, **flow._producer())
            raise RuntimeError("failed half way")
        assert r.llen(queued) == 0
    finally:
        r.close()
