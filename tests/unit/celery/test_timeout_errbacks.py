"""A timed-out step's errbacks run the same way on every supported Celery (5.3 to 5.7).

Celery before 5.7 calls an old-style errback with a bound argument
(``on_error.s(tag=...)`` for ``def on_error(task_id, tag)``) inline as
``(request, exc, traceback)``, which raises TypeError; cleanup then retried the
timeout on every run. :func:`celery_persist.flow.expire_flow` classifies
errbacks as Celery 5.7 does, whatever Celery is installed.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery, signals
from celery.exceptions import Ignore

from celery_persist import AwaitTimeout, Persist
from celery_persist.flow import expire_flow


@pytest.fixture
def sent() -> Iterator[list[dict[str, Any]]]:
    messages: list[dict[str, Any]] = []

    def record(sender: Any = None, body: Any = None, headers: Any = None, **_: Any) -> None:
        args, kwargs, _embed = body
        messages.append({"task": headers["task"], "args": list(args), "kwargs": kwargs})

    signals.before_task_publish.connect(record, weak=False)
    yield messages
    signals.before_task_publish.disconnect(record)


def test_old_and_new_style_errbacks_of_a_timed_out_step(app: Celery, sent: list[dict[str, Any]], caplog: pytest.LogCaptureFixture) -> None:
    inline: list[tuple[str, Any, Any]] = []

    @app.task(name="t.old_style")
    def old_style(task_id: str, tag: str) -> None:  # runs on a worker, as a task of its own
        raise AssertionError("an old-style errback is sent, not called here")

    @app.task(name="t.new_style")
    def new_style(request: Any, exc: BaseException, traceback: Any, tag: str = "") -> None:
        inline.append((request.id, type(exc).__name__, tag))

    @app.task(name="t.broken")
    def broken(request: Any, exc: BaseException, traceback: Any) -> None:
        raise RuntimeError("errback bug")

    parked_id = f"parked-{uuid.uuid4().hex[:8]}"
    persist = Persist(app)
    task = app.tasks["celery_persist.await_input"]
    task.push_request(
        id=parked_id,
        task="celery_persist.await_input",
        root_id=parked_id,
        parent_id=None,
        group=None,
        chain=None,
        callbacks=None,
        errbacks=[
            dict(old_style.s(tag="old")),
            dict(new_style.s(tag="new")),
            dict(broken.s()),
            dict(app.signature("t.elsewhere")),  # not registered here: sent to a worker
        ],
        delivery_info={"priority": 0, "exchange": "", "routing_key": "celery"},
        hostname="worker@test",
        called_directly=False,
        is_eager=False,
    )
    try:
        with pytest.raises(Ignore):
            task.run(1, prompt="approve?", timeout=60)
    finally:
        task.pop_request()
    key = app.backend.get_task_meta(parked_id)["result"]["suspension_key"]

    caplog.set_level(logging.ERROR, logger="celery_persist.flow")
    expire_flow(persist.binding, persist.load(key))  # raises nothing: the timeout is applied once

    meta = app.backend.get_task_meta(parked_id)
    assert meta["status"] == "FAILURE" and isinstance(meta["result"], AwaitTimeout)
    assert inline == [(parked_id, "AwaitTimeout", "new")]
    by_task = sorted((m["task"], m["args"], m["kwargs"]) for m in sent)
    assert by_task == [("t.elsewhere", [parked_id], {}), ("t.old_style", [parked_id], {"tag": "old"})]
    [error] = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert "t.broken" in error.getMessage() and error.exc_info is not None
