"""One trace across a wait: OpenTelemetry's Celery instrumentation, a real worker, real Redis and store.

The worker runs in this process (Celery's embedded ``start_worker``, consuming
the stack's own queue on the real Redis broker, results in Redis, the store in
SQLite), so the SDK's in-memory exporter sees the spans of both sides: the test
publishing and resuming, the worker running every step. The resume happens
under a span of its own (an HTTP request, say), in another trace.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from celery import chain
from celery.contrib.testing.worker import start_worker
from opentelemetry import trace
from opentelemetry.instrumentation.celery import CeleryInstrumentor
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tests.e2e.harness import Stack, wait_for

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def exporter() -> Iterator[InMemorySpanExporter]:
    """Every span this process ends, with the Celery instrumentation on for the module."""
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        # The global provider can be set once per process; a later module reuses it.
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    spans = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    instrumentor = CeleryInstrumentor()
    instrumentor.instrument(tracer_provider=provider)
    try:
        yield spans
    finally:
        instrumentor.uninstrument()
        spans.shutdown()  # the processor stays on the provider but keeps nothing more


@pytest.fixture(scope="module")
def traced(make_stack: Callable[..., Stack], exporter: InMemorySpanExporter) -> Iterator[Stack]:
    """A stack whose worker runs in this process, instrumented."""
    stack = make_stack(store="sqlite", start=False)
    with start_worker(stack.app, pool="solo", perform_ping_check=False, queues=[stack.config["queue"]], hostname=stack.config["hostname"]):
        yield stack


@pytest.fixture
def spans(exporter: InMemorySpanExporter) -> InMemorySpanExporter:
    exporter.clear()
    return exporter


def _named(spans: InMemorySpanExporter, name: str, count: int = 1) -> list[ReadableSpan]:
    """The ended spans called ``name``, once there are ``count`` (a run span ends after its result is stored)."""

    def found() -> list[ReadableSpan] | None:
        named = [s for s in spans.get_finished_spans() if s.name == name]
        return named if len(named) >= count else None

    result: list[ReadableSpan] = wait_for(found, 20, f"{count} span(s) {name!r}")
    return result


def _ancestors(span: ReadableSpan, spans: InMemorySpanExporter) -> list[ReadableSpan]:
    """``span``'s parents, nearest first."""
    by_id = {s.context.span_id: s for s in spans.get_finished_spans() if s.context is not None}
    found: list[ReadableSpan] = []
    parent = span.parent
    while parent is not None and parent.span_id in by_id:
        found.append(by_id[parent.span_id])
        parent = found[-1].parent
    return found


def _trace_id(span: ReadableSpan) -> int:
    assert span.context is not None
    return span.context.trace_id


def test_a_chain_resumed_after_its_wait_is_one_trace(traced: Stack, spans: InMemorySpanExporter) -> None:
    tag = traced.tag()
    flow = chain(traced.sig("e2e.review", "doc-1"), traced.await_input(prompt="ok?", timeout=120), traced.sig("e2e.publish", tag=tag))
    res = flow.apply_async()
    key = traced.persist.suspension_key(res, timeout=20)
    (parked,) = _named(spans, "run/celery_persist.await_input")

    tracer = trace.get_tracer("tests.e2e")
    with tracer.start_as_current_span("POST /approve") as resumer:
        traced.persist.resume(key, {"approved": True})
    assert res.get(timeout=20) == {"published": {"approved": True}}

    (review,) = _named(spans, "run/e2e.review")
    (resumed,) = _named(spans, "resume/celery_persist.await_input")
    (publish,) = _named(spans, "run/e2e.publish")
    flow_trace = _trace_id(review)
    assert {_trace_id(s) for s in (parked, resumed, publish)} == {flow_trace}
    # The step after the wait descends from the parked step, through the resume span.
    ancestors = [s.name for s in _ancestors(publish, spans)]
    assert ancestors[: ancestors.index("run/celery_persist.await_input") + 1] == [
        "apply_async/e2e.publish",
        "resume/celery_persist.await_input",
        "run/celery_persist.await_input",
    ]
    assert "run/e2e.review" in ancestors
    # The resumer's trace stays its own, and the resume span links to it.
    assert resumer.get_span_context().trace_id != flow_trace
    assert [link.context for link in resumed.links] == [resumer.get_span_context()]
    assert resumed.attributes is not None and resumed.attributes["celery_persist.suspension"] == traced.persist.load(key).fingerprint


def test_a_persistent_task_re_runs_in_the_trace_of_its_first_run(traced: Stack, spans: InMemorySpanExporter) -> None:
    tag = traced.tag()
    res = traced.sig("e2e.two_awaits", tag).apply_async()
    for value in ("one", "two"):
        key = traced.persist.suspension_key(res, timeout=20)
        traced.persist.resume(key, value)
    result: dict[str, Any] = res.get(timeout=20)
    assert result["second"] == "two"

    runs = _named(spans, "run/e2e.two_awaits", count=3)
    resumes = _named(spans, "resume/e2e.two_awaits", count=2)
    assert len({_trace_id(s) for s in [*runs, *resumes]}) == 1
    ordered = sorted(runs, key=lambda s: s.start_time or 0)
    for parked, rerun in zip(ordered, ordered[1:], strict=False):
        # Each re-run descends from the run that parked before it, through a resume span.
        above = _ancestors(rerun, spans)
        assert [s.name for s in above[:3]] == ["apply_async/e2e.two_awaits", "resume/e2e.two_awaits", "run/e2e.two_awaits"]
        assert above[2].context == parked.context
