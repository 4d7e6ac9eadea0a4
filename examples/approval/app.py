"""The approval example's Celery app and tasks.

This is what ``celery -A examples.approval.app worker`` loads, in the
example's own worker subprocess and in the ``worker``, ``beat`` and ``flower``
services of ``docker/docker-compose.yml``, and what
``celery -A examples.approval.app persist serve`` serves; configuration comes
from the environment (see :mod:`examples._embedded`). The inbox server's
bearer tokens and public address come from ``CELERY_PERSIST_WEB_TOKENS``
(comma-separated) and ``CELERY_PERSIST_WEB_BASE_URL``, which
``python -m examples.approval`` sets for the server it starts.
"""

from __future__ import annotations

import os
from typing import Any

from celery_persist import Persist
from examples._embedded import make_app

app = make_app("approval")
if os.environ.get("CELERY_PERSIST_WEB_TOKENS"):
    app.conf.persist_web_tokens = os.environ["CELERY_PERSIST_WEB_TOKENS"]
if os.environ.get("CELERY_PERSIST_WEB_BASE_URL"):
    app.conf.persist_web_base_url = os.environ["CELERY_PERSIST_WEB_BASE_URL"]
persist = Persist(app)

#: What the approver answers (the inbox and link pages build their form from it; resumes are checked against it).
DECISION: dict[str, Any] = {
    "type": "object",
    "properties": {
        "approved": {"type": "boolean"},
        "by": {"type": "string", "minLength": 1, "maxLength": 64, "description": "who decides"},
        "reason": {"type": "string", "maxLength": 200},
    },
    "required": ["approved", "by"],
    "x-order": ["approved", "by", "reason"],
}


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
