"""Django settings for the example: only what the approval flow needs.

Every Celery setting is ``CELERY_<NAME>``, celery-persist's included
(``CELERY_PERSIST_STORE_URL`` is ``persist_store_url``). The usual
environment variables (``CELERY_BROKER_URL``, ``CELERY_RESULT_BACKEND``,
``CELERY_PERSIST_STORE_URL``) point it at another broker, backend or store.
"""

import os
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "example-only-not-secret")
DEBUG = False
ALLOWED_HOSTS = ["localhost", "127.0.0.1", "testserver"]
INSTALLED_APPS = ["approvals"]
MIDDLEWARE = ["django.middleware.common.CommonMiddleware"]
ROOT_URLCONF = "proj.urls"
DATABASES: dict[str, dict[str, str]] = {}
USE_TZ = True

CELERY_BROKER_URL = os.environ.get("CELERY_BROKER_URL", "redis://127.0.0.1:6379/0")
CELERY_RESULT_BACKEND = os.environ.get("CELERY_RESULT_BACKEND", CELERY_BROKER_URL)
CELERY_TASK_DEFAULT_QUEUE = os.environ.get("CELERY_PERSIST_EXAMPLE_QUEUE", "celery")
CELERY_PERSIST_STORE_URL = os.environ.get("CELERY_PERSIST_STORE_URL", f"sqlite:///{BASE_DIR / 'persist.db'}")
CELERY_PERSIST_STORE_OPTIONS = {"prefix": "expenses"}
CELERY_PERSIST_DEFAULT_TIMEOUT = 7 * 86400
