"""Many resumes at once: :func:`resume_many`, claims in batches.

:func:`celery_persist.flow.resume` reads, checks and claims one key with one
compare-and-set. :func:`resume_many` reads and checks a batch of keys the same
way and claims all that can be claimed with one
:meth:`~celery_persist.stores.base.BaseStore.transition_many`
(:meth:`~celery_persist.hub.PersistenceHub.claim_many`); then the winners are sent on
as :func:`~celery_persist.flow.resume` sends one, a batch at a time
(:func:`send_on_many`): dispatches recorded before sending (one store write),
continuations sent (one pipelined batch, on Redis), claims completed (one
compare-and-set round trip). One bad key never stops the others: its outcome is
the error :func:`~celery_persist.flow.resume` would have raised.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, TypeAlias

from .errors import AlreadyResumed, ConfigurationError, PersistenceError
from .flow import continue_flow, refuse_timer, sending_together
from .registry import Binding
from .retry import with_store_retry

if TYPE_CHECKING:
    from celery.result import AsyncResult

    from .hub import Suspension

__all__ = ["Outcome", "resume_many", "send_on_many", "BATCH"]

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
        claimed: list[tuple[str, Suspension]] = []
        at: list[int] = []
        for (key, _), claim in zip(chunk, claims, strict=True):
            outcomes.append(claim if isinstance(claim, Exception) else None)
            if not isinstance(claim, Exception):
                claimed.append((key, claim))
                at.append(len(outcomes) - 1)
        for i, outcome in zip(at, send_on_many(binding, claimed), strict=True):
            outcomes[i] = outcome
    return outcomes


def send_on_many(binding: Binding, claimed: Sequence[tuple[str, Suspension]]) -> list[Outcome]:
    """:func:`~celery_persist.flow.send_on` for many claims of this process, a few round trips in all.

    1. The dispatches are recorded in one store write (a key whose input cannot be
       recorded gets its claim back, as ``send_on`` does).
    2. The continuations go out inside :func:`~celery_persist.flow.sending_together`:
       one producer, pipelined where the transport can.
    3. Only once that has flushed are the claims completed, in one compare-and-set round
       trip (retried through a brief store outage).

    If the sending fails, nothing is completed: each claim stays with its dispatch
    recorded, and cleanup sends the same continuation after the lease (a worker runs
    one copy). Returns one outcome per claim, in order, as :func:`resume_many` does.
    """
    hub = binding.ready()
    outcomes: list[Outcome] = [None] * len(claimed)
    todo: list[tuple[int, str, Suspension, int]] = []
    for i, (key, suspension) in enumerate(claimed):
        token = suspension.claim_token
        if token is None:
            continue  # an approval was recorded; more are needed
        try:
            refuse_timer(hub, key, suspension, token)
        except Exception as exc:  # noqa: BLE001 - this key's outcome
            outcomes[i] = exc
            continue
        todo.append((i, key, suspension, token))
    if not todo:
        return outcomes
    try:
        tags = hub.record_dispatches([(key, s.input) for _, key, s, _ in todo])
    except Exception as exc:  # noqa: BLE001 - nothing recorded: every claim is given back
        for i, key, _, token in todo:
            _give_back(hub, key, token)
            outcomes[i] = exc
        return outcomes
    sent: list[tuple[int, str, Suspension, int]] = []
    try:
        with sending_together(binding):
            for (i, key, suspension, token), tag in zip(todo, tags, strict=True):
                if isinstance(tag, Exception):
                    _give_back(hub, key, token)
                    outcomes[i] = tag
                    continue
                try:
                    outcomes[i] = continue_flow(binding, suspension, suspension.input, delivery=tag)
                except Exception as exc:  # noqa: BLE001 - recorded: cleanup sends it after the lease
                    outcomes[i] = exc
                    continue
                sent.append((i, key, suspension, token))
    except Exception as exc:  # noqa: BLE001 - the batch did not go out: cleanup sends it after the lease
        logger.warning("celery-persist: sending %d continuations failed; cleanup sends them after the lease", len(sent), exc_info=True)
        for i, *_ in sent:
            outcomes[i] = exc
        return outcomes
    if not sent:
        return outcomes
    try:
        completed = with_store_retry(
            lambda: hub.complete_many([(key, token) for _, key, _, token in sent]), binding.config.store_retry, what="completing resumes"
        )
    except Exception as exc:  # noqa: BLE001 - sent but not completed: cleanup completes them after the lease
        for i, *_ in sent:
            outcomes[i] = exc
        return outcomes
    for (_, _, suspension, _), error in zip(sent, completed, strict=True):
        if isinstance(error, AlreadyResumed):
            # The lease lapsed while this resumer was slow and cleanup finished the dispatch.
            logger.info("celery-persist: suspension %s was completed by cleanup meanwhile", suspension.fingerprint)
        elif error is not None:
            logger.warning("celery-persist: could not complete the resume of suspension %s: %s", suspension.fingerprint, error)
    return outcomes


def _give_back(hub: Any, key: str, token: int) -> None:
    try:
        hub.release(key, token=token)
    except PersistenceError:  # left claimed: cleanup re-opens it after the lease
        logger.warning("celery-persist: could not give a claim back; cleanup re-opens it after the lease", exc_info=True)
