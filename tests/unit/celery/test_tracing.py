"""Trace context across a wait (:mod:`celery_persist.tracing`), without a worker.

Spans come from the OpenTelemetry SDK's own ``TracerProvider`` (a local one: the
global provider is left alone), made current the way the Celery instrumentation
makes a task's span current. What a resume sends is observed on Celery's
``before_task_publish`` signal, where the instrumentation would inject the
current span into the message.
"""

from __future__ import annotations

import importlib
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery, signals
from celery.exceptions import Ignore
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider

from celery_persist import Persist, tracing
from celery_persist.flow import capture

TRACER = TracerProvider().get_tracer("tests")


def _request(app: Celery, task_id: str) -> dict[str, Any]:
    """The request of the parked step of ``a | await_input | b``."""
    return {
        "id": task_id,
        "task": "celery_persist.await_input",
        "root_id": "root",
        "parent_id": "root",
        "group": None,
        "chain": [dict(app.signature("t.b", options={"task_id": f"b-{task_id}"}))],
        "callbacks": None,
        "errbacks": None,
        "delivery_info": {},
        "hostname": "w@t",
        "called_directly": False,
        "is_eager": False,
    }


def _park(app: Celery, task_id: str) -> str:
    """Run the await_input body as a worker would; returns the key it announced."""
    persist = Persist.of(app)
    task = app.tasks["celery_persist.await_input"]
    task.push_request(**_request(app, task_id))
    try:
        with pytest.raises(Ignore):
            task.run(1, prompt="approve?", timeout=600)
    finally:
        task.pop_request()
    return persist.hub.unwrap_key(app.backend.get_task_meta(task_id)["result"]["suspension_key"])


def _raw_sqlite(url: str) -> bytes:
    path = Path(url.removeprefix("sqlite:///"))
    return b"".join(p.read_bytes() for p in path.parent.glob(path.name + "*") if not p.name.endswith(".key"))


@pytest.fixture
def published() -> Iterator[list[trace.SpanContext]]:
    """The span context current while each task message of the test is published."""
    contexts: list[trace.SpanContext] = []

    def record(**_: Any) -> None:
        contexts.append(trace.get_current_span().get_span_context())

    signals.before_task_publish.connect(record, weak=False)
    yield contexts
    signals.before_task_publish.disconnect(record)


@pytest.fixture
def without_opentelemetry(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """``celery_persist.tracing`` as imported where opentelemetry-api is not installed."""
    monkeypatch.setitem(sys.modules, "opentelemetry", None)  # import opentelemetry -> ImportError
    importlib.reload(tracing)
    assert not tracing.AVAILABLE
    yield
    monkeypatch.undo()
    importlib.reload(tracing)
    assert tracing.AVAILABLE


def test_the_parked_span_is_kept_in_the_sealed_state_only(app: Celery) -> None:
    persist = Persist(app)
    with TRACER.start_as_current_span("run/celery_persist.await_input") as span:
        key = _park(app, f"p-{uuid.uuid4().hex[:8]}")
    ctx = span.get_span_context()
    trace_id, span_id = f"{ctx.trace_id:032x}", f"{ctx.span_id:016x}"
    suspension = persist.load(key)
    assert suspension.state["trace"]["traceparent"].startswith(f"00-{trace_id}-{span_id}-")
    raw = _raw_sqlite(app.conf.persist_store_url)
    assert trace_id.encode() not in raw and span_id.encode() not in raw  # encrypted with the state
    assert trace_id not in str(suspension.metadata)  # and not in the clear metadata


def test_resume_publishes_the_continuation_in_the_parked_trace(app: Celery, published: list[trace.SpanContext]) -> None:
    persist = Persist(app)
    with TRACER.start_as_current_span("run/celery_persist.await_input") as parked:
        key = _park(app, f"p-{uuid.uuid4().hex[:8]}")
    published.clear()
    with TRACER.start_as_current_span("POST /approve") as resumer:
        persist.resume(key, {"approved": True})
        assert trace.get_current_span() is resumer  # the resumer's context is back after the send
    assert len(published) == 1  # the chain's next step, t.b
    assert published[0].trace_id == parked.get_span_context().trace_id != resumer.get_span_context().trace_id


def test_without_a_current_span_nothing_is_added(app: Celery, published: list[trace.SpanContext]) -> None:
    persist = Persist(app)
    task_id = f"p-{uuid.uuid4().hex[:8]}"
    app.tasks["celery_persist.await_input"].push_request(**_request(app, task_id))
    try:
        assert "trace" not in capture(app.tasks["celery_persist.await_input"].request, kind="chain")
    finally:
        app.tasks["celery_persist.await_input"].pop_request()
    key = _park(app, task_id)
    assert "trace" not in persist.load(key).state
    published.clear()
    persist.resume(key, 1)
    assert [c.is_valid for c in published] == [False]  # the continuation starts no trace of its own


@pytest.mark.usefixtures("without_opentelemetry")
def test_without_opentelemetry_installed_nothing_is_added_or_started(app: Celery, published: list[trace.SpanContext]) -> None:
    persist = Persist(app)
    with TRACER.start_as_current_span("run/celery_persist.await_input") as parked:
        assert tracing.capture_context() is None
        key = _park(app, f"p-{uuid.uuid4().hex[:8]}")
    assert "trace" not in persist.load(key).state
    # A flow parked by a traced worker, resumed where opentelemetry is missing: sent untraced.
    ctx = parked.get_span_context()
    carrier = {"traceparent": f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-01"}
    with tracing.trace_resume(carrier, task_name="t", fingerprint="f"):
        assert trace.get_current_span() is trace.INVALID_SPAN


@pytest.mark.parametrize("carrier", [None, {}, "00-x", {"traceparent": "garbage"}, {"traceparent": f"00-{'0' * 32}-{'0' * 16}-01"}])
def test_a_missing_or_unusable_carrier_sends_untraced(carrier: Any) -> None:
    with tracing.trace_resume(carrier, task_name="t", fingerprint="f"):
        assert not trace.get_current_span().get_span_context().is_valid
