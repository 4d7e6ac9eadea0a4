"""The same park/resume flow with RabbitMQ as the broker (results stay on Redis)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from celery import Celery, chain

from celery_persist import ConfigurationError, Persist
from celery_persist.persist import SUSPENDED
from tests.e2e.harness import RABBITMQ_URL, Stack

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("store", ["postgresql"])
def test_park_and_resume_over_rabbitmq(make_stack: Callable[..., Stack], store: str) -> None:
    stack = make_stack(store=store, broker="rabbitmq")
    try:
        assert stack.app.connection_for_write().transport.driver_type == "amqp"
        tag = stack.tag()
        flow = chain(stack.sig("e2e.review", tag), stack.await_input(prompt="over amqp?", timeout=300), stack.sig("e2e.publish", tag=tag))
        res = flow.apply_async()
        key = stack.persist.suspension_key(res, timeout=20)
        awaiting = res.parent
        assert awaiting is not None and awaiting.state == SUSPENDED
        assert awaiting.info["prompt"] == "over amqp?"

        assert stack.persist.resume(key, {"via": "amqp"}).id == res.id
        assert res.get(timeout=20) == {"published": {"via": "amqp"}}
        assert stack.recorded(tag) == [{"via": "amqp"}]

        task = stack.sig("e2e.two_awaits", tag=f"{tag}:task").apply_async()
        stack.app.send_task("celery_persist.resume", args=[stack.persist.suspension_key(task, timeout=20), "one"])
        assert stack.wait_recorded(f"{tag}:task", 2)[1]["checkpoint"] is None
    finally:
        stack.close()


@pytest.mark.parametrize("configured_first", [False, True])
def test_the_rpc_result_backend_is_refused_with_a_reason(configured_first: bool) -> None:
    """RabbitMQ users often pick ``rpc://``; it cannot carry a parked step's states, so Persist(app) says so."""
    app = Celery("rpc-refused", broker=RABBITMQ_URL, backend="rpc://", set_as_current=False)
    if configured_first:
        assert app.conf.result_backend == "rpc://"  # configures the app
    with pytest.raises(ConfigurationError, match=r"rpc:// result backend.*PENDING"):
        Persist(app)
    late = Celery("rpc-late", broker=RABBITMQ_URL, set_as_current=False)
    persist = Persist(late)
    late.config_from_object({"result_backend": "rpc://"})
    with pytest.raises(ConfigurationError, match="rpc://"):
        persist.ready()
    app.close()
    late.close()
