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

import contextlib
import logging
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from .crypto import KEY_MAGIC, Keyring
from .errors import EncryptionError, IntegrityError, PersistenceError
from .stores.base import TERMINAL, Kind, Status, StoredRecord

if TYPE_CHECKING:
    from .hub import PersistenceHub, Suspension

__all__ = ["TIMEOUT_HANDLER_ATTEMPTS", "cleanup", "rotate_keys", "adopt_unsealed", "stats"]

# The hub's logger, not __name__: these are hub operations, and logging set up
# for celery_persist.hub should keep seeing a failing timeout handler.
logger = logging.getLogger("celery_persist.hub")

_ROTATE_OUTCOMES = ("rotated", "current", "raced", "plaintext", "unreadable")

#: How many times cleanup applies a suspension's timeout policy (``on_expired``) before it
#: gives up on it: the record then stays ``expired``, out of the due index, for inspection.
TIMEOUT_HANDLER_ATTEMPTS = 5


def cleanup(
    hub: PersistenceHub,
    now: float | None = None,
    *,
    on_expired: Callable[[Suspension], None] | None = None,
    on_unfinished: Callable[[Suspension, Any, str], None] | None = None,
    batch: int = 500,
    retry_after: float = 60.0,
    handler_attempts: int = TIMEOUT_HANDLER_ATTEMPTS,
    around_handlers: Callable[[], AbstractContextManager[Any]] | None = None,
) -> int:
    """Handle every record of ``hub``'s store that is due (see :meth:`PersistenceHub.cleanup`).

    Each page of ``batch`` due records costs a few store round trips, not one per record:
    what is pruned goes in one :meth:`~celery_persist.stores.base.BaseStore.delete_many`
    (companions in another), what expires moves in one
    :meth:`~celery_persist.stores.base.BaseStore.transition_many`, each record still its own
    compare-and-set, and only the records this call moved get their timeout policy applied.
    Lapsed claims (rare) and records that cannot be trusted are handled one by one.

    Timeout policies are applied under a lease, so that a cleanup killed half way through a
    page loses nothing and applies no policy twice (see :func:`_fire`).
    """
    now = hub.clock() if now is None else now
    around = around_handlers or contextlib.nullcontext
    done = 0
    while True:
        records = hub.store.due(now, batch)
        progressed = _cleanup_page(hub, records, now, on_expired, on_unfinished, retry_after, handler_attempts, around)
        done += progressed
        # Keep going while something moved: a lapsed lease that is also past its expiry is
        # re-opened in one pass and expired in the next, within the same run.
        if not records or not progressed:
            return done


def _cleanup_page(
    hub: PersistenceHub,
    records: Sequence[StoredRecord],
    now: float,
    on_expired: Callable[[Suspension], None] | None,
    on_unfinished: Callable[[Suspension, Any, str], None] | None,
    retry_after: float,
    handler_attempts: int,
    around: Callable[[], AbstractContextManager[Any]],
) -> int:
    """One page of due records: set aside what cannot be trusted, then prune, expire, re-open."""
    done = 0
    prune: list[StoredRecord] = []
    expiring: list[StoredRecord] = []
    lapsed: list[StoredRecord] = []
    for rec in {r.key_hash: r for r in records}.values():  # each record once, whatever the store returned
        untrusted = _set_aside(hub, rec)
        if untrusted is not None:
            done += untrusted
        elif rec.kind is not Kind.SUSPENSION or rec.status in TERMINAL:
            prune.append(rec)
        elif rec.status is Status.CLAIMED:
            lapsed.append(rec)
        else:
            expiring.append(rec)
    if prune:
        done += _prune(hub, prune)
    if expiring and on_expired is None:
        moved = hub._move_many([(rec, Status.EXPIRED, now + hub.retention) for rec in expiring], now=now)
        for rec in expiring:
            if rec.key_hash in moved:  # else another writer changed it first
                hub._audit("expire", rec.key_hash[:12], "ok", wait=_wait_of(rec))
                done += 1
    elif expiring and on_expired is not None:
        done += _fire(hub, expiring, now, on_expired, retry_after, handler_attempts, around)
    for rec in lapsed:
        done += _lapsed_claim(hub, rec, now, on_unfinished, retry_after)
    return done


