"""Human approval of an expense: a chain parks on ``await_input`` until someone decides.

Run it: ``python -m examples.approval``. The Celery app is
:mod:`examples.approval.app` (what ``docker/docker-compose.yml`` runs); the
approver answers through ``celery -A examples.approval.app persist serve``
(a resume link), an operator through ``celery persist resume``.
"""
