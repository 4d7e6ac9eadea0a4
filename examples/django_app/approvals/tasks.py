"""The approval flow: check an expense, wait for a person, book it."""

from typing import Any

from celery import chain, shared_task

from celery_persist import await_input


@shared_task
def check_expense(expense: dict[str, Any]) -> dict[str, Any]:
    return {**expense, "checked": True}


@shared_task
def book_expense(decision: dict[str, Any], expense_id: int) -> str:
    verdict = "booked" if decision.get("approved") else "rejected"
    return f"expense #{expense_id} {verdict} by {decision.get('by', 'someone')}"


def approval_flow(expense: dict[str, Any]) -> Any:
    """check -> wait for a person (at most a week) -> book."""
    return chain(
        check_expense.s(expense),
        await_input.s(prompt=f"Approve expense #{expense['id']}?"),
        book_expense.s(expense_id=expense["id"]),
    )
