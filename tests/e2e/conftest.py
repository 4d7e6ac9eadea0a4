"""Fixtures for the end-to-end suite; the machinery lives in :mod:`tests.e2e.harness`."""

from __future__ import annotations

import socket
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.e2e.harness import (
    BACKEND_DB,
    BROKER_DB,
    RABBITMQ_URL,
    RECORD_DB,
    REDIS_URL,
    SESSION_NS,
    Stack,
    delete_namespace,
    missing,
    new_key,
    postgres_up,
    rabbitmq_up,
    redis_db,
    redis_up,
    store_for,
)

_label_counter = iter(range(1, 1_000_000))


@pytest.fixture(scope="session")
def make_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Stack]]:
    """Factory: ``make_stack(store="sqlite"|"postgresql", broker="redis"|"rabbitmq", **broker_options)``.

    Stacks live until the end of the session unless the caller closes them.
    """
    reason = redis_up()
    if reason:
        missing(reason)
    stacks: list[Stack] = []
    cleanups: list[Callable[[], None]] = []
    workdir = tmp_path_factory.mktemp("e2e")

    def make(
        store: str = "sqlite",
        broker: str = "redis",
        start: bool = True,
        loglevel: str = "INFO",
        encrypted: bool = True,
        store_url: str | None = None,
        timer_interval: float = 1,
        lease: float = 60,
        **broker_options: Any,
    ) -> Stack:
        if store == "postgresql" and (reason := postgres_up()):
            missing(reason)
        if broker == "rabbitmq" and (reason := rabbitmq_up()):
            missing(reason)
        label = f"{store}{next(_label_counter)}"
        ns = f"{SESSION_NS}-{label}"
        url, store_options, drop = store_for(store, label, workdir)
        if store_url is not None:  # a store of the test's own, e.g. a private server it restarts
            url, store_options, drop = store_url, {"prefix": ns.replace("-", "_")}, lambda: None
        cleanups.append(drop)
        if broker == "redis":
            broker_url = redis_db(REDIS_URL, BROKER_DB)
            broker_options = {"global_keyprefix": f"{ns}:", **broker_options}
        else:
            broker_url = RABBITMQ_URL
        config = {
            "label": label,
            "ns": ns,
            "broker": broker_url,
            "backend": redis_db(REDIS_URL, BACKEND_DB),
            "broker_options": broker_options,
            "queue": f"{ns}.q",
            "hostname": f"{ns}@{socket.gethostname()}",
            "record_url": redis_db(REDIS_URL, RECORD_DB),
            "store_url": url,
            "store_options": store_options,
            "keys": new_key() if encrypted else None,
            "secret": uuid.uuid4().hex if encrypted else None,
            "loglevel": loglevel,
            "timer_interval": timer_interval,
            "lease": lease,
        }
        stack = Stack(config, workdir)
        stacks.append(stack)
        if start:
            stack.start()
        return stack

    yield make

    # Every cleanup runs even if one fails; the first failure is reported.
    steps: list[Callable[[], None]] = [s.close for s in stacks]
    steps += [
        lambda: delete_namespace(redis_db(REDIS_URL, BROKER_DB), SESSION_NS),
        lambda: delete_namespace(redis_db(REDIS_URL, RECORD_DB), SESSION_NS),
    ]
    steps += cleanups
    errors: list[BaseException] = []
    for step in steps:
        try:
            step()
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)
    if errors:
        raise errors[0]


@pytest.fixture(scope="session", params=["sqlite", "postgresql"])
def stack(request: pytest.FixtureRequest, make_stack: Callable[..., Stack]) -> Iterator[Stack]:
    """The shared worker of the suite, once per store; tests isolate themselves by tag."""
    s = make_stack(store=request.param)
    yield s
    s.close()
