"""The flow under test: an expense is submitted, waits for a person's decision, then is booked.

Tasks are ``@shared_task`` so they run on whichever app the worker serves:
the production app, and in tests the plugin's ``persist_app``.
"""

from __future__ import annotations

from typing import Any

from celery import chain, shared_task
from celery.canvas import Signature

from celery_persist import await_input


@shared_task(name="expenses.submit")
def submit(expense_id: int, amount: float) -> dict[str, Any]:
    """Check the expense and hand it to the approver."""
    if amount <= 0:
        raise ValueError(f"expense #{expense_id}: amount must be positive")
    return {"id": expense_id, "amount": amount}


@shared_task(name="expenses.book")
def book(decision: dict[str, Any]) -> str:
    """Book or reject the expense, given ``{"previous": <expense>, "input": <decision>}``."""
    expense, answer = decision["previous"], decision["input"]
    if not answer.get("approved"):
        return f"expense #{expense['id']} rejected by {answer['by']}"
    return f"expense #{expense['id']} (EUR {expense['amount']:.2f}) booked, approved by {answer['by']}"


def approval_flow(expense_id: int, amount: float, timeout: float = 86400) -> Signature:
    """submit -> wait for a decision (at most ``timeout`` seconds) -> book."""
    return chain(
        submit.s(expense_id, amount),
        await_input.s(prompt=f"Approve expense #{expense_id} (EUR {amount:.2f})?", timeout=timeout, include_previous=True),
        book.s(),
    )
