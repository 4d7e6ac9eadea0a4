"""Fixtures for tests against real stores: one ``backend`` per registered store.

``backend`` is parametrized over :func:`tests.integration.backends.all_backends`
(ids = backend names, so ``-k postgres`` picks one). A backend whose service is
missing is skipped with the reason, except under ``CI=true`` where a
``ci_required`` backend fails the test instead: green in CI means it ran.

``store`` opens the backend's URL with a table/key/directory prefix unique to the
test, runs ``setup()``, and afterwards removes what the test wrote (the backend's
``teardown``, else scan + delete of the test's records) and closes the store.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from celery_persist.stores import BaseStore, open_store
from tests.integration.backends import Backend, all_backends

BACKENDS = all_backends()


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() == "true"


@pytest.fixture(params=BACKENDS, ids=[b.name for b in BACKENDS])
def backend(request: pytest.FixtureRequest) -> Backend:
    b: Backend = request.param
    reason = b.available()
    if reason is not None:
        if in_ci() and b.ci_required:
            pytest.fail(f"store backend {b.name!r} is required under CI=true but unavailable: {reason}")
        pytest.skip(f"store backend {b.name!r} unavailable: {reason}")
    return b


@pytest.fixture
def store_prefix() -> str:
    """Unique per test; valid as a SQL table prefix, key prefix and directory name."""
    return f"t{uuid.uuid4().hex[:12]}_"


@pytest.fixture
def store_options(backend: Backend, store_prefix: str) -> dict[str, Any]:
    """Everything :func:`open_store` needs besides the URL, prefix included."""
    return {**backend.options, "prefix": store_prefix}


@pytest.fixture
def store_url(backend: Backend) -> str:
    return backend.url()


def wipe(store: BaseStore) -> None:
    """Delete every record visible through ``store`` (its prefix only)."""
    while True:
        page = store.scan(limit=500)
        for rec in page.items:
            store.delete(rec.key_hash)
        if not page.items:
            return


@pytest.fixture
def open_test_store(backend: Backend, store_url: str, store_options: dict[str, Any]) -> Iterator[Callable[[], BaseStore]]:
    """Opens more stores on the test's URL and prefix (other clients of the same data); closes them after."""
    opened: list[BaseStore] = []

    def _open() -> BaseStore:
        s = open_store(store_url, **store_options)
        opened.append(s)
        return s

    yield _open
    for s in opened:
        s.close()


@pytest.fixture
def store(backend: Backend, store_url: str, store_options: dict[str, Any]) -> Iterator[BaseStore]:
    s = open_store(store_url, **store_options)
    try:
        s.setup()
    except BaseException:
        s.close()  # a leaked driver would warn from its finalizer in some later test
        raise
    try:
        yield s
    finally:
        try:
            if backend.teardown is not None:
                backend.teardown(s)
            else:
                wipe(s)
        finally:
            s.close()
