"""Shared pytest configuration for every test tier.

Kept free of Celery on purpose: the library-layer unit tests must run without
an app. Library fixtures live in ``tests/unit/conftest.py``; Celery fixtures
(app, worker) belong here once the Celery layer has its tests.
"""
