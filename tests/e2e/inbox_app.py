"""The Celery app of the browser test: ``celery -A tests.e2e.inbox_app worker`` and ``... persist serve``.

Configured by the ``INBOX_E2E_CONFIG`` environment variable (JSON: ``broker``,
``backend``, ``ns``, ``queue``, ``store_url``, ``keys``, ``token``,
``base_url``), so the worker, the server and the test process build the same
app: Redis broker and results (the e2e databases, under the test's own
namespace), a SQLite store in the test's temp dir, and the inbox's bearer token.
The flows use only celery-persist's own tasks (``await_input``, then
``celery_persist.sleep`` with 0 seconds, which passes the answer on).
"""

from __future__ import annotations

import json
import os
from typing import Any

from celery import Celery

from celery_persist import Persist

CONFIG_ENV = "INBOX_E2E_CONFIG"


def make_app(config: dict[str, Any]) -> Celery:
    app = Celery(f"inbox-{config['ns']}", broker=config["broker"], backend=config["backend"], set_as_current=False)
    app.conf.update(
        task_default_queue=config["queue"],
        broker_transport_options={"global_keyprefix": f"{config['ns']}:"},
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        result_expires=3600,
        persist_store_url=config["store_url"],
        persist_keys=config["keys"],
        persist_encryption="required",
        persist_cleanup_interval=None,
        persist_web_tokens=[config["token"]],
        persist_web_base_url=config["base_url"],
    )
    Persist(app)
    return app


def __getattr__(name: str) -> Any:
    # `celery -A tests.e2e.inbox_app` asks for `app`; importing the module alone (the test) builds nothing.
    if name != "app":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    raw = os.environ.get(CONFIG_ENV)
    if not raw:
        raise RuntimeError(f"{CONFIG_ENV} is not set: the browser test configures this app")
    app = globals()["app"] = make_app(json.loads(raw))
    return app