def _set_aside(hub: PersistenceHub, rec: StoredRecord) -> int | None:
    """None for a record cleanup may act on; else it is quarantined: 1 if that changed it, else 0."""
    fp = rec.key_hash[:12]
    if rec.poisoned is not None:
        # A row the store cannot even decode: take it out of the due index (kept for
        # inspection) so it never blocks the records behind it, and say so once.
        outcome = f"undecodable:{rec.poisoned}"
    else:
        try:
            hub._verify(rec, fp)  # a forged status or time must not make cleanup delete, expire or re-open
            return None
        except IntegrityError:
            # Tampered with: never acted on, and out of the due index so the rest goes on.
            outcome = "seal-mismatch"
    if hub.store.quarantine(rec.key_hash):
        hub._audit("quarantine", fp, outcome)
        return 1
    return 0


def _prune(hub: PersistenceHub, records: Sequence[StoredRecord]) -> int:
    """Delete finished suspensions and checkpoints past their time, companions first; how many records went."""
    companions = [kh for rec in records for kh in hub.companion_hashes(rec)]
    if companions:
        # First: a crash in between leaves the record due, and its companions are deleted again.
        hub.store.delete_many(companions)
    return hub.store.delete_many([rec.key_hash for rec in records])


def _fire(
    hub: PersistenceHub,
    expiring: Sequence[StoredRecord],
    now: float,
    on_expired: Callable[[Suspension], None],
    retry_after: float,
    handler_attempts: int,
    around: Callable[[], AbstractContextManager[Any]],
) -> int:
    """Apply the timeout policy of each suspension of ``expiring``, exactly once, under a lease.

    1. Each record is taken with a compare-and-set (``suspended -> claimed``, due when the
       hub's ``lease`` lapses, as for a resume claim), all in one ``transition_many``; a record
       another writer changed first (a resume, a second cleanup) is not ours.
    2. ``on_expired`` runs for each, inside ``around()`` (flow cleanup batches the page's
       messages there). A continuation it sends carries ``suspension.delivery``, a tag of the
       record's version while this cleanup holds it (:meth:`PersistenceHub.timeout_tag`). A
       handler that raises is retried later (``handler_attempts``).
    3. Once ``around()`` has exited cleanly (the messages are out), the records become
       ``expired`` in one ``transition_many``.

    A worker runs a continuation only while its tag is the record's current claim, or the
    claim that expired it (:meth:`PersistenceHub.take_delivery`). So a cleanup killed between
    1 and 3 loses nothing and runs nothing twice: a continuation that did go out makes its
    record ``expired`` when it reaches a worker; the other records lapse, are re-opened
    (:func:`_lapsed_claim`) and fired again under a new version, and a late copy of the first
    continuation is then dropped.
    """
    done = 0
    opened: list[tuple[StoredRecord, Any]] = []
    for rec in expiring:
        try:
            opened.append((rec, hub._open_record(rec, rec.key_hash[:12])))
        except PersistenceError as exc:
            # Unreadable (tampered or key removed): marked expired, kept for inspection.
            if hub._move(rec, Status.EXPIRED, due=now + hub.retention, now=now) is not None:
                hub._audit("expire", rec.key_hash[:12], f"unreadable:{type(exc).__name__}")
                done += 1
    held = hub._move_many([(rec, Status.CLAIMED, now + hub.lease) for rec, _ in opened], now=now)
    taken = [(rec, held[rec.key_hash], state) for rec, state in opened if rec.key_hash in held]
    finished: list[tuple[StoredRecord, StoredRecord]] = []
    try:
        with around():
            for rec, claimed, state in taken:
                view = hub._view(rec.replace(status=Status.EXPIRED), None, state=state)
                try:
                    on_expired(replace(view, delivery=hub.timeout_tag(claimed)))
                except Exception:  # noqa: BLE001 - counted, retried, and given up on after handler_attempts
                    done += _timeout_handler_failed(hub, claimed, now, _retried(rec), retry_after, handler_attempts)
                else:
                    finished.append((rec, claimed))
    except Exception:  # noqa: BLE001 - e.g. the batched messages could not be flushed
        # Not known to have gone out: the records stay claimed; when the lease lapses they are
        # re-opened and fired again (a copy that did go out expires its record on arrival).
        logger.exception("celery-persist: sending the timeouts of %d suspensions failed; retried after the lease", len(finished))
        return done
    moved = hub._move_many([(claimed, Status.EXPIRED, now + hub.retention) for _, claimed in finished], now=now)
    for rec, _ in finished:
        # Not moved: the continuation reached a worker first, which expired the record itself.
        if _retried(rec):
            hub.delete_checkpoint(_attempts_name(rec.key_hash))
        hub._audit("expire", rec.key_hash[:12], "ok" if rec.key_hash in moved else "ok:by-worker", wait=_wait_of(rec))
        done += 1
    return done


