"""``open_store(url, **options)``: pick the store class from the URL scheme.

Lookup order: the whole scheme (``mongodb+srv``, ``postgresql+psycopg``) in the
table, then in the ``celery_persist.stores`` entry point group (third-party
stores), then the part before ``+`` in the table. The table maps schemes to ``"module:Class"`` strings so a
driver is imported only when its store is opened, and nothing registers at
import time. The URL is handed to the store (and its driver) unchanged.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any

from ..errors import ConfigurationError
from .base import KEEP, BaseStore, Kind, Page, Status, StoredRecord, TransitionSpec
from .drivers import mask_url

__all__ = ["open_store", "STORES", "BaseStore", "StoredRecord", "TransitionSpec", "Status", "Kind", "Page", "KEEP", "mask_url"]

_SQL = "celery_persist.stores.sql:SQLStore"
_NEO4J = "celery_persist.stores.neo4j:Neo4jStore"

#: Scheme -> "module:Class". Third-party stores use the entry point group instead.
STORES: dict[str, str] = {
    "memory": "celery_persist.stores.memory:MemoryStore",
    "file": "celery_persist.stores.filesystem:FileStore",
    "sqlite": _SQL,
    "postgresql": _SQL,
    "postgres": _SQL,
    "mysql": _SQL,
    "mariadb": _SQL,
    "redis": "celery_persist.stores.redis:RedisStore",
    "rediss": "celery_persist.stores.redis:RedisStore",
    "unix": "celery_persist.stores.redis:RedisStore",
    "redis+sentinel": "celery_persist.stores.redis:RedisStore",
    "mongodb": "celery_persist.stores.mongodb:MongoStore",
    "mongodb+srv": "celery_persist.stores.mongodb:MongoStore",
    "neo4j": _NEO4J,
    "neo4j+s": _NEO4J,
    "neo4j+ssc": _NEO4J,
    "bolt": _NEO4J,
    "bolt+s": _NEO4J,
    "bolt+ssc": _NEO4J,
}

ENTRY_POINT_GROUP = "celery_persist.stores"


def _resolve(scheme: str) -> str | None:
    # Whole scheme first, in our table then in third-party entry points, so a plugin's
    # "redis+cluster" is not shadowed by our "redis"; the part before "+" last.
    target = STORES.get(scheme)
    if target:
        return target
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == scheme:
            return str(ep.value)
    return STORES.get(scheme.partition("+")[0])


def store_class(url: str) -> type[BaseStore]:
    """The store class for ``url`` (imports its module, not its driver)."""
    scheme, sep, _ = url.partition("://")
    if not sep or not scheme:
        # Not echoed: without a scheme mask_url cannot find a password in it.
        raise ConfigurationError("store URL has no scheme (expected e.g. 'sqlite:///persist.db')")
    scheme = scheme.lower()
    target = _resolve(scheme)
    if target is None:
        known = sorted(set(STORES) | {ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)})
        close = difflib.get_close_matches(scheme, known, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else f" Known: {', '.join(known)}."
        raise ConfigurationError(f"unknown store scheme {scheme!r}.{hint}")
    module, _, attr = target.partition(":")
    cls: type[BaseStore] = getattr(importlib.import_module(module), attr)
    return cls


def open_store(url: str, **options: Any) -> BaseStore:
    """Open the store that ``url`` names.

    Args:
        url: ``sqlite:///path``, ``file:///dir``, ``memory://``, ``redis://...``,
            ``postgresql://...``, ``mysql://...``, ``mongodb://...``, ``neo4j://...``.
        **options: Store-specific options, e.g. ``prefix`` (namespace for keys,
            tables or collections) or ``chunk_size`` (Neo4j).

    Raises:
        ConfigurationError: Unknown scheme, bad option, or missing driver (the
            message names the extra to install).
    """
    factory: Callable[..., BaseStore] = store_class(url)
    try:
        inspect.signature(factory).bind(url, **options)
    except TypeError as exc:
        # Checked before the call, so a TypeError raised inside a store is not mistaken for a bad option.
        raise ConfigurationError(f"bad options for the {url.partition('://')[0]!r} store: {exc}") from None
    return factory(url, **options)
