"""The example project; importing it loads the Celery app, as Django projects do."""

from .celery import app as celery_app

__all__ = ("celery_app",)
