"""Memory: a park leaves no reference cycle behind for a full gc to find (Trust II, point 5)."""

from __future__ import annotations

import gc
import uuid

from celery import Celery
from celery.app.trace import build_tracer
from celery.exceptions import Ignore

from celery_persist import Persist


def test_a_park_leaves_no_cyclic_garbage(app: Celery) -> None:
    """What Celery's tracer keeps of a park's Ignore is freed when the task returns, not by a full gc."""
    Persist(app)
    task = app.tasks["celery_persist.await_input"]
    tracer = build_tracer(task.name, task, eager=False, app=app)  # what a worker's pool child runs
    task_id = f"parked-{uuid.uuid4().hex[:8]}"
    request = {"id": task_id, "task": task.name, "root_id": task_id, "hostname": "worker@test", "delivery_info": {}, "is_eager": False}
    gc.collect()
    gc.disable()
    try:
        tracer(task_id, [1], {"prompt": "ok?"}, request)
        assert app.AsyncResult(task_id).state == "SUSPENDED"
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        left = [o for o in gc.garbage if isinstance(o, Ignore)]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert left == []
