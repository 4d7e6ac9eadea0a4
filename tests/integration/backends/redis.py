"""The Redis store for the conformance suite.

URL from ``CELERY_PERSIST_TEST_REDIS_URL`` (default: database 15 of the local
server). Every test gets its own ``prefix``; teardown deletes the keys under
that prefix only (records, blobs, indexes, layout marker). Nothing is flushed.

``redis-cluster`` runs the same suite against a real Redis Cluster of 3 masters
that the session starts on loopback ports (``tests/integration/redis_cluster.py``,
once, stopped at exit), through a ``redis+cluster://`` URL naming every node; or
against ``CELERY_PERSIST_TEST_REDIS_CLUSTER_URL`` when set. Without
``redis-server`` / ``redis-cli`` it is skipped, and fails under ``CI=true``.
"""

from __future__ import annotations

import atexit
import functools
import os
import re
from typing import Any

from celery_persist.stores import mask_url

from . import BAD_METADATA, BAD_STATUS, Backend

URL_ENV = "CELERY_PERSIST_TEST_REDIS_URL"
DEFAULT_URL = "redis://127.0.0.1:6379/15"
CLUSTER_URL_ENV = "CELERY_PERSIST_TEST_REDIS_CLUSTER_URL"


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


@functools.cache
def redis_cluster() -> Any:
    """The session's 3-master cluster (started on first use, stopped at exit); None when the URL is given."""
    if os.environ.get(CLUSTER_URL_ENV):
        return None
    from tests.integration.redis_cluster import LocalRedisCluster

    cluster = LocalRedisCluster(masters=3)
    atexit.register(cluster.stop)
    return cluster.start()


def redis_cluster_url() -> str:
    cluster = redis_cluster()
    return os.environ.get(CLUSTER_URL_ENV, "") if cluster is None else str(cluster.url)


@functools.cache
def redis_cluster_unavailable() -> str | None:
    if not os.environ.get(CLUSTER_URL_ENV):
        from tests.integration.redis_cluster import cluster_unavailable

        reason = cluster_unavailable()
        if reason is not None:
            return f"{reason}; or set {CLUSTER_URL_ENV}"
    try:
        redis_cluster_url()
    except Exception as exc:  # noqa: BLE001 - reported as the skip/fail reason
        return f"the local Redis Cluster did not start: {exc}"
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
    Backend(
        "redis-cluster",
        url=redis_cluster_url,
        available=redis_cluster_unavailable,
        ci_required=True,
        teardown=drop_prefix,
        corrupt=corrupt,
    ),
]
