"""The Redis store for the conformance suite.

URL from ``CELERY_PERSIST_TEST_REDIS_URL`` (default: database 15 of the local
server). Every test gets its own ``prefix``; teardown deletes the keys under
that prefix only (records, blobs, indexes, layout marker). Nothing is flushed.
"""

from __future__ import annotations

import functools
import os
import re
from typing import Any

from celery_persist.stores import mask_url

from . import BAD_METADATA, BAD_STATUS, Backend

URL_ENV = "CELERY_PERSIST_TEST_REDIS_URL"
DEFAULT_URL = "redis://127.0.0.1:6379/15"


def redis_url() -> str:
    return os.environ.get(URL_ENV) or DEFAULT_URL


@functools.cache
def redis_unavailable() -> str | None:
    """None when the test server answers PING, else why not."""
    try:
        import redis
    except ImportError:
        return "redis-py is not installed (pip install 'celery-persist[redis]')"
    url = redis_url()
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2)
        try:
            client.ping()
        finally:
            client.close()
    except redis.RedisError as exc:
        return f"Redis at {mask_url(url)} is unreachable ({type(exc).__name__}); set {URL_ENV}"
    return None


def drop_prefix(store: Any) -> None:
    """Delete every key under the test store's prefix, and nothing else."""
    pattern = re.sub(r"([*?\[\]\\])", r"\\\1", "{" + store.prefix + "}") + ":*"
    client = store._connection().client
    keys = list(client.scan_iter(match=pattern, count=1000))
    for i in range(0, len(keys), 500):
        client.delete(*keys[i : i + 500])


def corrupt(store: Any, key_hash: str, how: str) -> None:
    """Edit the record's hash directly (its index entries stay as they were)."""
    client = store._connection().client
    key = "{" + store.prefix + "}:r:" + key_hash
    if how == "metadata":
        client.hset(key, "meta", BAD_METADATA)
    elif how == "status":
        client.hset(key, "status", BAD_STATUS)
    else:
        client.hdel(key, "created_at")


BACKENDS = [
    Backend("redis", url=redis_url, available=redis_unavailable, ci_required=True, teardown=drop_prefix, corrupt=corrupt),
]
