"""Run :func:`celery_persist.web.create_app` under uvicorn: what ``celery persist serve`` does.

uvicorn's access log is off: its lines would hold the path of a resume link,
that is its token. The app logs its own line instead
(``celery_persist.web.access``, with the link's fingerprint), through
uvicorn's console handler.
"""

from __future__ import annotations

import copy
import logging
from typing import TYPE_CHECKING, Any

import uvicorn
from uvicorn.config import LOGGING_CONFIG

from ..persist import Persist
from .app import create_app

if TYPE_CHECKING:
    from celery import Celery

__all__ = ["serve", "log_config"]

logger = logging.getLogger(__name__)


def log_config() -> dict[str, Any]:
    """uvicorn's logging configuration, with celery-persist's loggers on its console handler."""
    config: dict[str, Any] = copy.deepcopy(LOGGING_CONFIG)
    config["loggers"]["celery_persist"] = {"handlers": ["default"], "level": "INFO", "propagate": False}
    return config


def serve(app: Celery, *, host: str = "127.0.0.1", port: int = 8080, base_path: str = "") -> None:
    """Serve ``app``'s inbox, resume links and API until interrupted.

    Raises:
        ConfigurationError: A bad setting (raised while binding the app).
        StoreUnavailable: The store cannot be reached at start.
    """
    persist = Persist.of(app)
    persist.ready()  # tables and indexes exist before the first request, and a dead store fails here
    config = uvicorn.Config(create_app(persist, base_path=base_path), host=host, port=port, access_log=False, log_config=log_config())
    # uvicorn.Config has configured logging: these lines reach its console handler.
    if not persist.config.web_tokens:
        logger.warning("celery-persist: persist_web_tokens is empty: the inbox and the API refuse every request; resume links work")
    uvicorn.Server(config).run()
