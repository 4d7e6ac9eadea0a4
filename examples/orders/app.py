"""The orders example's Celery app, tasks and flow.

This is what ``celery -A examples.orders.app worker`` and ``celery -A
examples.orders.app beat`` load (the example starts both); configuration
comes from the environment (see :mod:`examples._embedded`), plus:

==================================  ==============================================================
``ORDERS_REMINDER_SECONDS``         how long a paid order sleeps before its reminder (default 2
                                    days; ``python -m examples.orders`` sets 2 s unless given)
``ORDERS_PAYMENT_TIMEOUT_SECONDS``  how long an order waits for its payment (default 3600 s)
==================================  ==============================================================

Timers fire through the beat entry ``celery-persist-timers``, which runs
every ``persist_timer_interval`` seconds (0.5 here): a sleeping flow, or an
``await_event`` past its timeout, waits in the store, not in the broker.
"""

from __future__ import annotations

import os
import time
from datetime import datetime, timezone
from typing import Any

from celery import chain
from celery.canvas import Signature

from celery_persist import Persist, await_event, sleep
from examples._embedded import make_app

#: The topic the payment provider's webhook signals, with the order id as the key.
PAYMENT_SETTLED = "payment.settled"
ENV_REMINDER = "ORDERS_REMINDER_SECONDS"
ENV_PAYMENT_TIMEOUT = "ORDERS_PAYMENT_TIMEOUT_SECONDS"
DEFAULT_REMINDER_DELAY = 2 * 86400.0
DEFAULT_PAYMENT_TIMEOUT = 3600.0

app = make_app("orders")
app.conf.persist_timer_interval = 0.5  # the beat entry fires due timers twice a second
persist = Persist(app)


def reminder_delay() -> float:
    """Seconds between payment and reminder: ``ORDERS_REMINDER_SECONDS``, else two days."""
    return float(os.environ.get(ENV_REMINDER) or DEFAULT_REMINDER_DELAY)


def payment_timeout() -> float:
    """Seconds an order waits for its payment: ``ORDERS_PAYMENT_TIMEOUT_SECONDS``, else an hour."""
    return float(os.environ.get(ENV_PAYMENT_TIMEOUT) or DEFAULT_PAYMENT_TIMEOUT)


def order_flow(order: dict[str, Any], *, timeout: float | None = None) -> Signature:
    """Charge, wait for ``payment.settled`` on the order id (failing after ``timeout``), sleep, remind."""
    return chain(
        charge.s(order),
        await_event.s(PAYMENT_SETTLED, key=order["id"], timeout=timeout or payment_timeout(), on_timeout="fail"),
        sleep.s(seconds=reminder_delay()),
        remind.s(),
    )


@app.task(name="examples.orders.charge")
def charge(order: dict[str, Any]) -> dict[str, Any]:
    """Ask the payment provider to charge the order; it answers later, with a ``payment.settled`` event."""
    if order["amount"] <= 0:
        raise ValueError(f"order {order['id']}: the amount must be positive")
    return {"order_id": order["id"], "amount": round(order["amount"], 2), "charge": f"ch_{order['id'].lower()}"}


@app.task(name="examples.orders.remind")
def remind(payment: dict[str, Any]) -> dict[str, Any]:
    """Send the 'how was your order?' reminder; gets the payment event's payload (the sleep passes it on)."""
    now = time.time()
    return {
        "order_id": payment["order_id"],
        "message": f"reminder sent for order {payment['order_id']} (EUR {payment['amount']:.2f}, {payment['psp_reference']})",
        "at": datetime.fromtimestamp(now, tz=timezone.utc).isoformat(),
    }
