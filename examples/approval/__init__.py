"""Human approval of an expense: a chain parks on ``await_input`` until someone decides.

Run it: ``python -m examples.approval``. The Celery app is
:mod:`examples.approval.app` (what ``docker/docker-compose.yml`` runs), the
HTTP resume endpoint :mod:`examples.approval.webhook`.
"""
