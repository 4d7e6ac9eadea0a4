"""Trust I on a real worker at DEBUG: no suspension key in the store, the events, the worker log
or the result backend, whether states are encrypted or not.

A flow parks with ``notify`` (whose task must receive the key), a PersistentTask
parks mid-task, one is resumed by name from a plain Celery client the way the
README shows, the other through ``persist.resume``. Then every place an
onlooker could read is searched for each key and for its random part.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from celery import chain

from tests.e2e.harness import BACKEND_DB, REDIS_URL, Stack, redis_db, wait_for
from tests.e2e.test_e2e_events import EventLog

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module", params=[True, False], ids=["encrypted", "encryption-off"])
def debug_stack(request: pytest.FixtureRequest, make_stack: Callable[..., Stack]) -> Iterator[Stack]:
    stack = make_stack(store="sqlite", loglevel="DEBUG", encrypted=request.param)
    yield stack
    stack.close()


def _needles(key: str) -> list[bytes]:
    return [key.encode(), key.split(".")[1].encode()]


def test_keys_appear_nowhere_an_onlooker_reads(debug_stack: Stack) -> None:
    stack = debug_stack
    events = EventLog(stack)
    events.start()
    try:
        tag = stack.tag()
        flow = chain(
            stack.sig("e2e.review", "doc"),
            stack.await_input(prompt="publish?", timeout=300, notify=stack.sig("e2e.notify", tag=f"{tag}:notify")),
            stack.sig("e2e.publish", tag=tag),
        ).apply_async()
        key = stack.persist.suspension_key(flow, timeout=20)
        assert stack.wait_recorded(f"{tag}:notify", 1)[0]["key"] == key  # the notify task got the key itself
        mid = stack.sig("e2e.two_awaits", f"{tag}:mid").apply_async()
        mid_key = stack.persist.suspension_key(mid, timeout=20)

        # A plain Celery client resumes by name, masking the key as the README shows.
        sent = stack.app.send_task(
            "celery_persist.resume",
            args=[key, {"approved": True}],
            kwargs={},
            argsrepr="('<suspension-key>', ...)",
            queue=stack.config["queue"],
        )
        assert sent.get(timeout=20)
        assert flow.get(timeout=20) == {"published": {"approved": True}}
        stack.persist.resume(mid_key, "one")
        wait_for(lambda: events.of_type("task-succeeded", sent.id), 20, "the resume task's success event")
    finally:
        events.stop()

    needles = _needles(key) + _needles(mid_key)
    db = Path(stack.config["store_url"].removeprefix("sqlite:///"))
    store_bytes = b"".join(p.read_bytes() for p in db.parent.glob(db.name + "*") if not p.name.endswith(".key"))
    event_bytes = json.dumps(events.events, default=str).encode()
    log_bytes = stack.worker.log_path.read_bytes()
    backend = redis.Redis.from_url(redis_db(REDIS_URL, BACKEND_DB))
    try:
        backend_bytes = b"".join(backend.get(f"celery-task-meta-{tid}") or b"" for tid in (flow.parent.id, mid.id, sent.id))
    finally:
        backend.close()
    assert b"TaskPool: Apply" in log_bytes  # the worker did log message bodies at DEBUG
    assert b"suspension-key:" in log_bytes  # ... with the keys masked
    for needle in needles:
        assert needle not in store_bytes, "a key reached the store"
        assert needle not in event_bytes, "a key reached the task events"
        assert needle not in log_bytes, "a key reached the worker log"
        assert needle not in backend_bytes, "a key reached the result backend"
