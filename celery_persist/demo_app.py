"""The demo's worker app: ``celery -A celery_persist.demo_app worker``, started by ``celery-persist demo``.

Kept apart from :mod:`celery_persist.demo` because importing it builds the
app (and its SQLite store) in ``CELERY_PERSIST_DEMO_DIR``.
"""

from __future__ import annotations

from .demo import directory, make_app

__all__ = ["app"]

app = make_app(directory())
