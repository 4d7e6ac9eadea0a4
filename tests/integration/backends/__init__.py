"""Registry of the stores the conformance suite runs against.

Each module in this package defines ``BACKENDS: list[Backend]``. The suite
(``tests/integration/test_store_contract.py``) runs once per backend. A backend
whose service is missing is skipped on a laptop and fails under ``CI=true``,
except those marked ``ci_required=False`` (real MongoDB / Neo4j servers that
only run when their URL variable is set).
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Backend:
    """How to reach one store for tests.

    Attributes:
        name: Test id, e.g. ``"postgres"``.
        url: Callable returning the store URL (may start a service; called lazily).
        options: Store options; ``prefix`` is added per test for isolation.
        available: Returns None when usable, else the reason it is not.
        ci_required: When True, unavailability fails the run under CI=true.
        cross_process: True when separate processes opening the URL share records.
        teardown: Called with a test's store after the test to remove what it
            wrote (drop its tables, remove its directory). None: the fixture
            deletes the test's records with scan + delete.
        corrupt: ``corrupt(store, key_hash, how)`` edits one stored record with the
            driver, below the store's API, so that it no longer decodes: ``how`` is
            ``"metadata"`` (metadata that is not JSON), ``"status"`` (the unknown
            status ``revived``) or ``"field"`` (a required field missing, or of the
            wrong type where the database cannot drop it). None: the store has no
            level below its API to edit, and the tests that need it skip.
    """

    name: str
    url: Callable[[], str]
    options: dict[str, Any] = field(default_factory=dict)
    available: Callable[[], str | None] = lambda: None
    ci_required: bool = True
    cross_process: bool = True
    teardown: Callable[[Any], None] | None = None
    corrupt: Callable[[Any, str, str], None] | None = None


#: What ``corrupt(..., "metadata")`` writes as the metadata: not JSON, and harmless to
#: every driver (FalkorDB takes only ``[A-Za-z0-9_.:/+=-]`` in the text it is sent).
BAD_METADATA = "not-json"
#: The unknown status ``corrupt(..., "status")`` writes.
BAD_STATUS = "revived"


def all_backends() -> list[Backend]:
    found: list[Backend] = []
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        found.extend(getattr(module, "BACKENDS", []))
    return found
