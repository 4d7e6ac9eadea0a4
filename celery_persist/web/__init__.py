"""``celery persist serve``: the inbox, resume links and the JSON API over Starlette (extra ``web``).

``create_app(persist, *, tokens=None, base_path="")`` returns the ASGI app
(:mod:`celery_persist.web.app`); run it with any ASGI server or mount it in
a FastAPI, Starlette or Django ASGI service.

The app is loaded on first use of ``create_app``, through importlib: the
``celery`` command imports :mod:`celery_persist.cli` for every app, which
imports :mod:`celery_persist.web.cli` and so runs this module, where neither
Starlette (an optional extra) nor the Celery layer (importing it registers the
shared tasks) may be imported. This is the one lazy import of the package,
like the package ``__init__``'s.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .app import create_app

__all__ = ["create_app"]


def __getattr__(name: str) -> Any:
    if name != "create_app":
        raise AttributeError(f"module 'celery_persist.web' has no attribute {name!r}")
    value = importlib.import_module(".app", __name__).create_app
    globals()[name] = value
    return value
