"""MongoDB backends: mongomock in-process (always), a real server when a URL is set.

``mongomock`` runs in this process only (``cross_process=False``: the claim race
uses threads, and the outage test has no server to lose). A real server runs
the whole suite, cross-process race included, when
``CELERY_PERSIST_TEST_MONGODB_URL`` is set (e.g. ``mongodb://127.0.0.1:27017/test``);
without it that backend is skipped, in CI too (there is no MongoDB server here).
Each test gets its own collection prefix; teardown drops that test's collections.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

from . import Backend

MONGODB_URL = os.environ.get("CELERY_PERSIST_TEST_MONGODB_URL", "")


def _driver(module: str) -> str | None:
    try:
        importlib.import_module(module)
    except ImportError:
        return f"{module!r} is not installed"
    return None


def _mongomock_available() -> str | None:
    return _driver("pymongo") or _driver("mongomock")


def _server_available() -> str | None:
    if not MONGODB_URL:
        return "CELERY_PERSIST_TEST_MONGODB_URL is not set (no MongoDB server on this machine)"
    return _driver("pymongo")


def drop_collections(store: Any) -> None:
    store.drop()


BACKENDS = [
    Backend(
        "mongomock",
        url=lambda: "mongomock://contract/celery_persist_test",
        available=_mongomock_available,
        cross_process=False,
        teardown=drop_collections,
    ),
    Backend(
        "mongodb",
        url=lambda: MONGODB_URL,
        available=_server_available,
        ci_required=False,
        teardown=drop_collections,
    ),
]
