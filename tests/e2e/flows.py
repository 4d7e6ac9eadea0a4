"""The Celery app the end-to-end tests run: the same code builds it in the worker and in the test.

``make_app(config)`` builds a fresh app (with ``Persist(app)``) from a plain,
JSON-able config dict. The worker gets that dict in the ``E2E_CONFIG``
environment variable and builds its app in :mod:`tests.e2e.worker_app`; the
test process (and every helper process it spawns) calls ``make_app`` with the
same dict, so both sides agree on broker, backend, queue, store and keys.

Tasks record what they did into Redis lists under the session's namespace
(``record`` / ``recorded``), so a test can count executions across processes,
including work done by a worker the test killed.

Config keys: ``broker``, ``backend``, ``broker_options`` (transport options),
``queue``, ``hostname``, ``ns`` (namespace of the Redis records),
``record_url``, ``store_url``, ``store_options``, ``keys``, ``secret``.
"""

from __future__ import annotations

import json
import os
import threading
import time
from typing import Any

import redis
from celery import Celery

from celery_persist import Persist, PersistentTask

CONFIG_ENV = "E2E_CONFIG"

_clients: dict[tuple[int, str], redis.Redis] = {}
_clients_lock = threading.Lock()


def recorder(config: dict[str, Any]) -> redis.Redis:
    """A Redis client for the records, one per (process, URL): never shared across fork."""
    key = (os.getpid(), config["record_url"])
    with _clients_lock:
        client = _clients.get(key)
        if client is None:
            client = _clients[key] = redis.Redis.from_url(config["record_url"], decode_responses=True)
        return client


def record_key(config: dict[str, Any], tag: str) -> str:
    return f"{config['ns']}:rec:{tag}"


def record(config: dict[str, Any], tag: str, value: Any) -> None:
    recorder(config).rpush(record_key(config, tag), json.dumps(value))


def recorded(config: dict[str, Any], tag: str) -> list[Any]:
    return [json.loads(v) for v in recorder(config).lrange(record_key(config, tag), 0, -1)]


def make_app(config: dict[str, Any]) -> Celery:
    app = Celery(f"e2e-{config['ns']}", broker=config["broker"], backend=config["backend"], set_as_current=False)
    app.conf.update(
        task_default_queue=config["queue"],
        broker_transport_options=dict(config.get("broker_options") or {}),
        broker_connection_retry_on_startup=True,
        worker_prefetch_multiplier=1,
        task_track_started=True,
        task_send_sent_event=True,
        result_expires=3600,
        result_extended=True,
        persist_store_url=config["store_url"],
        persist_store_options=dict(config.get("store_options") or {}),
        persist_keys=config.get("keys"),
        persist_signing_secret=config.get("secret"),
        persist_encryption="required" if config.get("keys") else "off",
        # No beat in most stacks; the tests run cleanup themselves (in-process and as a task).
        # Stacks that start a beat (Stack.start_beat) get the timer entry every timer_interval s.
        persist_cleanup_interval=None,
        persist_timer_interval=config.get("timer_interval", 1),
        persist_task_aliases=config.get("aliases"),
        persist_lease=config.get("lease", 60),
    )
    # A deploy that renamed tasks: {"e2e.publish": "e2e.publish_v2"} registers publish under the new name.
    renamed = config.get("renamed") or {}

    # shared=False: a shared task is attached to every app created later, so the
    # next stack's app would run this stack's closures (wrong config, wrong Redis keys).
    @app.task(shared=False, name="e2e.review")
    def review(doc: Any) -> str:
        return f"reviewed:{doc}"

    @app.task(shared=False, name=renamed.get("e2e.publish", "e2e.publish"))
    def publish(value: Any, tag: str | None = None) -> dict[str, Any]:
        if tag:
            record(config, tag, value)
        return {"published": value}

    @app.task(shared=False, name="e2e.stamp")
    def stamp(value: Any, tag: str) -> Any:
        # When this step started, and with what: timer and event tests check both.
        record(config, tag, {"value": value, "at": time.time()})
        return value

    @app.task(shared=False, name="e2e.collect")
    def collect(values: list[Any], tag: str) -> list[Any]:
        record(config, tag, values)
        return values

    @app.task(shared=False, base=PersistentTask, bind=True, acks_late=True, name="e2e.task_waits")
    def task_waits(self: PersistentTask, tag: str, topic: str, key: str) -> dict[str, Any]:
        record(config, f"{tag}:runs", self.request.id)
        self.sleep(1.0)
        payload = self.await_event(topic, key=key, timeout=120)
        record(config, tag, {"payload": payload, "at": time.time()})
        return {"payload": payload}

    @app.task(shared=False, name="e2e.on_error")
    def on_error(task_id: str, tag: str) -> None:
        # Old-style errback (task id only): Celery sends it as a task to the worker.
        record(config, tag, task_id)

    @app.task(shared=False, name="e2e.notify")
    def notify(key: str, info: dict[str, Any], tag: str) -> None:
        record(config, tag, {"key": key, "prompt": info.get("prompt")})

    @app.task(shared=False, base=PersistentTask, bind=True, acks_late=True, name="e2e.two_awaits")
    def two_awaits(self: PersistentTask, tag: str) -> dict[str, Any]:
        record(config, tag, {"run": self.request.id, "checkpoint": self.checkpoint_state})
        first = self.await_input(prompt="first?", timeout=120)
        self.checkpoint({"first": first})
        second = self.await_input(prompt="second?", timeout=120)
        return {"first": first, "second": second, "task_id": self.request.id}

    @app.task(shared=False, base=PersistentTask, bind=True, acks_late=True, name="e2e.checkpoint_then_fail")
    def checkpoint_then_fail(self: PersistentTask, tag: str) -> None:
        self.checkpoint({"step": 1, "tag": tag})
        raise RuntimeError("failing on purpose after a checkpoint")

    @app.task(shared=False, base=PersistentTask, bind=True, acks_late=True, name="e2e.steps")
    def steps(self: PersistentTask, tag: str, total: int, block_after: int) -> dict[str, Any]:
        state = self.checkpoint_state or {"done": 0}
        record(config, f"{tag}:starts", {"done": state["done"], "pid": os.getpid(), "worker": os.getppid()})
        for i in range(state["done"], total):
            record(config, f"{tag}:ran", i)
            state = {"done": i + 1}
            self.checkpoint(state)
            if i + 1 == block_after:
                # Tell the test who we are, then hang until it kills us (bounded, in
                # case it never does: the test then fails on its own deadline).
                record(config, f"{tag}:blocked", os.getpid())
                recorder(config).blpop([record_key(config, f"{tag}:never")], timeout=60)
        return state

    Persist(app)
    return app


