"""Waits beyond human input: durable timers and events by correlation.

Both are parked flows (:mod:`celery_persist.flow`) with their own ``wait``:

* **Timers** (``wait="timer"``). A flow that sleeps is a suspension whose
  timeout is its wake time and whose timeout policy passes the previous
  result on (``on_timeout="default"``). Nothing waits in the broker: the beat
  entry ``celery-persist-timers`` runs :func:`celery_persist.flow.cleanup`
  every ``persist_timer_interval`` seconds, which walks the store's due index
  (the cost follows the number of due records) and fires each due timer with
  the same compare-and-set as any expiry, so a timer fires once even with two
  beats, and never before its time (a record is due only once ``expires_at``
  has passed).
* **Events** (``wait="event"``). A flow waiting on ``(topic, key)`` writes an
  index record under :meth:`~celery_persist.hub.PersistenceHub.index_prefix`
  of that pair, once it is parked and announced. :func:`signal` walks that
  prefix of the store's key-hash index (its cost follows the number of
  waiting flows, not the number stored) and resumes the flows through
  :func:`celery_persist.bulk.resume_many` (claims, sends and completions
  batched): one claim per flow, so a flow woken by two racing signals, or by
  a signal racing its timeout, ends exactly one way.
  The index record holds, sealed, the name of the flow's park journal, from
  which the suspension's key is derived again (keys are never stored).
  ``signal(..., buffer=S)`` also keeps the payload S seconds under a second
  prefix; a flow that starts waiting within that time takes the oldest one.
"""

from __future__ import annotations

import math
import secrets
import time
from datetime import datetime
from typing import Any

from .bulk import BATCH, resume_many
from .errors import AlreadyResumed, ConfigurationError, SuspensionCancelled, SuspensionExpired, SuspensionNotFound
from .flow import key_of, resume
from .hub import PersistenceHub
from .registry import Binding

__all__ = ["NAME_MAX", "check_name", "wake_time", "signal", "index_wait", "take_buffered", "WAITS"]

#: Longest topic or event key, in characters.
NAME_MAX = 256
#: What a parked flow can wait for.
WAITS = ("input", "timer", "event")
_ENDED = (AlreadyResumed, SuspensionCancelled, SuspensionExpired, SuspensionNotFound)


def check_name(what: str, value: Any) -> str:
    """``value`` if it is a usable topic or event key; else :class:`ConfigurationError` naming ``what``."""
    if not isinstance(value, str) or not value:
        raise ConfigurationError(f"the event {what} must be a non-empty string, not {type(value).__name__}")
    if len(value) > NAME_MAX:
        raise ConfigurationError(f"the event {what} is {len(value)} characters long; at most {NAME_MAX} are allowed")
    return value


def wake_time(seconds: Any = None, until: Any = None, *, now: float | None = None) -> float:
    """The POSIX time a sleep ends: ``seconds`` from ``now``, or ``until`` (aware datetime or ISO 8601).

    Raises:
        ConfigurationError: Neither or both given, a naive ``until``, or a value that is not a finite time.
    """
    if (seconds is None) == (until is None):
        raise ConfigurationError("sleep takes exactly one of seconds= or until=")
    now = time.time() if now is None else now
    if seconds is not None:
        if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not math.isfinite(seconds):
            raise ConfigurationError(f"sleep seconds must be a finite number, not {seconds!r}")
        return now + float(seconds)
    if isinstance(until, str):
        try:
            until = datetime.fromisoformat(until)
        except ValueError:
            raise ConfigurationError(f"sleep until= is not an ISO 8601 time: {until!r}") from None
    if not isinstance(until, datetime):
        raise ConfigurationError(f"sleep until= takes an aware datetime or an ISO 8601 string, not {type(until).__name__}")
    if until.tzinfo is None or until.utcoffset() is None:
        raise ConfigurationError("sleep until= needs a timezone (a naive time is ambiguous): use e.g. datetime(..., tzinfo=timezone.utc)")
    return until.timestamp()


