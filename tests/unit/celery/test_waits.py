"""Waits beyond input, at the unit level: validation, and a signal racing the announcement."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from celery import Celery
from celery.exceptions import Ignore

from celery_persist import ConfigurationError, Persist
from celery_persist.persist import SUSPENDED
from celery_persist.waits import NAME_MAX, check_name, wake_time

NOW = 1_800_000_000.0


def test_wake_time_forms() -> None:
    assert wake_time(seconds=5, now=NOW) == NOW + 5
    aware = datetime.fromtimestamp(NOW + 60, tz=timezone(timedelta(hours=2)))
    assert wake_time(until=aware, now=NOW) == NOW + 60
    assert wake_time(until=aware.isoformat(), now=NOW) == NOW + 60
    assert wake_time(seconds=-3, now=NOW) == NOW - 3  # in the past: the caller fires it at once


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "exactly one"),
        ({"seconds": 1, "until": "2030-01-01T00:00:00+00:00"}, "exactly one"),
        ({"until": "2030-01-01T00:00:00"}, "timezone"),
        ({"until": datetime(2030, 1, 1)}, "timezone"),  # noqa: DTZ001 - the point of the test
        ({"until": "next tuesday"}, "ISO 8601"),
        ({"until": 12}, "aware datetime"),
        ({"seconds": float("nan")}, "finite"),
        ({"seconds": "10"}, "finite"),
        ({"seconds": True}, "finite"),
    ],
)
def test_wake_time_refuses(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        wake_time(**kwargs, now=NOW)


@pytest.mark.parametrize("value", ["", "x" * (NAME_MAX + 1), 42, None, b"bytes"])
def test_bad_topics_and_keys(value: Any) -> None:
    with pytest.raises(ConfigurationError, match="event topic"):
        check_name("topic", value)
    assert check_name("key", "x" * NAME_MAX) == "x" * NAME_MAX


def _park_event(app: Celery, task_id: str, topic: str, key: str, on_announce: Any = None) -> None:
    task = app.tasks["celery_persist.await_event"]
    original = task.update_state
    if on_announce is not None:

        def update_state(*args: Any, **kwargs: Any) -> None:
            original(*args, **kwargs)
            if kwargs.get("state") == SUSPENDED:
                on_announce()

        task.update_state = update_state
    task.push_request(
        id=task_id,
        task=task.name,
        root_id=task_id,
        parent_id=None,
        group=None,
        chain=[dict(app.signature("t.next"))],
        callbacks=None,
        errbacks=None,
        delivery_info={},
        hostname="worker@test",
        called_directly=False,
        is_eager=False,
    )
    try:
        with pytest.raises(Ignore):
            task.run(None, topic, key=key, timeout=600)
    finally:
        task.pop_request()
        task.update_state = original


def test_a_signal_sent_as_soon_as_the_flow_shows_suspended_wakes_it(app: Celery) -> None:
    """The index is written before SUSPENDED is announced: a client that signals on seeing it is not lost."""
    persist = Persist(app)
    woken: list[int] = []
    _park_event(
        app, str(uuid.uuid4()), "payment.settled", "A-1", on_announce=lambda: woken.append(persist.signal("payment.settled", "A-1", 1))
    )
    assert woken == [1]
    assert persist.hub.stats()["suspensions"] == {"resumed": 1}
    assert persist.signal("payment.settled", "A-1", 2) == 0


def test_a_buffered_signal_is_taken_at_park_and_the_result_stays_success(app: Celery) -> None:
    persist = Persist(app)
    assert persist.signal("doc.signed", "D-9", {"by": "ann"}, buffer=60) == 0
    task_id = str(uuid.uuid4())
    _park_event(app, task_id, "doc.signed", "D-9")
    result = app.AsyncResult(task_id)
    assert (result.state, result.result) == ("SUCCESS", {"by": "ann"})  # the later SUSPENDED did not overwrite it
    assert persist.hub.stats()["suspensions"] == {"resumed": 1}
