"""Entry point of the e2e worker subprocess: ``celery -A tests.e2e.worker_app worker``.

Kept apart from :mod:`tests.e2e.flows` so that importing the flows (in the test
process) builds nothing; only the worker builds an app at import time.
"""

from __future__ import annotations

from tests.e2e.flows import config_from_env, make_app

app = make_app(config_from_env())
