"""Many resumes at once: :func:`resume_many`, claims in batches.

:func:`celery_persist.flow.resume` reads, checks and claims one key with one
compare-and-set. :func:`resume_many` reads and checks a batch of keys the same
way and claims all that can be claimed with one
:meth:`~celery_persist.stores.base.BaseStore.transition_many`
(:meth:`~celery_persist.hub.PersistenceHub.claim_many`); then each winner is sent on
exactly as :func:`~celery_persist.flow.resume` sends it: dispatch recorded before
sending, continuation sent, claim completed. One bad key never stops the others:
its outcome is the error :func:`~celery_persist.flow.resume` would have raised.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, TypeAlias

from .errors import ConfigurationError, PersistenceError
from .flow import send_on
from .registry import Binding

if TYPE_CHECKING:
    from celery.result import AsyncResult

__all__ = ["Outcome", "resume_many", "BATCH"]

logger = logging.getLogger(__name__)

#: Keys claimed per ``transition_many``.
BATCH = 200

#: What :func:`resume_many` returns per key: the continuation's AsyncResult, None when
#: the flow goes on without one (an approval was recorded), or the error that key met.
Outcome: TypeAlias = "AsyncResult | Exception | None"


def resume_many(binding: Binding, items: Iterable[tuple[str, Any]], *, batch: int = BATCH) -> list[Outcome]:
    """Resume each ``(key, input)`` of ``items``; one outcome per item, in order.

    Keys are claimed ``batch`` at a time: one read per key, then one
    compare-and-set round trip for the whole batch (a suspension that waits for
    approvals or checks its input against a schema is claimed on its own, as
    :func:`~celery_persist.flow.resume` would). Each claimed flow is then sent on
    once: its dispatch is recorded, its continuation sent, its claim completed.

    Returns:
        Per item: the continuation's ``AsyncResult``; or the exception that key met
        (``InvalidKey``, ``SuspensionNotFound``, ``AlreadyResumed`` for a key resumed
        before or given twice, ``SuspensionExpired``, ``SuspensionCancelled``,
        ``InvalidInput``, a send that failed...). Nothing is raised for one key's sake.
    """
    if batch < 1:
        raise ConfigurationError(f"batch must be at least 1, not {batch!r}")
    hub = binding.ready()
    pairs = list(items)
    outcomes: list[Outcome] = []
    for start in range(0, len(pairs), batch):
        chunk = pairs[start : start + batch]
        try:
            claims = hub.claim_many([key for key, _ in chunk], [value for _, value in chunk])
        except PersistenceError as exc:  # the batch's read or compare-and-set failed (store down)
            outcomes.extend(exc for _ in chunk)
            continue
        for (key, _), claim in zip(chunk, claims, strict=True):
            if isinstance(claim, Exception):
                outcomes.append(claim)
                continue
            try:
                outcomes.append(send_on(binding, key, claim))
            except Exception as exc:  # noqa: BLE001 - the outcome of this key; the others go on
                outcomes.append(exc)
    return outcomes
