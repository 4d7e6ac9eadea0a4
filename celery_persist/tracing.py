"""OpenTelemetry trace context across a wait (``pip install 'celery-persist[otel]'``).

A parked flow is one trace, however long it waits. When a step parks,
:func:`capture_context` takes the W3C trace context (``traceparent``,
``tracestate``, and any baggage) of the span running it, and
:func:`celery_persist.flow.capture` keeps it in the flow's state: encrypted
and authenticated like the continuation, so a store writer can neither read
it nor graft a flow onto another trace. When the flow is resumed,
:func:`trace_resume` wraps the sending of the continuation in a
``resume/<parked task>`` span whose parent is the parked task's span; with
OpenTelemetry's Celery instrumentation in the resuming process, the
continuation's message carries that span as its parent, so the worker's
``run/<next task>`` span lands in the same trace as every step before the
wait. The span of whatever resumed (an HTTP request, the
``celery_persist.resume`` task, cleanup) is added to the resume span as a
link, so the resumer's own trace still points at the flow it continued.

Without ``opentelemetry-api`` installed, or with no span current when a step
parks (no instrumentation), nothing is stored and nothing is started. A span
that is valid but not recording (sampled out) is carried all the same: the
continuation then inherits that sampling decision, as any child would.

The optional import sits at module top rather than behind
``stores.drivers.require``: tracing is ambient and never required, so a
missing package means "off", not a configuration error.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

try:
    from opentelemetry import context as otel_context
    from opentelemetry import propagate, trace
except ImportError:  # the otel extra is not installed: tracing is off
    AVAILABLE = False
else:
    AVAILABLE = True

__all__ = ["AVAILABLE", "capture_context", "trace_resume"]

#: Attribute of the resume span naming the suspension (its fingerprint, never its key).
SUSPENSION_ATTRIBUTE = "celery_persist.suspension"


def capture_context() -> dict[str, str] | None:
    """The W3C trace context of the current span as a carrier dict, or None if there is none.

    Example:
        >>> capture_context()  # inside a traced task
        {'traceparent': '00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01'}
    """
    if not AVAILABLE or not trace.get_current_span().get_span_context().is_valid:
        return None
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier or None


@contextmanager
def trace_resume(carrier: object, *, task_name: str | None, fingerprint: str) -> Iterator[None]:
    """Run the body (the sending of a continuation) in a span of the trace ``carrier`` came from.

    ``carrier`` is what :func:`capture_context` returned when the flow parked
    (None, or anything that is not a carrier, runs the body untraced). The
    span is named ``resume/<task_name>``, is a child of the parked task's span,
    and links to the span current here (the resumer's), if any.
    """
    if not AVAILABLE or not isinstance(carrier, Mapping) or not carrier:
        yield
        return
    parked = propagate.extract({str(k): str(v) for k, v in carrier.items()})
    if not trace.get_current_span(parked).get_span_context().is_valid:
        yield
        return
    resumer = trace.get_current_span().get_span_context()
    links = [trace.Link(resumer)] if resumer.is_valid else None
    tracer = trace.get_tracer(__name__)
    # The parked context is attached, not only passed as the parent, so its baggage
    # travels on with the continuation too.
    token = otel_context.attach(parked)
    try:
        with tracer.start_as_current_span(
            f"resume/{task_name}", links=links, attributes={SUSPENSION_ATTRIBUTE: fingerprint, "celery.action": "resume"}
        ):
            yield
    finally:
        otel_context.detach(token)
