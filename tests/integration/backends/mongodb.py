"""MongoDB backends: mongomock in-process (always), a real server when a URL is set.

``mongomock`` is a client object, not a server: the store gets it as its
``client`` option (:class:`LockedMongomock`, so that concurrent calls behave as
a server's per-document atomic writes do) with ``bulk=False`` (mongomock's
``bulk_write`` rejects the ``sort`` pymongo >= 4.9 gives ``ReplaceOne``). It
lives in this process only, so the backend is ``cross_process=False``: the claim
race runs in threads, the fork test checks only that a child can use its copy,
and the outage test is skipped (there is no server to lose). A real server runs
the whole suite, cross-process race included, when
``CELERY_PERSIST_TEST_MONGODB_URL`` is set (e.g. ``mongodb://127.0.0.1:27017/test``);
without it that backend is skipped, in CI too (there is no MongoDB server here).
Each test gets its own collection prefix; teardown drops that test's collections.
"""

from __future__ import annotations

import functools
import importlib
import os
import threading
import weakref
from collections.abc import Iterator
from typing import Any

from . import BAD_METADATA, BAD_STATUS, Backend

MONGODB_URL = os.environ.get("CELERY_PERSIST_TEST_MONGODB_URL", "")
#: The URL a mongomock-backed store is opened with: only its path (the database) is used.
MONGOMOCK_URL = "mongodb://mongomock/celery_persist_test"

_GUARDS: weakref.WeakSet[_Guard] = weakref.WeakSet()


class _Guard:
    """The lock of one mongomock "server"; re-made in a forked child, where a thread
    of the parent may have held it at fork() and would never release it."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        _GUARDS.add(self)


def _reset_guards() -> None:
    for guard in list(_GUARDS):
        guard.lock = threading.RLock()


os.register_at_fork(after_in_child=_reset_guards)


class _Locked:
    """A mongomock client, database, collection or cursor whose calls hold ``guard.lock``.

    What a call returns is wrapped too, and a cursor is read out under the lock.
    """

    def __init__(self, target: Any, guard: _Guard) -> None:
        self._target = target
        self._guard = guard

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._target, name)
        if _wrappable(value):
            return _Locked(value, self._guard)
        if not callable(value):
            return value

        @functools.wraps(value)
        def locked(*args: Any, **kwargs: Any) -> Any:
            with self._guard.lock:
                result = value(*args, **kwargs)
            return _Locked(result, self._guard) if _wrappable(result) else result

        return locked

    def __getitem__(self, name: str) -> _Locked:
        with self._guard.lock:
            return _Locked(self._target[name], self._guard)

    def __iter__(self) -> Iterator[Any]:
        with self._guard.lock:
            items = list(self._target)
        return iter(items)


def _wrappable(value: Any) -> bool:
    return isinstance(value, _mongomock_types())


@functools.cache
def _mongomock_types() -> tuple[type, ...]:
    # Imported here: mongomock is optional, and checked by the backend's available().
    import mongomock
    from mongomock.collection import Cursor

    return (mongomock.Database, mongomock.Collection, Cursor)


class LockedMongomock(_Locked):
    """One in-process mongomock "server": stores given the same instance share its data.

    mongomock has no locks, so two threads could both match one
    ``find_one_and_update``; a MongoDB server applies each write to a document
    atomically, and the store's compare-and-set relies on that. Every call through
    this client (and its databases, collections and cursors) holds one lock, which
    gives at least that. The mongomock client is made on first use, so building
    one (at import, as a backend option) needs no mongomock.
    """

    def __init__(self) -> None:
        super().__init__(None, _Guard())

    def _ensure(self) -> None:
        with self._guard.lock:
            if self._target is None:
                # Imported here: mongomock is optional (see _mongomock_types).
                import mongomock

                self._target = mongomock.MongoClient()

    def __getattr__(self, name: str) -> Any:
        self._ensure()
        return super().__getattr__(name)

    def __getitem__(self, name: str) -> _Locked:
        self._ensure()
        return super().__getitem__(name)


def mongomock_store_options(**options: Any) -> dict[str, Any]:
    """Options that open the store on a fresh in-process mongomock server (plus ``options``)."""
    return {"client": LockedMongomock(), "bulk": False, **options}


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


def corrupt(store: Any, key_hash: str, how: str) -> None:
    """One update_one of the record document."""
    records, _ = store._collections()
    update = {
        "metadata": {"$set": {"metadata": BAD_METADATA}},
        "status": {"$set": {"status": BAD_STATUS}},
        "field": {"$unset": {"created_at": ""}},
    }[how]
    records.update_one({"_id": key_hash}, update)


BACKENDS = [
    Backend(
        "mongomock",
        url=lambda: MONGOMOCK_URL,
        options=mongomock_store_options(),
        available=_mongomock_available,
        cross_process=False,
        teardown=drop_collections,
        corrupt=corrupt,
    ),
    Backend(
        "mongodb",
        url=lambda: MONGODB_URL,
        available=_server_available,
        ci_required=False,
        teardown=drop_collections,
        corrupt=corrupt,
    ),
]
