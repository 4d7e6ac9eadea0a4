"""The Celery app the benchmark's worker runs: ``celery -A benchmarks.celery_app worker``.

Configuration comes from the environment, set by :mod:`benchmarks.celery_bench`
for both the worker subprocess and the measuring process:

* ``CP_BENCH_REDIS_URL``: broker and result backend (db 12 by default);
* ``CP_BENCH_NS``: namespace: the queue name and the Redis ``global_keyprefix``
  of broker and backend keys, so teardown deletes exactly this run's keys;
* ``CP_BENCH_STORE_URL`` / ``CP_BENCH_STORE_PREFIX``: the celery-persist store;
* ``CELERY_PERSIST_KEYS``: the run's random encryption key.

Tasks: ``noop`` (returns its argument) and ``stamp``, which records
``time.time()`` into a Redis list the moment it starts, so the measuring
process can tell when the step after a resume began.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import redis
from celery import Celery

from celery_persist import Persist

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/12"


def redis_url() -> str:
    return os.environ.get("CP_BENCH_REDIS_URL", DEFAULT_REDIS_URL)


def namespace() -> str:
    return os.environ.get("CP_BENCH_NS", "cp-bench")


def stamps_key(run: str) -> str:
    return f"{namespace()}:stamps:{run}"


def make_app() -> Celery:
    """An app configured from the environment as it is now (each call reads it again)."""
    url, ns = redis_url(), namespace()
    app = Celery("cp_bench", broker=url, backend=url, set_as_current=False)
    app.conf.update(
        task_default_queue=ns,
        broker_transport_options={"global_keyprefix": f"{ns}:"},
        result_backend_transport_options={"global_keyprefix": f"{ns}:"},
        result_expires=3600,
        worker_enable_remote_control=False,
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True,
        persist_store_url=os.environ.get("CP_BENCH_STORE_URL", "sqlite:////tmp/cp-bench.db"),
        persist_store_options={"prefix": os.environ["CP_BENCH_STORE_PREFIX"]} if os.environ.get("CP_BENCH_STORE_PREFIX") else {},
        persist_cleanup_interval=0,
    )
    return app


app = make_app()
persist = Persist(app)

_client: tuple[int, redis.Redis] | None = None


def _redis() -> redis.Redis:
    # One client per process: prefork children must not share the parent's socket.
    global _client
    if _client is None or _client[0] != os.getpid():
        _client = (os.getpid(), redis.Redis.from_url(redis_url()))
    return _client[1]


@app.task(name="cp_bench.noop")
def noop(value: Any = None) -> Any:
    return value


@app.task(name="cp_bench.stamp")
def stamp(value: Any, run: str, flow: int) -> Any:
    started = time.time()
    _redis().rpush(stamps_key(run), json.dumps([flow, started]))
    return value
