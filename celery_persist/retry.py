"""Riding out a brief store outage: retry :class:`~celery_persist.errors.StoreUnavailable` with backoff.

A PostgreSQL restart or a Redis failover takes the store away for a few
seconds. A park, a checkpoint or the completion of a resume that fails on the
first connection error would fail the chain for good, so those calls go
through :func:`with_store_retry`, for up to ``persist_store_retry`` seconds.
Only ``StoreUnavailable`` is retried: it is the one error class that says
"try again" (STYLE.md); everything else is a real answer.

The calls retried must be safe to repeat: every one here is (a park finds its
own earlier write, a checkpoint is a whole-record upsert, a completion
recognises its own earlier success).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

from .errors import StoreUnavailable

__all__ = ["with_store_retry"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

_FIRST_PAUSE = 0.1
_LONGEST_PAUSE = 5.0


def with_store_retry(
    call: Callable[[], T],
    budget: float,
    *,
    what: str,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> T:
    """``call()``, tried again while it raises StoreUnavailable and ``budget`` seconds last.

    Pauses double from 0.1 s up to 5 s between tries, and never sleep past the budget.

    Args:
        call: What to do; must be safe to repeat.
        budget: Seconds to keep trying (0: one try).
        what: Named in the log line of each retry (never a key or a state).
        sleep, clock: Replaced by tests.

    Raises:
        StoreUnavailable: The store was still down when the budget ran out (the last error).
    """
    deadline = clock() + max(budget, 0.0)
    pause = _FIRST_PAUSE
    while True:
        try:
            return call()
        except StoreUnavailable as exc:
            left = deadline - clock()
            if left <= 0:
                raise
            logger.warning("celery-persist: store unavailable during %s (%s); retrying for %.0f s more", what, exc, left)
            sleep(min(pause, left))
            pause = min(pause * 2, _LONGEST_PAUSE)
