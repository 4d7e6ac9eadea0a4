"""The same park/resume flow with RabbitMQ as the broker (results stay on Redis)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from celery import chain

from celery_persist.persist import SUSPENDED
from tests.e2e.harness import Stack

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
