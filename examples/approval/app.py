"""The approval example's Celery app and tasks.

This is what ``celery -A examples.approval.app worker`` loads, in the
example's own worker subprocess and in the ``worker``, ``beat`` and ``flower``
services of ``docker/docker-compose.yml``; configuration comes from the
environment (see :mod:`examples._embedded`).
"""

from __future__ import annotations

from typing import Any

from celery_persist import Persist
from examples._embedded import make_app

app = make_app("approval")
persist = Persist(app)


@app.task(name="examples.approval.prepare")
def prepare(expense_id: int, amount: float, submitter: str) -> dict[str, Any]:
    """Check the expense and hand it to the approver (the result travels with the parked flow)."""
    if amount <= 0:
        raise ValueError(f"expense #{expense_id}: the amount must be positive")
    return {"expense_id": expense_id, "amount": round(amount, 2), "submitter": submitter}


@app.task(name="examples.approval.book")
def book(decision: dict[str, Any]) -> str:
    """Book or reject; gets ``{"previous": <prepare's result>, "input": <the approver's answer>}``."""
    expense, answer = decision["previous"], decision["input"] or {}
    head = f"expense #{expense['expense_id']} (EUR {expense['amount']:.2f}, by {expense['submitter']})"
    if answer.get("approved"):
        return f"{head} booked, approved by {answer.get('by', '?')}"
    return f"{head} rejected by {answer.get('by', '?')}: {answer.get('reason', 'no reason given')}"
