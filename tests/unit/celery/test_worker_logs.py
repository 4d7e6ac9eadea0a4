"""What a worker logs when a flow parks and when a resume is refused (a real in-thread worker)."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from celery_persist.keys import fingerprint


def test_parking_logs_one_line(persist_app: Any, persist_worker: Any, wait_suspended: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    result = persist_app.signature("celery_persist.await_input", kwargs={"prompt": "ok?"}).apply_async()
    key = wait_suspended(result)
    parked_id = result.id
    fp = fingerprint(key)
    lines = [r for r in caplog.records if r.levelno >= logging.INFO and (parked_id in r.getMessage() or fp in r.getMessage())]
    assert [r.getMessage() for r in lines] == [lines[0].getMessage()] and "parked as suspension" in lines[0].getMessage()
    assert key not in caplog.text


def test_a_refused_resume_task_logs_info_without_a_traceback(
    persist_app: Any, persist_worker: Any, persist: Any, caplog: pytest.LogCaptureFixture
) -> None:
    key = persist.hub.suspend({"x": 1})
    persist.hub.resume(key)
    caplog.set_level(logging.INFO)
    outcome = persist_app.send_task("celery_persist.resume", args=[key, None])
    with pytest.raises(Exception, match="AlreadyResumed|already") as raised:
        outcome.get(timeout=10)
    assert type(raised.value).__name__ == "AlreadyResumed"
    records = [r for r in caplog.records if r.name.startswith("celery") and outcome.id in r.getMessage()]
    assert records, caplog.text
    assert all(r.levelno == logging.INFO and r.exc_info is None for r in records), [(r.levelname, r.getMessage()) for r in records]