def _retried(rec: StoredRecord) -> bool:
    """Whether a failed timeout handler moved ``rec`` back (its due time is then past its expiry)."""
    return rec.expires_at is not None and rec.due_at is not None and rec.due_at > rec.expires_at


def _wait_of(rec: StoredRecord) -> str:
    """What a suspension waits for (``input``, ``timer``, ``event``), from its clear metadata."""
    wait = rec.metadata.get("wait", "input") if rec.poisoned is None else "input"
    return wait if isinstance(wait, str) else "input"


def _attempts_name(kh: str) -> str:
    """The checkpoint that counts the failed timeout-handler attempts of suspension ``kh``."""
    return f"timeout-attempts:{kh}"


def _timeout_handler_failed(
    hub: PersistenceHub, expired: StoredRecord, now: float, retried: bool, retry_after: float, attempts: int
) -> int:
    """Count a failed timeout handler: retry after ``retry_after`` seconds, or give up after ``attempts``.

    Given up, the record stays ``expired`` (a resume is refused) and leaves the due index, so
    it is kept for inspection and never handled (or pruned) again; one ERROR says so.
    Must be called from the ``except`` block of the failed handler (it logs the exception).
    """
    fp = expired.key_hash[:12]
    name = _attempts_name(expired.key_hash)
    failures = 0
    if retried:
        try:
            counted = hub.load_checkpoint(name)
        except PersistenceError:  # unreadable counter: count from here
            counted = None
        if isinstance(counted, dict) and isinstance(counted.get("failures"), int):
            failures = counted["failures"]
    failures += 1
    if failures < attempts:
        logger.warning(
            "celery-persist: timeout handler failed for suspension %s (attempt %d of %d); retrying in %.0f s",
            fp,
            failures,
            attempts,
            retry_after,
            exc_info=True,
        )
        hub.save_checkpoint(name, {"failures": failures}, ttl=hub.retention + retry_after)
        hub._move(expired, Status.SUSPENDED, due=now + retry_after, now=now)
        hub._audit("expire", fp, "handler-failed", attempt=failures)
        return 1
    logger.error(
        "celery-persist: timeout handler failed %d times for suspension %s; giving up: it stays expired, "
        "out of cleanup's due index, for inspection (its timeout policy was not applied)",
        failures,
        fp,
        exc_info=True,
    )
    hub._move(expired, Status.EXPIRED, due=None, now=now)
    hub.delete_checkpoint(name)
    hub._audit("expire", fp, "gave-up", attempt=failures)
    return 1


