"""Two endpoints: start an approval flow, and resume one with the key a person was given.

The suspension key is a capability: whoever holds it can resume the flow, so
the resume endpoint takes it in the body, never in the URL (URLs land in logs).
"""

import json
from typing import Any

from django.http import HttpRequest, JsonResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_POST
from proj.celery import app

from celery_persist import (
    AlreadyResumed,
    InvalidKey,
    Persist,
    SuspensionCancelled,
    SuspensionExpired,
    SuspensionNotFound,
)

from .tasks import approval_flow

_STATUS = {InvalidKey: 400, SuspensionNotFound: 404, AlreadyResumed: 409, SuspensionExpired: 410, SuspensionCancelled: 410}


def _body(request: HttpRequest) -> Any:
    try:
        return json.loads(request.body or b"null")
    except ValueError:
        return None


@csrf_exempt  # an API called with a key, not a browser form
@require_POST
def submit_expense(request: HttpRequest) -> JsonResponse:
    expense = _body(request)
    if not isinstance(expense, dict) or not isinstance(expense.get("id"), int):
        return JsonResponse({"error": "send a JSON object with an integer id"}, status=400)
    result = approval_flow(expense).apply_async()
    # The await_input step's id: its result-backend state (SUSPENDED) carries the key, sealed.
    # Production flows hand the key to a person with await_input's notify= instead.
    return JsonResponse({"task_id": result.id, "approval_task_id": result.parent.id}, status=202)


@csrf_exempt
@require_POST
def resume(request: HttpRequest) -> JsonResponse:
    body = _body(request)
    if not isinstance(body, dict) or not isinstance(body.get("key"), str):
        return JsonResponse({"error": "send a JSON object with the suspension key"}, status=400)
    try:
        continuation = Persist.of(app).resume(body["key"], body.get("input"))
    except tuple(_STATUS) as exc:
        return JsonResponse({"error": type(exc).__name__}, status=_STATUS[type(exc)])
    return JsonResponse({"task_id": continuation.id}, status=202)
