"""PersistenceHub: the one place where store, serializer, crypto and keys meet.

Write path: ``state -> StateSerializer.dumps -> seal (AES-GCM or HMAC) -> store.put``.
Read path: validate the key (no store access for a malformed or forged one),
``store.get -> open -> StateSerializer.loads``.

The sealed blob is bound, as associated data, to the record's key hash, its
kind and its metadata, so a blob copied to another record, or metadata edited
in the store, fails to open. Metadata is stored in clear (operators list and
inspect it without keys), so it must hold nothing secret.

Resume is a claim: ``suspended -> claimed`` under a lease (``due_at`` is the
lease deadline), then ``claimed -> resumed`` once the continuation is
dispatched, or back to ``suspended`` if dispatch fails. A process that dies
holding a lease leaves the record ``claimed``; :meth:`PersistenceHub.cleanup`
re-opens it when the lease lapses, so the flow is never lost.

Every state change writes one audit record to the ``celery_persist.audit``
logger: action, key fingerprint, store, outcome. Never state or inputs.

Which sealer protects blobs is :func:`celery_persist.crypto.choose_sealer`'s
decision; the store-wide operations (``cleanup``, ``rotate_keys``, ``stats``)
live in :mod:`celery_persist.maintenance`, and the hub's methods delegate to them.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import dataclasses
import hashlib
import hmac
import json
import logging
import math
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from . import maintenance
from .crypto import KEY_MAGIC, SIGN_MAGIC, Keyring, Sealer, choose_sealer, derive, secrets_from_env
from .errors import (
    AlreadyResumed,
    ConfigurationError,
    EncryptionError,
    IntegrityError,
    InvalidInput,
    InvalidKey,
    PersistenceError,
    SerializationError,
    SuspensionCancelled,
    SuspensionExpired,
    SuspensionNotFound,
)
from .keys import derive_suspension_key, fingerprint, key_hash, new_suspension_key, validate_key
from .schemas import validate
from .serializer import DEFAULT_MAX_STATE_SIZE, StateSerializer
from .stores.base import KEEP, BaseStore, Keep, Kind, Page, Status, StoredRecord, TransitionSpec, dump_metadata

__all__ = ["PersistenceHub", "Suspension", "WRAPPED_KEY_PREFIX", "link_fingerprint"]

logger = logging.getLogger(__name__)
audit_logger = logging.getLogger("celery_persist.audit")

_AAD_PREFIX = b"celery-persist/record/v1\0"
WRAPPED_KEY_PREFIX = _WRAP_PREFIX = "p1w."
_FIELDS_PREFIX = b"celery-persist/record-fields/v1\0"
_WRAP_AAD = b"celery-persist/wrapped-key/v1"
#: Claims remembered for a complete without a read (a resumer holds a claim for milliseconds).
_HELD_CLAIMS = 1024
#: How long history entries of a suspension that never expires are kept (then pruned like checkpoints).
_HISTORY_WITHOUT_EXPIRY = 365 * 86400.0
#: Resume-link tokens: AES-GCM under the key-wrap secrets, with their own associated data.
_LINK_PREFIX = "l1."
_LINK_AAD = b"celery-persist/resume-link/v1"
_warned_plaintext = False
#: Hex characters of :meth:`PersistenceHub.index_prefix` (96 bits); the other 40 of an indexed key hash tell records apart.
INDEX_PREFIX_LEN = 24
#: Audit outcomes of the normal path, logged at DEBUG; every other outcome is logged at INFO.
_ROUTINE = frozenset({"ok", "granted"})


#: The longest ttl accepted: a hundred years (a time past it overflows some stores' dates).
MAX_TTL = 100 * 365.25 * 86400


def _checked_ttl(ttl: float | None) -> float | None:
    """``ttl`` if it is None, 0 or a finite number of seconds up to :data:`MAX_TTL`."""
    if ttl is None:
        return None
    try:
        value = float(ttl)
    except (TypeError, ValueError):
        raise ConfigurationError(f"ttl must be a number of seconds or None, not {type(ttl).__name__}") from None
    if not math.isfinite(value) or value < 0 or value > MAX_TTL:
        raise ConfigurationError(f"ttl must be between 0 and {MAX_TTL:.0f} seconds (100 years), or None for never; got {ttl!r}")
    return value


def link_fingerprint(token: str) -> str:
    """A short, non-secret name for a resume-link token (what logs and errors show)."""
    return hashlib.sha256(token.encode("utf-8", "replace")).hexdigest()[:12]


def _quorum(metadata: Mapping[str, Any]) -> tuple[int, tuple[str, ...] | None] | None:
    """``(approvals needed, allowed approvers or None)`` for a suspension that waits for approvals, else None."""
    needed = metadata.get("approvals")
    approvers = metadata.get("approvers")
    if not isinstance(needed, int) or isinstance(needed, bool):
        needed = 1
    allowed = tuple(str(a) for a in approvers) if isinstance(approvers, list | tuple) else None
    if needed <= 1 and allowed is None:
        return None
    return max(needed, 1), allowed


def _utc(ts: float | None) -> datetime | None:
    return None if ts is None else datetime.fromtimestamp(ts, tz=timezone.utc)


def _warn_plaintext_once(sealer: Sealer | None) -> None:
    """Say once per process that states are stored without encryption (``persist_encryption="auto"``)."""
    global _warned_plaintext
    if not _warned_plaintext:
        _warned_plaintext = True
        logger.warning(
            "celery-persist: no encryption key configured (CELERY_PERSIST_KEYS); suspended states are stored %s",
            "signed but readable" if sealer else "in clear and unauthenticated",
        )


@dataclass(frozen=True, slots=True)
class Suspension:
    """A suspension as the hub returns it.

    Attributes:
        key: The suspension key; None when the record was read without it
            (listing, cleanup).
        fingerprint: Short non-secret name of the key (12 hex characters).
        state: The suspended state (None in listings).
        input: The resume input, set by :meth:`PersistenceHub.resume`.
        metadata: Non-secret facts stored beside the state.
        created_at: When it was suspended (UTC).
        expires_at: When it times out (UTC), or None.
        status: ``suspended``, ``claimed``, ``resumed``, ``cancelled`` or ``expired``.
    """

    key: str | None
    fingerprint: str
    state: Any = None
    input: Any = None
    metadata: Mapping[str, Any] = field(default_factory=dict)
    created_at: datetime | None = None
    expires_at: datetime | None = None
    status: str = Status.SUSPENDED.value
    #: The record's key hash (what stores index it by; not secret, and no key can be made from it).
    key_hash: str = ""
    #: Set by :meth:`PersistenceHub.claim`: what :meth:`~PersistenceHub.complete` and
    #: :meth:`~PersistenceHub.release` need, so only the claim holder can finish it.
    claim_token: int | None = None
    #: Set by :meth:`PersistenceHub.cleanup` for ``on_expired``: the delivery tag that a
    #: continuation sent by the timeout policy carries (see :meth:`PersistenceHub.take_delivery`).
    delivery: str | None = None


class PersistenceHub:
    """Suspend, load, resume, cancel, list and clean up durable state.

    Args:
        store: Where records live (see :func:`celery_persist.open_store`).
        keyring: AES-256-GCM keys; left out, read from ``CELERY_PERSIST_KEYS`` /
            ``CELERY_PERSIST_KEY``.
        serializer: How states become bytes; default ``StateSerializer()``.
        signing_secret: HMAC secret for key tags (and blob signatures when not
            encrypting); left out, read from ``CELERY_PERSIST_SIGNING_SECRET``.
        default_ttl: Seconds before a suspension expires when ``suspend`` gets no ttl.
        max_state_size: Largest serialized state, in bytes (write and decompress).
        encryption: ``auto`` (encrypt when keys exist, else warn once),
            ``required`` (refuse to start without a key) or ``off``; see
            :func:`~celery_persist.crypto.choose_sealer`.
        lease: Seconds a resume claim holds before cleanup may re-open it.
        retention: Seconds finished records (resumed, cancelled, expired) are
            kept, so late callers get ``AlreadyResumed`` rather than ``SuspensionNotFound``.
        clock: Returns POSIX seconds; tests may fake it.
        observer: Called as ``observer(action, outcome, extra)`` for every audit
            record (``extra`` may hold ``seconds`` and ``size``); metrics hang here.

    Example:
        >>> hub = PersistenceHub(open_store("sqlite:///persist.db"))
        >>> key = hub.suspend({"x": 1}, ttl=60, metadata={"flow": "demo"})
        >>> hub.resume(key, input={"ok": True}).state
        {'x': 1}
    """

    def __init__(
        self,
        store: BaseStore,
        *,
        keyring: Keyring | None = None,
        serializer: StateSerializer | None = None,
        signing_secret: str | bytes | None = None,
        default_ttl: float | None = None,
        max_state_size: int = DEFAULT_MAX_STATE_SIZE,
        encryption: str = "auto",
        lease: float = 60.0,
        retention: float = 7 * 86400.0,
        clock: Callable[[], float] = time.time,
        observer: Callable[[str, str, dict[str, Any]], None] | None = None,
        history: bool = False,
    ) -> None:
        self.observer = observer
        #: Claims taken by this process and not yet completed or released (see _hold), oldest first.
        self._held: dict[str, StoredRecord] = {}
        self._held_lock = threading.Lock()
        #: Keep an audit history beside each suspension (suspended, denied, approved, claimed,
        #: resumed, cancelled, expired): one more write per event, read by the inbox and `show --history`.
        self.history = history
        self.store = store
        if signing_secret is None:
            signing_secret = secrets_from_env().signing_secret
        self._sealer = choose_sealer(encryption, keyring, signing_secret)
        self.keyring = self._sealer if isinstance(self._sealer, Keyring) else None
        self.encryption = encryption
        # Keys are signed whenever any secret exists: with the signing secret when one is
        # set, else with secrets derived from the keyring (one per key, so keys issued
        # before a rotation still verify). The seed makes re-derivable keys (new_key).
        self._key_secrets: tuple[bytes, ...] = ()
        self._seed: bytes | None = None
        self._key_wraps: tuple[bytes, ...] = ()
        if signing_secret:
            raw = signing_secret.encode("utf-8") if isinstance(signing_secret, str) else signing_secret
            self._key_secrets, self._seed = (raw,), derive(raw, b"key-seed/v1")
        elif self.keyring is not None:
            self._key_secrets, self._seed = self.keyring.derive(b"key-tag/v1"), self.keyring.derive(b"key-seed/v1")[0]
        # What decides behaviour but sits beside the blob (status, times, version) is
        # sealed with an HMAC under its own derived secrets (see _seal_fields).
        self._field_keys: tuple[bytes, ...] = ()
        if self.keyring is not None:
            self._key_wraps = self.keyring.derive(b"key-wrap/v1")
            self._field_keys = self.keyring.derive(b"record-fields/v1")
        elif signing_secret:
            self._key_wraps = (derive(raw, b"key-wrap/v1"),)
            self._field_keys = (derive(raw, b"record-fields/v1"),)
        self.serializer = serializer or StateSerializer(max_size=max_state_size)
        if serializer is not None and max_state_size != DEFAULT_MAX_STATE_SIZE:
            self.serializer = serializer.with_max_size(max_state_size)
        self.default_ttl = default_ttl
        self.lease = float(lease)
        self.retention = float(retention)
        self.clock = clock
        if self.serializer.unsafe_codec and self._sealer is None:
            raise ConfigurationError(
                f"the {self.serializer.codec} codec needs an encryption key or a signing secret, "
                "because it only ever unpickles authenticated bytes"
            )
        if self.keyring is None and encryption == "auto":
            _warn_plaintext_once(self._sealer)

    # -- sealing ---------------------------------------------------------------------------

    @staticmethod
    def _aad(kh: str, kind: Kind, metadata: Mapping[str, Any]) -> bytes:
        return b"".join((_AAD_PREFIX, kh.encode(), b"\0", kind.value.encode(), b"\0", dump_metadata(metadata).encode()))

    def _seal(self, plain: bytes, aad: bytes) -> bytes:
        return plain if self._sealer is None else self._sealer.seal(plain, aad)

    def _open_record(self, rec: StoredRecord, fp: str | None = None) -> Any:
        aad = self._aad(rec.key_hash, rec.kind, rec.metadata)
        blob = rec.blob
        fp = fp or rec.key_hash[:12]
        magic = bytes(blob[:3])
        try:
            if magic == KEY_MAGIC:
                if self.keyring is None:
                    raise EncryptionError("record is encrypted but no encryption key is configured")
                plain = self.keyring.decrypt(blob, aad)
            elif self.keyring is not None:
                raise EncryptionError("record is not encrypted but encryption is on; refusing to read it")
            elif magic == SIGN_MAGIC:
                if self._sealer is None:
                    raise EncryptionError("record is signed but no signing secret is configured")
                plain = self._sealer.open(blob, aad)
            elif self._sealer is not None:
                raise EncryptionError("record is not signed but a signing secret is set; refusing to read it")
            else:
                plain = blob
            return self.serializer.loads(plain, trusted=self._sealer is not None)
        except PersistenceError as exc:
            exc.key, exc.store = fp, self.store.name
            raise

    # -- the record's deciding fields ---------------------------------------------------------

    @staticmethod
    def _fields(
        kh: str, kind: Kind, status: Status, created: float, expires: float | None, due: float | None, version: int, blob: bytes
    ) -> bytes:
        def when(t: float | None) -> str:
            return "-" if t is None else f"{t:.3f}"  # milliseconds: every store keeps that exactly

        # The blob's last 16 bytes are its AEAD tag (or the end of its HMAC): a blob swapped
        # for another one of the same record, e.g. an older checkpoint, changes them.
        text = f"{kh}|{kind.value}|{status.value}|{when(created)}|{when(expires)}|{when(due)}|{version}|"
        return _FIELDS_PREFIX + text.encode("ascii") + bytes(blob[-16:])

    def _seal_fields(self, fields: bytes) -> str:
        if not self._field_keys:
            return ""
        return hmac.new(self._field_keys[0], fields, hashlib.sha256).hexdigest()

    def _seal_of(
        self, rec: StoredRecord, *, status: Status | None = None, due: float | None | Keep = KEEP, version: int | None = None
    ) -> str:
        """The seal ``rec`` would carry with ``status``, ``due`` and ``version`` changed."""
        return self._seal_fields(
            self._fields(
                rec.key_hash,
                rec.kind,
                rec.status if status is None else status,
                rec.created_at,
                rec.expires_at,
                rec.due_at if due is KEEP else due,
                rec.version if version is None else version,
                rec.blob,
            )
        )

    def _verify(self, rec: StoredRecord, fp: str | None = None) -> StoredRecord:
        """``rec`` if its deciding fields are as celery-persist last wrote them.

        Status, times, version and blob are bound by an HMAC (the record's seal)
        under secrets derived from the keyring or signing secret; without either
        there is nothing to check with.

        Raises:
            IntegrityError: The seal is missing or does not match (the record was
                edited outside celery-persist, or restored from an older copy's parts).
        """
        if not self._field_keys:
            return rec
        fields = self._fields(rec.key_hash, rec.kind, rec.status, rec.created_at, rec.expires_at, rec.due_at, rec.version, rec.blob)
        genuine = False
        for secret in self._field_keys:  # old keys still verify until rotate-keys re-seals
            genuine |= hmac.compare_digest(hmac.new(secret, fields, hashlib.sha256).hexdigest(), rec.seal)
        if not genuine:
            fp = fp or rec.key_hash[:12]
            self._audit("verify", fp, "denied:IntegrityError")
            raise IntegrityError(
                "the record's status, times or version were changed outside celery-persist (its seal does not verify); nothing was changed",
                key=fp,
                store=self.store.name,
            )
        return rec

    def _move(self, rec: StoredRecord, to: Status, *, due: float | None | Keep, now: float) -> StoredRecord | None:
        """Compare-and-set ``rec`` (as read: same status and version) to ``to``, re-sealed.

        Returns:
            The record as it now is, or None when another writer changed it first.
        """
        version = rec.version + 1
        seal = self._seal_of(rec, status=to, due=due, version=version)
        moved = self.store.transition(
            rec.key_hash, {rec.status}, to, due_at=due, now=now, version=version, seal=seal, expect_version=rec.version
        )
        if not moved:
            return None
        return rec.replace(status=to, due_at=rec.due_at if due is KEEP else due, version=version, seal=seal, updated_at=now)

    def _move_many(self, moves: Sequence[tuple[StoredRecord, Status, float | None | Keep]], *, now: float) -> dict[str, StoredRecord]:
        """:meth:`_move` for many records (``(record as read, to, due)`` each, distinct records) in one
        :meth:`BaseStore.transition_many`: each its own compare-and-set, re-sealed as :meth:`_move` does.

        Returns:
            The records that moved, as they now are, by key hash; the others were changed by another writer first.
        """
        changes: list[TransitionSpec] = []
        after: dict[str, StoredRecord] = {}
        for rec, to, due in moves:
            version = rec.version + 1
            seal = self._seal_of(rec, status=to, due=due, version=version)
            changes.append(TransitionSpec(rec.key_hash, frozenset({rec.status}), to, due, version, seal, rec.version))
            after[rec.key_hash] = rec.replace(
                status=to, due_at=rec.due_at if due is KEEP else due, version=version, seal=seal, updated_at=now
            )
        if not changes:
            return {}
        return {kh: after[kh] for kh in self.store.transition_many(changes, now=now)}

    # -- audit -----------------------------------------------------------------------------

    def _audit(self, action: str, fp: str, outcome: str, **extra: Any) -> None:
        # Successes at DEBUG (the worker's own line says what happened), refusals and failures at INFO.
        audit_logger.log(
            logging.DEBUG if outcome in _ROUTINE else logging.INFO,
            "%s suspension=%s store=%s outcome=%s",
            action,
            fp,
            self.store.name,
            outcome,
            extra={"persist_action": action, "persist_key": fp, "persist_store": self.store.name, "persist_outcome": outcome, **extra},
        )
        if self.observer is not None:
            try:
                self.observer(action, outcome, extra)
            except Exception:  # noqa: BLE001 - metrics must never break a suspend or resume
                logger.warning("celery-persist: metrics observer failed", exc_info=True)

    def _check_key(self, key: str, action: str) -> str:
        """Validate ``key`` (no store access) and return its fingerprint; audit a refusal."""
        try:
            validate_key(key, self._key_secrets)
        except InvalidKey as exc:
            # Like every hub error, name the store and (a hash of) the candidate, never the key.
            exc.key, exc.store = (fingerprint(key) if isinstance(key, str) else None), self.store.name
            self._audit(action, exc.key or "-", "denied:InvalidKey")
            raise
        return fingerprint(key)

    def _view(self, rec: StoredRecord, key: str | None, *, state: Any = None, input: Any = None, now: float | None = None) -> Suspension:
        status = rec.status
        if status is Status.SUSPENDED and rec.expires_at is not None and now is not None and rec.expires_at <= now:
            status = Status.EXPIRED
        return Suspension(
            key=key,
            fingerprint=rec.key_hash[:12],
            state=state,
            input=input,
            metadata=dict(rec.metadata),
            created_at=_utc(rec.created_at),
            expires_at=_utc(rec.expires_at),
            status=status.value,
            key_hash=rec.key_hash,
        )

    # -- suspensions -----------------------------------------------------------------------

    def suspend(
        self,
        state: Any,
        *,
        ttl: float | None = None,
        metadata: Mapping[str, Any] | None = None,
        key: str | None = None,
    ) -> str:
        """Store ``state`` and return the key that resumes it.

        Args:
            state: Anything the codec can encode.
            ttl: Seconds until it expires (None: ``default_ttl``; 0 or None: never).
            metadata: JSON-able, non-secret facts kept in clear for listing.
            key: Use this (already issued) key instead of a new one.

        Raises:
            StateTooLarge: The serialized state exceeds ``max_state_size``.
            SerializationError: The state or metadata cannot be encoded.
            StoreUnavailable: The store is down; nothing was written.
        """
        started = time.perf_counter()
        if key is None:
            key = new_suspension_key(self._key_secrets)
        else:
            self._check_key(key, "suspend")
        ttl = _checked_ttl(self.default_ttl if ttl is None else ttl)
        now = self.clock()
        expires = now + ttl if ttl else None
        fp = fingerprint(key)
        if _quorum(metadata or {}) is not None:
            # Approvals are kept in a record of their own, which must exist before the first one.
            self.save_checkpoint(self.approvals_name(key_hash(key)), [], ttl=(ttl + self.retention) if ttl else None)
        rec = self._build(key_hash(key), Kind.SUSPENSION, Status.SUSPENDED, state, metadata, now, expires, fp)
        self.store.put(rec)
        wait = str((metadata or {}).get("wait", "input"))
        self._audit("suspend", fp, "ok", seconds=time.perf_counter() - started, size=len(rec.blob), wait=wait)
        return key

    def new_key(self, context: bytes | None = None, ms: int | None = None) -> str:
        """A key to pass to :meth:`suspend`; with ``context`` and ``ms``, the same every time.

        A derived key lets a caller that parks the same thing twice (a redelivered
        message) hand out the same key again without it ever being stored. It
        needs a secret (a keyring or a signing secret); without one the key is
        random and :meth:`derived_key` answers None.
        """
        if context is not None and ms is not None and self._seed is not None:
            return derive_suspension_key(self._seed, context, ms, self._key_secrets)
        return new_suspension_key(self._key_secrets)

    def wrap_key(self, key: str) -> str:
        """``key`` sealed for places that must not hold it in clear (the result backend, Flower).

        A wrapped key (``p1w.…``) is useless without this hub's keys; :meth:`unwrap_key`
        (and so ``Persist.resume`` and the ``celery_persist.resume`` task) turns it back.
        Without any key or secret the key is returned as it is.
        """
        if not self._key_wraps:
            return key
        nonce = os.urandom(12)
        sealed = AESGCM(self._key_wraps[0]).encrypt(nonce, key.encode("ascii"), _WRAP_AAD)
        return _WRAP_PREFIX + base64.urlsafe_b64encode(nonce + sealed).rstrip(b"=").decode("ascii")

    def unwrap_key(self, key: str) -> str:
        """The key inside a :meth:`wrap_key` token; any other string is returned unchanged.

        Raises:
            InvalidKey: A wrapped key that this hub's keys cannot open.
        """
        if not isinstance(key, str) or not key.startswith(_WRAP_PREFIX):
            return key
        try:
            raw = base64.urlsafe_b64decode(key[len(_WRAP_PREFIX) :] + "=" * (-len(key) % 4))
        except (ValueError, binascii.Error):
            raise InvalidKey("wrapped suspension key is malformed", store=self.store.name) from None
        for secret in self._key_wraps:
            try:
                return AESGCM(secret).decrypt(raw[:12], raw[12:], _WRAP_AAD).decode("ascii")
            except (InvalidTag, ValueError):
                continue
        raise InvalidKey("wrapped suspension key does not open with the configured keys", store=self.store.name)

    def derived_key(self, context: bytes, ms: int) -> str | None:
        """The key :meth:`new_key` derived for ``(context, ms)``, or None without a secret."""
        return None if self._seed is None else derive_suspension_key(self._seed, context, ms, self._key_secrets)

    def reissue(self, kh: str) -> str:
        """Move the suspension stored under ``kh`` to a new key; the old key stops working.

        For a caller that must announce a key it no longer has (keys are never
        stored). The new record is written first and the old one then retired
        with a compare-and-set, so exactly one of them can be resumed.

        Raises:
            SuspensionNotFound, AlreadyResumed, SuspensionCancelled, SuspensionExpired:
                The old record is gone or no longer suspended (nothing is written).
        """
        fp = kh[:12]
        now = self.clock()
        rec = self.store.get(kh)
        if rec is None or rec.kind is not Kind.SUSPENSION:
            raise SuspensionNotFound("no suspension is stored under this key", key=fp, store=self.store.name)
        self._verify(rec, fp)
        self._refuse(rec, fp, now, "reissue")
        state = self._open_record(rec, fp)
        key = self.new_key()
        new_kh = key_hash(key)
        self.store.put(self._build(new_kh, Kind.SUSPENSION, Status.SUSPENDED, state, rec.metadata, rec.created_at, rec.expires_at, fp))
        if self._move(rec, Status.CANCELLED, due=now + self.retention, now=now) is None:
            self.store.delete(new_kh)
            self._lost_race(kh, fp, now, "reissue")
        self._audit("reissue", fp, "ok", new=fingerprint(key))
        return key

    def _build(
        self,
        kh: str,
        kind: Kind,
        status: Status,
        state: Any,
        metadata: Mapping[str, Any] | None,
        now: float,
        expires: float | None,
        fp: str,
    ) -> StoredRecord:
        md = dict(metadata or {})
        try:
            aad = self._aad(kh, kind, md)
        except (TypeError, ValueError) as exc:
            raise SerializationError(f"metadata must be JSON-serializable: {type(exc).__name__}", key=fp, store=self.store.name) from None
        try:
            plain = self.serializer.dumps(state)
        except PersistenceError as exc:
            exc.key, exc.store = fp, self.store.name
            raise
        blob = self._seal(plain, aad)
        seal = self._seal_fields(self._fields(kh, kind, status, now, expires, expires, 1, blob))
        return StoredRecord(kh, kind, status, blob, md, now, expires, expires, now, version=1, seal=seal)

    # -- dispatch: a continuation is sent at most once per suspension -------------------------

    @staticmethod
    def dispatch_name(kh: str) -> str:
        """The checkpoint that records the dispatch of suspension ``kh``'s continuation."""
        return f"dispatch:{kh}"

    def record_dispatch(self, key: str, input: Any) -> str:
        """Note durably, before sending, that claimed ``key``'s continuation goes out with ``input``.

        From then on the claim is never re-opened for another resumer: if this
        process dies before completing, cleanup finishes the dispatch instead
        (see :func:`celery_persist.maintenance.cleanup`), and the copy that
        reaches a worker second is dropped there (:meth:`take_delivery`).

        Returns:
            The delivery tag to carry in the continuation message.
        """
        kh = key_hash(self.unwrap_key(key))
        self.store.put(self._dispatch_record(kh, {"input": input}))
        return self.delivery_tag(kh)

    @staticmethod
    def delivery_tag(kh: str) -> str:
        """A fresh ``<key hash>:<nonce>`` for one sending of ``kh``'s continuation."""
        return f"{kh}:{secrets.randbelow(2**31) + 2}"

    def recorded_dispatch(self, kh: str) -> dict[str, Any] | None:
        """What was recorded for suspension ``kh``'s dispatch (``{"input": ...}``); None when nothing was."""
        rec = self.checkpoint_record(self.dispatch_name(kh))
        if rec is None:
            return None
        recorded = self._open_record(rec)
        return recorded if isinstance(recorded, dict) else {}

    def record_dispatches(self, items: Sequence[tuple[str, Any]]) -> list[str | PersistenceError]:
        """:meth:`record_dispatch` for each claimed ``(key, input)``, in one store write.

        Returns:
            Per item, in order: the delivery tag, or the error that item's input met
            (not serializable, too large): that one was not recorded.

        Raises:
            PersistenceError: The write failed (store down): nothing was recorded.
        """
        out: list[str | PersistenceError] = []
        records = []
        for key, input in items:
            try:
                kh = key_hash(self.unwrap_key(key))
                records.append(self._dispatch_record(kh, {"input": input}))
            except PersistenceError as exc:
                out.append(exc)
                continue
            out.append(self.delivery_tag(kh))
        if records:
            self.store.put_many(records)
        return out

    def _dispatch_record(self, kh: str, what: dict[str, Any]) -> StoredRecord:
        now = self.clock()
        ttl = _checked_ttl(self.retention)
        ck = self.checkpoint_hash(self.dispatch_name(kh))
        return self._build(ck, Kind.CHECKPOINT, Status.ACTIVE, what, None, now, now + ttl if ttl else None, ck[:12])

    @staticmethod
    def timeout_tag(claimed: StoredRecord) -> str:
        """The delivery tag of a continuation that cleanup sends while it holds ``claimed`` to apply its timeout."""
        return f"{claimed.key_hash}:t{claimed.version}"

    def take_delivery(self, tag: str) -> bool:
        """Whether the continuation message carrying ``tag`` is the one to run.

        The first copy to arrive marks the dispatch record with its nonce in one
        compare-and-set; the same message delivered again (a worker died running
        it) still runs; any other copy (sent again by cleanup after the resumer
        died) does not. No record (expired, or never written): run.

        A timeout's continuation (tag ``<hash>:t<version>``, see :meth:`timeout_tag`)
        runs while the suspension is still claimed at that version (then this
        expires it, in one compare-and-set, in case the cleanup that sent it died) or
        was expired from it; not once it was re-opened and fired again.
        """
        kh, _, raw_nonce = tag.rpartition(":")
        if raw_nonce.startswith("t"):
            return self._take_timeout(kh, int(raw_nonce[1:]))
        nonce = int(raw_nonce)
        rec = self.checkpoint_record(self.dispatch_name(kh))
        if rec is None:
            return True
        if rec.status is Status.ACTIVE:
            seal = self._seal_of(rec, status=Status.RESUMED, version=nonce)
            moved = self.store.transition(
                rec.key_hash, {Status.ACTIVE}, Status.RESUMED, now=self.clock(), version=nonce, seal=seal, expect_version=rec.version
            )
            if moved:
                return True
            latest = self.checkpoint_record(self.dispatch_name(kh))
            return latest is None or latest.version == nonce
        return rec.version == nonce

    def _take_timeout(self, kh: str, version: int) -> bool:
        fp = kh[:12]
        rec = self.store.get(kh)
        if rec is not None and self._verify(rec, fp).status is Status.CLAIMED and rec.version == version:
            now = self.clock()
            if self._move(rec, Status.EXPIRED, due=now + self.retention, now=now) is not None:
                self._audit("expire", fp, "ok:by-worker", wait=rec.metadata.get("wait", "input"))
                return True
            rec = self.store.get(kh)
            if rec is not None:
                self._verify(rec, fp)
        if rec is None:
            return True  # pruned after its retention: nothing left to judge by
        return rec.status is Status.EXPIRED and rec.version == version + 1

    def strand(self, kh: str, reason: str) -> bool:
        """Put a dispatched suspension back to ``suspended``: its continuation could not run.

        For a continuation that a worker refused (it names a task the worker does
        not know, say after a deploy renamed it): nothing is lost, and the same key
        resumes the flow once the code (or ``persist_task_aliases``) is fixed.

        Returns:
            True if the record was put back; False if it was not resumed (or is gone).
        """
        fp = kh[:12]
        rec = self.store.get(kh)
        if rec is None or rec.kind is not Kind.SUSPENSION or rec.status not in (Status.CLAIMED, Status.RESUMED):
            return False
        self._verify(rec, fp)
        if self._move(rec, Status.SUSPENDED, due=rec.expires_at, now=self.clock()) is None:
            return False
        self._audit("strand", fp, reason)
        return True

    def rewrite_states(self, change: Callable[[Any], tuple[Any, int]], *, batch: int = 200) -> int:
        """Apply ``change(state) -> (new state, changes)`` to every suspended flow's state.

        Each record is re-encrypted and re-sealed with a compare-and-set on its
        blob, so a flow resumed meanwhile is left alone. Returns how many records changed.
        """
        changed = 0
        cursor: str | None = None
        while True:
            page = self.store.scan(kind=Kind.SUSPENSION, status=Status.SUSPENDED, limit=batch, cursor=cursor, with_blob=True)
            for rec in page.items:
                fp = rec.key_hash[:12]
                try:
                    if rec.poisoned is not None:
                        raise IntegrityError(rec.poisoned, key=fp, store=self.store.name)
                    self._verify(rec, fp)
                    state, count = change(self._open_record(rec, fp))
                except (IntegrityError, EncryptionError) as exc:  # one bad record must not stop the rest
                    self._audit("rewrite", fp, f"skipped:{type(exc).__name__}")
                    continue
                if not count:
                    continue
                fresh = self._build(rec.key_hash, rec.kind, rec.status, state, rec.metadata, rec.created_at, rec.expires_at, fp)
                version = rec.version + 1
                seal = self._seal_of(fresh.replace(due_at=rec.due_at), version=version)
                if self.store.replace_blob(rec.key_hash, rec.blob, fresh.blob, now=self.clock(), version=version, seal=seal):
                    changed += 1
                    self._audit("rewrite", fp, f"changes={count}")
            cursor = page.next_cursor
            if cursor is None:
                return changed

    def load(self, key: str) -> Suspension:
        """Read a suspension without changing it.

        Raises:
            InvalidKey: Malformed or forged key (nothing was read).
            SuspensionNotFound: No such suspension.
            IntegrityError, EncryptionError: The stored blob does not authenticate.
        """
        key = self.unwrap_key(key)
        fp = self._check_key(key, "load")
        rec = self._get(key, fp)
        return self._view(rec, key, state=self._open_record(rec, fp), now=self.clock())

    def peek(self, kh: str) -> Suspension | None:
        """The suspension stored under key hash ``kh`` (metadata, times, status; no state), or None."""
        rec = self.store.get(kh)
        if rec is None or rec.kind is not Kind.SUSPENSION:
            return None
        return self._view(self._verify(rec), None, now=self.clock())

    def _get(self, key: str, fp: str, action: str | None = None) -> StoredRecord:
        rec = self.store.get(key_hash(key))
        if rec is None or rec.kind is not Kind.SUSPENSION:
            if action is not None:
                self._audit(action, fp, "denied:SuspensionNotFound")
            raise SuspensionNotFound("no suspension is stored under this key", key=fp, store=self.store.name)
        return self._verify(rec, fp)

    def _refuse(self, rec: StoredRecord, fp: str, now: float, action: str) -> None:
        """Raise the error that ``rec``'s status means for a resume or cancel."""
        status = rec.status
        err: PersistenceError | None = None
        if status in (Status.CLAIMED, Status.RESUMED):
            err = AlreadyResumed("this suspension was already resumed", key=fp, store=self.store.name)
        elif status is Status.CANCELLED:
            err = SuspensionCancelled("this suspension was cancelled", key=fp, store=self.store.name)
        elif status is Status.EXPIRED or (rec.expires_at is not None and rec.expires_at <= now):
            err = SuspensionExpired("this suspension expired before it was resumed", key=fp, store=self.store.name)
        if err is not None:
            self._audit(action, fp, f"denied:{type(err).__name__}")
            raise err

    def claim(self, key: str, input: Any = None, *, lease: float | None = None, by: str | None = None) -> Suspension:
        """Take the exclusive right to resume ``key`` for ``lease`` seconds.

        Follow with :meth:`complete` once the continuation is dispatched, or
        :meth:`release` if it could not be. Prefer :meth:`claiming`.

        Raises:
            InvalidKey: The key is malformed or was not issued with this deployment's secret (no store access).
            SuspensionNotFound: No suspension is stored under the key.
            AlreadyResumed: The suspension was already claimed or resumed.
            SuspensionExpired: Its timeout passed.
            SuspensionCancelled: It was cancelled.
            IntegrityError: The stored record was changed outside celery-persist.
            EncryptionError: The state does not open with the configured keys.
            StoreUnavailable: The store cannot be reached.
        """
        return self._take(key, input, Status.CLAIMED, lease or self.lease, by)

    def _take(self, key: str, input: Any, to: Status, hold: float, by: str | None = None) -> Suspension:
        """Read, authenticate and move ``key`` from suspended to ``to`` in one compare-and-set.

        The input is checked against the suspension's schema first; a suspension
        that waits for several approvals records one (see :meth:`_approve`).
        """
        started = time.perf_counter()
        key = self.unwrap_key(key)
        fp = self._check_key(key, "resume")
        now = self.clock()
        rec = self._get(key, fp, "resume")
        self._refuse_recorded(rec, fp, now, by)
        self._check_input(rec, fp, input, by)
        if _quorum(rec.metadata) is not None:
            return self._approve(rec, key, fp, input, by, to, hold, started)
        # Open before claiming: a blob that fails to authenticate must not use up the claim.
        state = self._open_record(rec, fp)
        moved = self._move(rec, to, due=now + hold, now=now)
        if moved is None:
            self._lost_race(rec.key_hash, fp, now, "resume")
            raise AssertionError("unreachable")  # _lost_race always raises
        # The same audit trail (and metrics) as claim + complete, though only one write happened.
        self._audit("claim", fp, "granted", seconds=time.perf_counter() - started, size=len(rec.blob))
        if to is Status.RESUMED:
            self._audit("resume", fp, "ok")
        view = self._view(moved, key, state=state, input=input)
        return dataclasses.replace(view, claim_token=self._hold(moved) if to is Status.CLAIMED else None)

    # -- people: typed input, approvals, history, resume links ------------------------------

    def _refuse_recorded(self, rec: StoredRecord, fp: str, now: float, by: str | None) -> None:
        """:meth:`_refuse`, with the refusal also written to the suspension's history."""
        try:
            self._refuse(rec, fp, now, "resume")
        except PersistenceError as exc:
            self._history(rec, "denied", by=by, reason=type(exc).__name__)
            raise

    def _check_input(self, rec: StoredRecord, fp: str, input: Any, by: str | None) -> None:
        """Refuse (before any claim) an input its schema rejects, or an approver the suspension does not accept."""
        try:
            quorum = _quorum(rec.metadata)
            if quorum is not None:
                if not isinstance(by, str) or not by.strip():
                    raise InvalidInput(
                        "this suspension waits for approvals: say who approves with by=",
                        key=fp,
                        errors=[{"loc": ["by"], "msg": "field required"}],
                    )
                approvers = quorum[1]
                if approvers is not None and by not in approvers:
                    raise InvalidInput(
                        "this identity is not one of the suspension's approvers", key=fp, errors=[{"loc": ["by"], "msg": "not an approver"}]
                    )
            schema = rec.metadata.get("schema")
            validate(schema if isinstance(schema, Mapping) else None, input, key=fp)
        except InvalidInput as exc:
            exc.store = self.store.name
            self._audit("resume", fp, "denied:InvalidInput")
            self._history(rec, "denied", by=by, reason="InvalidInput")
            raise

    @staticmethod
    def approvals_name(kh: str) -> str:
        """The checkpoint that holds the approvals given so far to suspension ``kh`` (sealed)."""
        return f"approvals:{kh}"

    def approvals(self, kh: str) -> list[dict[str, Any]]:
        """The approvals recorded for suspension ``kh``: ``[{"by", "input", "at"}, ...]`` in arrival order."""
        recorded = self.load_checkpoint(self.approvals_name(kh), [])
        return list(recorded) if isinstance(recorded, list) else []

    def _approve(
        self, rec: StoredRecord, key: str, fp: str, input: Any, by: str | None, to: Status, hold: float, started: float
    ) -> Suspension:
        """Record ``by``'s approval; the one that completes the quorum claims the suspension.

        The approvals live in their own sealed record, changed only by approvers,
        with a compare-and-set on its blob: of concurrent approvers each is either
        recorded once or told why not, and exactly one of them adds the N-th
        approval. That one then claims the suspension (the usual compare-and-set)
        with the list of ``{"by", "input"}`` as the input. An approver who finds
        the quorum complete but the suspension still waiting (its completer
        died in between) claims it on the completer's behalf.

        Returns:
            The claimed suspension (``input`` = the approvals), or, when more
            approvals are needed (or the quorum was sent on by someone else),
            a view without a claim token.
        """
        assert by is not None
        needed = _quorum(rec.metadata)[0]  # type: ignore[index]
        name = self.approvals_name(rec.key_hash)
        for _ in range(64):
            entry = self.checkpoint_record(name)
            done = self.approvals(rec.key_hash)
            if len(done) >= needed:
                if not any(a.get("by") == by for a in done):
                    last = max((a.get("at") or 0.0 for a in done), default=0.0)
                    if self.clock() - float(last) > self.lease:
                        # The approver who completed the quorum did not claim it within a lease
                        # (it died in between): send the flow on for the quorum, on its behalf.
                        claimed = self._finish_quorum(rec, key, fp, done, to, hold, started, by=None)
                        if claimed is not None:
                            return claimed
                    self._audit("resume", fp, "denied:AlreadyResumed")
                    self._history(rec, "denied", by=by, reason="AlreadyResumed")
                    raise AlreadyResumed("the approvals this suspension waited for are complete", key=fp, store=self.store.name)
            if any(a.get("by") == by for a in done):
                self._audit("resume", fp, "denied:AlreadyResumed")
                self._history(rec, "denied", by=by, reason="AlreadyResumed")
                raise AlreadyResumed("this identity has already approved", key=fp, store=self.store.name)
            updated = [*done, {"by": by, "input": input, "at": self.clock()}]
            if entry is None or not self._swap_state(entry, updated):
                continue  # another approver changed the list first: read it again
            self._audit("approve", fp, "ok", by_count=len(updated))
            self._history(rec, "approved", by=by)
            if len(updated) < needed:
                return self._view(rec, key)
            claimed = self._finish_quorum(rec, key, fp, updated, to, hold, started, by=by)
            if claimed is None:
                latest = self.store.get(rec.key_hash)
                if latest is not None and latest.status in (Status.CLAIMED, Status.RESUMED):
                    return self._view(rec, key)  # sent on for this quorum meanwhile: the approval counted
                self._refuse(self._verify(latest, fp) if latest is not None else rec, fp, self.clock(), "resume")
                raise AlreadyResumed("the suspension was taken before the last approval", key=fp, store=self.store.name)
            return claimed
        raise AlreadyResumed("too many concurrent approvals; try again", key=fp, store=self.store.name)

    def _finish_quorum(
        self, rec: StoredRecord, key: str, fp: str, done: list[dict[str, Any]], to: Status, hold: float, started: float, *, by: str | None
    ) -> Suspension | None:
        """Claim the suspension for a complete quorum; None if it was no longer suspended."""
        latest = self.store.get(rec.key_hash)
        if latest is None:
            return None
        latest = self._verify(latest, fp)
        if latest.status is not Status.SUSPENDED:
            return None
        now = self.clock()
        self._refuse_recorded(latest, fp, now, by)
        state = self._open_record(latest, fp)
        moved = self._move(latest, to, due=now + hold, now=now)
        if moved is None:
            return None
        value = [{"by": a.get("by"), "input": a.get("input")} for a in done[: _quorum(rec.metadata)[0]]]  # type: ignore[index]
        self._audit("claim", fp, "granted", seconds=time.perf_counter() - started, size=len(latest.blob))
        if to is Status.RESUMED:
            self._audit("resume", fp, "ok")
        view = self._view(moved, key, state=state, input=value)
        return dataclasses.replace(view, claim_token=self._hold(moved) if to is Status.CLAIMED else None)

    def _swap_state(self, rec: StoredRecord, state: Any) -> bool:
        """Replace ``rec``'s state (same metadata) if its blob is still the one read: a compare-and-set."""
        aad = self._aad(rec.key_hash, rec.kind, rec.metadata)
        blob = self._seal(self.serializer.dumps(state), aad)
        version = rec.version + 1
        seal = self._seal_of(rec.replace(blob=blob), version=version)
        return self.store.replace_blob(rec.key_hash, rec.blob, blob, now=self.clock(), version=version, seal=seal)

    def _history(self, rec: StoredRecord, event: str, *, by: str | None = None, reason: str | None = None) -> None:
        """Keep one audit entry beside suspension ``rec`` (when the hub keeps history): what the inbox shows.

        Only what the record itself cannot tell is written: denied attempts and
        approvals. Suspended, claimed, resumed, cancelled and expired come from
        the record's own times and status (:meth:`history_of`), so the hot path
        (park, resume) writes nothing more. An entry lives as long as the
        suspension can (its expiry, or a year without one) plus the retention,
        so cleanup prunes it like a checkpoint. Entries name identities and
        reasons, never keys or inputs; a failure to write one is logged, never raised.
        """
        if not self.history:
            return
        now = self.clock()
        lives = (rec.expires_at - now) if rec.expires_at is not None else _HISTORY_WITHOUT_EXPIRY
        tail = format(time.time_ns() // 1000, "014x")[-14:] + secrets.token_hex(13)
        try:
            self.save_indexed(
                self.index_prefix("history", rec.key_hash) + tail,
                {"at": now, "event": event, "by": by, "reason": reason},
                ttl=max(lives, 0.0) + self.retention,
                metadata={"index": "history"},
            )
        except PersistenceError:
            logger.warning("celery-persist: could not write a history entry for suspension %s", rec.key_hash[:12], exc_info=True)

    def history_of(self, kh: str) -> list[dict[str, Any]]:
        """Suspension ``kh``'s audit history, oldest first: ``{"at", "event", "by", "reason"}`` each.

        ``suspended`` and the current status (``claimed``, ``resumed``,
        ``cancelled``, ``expired``) come from the record; denials and approvals
        from the entries kept beside it.
        """
        rec = self.store.get(kh)
        entries = [state for _, state in self.indexed(self.index_prefix("history", kh)) if isinstance(state, dict)]
        if rec is not None and rec.kind is Kind.SUSPENSION:
            rec = self._verify(rec)
            entries.append({"at": rec.created_at, "event": "suspended", "by": None, "reason": None})
            if rec.status is not Status.SUSPENDED:
                entries.append({"at": rec.updated_at, "event": rec.status.value, "by": None, "reason": None})
        return sorted(entries, key=lambda e: (float(e.get("at") or 0.0), e.get("event") != "suspended"))

    def drop_companions(self, rec: StoredRecord) -> None:
        """Delete what is kept beside a suspension that is being pruned: approvals, event index.

        (History entries expire on their own: see :meth:`_history`.)
        """
        for kh in self.companion_hashes(rec):
            self.store.delete(kh)

    def companion_hashes(self, rec: StoredRecord) -> list[str]:
        """The key hashes :meth:`drop_companions` deletes for ``rec`` (from its clear metadata; no store access)."""
        if rec.kind is not Kind.SUSPENSION or rec.poisoned is not None:
            return []
        found = []
        if _quorum(rec.metadata) is not None:
            found.append(self.checkpoint_hash(self.approvals_name(rec.key_hash)))
        topic, key = rec.metadata.get("topic"), rec.metadata.get("event_key")
        if rec.metadata.get("wait") == "event" and isinstance(topic, str) and isinstance(key, str):
            found.append(self.event_index_hash(topic, key, rec.key_hash))
        return found

    def link_token(self, key: str, *, ttl: float | None, by: str | None = None) -> str:
        """A resume-link token for ``key``: sealed with a keyring-derived secret, expiring, optionally bound to ``by``.

        The token carries the key encrypted (AES-GCM): without this deployment's
        keys it is an opaque string. It works once because a resume spends the
        suspension (or, with approvals, that approver's turn).

        Raises:
            ConfigurationError: No key or secret to seal links with.
            InvalidKey: ``key`` is not a valid key.
        """
        key = self.unwrap_key(key)
        self._check_key(key, "link")
        if not self._key_wraps:
            raise ConfigurationError("resume links need an encryption key or a signing secret to seal them")
        checked = None if ttl is None else _checked_ttl(ttl)
        expires = None if not checked else self.clock() + checked
        body = json.dumps({"k": key, "by": by, "exp": expires}, separators=(",", ":")).encode("utf-8")
        nonce = os.urandom(12)
        sealed = AESGCM(self._key_wraps[0]).encrypt(nonce, body, _LINK_AAD)
        return _LINK_PREFIX + base64.urlsafe_b64encode(nonce + sealed).rstrip(b"=").decode("ascii")

    def open_link(self, token: str) -> tuple[str, str | None, float | None]:
        """``(key, bound approver or None, expiry)`` of a :meth:`link_token` token.

        Raises:
            InvalidKey: A token that is malformed or was not sealed by this deployment.
            SuspensionExpired: The link expired.
        """
        fp = link_fingerprint(token) if isinstance(token, str) else "-"
        if not isinstance(token, str) or not token.startswith(_LINK_PREFIX) or len(token) > 2048:
            raise InvalidKey("this resume link is not valid", key=fp, store=self.store.name)
        try:
            raw = base64.urlsafe_b64decode(token[len(_LINK_PREFIX) :] + "=" * (-len(token) % 4))
        except (ValueError, binascii.Error):
            raise InvalidKey("this resume link is not valid", key=fp, store=self.store.name) from None
        for secret in self._key_wraps:
            try:
                body = json.loads(AESGCM(secret).decrypt(raw[:12], raw[12:], _LINK_AAD))
                break
            except (InvalidTag, ValueError):
                continue
        else:
            self._audit("link", fp, "denied:InvalidKey")
            raise InvalidKey("this resume link is not valid (altered, or from another deployment)", key=fp, store=self.store.name)
        expires = body.get("exp")
        if expires is not None and float(expires) <= self.clock():
            self._audit("link", fp, "denied:SuspensionExpired")
            raise SuspensionExpired("this resume link has expired", key=fp, store=self.store.name)
        return str(body["k"]), body.get("by"), expires

    def _hold(self, claimed: StoredRecord) -> int:
        """Remember a claim this process holds, so :meth:`complete` can move it without reading it again."""
        with self._held_lock:
            if len(self._held) >= _HELD_CLAIMS:
                self._held.pop(next(iter(self._held)), None)
            self._held[claimed.key_hash] = claimed
        return claimed.version

    def _lost_race(self, kh: str, fp: str, now: float, action: str) -> None:
        """Another caller changed the record between our read and our transition: say how."""
        latest = self.store.get(kh)
        if latest is None:
            raise SuspensionNotFound("no suspension is stored under this key", key=fp, store=self.store.name)
        self._refuse(self._verify(latest, fp), fp, now, action)
        self._audit(action, fp, "denied:AlreadyResumed")
        raise AlreadyResumed("this suspension is being resumed by another caller", key=fp, store=self.store.name)

    def complete(self, key: str, *, token: int) -> None:
        """Mark a claimed suspension ``resumed`` (its continuation is on its way).

        Args:
            key: The suspension key.
            token: ``claim_token`` of the :class:`Suspension` that :meth:`claim`
                returned: only the claim that still holds the record completes it.

        Raises:
            AlreadyResumed: The claim is no longer held (its lease lapsed and was
                re-opened, perhaps claimed again by another caller).
            IntegrityError: The record was edited outside celery-persist.
        """
        key = self.unwrap_key(key)
        fp = self._check_key(key, "resume")
        now = self.clock()
        held = self._held.pop(key_hash(key), None)
        if held is not None and held.version == token and self._move(held, Status.RESUMED, due=now + self.retention, now=now):
            # The record as this process's claim left it: one compare-and-set, no read first.
            self._audit("resume", fp, "ok")
            return
        rec = self._get(key, fp, "resume")
        if rec.status is Status.RESUMED and rec.version == token + 1:
            return  # completed by an earlier try of this call whose reply was lost
        if (
            rec.status is not Status.CLAIMED
            or rec.version != token
            or self._move(rec, Status.RESUMED, due=now + self.retention, now=now) is None
        ):
            raise AlreadyResumed("this claim is no longer held (its lease lapsed and was re-opened?)", key=fp, store=self.store.name)
        self._audit("resume", fp, "ok")

    def complete_many(self, claims: Sequence[tuple[str, int]]) -> list[PersistenceError | None]:
        """:meth:`complete` for each ``(key, claim_token)``: claims this process holds move in one
        :meth:`BaseStore.transition_many`; any other goes through :meth:`complete` itself.

        Returns:
            Per claim, in order: None when completed, else the error :meth:`complete` raised.
        """
        now = self.clock()
        out: list[PersistenceError | None] = [None] * len(claims)
        moves: list[tuple[StoredRecord, Status, float | None | Keep]] = []
        batched: dict[str, int] = {}
        alone: list[int] = []
        for i, (key, token) in enumerate(claims):
            try:
                kh = key_hash(self.unwrap_key(key))
            except PersistenceError as exc:
                out[i] = exc
                continue
            with self._held_lock:
                held = self._held.pop(kh, None)
            if held is None or held.version != token or kh in batched:
                alone.append(i)
                continue
            moves.append((held, Status.RESUMED, now + self.retention))
            batched[kh] = i
        moved = self._move_many(moves, now=now)
        for kh, i in batched.items():
            if kh in moved:
                self._audit("resume", kh[:12], "ok")
            else:
                alone.append(i)
        for i in sorted(alone):
            if out[i] is not None:
                continue
            key, token = claims[i]
            try:
                self.complete(key, token=token)
            except PersistenceError as exc:
                out[i] = exc
        return out

    def release(self, key: str, *, token: int) -> None:
        """Give a claim back (``token`` as for :meth:`complete`): the suspension can be resumed again.

        A claim that is no longer held is left alone.
        """
        key = self.unwrap_key(key)
        fp = self._check_key(key, "release")
        now = self.clock()
        self._held.pop(key_hash(key), None)
        rec = self.store.get(key_hash(key))
        if rec is None or rec.status is not Status.CLAIMED or rec.version != token:
            return
        if self._move(self._verify(rec, fp), Status.SUSPENDED, due=rec.expires_at, now=now) is not None:
            self._audit("release", fp, "ok")

    @contextlib.contextmanager
    def claiming(self, key: str, input: Any = None, *, lease: float | None = None) -> Iterator[Suspension]:
        """Claim ``key``; complete on a clean exit, release if the block raises.

        Example:
            >>> with hub.claiming(key, {"approved": True}) as s:
            ...     dispatch(s.state, s.input)   # raises -> released, resumable again
        """
        suspension = self.claim(key, input, lease=lease)
        token = suspension.claim_token
        assert token is not None  # a claim always has one
        try:
            yield suspension
        except BaseException:
            self.release(key, token=token)
            raise
        self.complete(key, token=token)

    def resume(self, key: str, input: Any = None, *, by: str | None = None) -> Suspension:
        """Claim and complete in one step; exactly one caller per key succeeds.

        Returns:
            The suspension with ``.state``, ``.input`` and ``status == "resumed"``.

        Raises:
            InvalidKey: Malformed or forged key (no store read).
            SuspensionNotFound: No suspension is stored under the key.
            AlreadyResumed: The suspension was already claimed or resumed.
            SuspensionExpired: Its timeout passed.
            SuspensionCancelled: It was cancelled.
        """
        # Nothing is dispatched between claiming and completing here, so there is no
        # crash window for a lease to cover: one compare-and-set straight to RESUMED
        # halves the durable writes (an fsync or a commit each) of every resume.
        return self._take(key, input, Status.RESUMED, self.retention, by)

    def cancel(self, key: str) -> Suspension:
        """End a suspension so it can no longer be resumed. Cancelling twice is a no-op.

        Returns:
            The suspension, state included (authenticated: what a caller acts on,
            e.g. which tasks to revoke, comes from it), status ``cancelled``.

        Raises:
            InvalidKey: The key is malformed or was not issued with this deployment's secret (no store access).
            SuspensionNotFound: No suspension is stored under the key.
            AlreadyResumed: The suspension was already claimed or resumed.
            SuspensionExpired: Its timeout passed.
            IntegrityError: The stored record was changed outside celery-persist.
            EncryptionError: The state does not open with the configured keys.
        """
        key = self.unwrap_key(key)
        fp = self._check_key(key, "cancel")
        return self._cancel(self._get(key, fp, "cancel"), key, fp)

    def cancel_by_hash(self, kh: str) -> Suspension:
        """:meth:`cancel` for an operator who has the store and its keys but not the suspension's key.

        ``kh`` is the full key hash (what :meth:`list` shows the start of as the
        fingerprint). The record's seal and state must still authenticate with
        this hub's keys, so a store reader without them cannot cancel anything
        this way. Same outcomes and errors as :meth:`cancel`, but the result's
        ``key`` is None; the audit record says ``via=key-hash``.
        """
        fp = kh[:12]
        rec = self.store.get(kh)
        if rec is None or rec.kind is not Kind.SUSPENSION:
            self._audit("cancel", fp, "denied:SuspensionNotFound", via="key-hash")
            raise SuspensionNotFound("no suspension is stored under this key hash", key=fp, store=self.store.name)
        return self._cancel(self._verify(rec, fp), None, fp, via="key-hash")

    def _cancel(self, rec: StoredRecord, key: str | None, fp: str, **audit: str) -> Suspension:
        now = self.clock()
        state = self._open_record(rec, fp)  # a record that does not authenticate is not acted on
        if rec.status is not Status.CANCELLED:
            self._refuse(rec, fp, now, "cancel")
            if self._move(rec, Status.CANCELLED, due=now + self.retention, now=now) is None:
                latest = self.store.get(rec.key_hash)
                if latest is None or self._verify(latest, fp).status is not Status.CANCELLED:
                    self._lost_race(rec.key_hash, fp, now, "cancel")
            self._audit("cancel", fp, "ok", **audit)
        return self._view(rec.replace(status=Status.CANCELLED), key, state=state)

    def list(self, status: str | None = None, limit: int = 100, cursor: str | None = None) -> Page:
        """One page of suspensions (no state, no keys), in key-hash order.

        Returns:
            A :class:`Page` of :class:`Suspension` with ``.next_cursor`` (None at the end).
        """
        try:
            st = Status(status) if status is not None else None
        except ValueError:
            raise ConfigurationError(f"unknown status {status!r}; one of {[s.value for s in Status]}") from None
        page = self.store.scan(kind=Kind.SUSPENSION, status=st, limit=limit, cursor=cursor)
        now = self.clock()
        # A row the store cannot decode is not a suspension anyone can act on: it is left
        # out here (one bad row must not break a listing); stats() counts it as unreadable.
        return Page([self._view(r, None, now=now) for r in page.items if r.poisoned is None], page.next_cursor)

    # -- checkpoints -----------------------------------------------------------------------

    @staticmethod
    def checkpoint_hash(name: str) -> str:
        return hashlib.sha256(b"checkpoint\0" + name.encode("utf-8")).hexdigest()

    def save_checkpoint(self, name: str, state: Any, *, ttl: float | None = None, metadata: Mapping[str, Any] | None = None) -> None:
        """Durably store ``state`` under ``name`` (e.g. a task id), replacing the last one."""
        kh = self.checkpoint_hash(name)
        now = self.clock()
        ttl = _checked_ttl(self.default_ttl if ttl is None else ttl)
        self.store.put(self._build(kh, Kind.CHECKPOINT, Status.ACTIVE, state, metadata, now, now + ttl if ttl else None, kh[:12]))

    def checkpoint_record(self, name: str) -> StoredRecord | None:
        """The record saved under ``name`` (its seal checked), or None."""
        rec = self.store.get(self.checkpoint_hash(name))
        return self._verify(rec) if rec is not None and rec.kind is Kind.CHECKPOINT else None

    def load_checkpoint(self, name: str, default: Any = None) -> Any:
        """The last state saved under ``name``, or ``default``."""
        rec = self.checkpoint_record(name)
        return default if rec is None else self._open_record(rec)

    def delete_checkpoint(self, name: str) -> bool:
        return self.store.delete(self.checkpoint_hash(name))

    # -- indexes: records found by a key-hash prefix (event waits, buffered signals) --------

    def index_prefix(self, label: str, *parts: str) -> str:
        """24 hex characters that name ``parts`` (say a topic and a key) in the key-hash space.

        Records written under it with :meth:`save_indexed` are found again with
        :meth:`indexed`, through each store's key-hash index: the cost does not
        depend on how many other records are stored. Keyed with a secret derived
        from the keyring (or the signing secret) when there is one, so the store
        does not show which topic or key a record belongs to.
        """
        data = "\0".join((label, *parts)).encode("utf-8")
        secret = self._seed if self._seed is not None else b"celery-persist/index"
        return hmac.new(secret, b"index/v1\0" + data, hashlib.sha256).hexdigest()[:INDEX_PREFIX_LEN]

    def event_index_hash(self, topic: str, key: str, suspension_hash: str) -> str:
        """Where the index record of a flow waiting on ``(topic, key)`` lives (see :mod:`celery_persist.waits`)."""
        return self.index_prefix("event", topic, key) + suspension_hash[: 64 - INDEX_PREFIX_LEN]

    def audit(self, action: str, fp: str, outcome: str, **extra: Any) -> None:
        """Log an audit record (and tell the metrics observer) for an action taken above the hub."""
        self._audit(action, fp, outcome, **extra)

    def save_indexed(self, kh: str, state: Any, *, ttl: float | None, metadata: Mapping[str, Any] | None = None) -> None:
        """Store ``state`` (sealed, like a checkpoint) under the key hash ``kh`` (an index prefix + 40 hex)."""
        if len(kh) != 64 or not all(c in "0123456789abcdef" for c in kh):
            raise ValueError("an indexed record's key hash is 64 lowercase hex characters")
        now = self.clock()
        ttl = _checked_ttl(ttl or 0)
        self.store.put(self._build(kh, Kind.CHECKPOINT, Status.ACTIVE, state, metadata, now, now + ttl if ttl else None, kh[:12]))

    def indexed(self, prefix: str, *, batch: int = 500) -> Iterator[tuple[StoredRecord, Any]]:
        """``(record, state)`` of every live record saved under ``prefix``, in key-hash order.

        Walks the store's key-hash order from the prefix on and stops at the
        first key past it: the cost follows the number of matches. Records that
        expired (not yet pruned), that do not verify or do not open are skipped.
        """
        start = int(prefix, 16)
        cursor = None if start == 0 else format(start - 1, f"0{len(prefix)}x") + "f" * (64 - len(prefix))
        now = self.clock()
        # Most prefixes hold a handful of records: a small first page, growing to ``batch``,
        # so a lookup does not read (with blobs) hundreds of unrelated records past the prefix.
        page_size = min(16, batch)
        while True:
            # No kind filter: every store serves a plain key-order scan from its primary index,
            # where a kind filter may make a database pick a (kind, ...) index and sort.
            page = self.store.scan(limit=page_size, cursor=cursor, with_blob=True)
            page_size = min(page_size * 4, batch)
            for rec in page.items:
                if not rec.key_hash.startswith(prefix):
                    return
                if rec.poisoned is not None or rec.kind is not Kind.CHECKPOINT or (rec.expires_at is not None and rec.expires_at <= now):
                    continue
                try:
                    yield rec, self._open_record(self._verify(rec), rec.key_hash[:12])
                except PersistenceError:
                    logger.warning("celery-persist: skipped indexed record %s that does not authenticate", rec.key_hash[:12])
            if page.next_cursor is None:
                return
            cursor = page.next_cursor

    # -- batches: many claims in one compare-and-set round trip (celery_persist.bulk.resume_many) --

    def claim_many(
        self, keys: Sequence[str], inputs: Sequence[Any], *, lease: float | None = None
    ) -> Sequence[Suspension | PersistenceError]:
        """:meth:`claim` for each of ``keys`` (with the input at the same index), the moves in one
        :meth:`BaseStore.transition_many`.

        Keys are checked, read (one :meth:`BaseStore.get` each), verified, refused and
        opened exactly as :meth:`claim` does, then every claimable one moves in one batch.
        A suspension that waits for approvals or checks its input against a schema, and
        a key given twice, goes through :meth:`claim` itself.

        Returns:
            Per key, in order: the claimed :class:`Suspension` (``claim_token`` set), or the
            :class:`~celery_persist.errors.PersistenceError` :meth:`claim` would have raised
            (``InvalidKey``, ``SuspensionNotFound``, ``AlreadyResumed``, ``SuspensionExpired``...).
        """
        if len(keys) != len(inputs):
            raise ValueError("claim_many takes one input per key")
        started = time.perf_counter()
        hold = lease or self.lease
        now = self.clock()
        out: list[Suspension | PersistenceError | None] = [None] * len(keys)
        batch: dict[str, tuple[int, str, str, StoredRecord, Any]] = {}
        single: list[int] = []
        for i, key in enumerate(keys):
            try:
                key = self.unwrap_key(key)
                fp = self._check_key(key, "resume")
                if key_hash(key) in batch:
                    single.append(i)  # the same key again: decided after the batch, as a second claim() would be
                    continue
                rec = self._get(key, fp, "resume")
                if _quorum(rec.metadata) is not None or rec.metadata.get("schema") is not None:
                    single.append(i)
                    continue
                self._refuse_recorded(rec, fp, now, None)
                state = self._open_record(rec, fp)  # before claiming: a blob that fails must not use up the claim
            except PersistenceError as exc:
                out[i] = exc
                continue
            batch[rec.key_hash] = (i, key, fp, rec, state)
        moved = self._move_many([(rec, Status.CLAIMED, now + hold) for _, _, _, rec, _ in batch.values()], now=now)
        for kh, (i, key, fp, rec, state) in batch.items():
            claimed = moved.get(kh)
            if claimed is None:
                try:
                    self._lost_race(kh, fp, now, "resume")
                except PersistenceError as exc:
                    out[i] = exc
                continue
            self._audit("claim", fp, "granted", seconds=time.perf_counter() - started, size=len(rec.blob))
            view = self._view(claimed, key, state=state, input=inputs[i])
            out[i] = dataclasses.replace(view, claim_token=self._hold(claimed))
        for i in single:
            try:
                out[i] = self.claim(keys[i], inputs[i], lease=lease)
            except PersistenceError as exc:
                out[i] = exc
        return [o for o in out if o is not None]

    # -- maintenance -----------------------------------------------------------------------

    def cleanup(
        self,
        now: float | None = None,
        *,
        on_expired: Callable[[Suspension], None] | None = None,
        on_unfinished: Callable[[Suspension, Any, str], None] | None = None,
        batch: int = 500,
        retry_after: float = 60.0,
        handler_attempts: int = maintenance.TIMEOUT_HANDLER_ATTEMPTS,
        around_handlers: Callable[[], AbstractContextManager[Any]] | None = None,
    ) -> int:
        """Handle every record that is due; cost grows with due records only.

        * a suspension past ``expires_at`` is taken under the hub's ``lease`` (as a
          resume claim is), and ``on_expired`` gets it (with state, and a ``delivery`` tag for
          the continuation it sends) to apply its timeout policy, inside
          ``around_handlers()`` when given (one context per page, e.g. batching the
          messages sent); then it becomes ``expired``. If a cleanup dies half way,
          a continuation that went out expires its record when a worker takes it
          (:meth:`take_delivery`); the others lapse, are re-opened and fired again,
          and a late copy of an earlier firing is dropped. If ``on_expired``
          raises, the record goes back to ``suspended`` and is retried after
          ``retry_after`` seconds, ``handler_attempts`` times in all: then cleanup
          gives up (one ERROR, audit ``expire ... gave-up``) and the record stays
          ``expired``, out of the due index, for inspection;
        * a claim whose lease lapsed is re-opened (``suspended``), unless its
          dispatch was recorded (:meth:`record_dispatch`): then
          ``on_unfinished(suspension, input, delivery_tag)`` sends the same continuation again
          and the claim is completed; if that raises, it is retried after
          ``retry_after`` seconds (without ``on_unfinished`` it is left as it is);
        * checkpoints past their ttl and finished records past retention are deleted;
        * a record whose seal does not verify is skipped and audited, never acted on.

        Returns:
            How many records were changed or deleted.
        """
        return maintenance.cleanup(
            self,
            now,
            on_expired=on_expired,
            on_unfinished=on_unfinished,
            batch=batch,
            retry_after=retry_after,
            handler_attempts=handler_attempts,
            around_handlers=around_handlers,
        )

    def rotate_keys(self, *, batch: int = 200, on_record: Callable[[str], None] | None = None) -> dict[str, int]:
        """Re-encrypt every record not sealed with the active key. Resumable; safe while workers run.

        Each record is swapped with :meth:`BaseStore.replace_blob`, a
        compare-and-set on the blob, so a record a worker changes meanwhile is
        left alone (the next run picks it up). Old keys must stay in the
        keyring until this reports ``pending == 0``.

        Args:
            batch: Records per store page.
            on_record: Called with each record's outcome (``rotated``, ``current``,
                ``raced``, ``plaintext``, ``unreadable``), e.g. to drive a progress bar.

        Returns:
            Counts per outcome, plus ``pending`` (records still not under the active key).

        Raises:
            EncryptionError: The hub has no keyring.
        """
        return maintenance.rotate_keys(self, batch=batch, on_record=on_record)

    def adopt_unsealed(self, *, batch: int = 200) -> int:
        """Seal records written before record seals existed (0.1); run once after upgrading.

        Until then such records are refused with ``IntegrityError``. Returns how many were sealed.
        """
        return maintenance.adopt_unsealed(self, batch=batch)

    def stats(self, *, batch: int = 1000) -> dict[str, Any]:
        """Counts of suspensions by status, oldest suspended age, checkpoints (a full scan: for operators)."""
        return maintenance.stats(self, batch=batch)

    def health(self) -> dict[str, Any]:
        """Store health plus the hub's security posture (never raises)."""
        info = dict(self.store.health())
        info["encryption"] = "aes-256-gcm" if self.keyring else ("hmac-sha256" if self._sealer else "none")
        info["key_ids"] = list(self.keyring.key_ids) if self.keyring else []
        info["signed_keys"] = bool(self._key_secrets)
        info["codec"] = self.serializer.codec
        info["compression"] = self.serializer.compression
        return info

    def close(self) -> None:
        self.store.close()

    def __repr__(self) -> str:
        return f"<PersistenceHub store={self.store.name} encryption={'on' if self.keyring else 'off'}>"