def _lapsed_claim(
    hub: PersistenceHub,
    rec: StoredRecord,
    now: float,
    on_unfinished: Callable[[Suspension, Any, str], None] | None,
    retry_after: float,
) -> int:
    """A claim whose holder went quiet: re-open it, or finish the dispatch it recorded.

    A recorded dispatch means the continuation may already be on its way, so
    handing the suspension to a new resumer (with another input) could run the
    flow twice: the same continuation is sent again instead, and a worker
    drops whichever copy arrives second. A cleanup that died applying a timeout
    recorded nothing: its claim is re-opened, and fired again (see :func:`_fire`).
    """
    fp = rec.key_hash[:12]
    try:
        recorded = hub.recorded_dispatch(rec.key_hash)
    except PersistenceError as exc:
        hub._audit("reopen", fp, f"skipped:{type(exc).__name__}")
        return 0
    if recorded is None:
        if hub._move(rec, Status.SUSPENDED, due=rec.expires_at, now=now) is not None:
            hub._audit("reopen", fp, "lease-lapsed")
            return 1
        return 0
    if on_unfinished is None:
        return 0
    try:
        state = hub._open_record(rec, fp)
        on_unfinished(hub._view(rec, None, state=state), recorded.get("input"), hub.delivery_tag(rec.key_hash))
    except Exception:
        logger.exception("celery-persist: could not finish the dispatch of suspension %s; retrying later", fp)
        hub._move(rec, Status.CLAIMED, due=now + retry_after, now=now)
        hub._audit("finish", fp, "handler-failed")
        return 1
    if hub._move(rec, Status.RESUMED, due=now + hub.retention, now=now) is None:
        return 0
    hub._audit("resume", fp, "finished-by-cleanup")
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
            outcome = "unreadable" if rec.poisoned is not None else _rotate_one(hub, keyring, rec)
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
        hub._verify(rec)
        if keyring.key_id_of(rec.blob) == keyring.active_id and hub._seal_of(rec) == rec.seal:
            return "current"
        aad = hub._aad(rec.key_hash, rec.kind, rec.metadata)
        fresh = keyring.encrypt(keyring.decrypt(rec.blob, aad), aad)
    except (EncryptionError, IntegrityError):
        hub._audit("rotate-keys", rec.key_hash[:12], "unreadable")
        return "unreadable"
    # Re-sealed under the active key too, so a retired key is needed for neither.
    version = rec.version + 1
    seal = hub._seal_of(rec.replace(blob=fresh), version=version)
    swapped = hub.store.replace_blob(rec.key_hash, rec.blob, fresh, now=hub.clock(), version=version, seal=seal)
    return "rotated" if swapped else "raced"


def adopt_unsealed(hub: PersistenceHub, *, batch: int = 200) -> int:
    """Seal the records a release before seals (0.1) wrote; returns how many were adopted.

    Such a record has version 0 and no seal. Its blob must still open with the
    configured keys (so its state and metadata are genuine); its status and
    times are taken as they stand, which is why this is an operator's explicit
    step right after upgrading, not something done on every read.
    """
    if not hub._field_keys:
        return 0
    adopted = 0
    cursor: str | None = None
    while True:
        page = hub.store.scan(limit=batch, cursor=cursor, with_blob=True)
        for rec in page.items:
            if rec.poisoned is not None or rec.seal or rec.version:
                continue
            try:
                hub._open_record(rec)
            except PersistenceError:
                hub._audit("adopt", rec.key_hash[:12], "unreadable")
                continue
            seal = hub._seal_of(rec, version=1)
            if hub.store.transition(rec.key_hash, {rec.status}, rec.status, now=hub.clock(), version=1, seal=seal, expect_version=0):
                adopted += 1
        cursor = page.next_cursor
        if cursor is None:
            break
    hub._audit("adopt", "-", f"adopted={adopted}")
    return adopted


def stats(hub: PersistenceHub, *, batch: int = 1000) -> dict[str, Any]:
    """Suspensions by status, oldest suspended age, checkpoints (see :meth:`PersistenceHub.stats`)."""
    now = hub.clock()
    by_status: dict[str, int] = {}
    checkpoints = unreadable = 0
    oldest: float | None = None
    cursor: str | None = None
    while True:
        page = hub.store.scan(limit=batch, cursor=cursor)
        for rec in page.items:
            if rec.poisoned is not None:
                unreadable += 1
                continue
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
        "unreadable": unreadable,
        "oldest_suspended_age": None if oldest is None else round(now - oldest, 3),
    }
