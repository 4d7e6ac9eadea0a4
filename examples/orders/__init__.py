"""An order waits for its payment event, then sleeps two days in the store before a reminder.

Run it: ``python -m examples.orders``. The Celery app, tasks and flow are in
:mod:`examples.orders.app`.
"""