def config_from_env() -> dict[str, Any]:
    raw = os.environ.get(CONFIG_ENV)
    if not raw:
        raise RuntimeError(f"{CONFIG_ENV} is not set: the e2e worker app is configured by the test fixtures")
    config: dict[str, Any] = json.loads(raw)
    return config


def resume_every_key(config: dict[str, Any], worker: int, keys: list[str], barrier: Any, out: Any) -> None:
    """Body of one racing resumer process: resume every key, count wins and AlreadyResumed.

    Puts ``(worker, won_indexes, already_resumed, other_errors)`` on ``out``.
    """
    from celery_persist import AlreadyResumed

    won: list[int] = []
    already = 0
    errors: list[str] = []
    try:
        app = make_app(config)
        persist = Persist.of(app)
        persist.ready()  # open the store before the start line, so the race is on resume itself
        barrier.wait(timeout=60)
        for i, key in enumerate(keys):
            try:
                persist.resume(key, {"index": i, "worker": worker})
            except AlreadyResumed:
                already += 1
            else:
                won.append(i)
        app.close()
    except Exception as exc:  # noqa: BLE001 - reported to the test, which fails on any
        errors.append(f"{type(exc).__name__}: {exc}")
    out.put((worker, won, already, errors))


def resume_and_die(config: dict[str, Any], key: str, value: Any, at: str) -> None:
    """Body of a resumer process that SIGKILLs itself at one step of ``persist.resume``.

    ``at``: ``claimed`` (before the dispatch is recorded), ``recorded`` (before the
    continuation is sent) or ``sent`` (before the claim is completed).
    """
    import signal as _signal

    from celery_persist import flow as _flow
    from celery_persist.hub import PersistenceHub

    def die(*_: Any, **__: Any) -> Any:
        os.kill(os.getpid(), _signal.SIGKILL)

    app = make_app(config)
    persist = Persist.of(app)
    persist.ready()
    if at == "claimed":
        PersistenceHub.record_dispatch = die  # type: ignore[method-assign]
    elif at == "recorded":
        _flow.continue_flow = die
    elif at == "sent":
        PersistenceHub.complete = die  # type: ignore[method-assign]
    else:
        raise ValueError(at)
    persist.resume(key, value)
    raise AssertionError("the resumer was meant to die")  # pragma: no cover
