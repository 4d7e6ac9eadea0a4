"""Store-wide work for operators: cleanup of due records, key rotation, statistics.

These are the :class:`~celery_persist.hub.PersistenceHub` operations that walk
many records instead of serving one key; ``hub.cleanup()``, ``hub.rotate_keys()``
and ``hub.stats()`` call them, and document them. They take the hub and use its
own helpers to open, describe and audit records, so a record is read and
audited here exactly as it is for a single key.

hub.py imports this module; the hub is named here only in annotations (under
``TYPE_CHECKING``), so the dependency points one way.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .crypto import KEY_MAGIC, Keyring
from .errors import EncryptionError, PersistenceError
from .stores.base import TERMINAL, Kind, Status, StoredRecord

if TYPE_CHECKING:
    from .hub import PersistenceHub, Suspension

__all__ = ["cleanup", "rotate_keys", "stats"]

# The hub's logger, not __name__: these are hub operations, and logging set up
# for celery_persist.hub should keep seeing a failing timeout handler.
logger = logging.getLogger("celery_persist.hub")

_ROTATE_OUTCOMES = ("rotated", "current", "raced", "plaintext", "unreadable")


def cleanup(
    hub: PersistenceHub,
    now: float | None = None,
    *,
    on_expired: Callable[[Suspension], None] | None = None,
    batch: int = 500,
    retry_after: float = 60.0,
) -> int:
    """Handle every record of ``hub``'s store that is due (see :meth:`PersistenceHub.cleanup`)."""
    now = hub.clock() if now is None else now
    done = 0
    while True:
        records = hub.store.due(now, batch)
        progressed = 0
        for rec in records:
            progressed += _cleanup_one(hub, rec, now, on_expired, retry_after)
        done += progressed
        # Keep going while something moved: a lapsed lease that is also past its expiry is
        # re-opened in one pass and expired in the next, within the same run.
        if not records or not progressed:
            return done


def _cleanup_one(
    hub: PersistenceHub,
    rec: StoredRecord,
    now: float,
    on_expired: Callable[[Suspension], None] | None,
    retry_after: float,
) -> int:
    store = hub.store
    fp = rec.key_hash[:12]
    if rec.kind is not Kind.SUSPENSION or rec.status in TERMINAL:
        return int(store.delete(rec.key_hash))
    if rec.status is Status.CLAIMED:
        if store.transition(rec.key_hash, {Status.CLAIMED}, Status.SUSPENDED, due_at=rec.expires_at, now=now):
            hub._audit("reopen", fp, "lease-lapsed")
            return 1
        return 0
    if not store.transition(rec.key_hash, {Status.SUSPENDED}, Status.EXPIRED, due_at=now + hub.retention, now=now):
        return 0
    if on_expired is None:
        hub._audit("expire", fp, "ok")
        return 1
    try:
        state = hub._open_record(rec, fp)
    except PersistenceError as exc:
        # Unreadable (tampered or key removed): the record stays, marked expired, for inspection.
        hub._audit("expire", fp, f"unreadable:{type(exc).__name__}")
        return 1
    try:
        on_expired(hub._view(rec.replace(status=Status.EXPIRED), None, state=state))
    except Exception:
        logger.exception("celery-persist: timeout handler failed for suspension %s; retrying later", fp)
        store.transition(rec.key_hash, {Status.EXPIRED}, Status.SUSPENDED, due_at=now + retry_after, now=now)
        hub._audit("expire", fp, "handler-failed")
        return 1
    hub._audit("expire", fp, "ok")
    return 1


def rotate_keys(hub: PersistenceHub, *, batch: int = 200, on_record: Callable[[str], None] | None = None) -> dict[str, int]:
    """Re-encrypt every record not sealed with the active key (see :meth:`PersistenceHub.rotate_keys`)."""
    keyring = hub.keyring
    if keyring is None:
        raise EncryptionError("key rotation needs an encryption keyring (CELERY_PERSIST_KEYS)")
    counts = dict.fromkeys(_ROTATE_OUTCOMES, 0)
    cursor: str | None = None
    while True:
        page = hub.store.scan(limit=batch, cursor=cursor, with_blob=True)
        for rec in page.items:
            outcome = _rotate_one(hub, keyring, rec)
            counts[outcome] += 1
            if on_record is not None:
                on_record(outcome)
        cursor = page.next_cursor
        if cursor is None:
            break
    counts["pending"] = counts["raced"] + counts["plaintext"] + counts["unreadable"]
    hub._audit("rotate-keys", "-", f"rotated={counts['rotated']} pending={counts['pending']}")
    return counts


def _rotate_one(hub: PersistenceHub, keyring: Keyring, rec: StoredRecord) -> str:
    if bytes(rec.blob[:3]) != KEY_MAGIC:
        return "plaintext"
    try:
        if keyring.key_id_of(rec.blob) == keyring.active_id:
            return "current"
        aad = hub._aad(rec.key_hash, rec.kind, rec.metadata)
        fresh = keyring.encrypt(keyring.decrypt(rec.blob, aad), aad)
    except EncryptionError:
        hub._audit("rotate-keys", rec.key_hash[:12], "unreadable")
        return "unreadable"
    return "rotated" if hub.store.replace_blob(rec.key_hash, rec.blob, fresh, now=hub.clock()) else "raced"


def stats(hub: PersistenceHub, *, batch: int = 1000) -> dict[str, Any]:
    """Suspensions by status, oldest suspended age, checkpoints (see :meth:`PersistenceHub.stats`)."""
    now = hub.clock()
    by_status: dict[str, int] = {}
    checkpoints = 0
    oldest: float | None = None
    cursor: str | None = None
    while True:
        page = hub.store.scan(limit=batch, cursor=cursor)
        for rec in page.items:
            if rec.kind is not Kind.SUSPENSION:
                checkpoints += 1
                continue
            view = hub._view(rec, None, now=now)
            by_status[view.status] = by_status.get(view.status, 0) + 1
            if view.status == Status.SUSPENDED.value and (oldest is None or rec.created_at < oldest):
                oldest = rec.created_at
        cursor = page.next_cursor
        if cursor is None:
            break
    return {
        "suspensions": by_status,
        "checkpoints": checkpoints,
        "oldest_suspended_age": None if oldest is None else round(now - oldest, 3),
    }
