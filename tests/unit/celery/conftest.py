"""Fixtures for the Celery-layer unit tests: an app on the in-memory broker, nothing current."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from celery import Celery
from celery.contrib.testing.app import Trap, set_trap


@pytest.fixture
def app(tmp_path: Path) -> Iterator[Celery]:
    """A fresh app whose store is SQLite in a temp dir; ``current_app`` is a trap."""
    test_app = Celery("persist-unit", broker="memory://", backend="cache+memory://", set_as_current=False)
    test_app.conf.persist_store_url = f"sqlite:///{tmp_path / 'persist.db'}"
    with set_trap(test_app):
        yield test_app
    test_app.close()


__all__ = ["Trap"]
