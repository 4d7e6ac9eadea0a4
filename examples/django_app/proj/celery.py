"""The project's Celery app: settings come from Django's, with the ``CELERY_`` namespace.

``Persist(app)`` may come before or after ``config_from_object``: celery-persist
reads its ``persist_*`` settings (here ``CELERY_PERSIST_*``) when the app is
configured, not when it is bound.
"""

import os

from celery import Celery

from celery_persist import Persist

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "proj.settings")

app = Celery("proj")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
persist = Persist(app)