def _event_prefix(hub: PersistenceHub, topic: str, key: str) -> str:
    return hub.index_prefix("event", topic, key)


def _buffer_prefix(hub: PersistenceHub, topic: str, key: str) -> str:
    return hub.index_prefix("signal-buffer", topic, key)


def index_wait(binding: Binding, topic: str, key: str, *, journal_name: str, suspension_hash: str, ttl: float | None) -> None:
    """Make the flow parked under ``journal_name`` findable by :func:`signal` on ``(topic, key)``."""
    hub = binding.ready()
    kh = hub.event_index_hash(topic, key, suspension_hash)
    entry_ttl = (ttl + binding.config.retention) if ttl else None
    hub.save_indexed(kh, {"journal": journal_name, "hash": suspension_hash}, ttl=entry_ttl, metadata={"index": "event"})


def take_buffered(binding: Binding, topic: str, key: str, suspension_key: str) -> bool:
    """Resume the flow just parked under ``suspension_key`` with the oldest live buffered signal, if any."""
    hub = binding.ready()
    for _, state in hub.indexed(_buffer_prefix(hub, topic, key)):
        if not isinstance(state, dict) or "payload" not in state:
            continue
        try:
            resume(binding, suspension_key, state["payload"])
        except _ENDED:
            return False  # a signal (or its timeout) got there first
        return True
    return False


def signal(binding: Binding, topic: str, key: str, payload: Any = None, *, buffer: float | None = None) -> int:
    """Wake every flow waiting on ``(topic, key)`` with ``payload``; returns how many were woken.

    Args:
        buffer: Also keep the payload this many seconds for flows that start
            waiting later (each takes it once).

    Raises:
        ConfigurationError: A bad topic, key or buffer.
        StateTooLarge: The payload is larger than ``persist_max_state_size`` (nothing changed).
    """
    check_name("topic", topic)
    check_name("key", key)
    if buffer is not None and (isinstance(buffer, bool) or not isinstance(buffer, int | float) or not 0 < buffer < math.inf):
        raise ConfigurationError(f"buffer must be a positive number of seconds, not {buffer!r}")
    hub = binding.ready()
    hub.serializer.dumps(payload)  # too large or not encodable: refused before anything changes
    if buffer:
        # Time-ordered within the prefix, so a late waiter takes the oldest live one.
        tail = format(time.time_ns() // 1000, "014x")[-14:] + secrets.token_hex(13)
        hub.save_indexed(_buffer_prefix(hub, topic, key) + tail, {"payload": payload}, ttl=float(buffer), metadata={"index": "signal"})
    woken = 0
    waiting = list(hub.indexed(_event_prefix(hub, topic, key)))
    for start in range(0, len(waiting), BATCH):
        done: list[str] = []  # index records to drop: woken, or ended meanwhile
        wake: list[tuple[str, str]] = []  # (index record, suspension key)
        for rec, state in waiting[start : start + BATCH]:
            if not isinstance(state, dict) or not isinstance(state.get("journal"), str):
                continue
            suspension_key = key_of(hub, state["journal"], binding.config.checkpoint_ttl)
            if suspension_key is None:
                done.append(rec.key_hash)
            else:
                wake.append((rec.key_hash, suspension_key))
        # The whole batch is claimed, sent (one pipelined batch) and completed together.
        outcomes = resume_many(binding, [(k, payload) for _, k in wake])
        failed: Exception | None = None
        for (index_hash, _), outcome in zip(wake, outcomes, strict=True):
            if isinstance(outcome, _ENDED):
                done.append(index_hash)  # resumed, timed out or cancelled meanwhile: not counted
            elif isinstance(outcome, Exception):
                failed = failed or outcome  # kept in the index: a later signal can still wake it
            else:
                woken += 1
                done.append(index_hash)
        hub.store.delete_many(done)
        if failed is not None:
            raise failed
    hub.audit("signal", _event_prefix(hub, topic, key)[:12], "ok", woken=woken, buffered=bool(buffer))
    return woken
