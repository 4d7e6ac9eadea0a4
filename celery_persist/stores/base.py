"""The store contract: a handful of atomic operations over opaque records.

A store sees bytes and metadata only. It never sees a suspension key (records
are indexed by :func:`celery_persist.keys.key_hash`), never decrypts, and
never decides policy: the hub does. What a store must guarantee:

* :meth:`BaseStore.put` is an upsert of one whole record.
* :meth:`BaseStore.transition` is a compare-and-set on ``status`` (and, when
  asked, on ``version``) that is atomic across processes and hosts. Claim,
  cancel, complete, expire and re-open are all built from it. Each store's
  docstring says how. :meth:`BaseStore.transition_many` and
  :meth:`BaseStore.delete_many` do the same for a batch of records in (about)
  one round trip, still atomic per record (cleanup and ``resume_many`` use them).
* ``version`` and ``seal`` are carried, never interpreted: the hub bumps the
  one and computes the other; a store stores them, returns them exactly, and
  compares ``version`` inside its compare-and-set.
* :meth:`BaseStore.due` walks an index on ``due_at`` so cleanup costs
  O(records due), not O(records stored).
* :meth:`BaseStore.scan` pages by ``key_hash`` with a cursor: no duplicates,
  no gaps for records that exist for the whole walk.
* One bad row never stops the rest. Every store decodes its rows through
  :func:`decode_record` and :func:`salvage`: a row edited into something that
  does not decode (metadata that is not JSON, an unknown status, a missing or
  mistyped field) makes :meth:`BaseStore.get` raise
  :class:`~celery_persist.errors.IntegrityError`, and comes back from
  :meth:`BaseStore.scan` and :meth:`BaseStore.due` as a placeholder whose
  ``poisoned`` says why (see :func:`poisoned_record`), so the hub can act on its
  key hash: :meth:`BaseStore.quarantine` takes it out of the due index.

Expiry has side effects (timeouts run errbacks, leases re-open), so no store
lets its database drop records on its own through a native TTL.
"""

from __future__ import annotations

import abc
import dataclasses
import enum
import json
import re
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

from ..errors import IntegrityError

__all__ = [
    "Status",
    "Kind",
    "StoredRecord",
    "TransitionSpec",
    "Page",
    "ScanRange",
    "BaseStore",
    "Keep",
    "KEEP",
    "batches",
    "distinct_changes",
    "token_changes",
    "dump_metadata",
    "load_metadata",
    "UndecodableRecord",
    "ROW_ERRORS",
    "decode_record",
    "poisoned_record",
    "salvage",
    "decoded",
]

_Row = TypeVar("_Row")


class Status(str, enum.Enum):
    """Lifecycle of a record.

    Suspensions move ``suspended -> claimed -> resumed`` (or back to
    ``suspended`` when a lease is released or lapses), or end ``cancelled`` /
    ``expired``. Checkpoints and run records stay ``active``.
    """

    SUSPENDED = "suspended"
    CLAIMED = "claimed"
    RESUMED = "resumed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"
    ACTIVE = "active"

    def __str__(self) -> str:
        return self.value


TERMINAL = frozenset({Status.RESUMED, Status.CANCELLED, Status.EXPIRED})


class Kind(str, enum.Enum):
    """What a record holds."""

    SUSPENSION = "suspension"
    CHECKPOINT = "checkpoint"

    def __str__(self) -> str:
        return self.value


class Keep(enum.Enum):
    """Type of :data:`KEEP` (an enum, so ``float | None | Keep`` narrows with ``is``)."""

    KEEP = "keep"


#: Sentinel for :meth:`BaseStore.transition`: leave ``due_at`` as it is.
KEEP = Keep.KEEP


@dataclass(frozen=True, slots=True)
class StoredRecord:
    """One stored record. Times are POSIX seconds (UTC).

    Attributes:
        key_hash: SHA-256 hex of the suspension key (or of the checkpoint name).
        kind: What the record holds.
        status: Where it is in its lifecycle.
        blob: The sealed (encrypted or signed) serialized state; opaque here.
        metadata: Non-secret, JSON-able facts for listing (task name, prompt...).
            Authenticated by the hub as associated data, not encrypted.
        created_at: When the record was first written.
        expires_at: When the suspension times out (None: never).
        due_at: When cleanup must next look at the record (None: never).
            For ``suspended`` it is ``expires_at``; for ``claimed`` the lease
            deadline; for terminal records the end of their retention.
        updated_at: Last write.
        version: A counter the hub bumps on every write of the record, and the
            token of :meth:`BaseStore.transition`'s compare-and-set
            (``expect_version``). 0 for records written before it existed.
        seal: The hub's HMAC over the fields that decide behaviour (status,
            times, version, which blob). Opaque to stores, which store and return
            it exactly and never compute or check it; hex text, may be empty
            (records written before it existed).
        poisoned: None for a record read back whole. For a stored row that does
            not decode, a short reason (``"metadata is not JSON"``, ``"unknown
            status 'revived'"``; never the row's content): :meth:`BaseStore.scan`
            and :meth:`BaseStore.due` return such a row as a placeholder (see
            :func:`poisoned_record`) whose other fields mean nothing. Never written.
    """

    key_hash: str
    kind: Kind
    status: Status
    blob: bytes
    metadata: Mapping[str, Any] = field(default_factory=dict)
    created_at: float = 0.0
    expires_at: float | None = None
    due_at: float | None = None
    updated_at: float = 0.0
    version: int = 0
    seal: str = ""
    poisoned: str | None = None

    def replace(self, **changes: Any) -> StoredRecord:
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True, slots=True)
class TransitionSpec:
    """One compare-and-set of :meth:`BaseStore.transition_many`: the arguments of one
    :meth:`BaseStore.transition` call but ``now`` (which the batch shares).

    ``expect`` is kept as a frozenset of :class:`Status`; ``due_at=KEEP``, ``version=None``
    and ``seal=None`` leave the field as it is, ``expect_version=None`` accepts any version.
    """

    key_hash: str
    expect: frozenset[Status]
    to: Status
    due_at: float | None | Keep = KEEP
    version: int | None = None
    seal: str | None = None
    expect_version: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "expect", frozenset(Status(s) for s in self.expect))
        object.__setattr__(self, "to", Status(self.to))


def distinct_changes(changes: Iterable[TransitionSpec]) -> list[TransitionSpec]:
    """``changes`` as a list, checked to name each record once (what :meth:`BaseStore.transition_many` takes).

    Raises:
        ValueError: A key hash appears twice.
    """
    out = list(changes)
    if len({c.key_hash for c in out}) != len(out):
        raise ValueError("transition_many takes each record once: a key hash appears twice in one batch")
    return out


@dataclass(frozen=True, slots=True)
class Page:
    """One page of a listing; ``next_cursor`` is None at the end."""

    items: Sequence[Any]
    next_cursor: str | None = None


@dataclass(frozen=True, slots=True)
class ScanRange:
    """The part of the key space one :meth:`BaseStore.scan` call asks for.

    Keys after ``cursor``, in key order, at most ``limit``, of the wanted ``kind``
    and ``status`` (None: any). Stores that read one row more than a page
    (``limit + 1``) to learn whether another page follows split the rows with
    :meth:`page`; stores that re-read records found through an index check them
    again with :meth:`matches`.
    """

    kind: Kind | None = None
    status: Status | None = None
    limit: int = 100
    cursor: str | None = None

    def matches(self, record: StoredRecord) -> bool:
        """True when ``record`` has the wanted kind and status.

        A poisoned placeholder always matches: its real kind and status are
        unknown, and leaving it out would hide the damage from the listing.
        """
        if record.poisoned is not None:
            return True
        return (self.kind is None or record.kind == self.kind) and (self.status is None or record.status == self.status)

    def page(self, rows: Sequence[_Row], key: Callable[[_Row], str]) -> tuple[list[_Row], str | None]:
        """Up to ``limit + 1`` rows read in key order -> (the page's rows, its next cursor)."""
        more = len(rows) > self.limit
        return list(rows[: self.limit]), key(rows[self.limit - 1]) if more else None


def batches(records: Iterable[StoredRecord], *, max_records: int, max_bytes: int) -> Iterator[list[StoredRecord]]:
    """Group ``records`` for ``put_many``: at most ``max_records`` each, closing a group once
    its blobs reach ``max_bytes``. Order is kept."""
    batch: list[StoredRecord] = []
    size = 0
    for record in records:
        batch.append(record)
        size += len(record.blob)
        if len(batch) >= max_records or size >= max_bytes:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def token_changes(version: int | None, seal: str | None) -> dict[str, Any]:
    """The ``version`` / ``seal`` changes a write asks for, as :meth:`StoredRecord.replace` keywords
    (a None leaves that field as it is)."""
    changes: dict[str, Any] = {}
    if version is not None:
        changes["version"] = int(version)
    if seal is not None:
        changes["seal"] = str(seal)
    return changes


def dump_metadata(metadata: Mapping[str, Any]) -> str:
    """Canonical JSON text of metadata (sorted keys, no spaces): stable for AAD."""
    return json.dumps(metadata, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def load_metadata(text: str | bytes | None) -> dict[str, Any]:
    if not text:
        return {}
    value = json.loads(text)
    return value if isinstance(value, dict) else {}


class UndecodableRecord(ValueError):
    """A stored row that does not decode into a :class:`StoredRecord`.

    The message is a short reason fit for logs and errors: it names the field and
    what is wrong with it, never the row's content.
    """


#: What decoding a row may raise besides :class:`UndecodableRecord`; :func:`salvage`
#: turns any of them into a poisoned placeholder (``json.JSONDecodeError`` and
#: ``UnicodeDecodeError`` are ``ValueError``-s).
ROW_ERRORS: tuple[type[Exception], ...] = (ValueError, KeyError, TypeError, AttributeError, IndexError, OverflowError, RecursionError)

#: Longest stored kind / status value a reason quotes.
_QUOTED = 24
_FIELD_NAME = re.compile(r"[a-z_]{1,32}")
_Member = TypeVar("_Member", Kind, Status)
#: Each member of Kind and Status by its stored value, as text and as UTF-8 bytes.
_MEMBERS: dict[type[Any], dict[str | bytes, Any]] = {
    cls: {**{m.value: m for m in cls}, **{m.value.encode(): m for m in cls}} for cls in (Kind, Status)
}


def _quote(value: str) -> str:
    return repr(value if len(value) <= _QUOTED else value[:_QUOTED] + "...")


def _text(value: Any, name: str) -> str:
    if isinstance(value, bytes | bytearray | memoryview):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            raise UndecodableRecord(f"{name} is not UTF-8 text") from None
    if not isinstance(value, str):
        raise UndecodableRecord(f"{name} is not text")
    return value


def _member(cls: type[_Member], value: Any, name: str) -> _Member:
    if isinstance(value, cls):
        return value
    if type(value) is str or type(value) is bytes:
        found: _Member | None = _MEMBERS[cls].get(value)
        if found is not None:
            return found  # the common case, without decoding or an enum lookup
    if value is None:
        raise UndecodableRecord(f"{name} is missing")
    text = _text(value, name)
    try:
        return cls(text)
    except ValueError:
        raise UndecodableRecord(f"unknown {name} {_quote(text)}") from None


def _opt_time(value: Any, name: str) -> float | None:
    return None if value is None else _time(value, name)


def _time(value: Any, name: str) -> float:
    if type(value) is float:
        return value
    if type(value) is bytes:  # Redis: float() reads ASCII digits from bytes as from text
        try:
            return float(value)
        except ValueError:
            raise UndecodableRecord(f"{name} is not a number") from None
    if value is None:
        raise UndecodableRecord(f"{name} is missing")
    if isinstance(value, bool):
        raise UndecodableRecord(f"{name} is not a number")
    try:
        if isinstance(value, bytes | bytearray | memoryview):
            value = bytes(value).decode("ascii")
        return float(value)
    except (TypeError, ValueError, OverflowError):
        raise UndecodableRecord(f"{name} is not a number") from None


def _version(value: Any) -> int:
    if value is None:
        return 0  # written before versions existed
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str | bytes | bytearray):
        try:
            return int(value)
        except ValueError:
            pass
    raise UndecodableRecord("version is not an integer")


def _metadata(value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    try:
        if isinstance(value, Mapping):
            # A copy through JSON, so a caller cannot reach into what a store keeps.
            return load_metadata(dump_metadata(value))
        if isinstance(value, bytes | bytearray):
            return load_metadata(bytes(value).decode("utf-8"))  # decoded first: json.loads(str) is faster
        if isinstance(value, str):
            return load_metadata(value)
    except (ValueError, TypeError, RecursionError):
        raise UndecodableRecord("metadata is not JSON") from None
    raise UndecodableRecord("metadata is not JSON text")


def _blob(value: Any) -> bytes:
    if value is None:
        return b""
    if type(value) is bytes:
        return value
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    raise UndecodableRecord("blob is not bytes")


def decode_record(
    key_hash: str,
    *,
    kind: Any,
    status: Any,
    metadata: Any,
    created_at: Any,
    updated_at: Any,
    expires_at: Any = None,
    due_at: Any = None,
    blob: Any = b"",
    version: Any = None,
    seal: Any = None,
) -> StoredRecord:
    """A :class:`StoredRecord` from the values a store read, each checked; every store decodes through this.

    Accepts what drivers hand back: text or UTF-8 bytes for ``kind``, ``status``,
    ``seal`` and numbers (Redis), JSON text, bytes or a mapping for ``metadata``
    (None and ``""`` are ``{}``, and JSON that is not an object reads as ``{}``),
    numbers for times. A None ``version`` / ``seal`` reads as ``0`` / ``""`` (rows
    written before they existed).

    Raises:
        UndecodableRecord: A field is missing, of the wrong type, or not one of
            the known values; the message names which (see :func:`salvage`).
    """
    return StoredRecord(
        key_hash=key_hash,
        kind=_member(Kind, kind, "kind"),
        status=_member(Status, status, "status"),
        blob=_blob(blob),
        metadata=_metadata(metadata),
        created_at=_time(created_at, "created_at"),
        expires_at=_opt_time(expires_at, "expires_at"),
        due_at=_opt_time(due_at, "due_at"),
        updated_at=_time(updated_at, "updated_at"),
        version=_version(version),
        seal="" if seal is None else _text(seal, "seal"),
    )


def poisoned_record(key_hash: str, reason: str) -> StoredRecord:
    """The placeholder :meth:`BaseStore.scan` and :meth:`BaseStore.due` return for a row that does not decode.

    Only ``key_hash`` and ``poisoned`` mean anything; kind, status and blob are
    fixed stand-ins (``suspension``, ``suspended``, ``b""``) and every time is unset.
    """
    return StoredRecord(key_hash=key_hash, kind=Kind.SUSPENSION, status=Status.SUSPENDED, blob=b"", poisoned=reason)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, UndecodableRecord | IntegrityError):
        return str(exc.args[0]) if exc.args else type(exc).__name__
    if isinstance(exc, KeyError) and exc.args and isinstance(exc.args[0], str) and _FIELD_NAME.fullmatch(exc.args[0]):
        return f"{exc.args[0]} is missing"  # our own field names only, never a value
    return f"record does not decode ({type(exc).__name__})"


def salvage(key_hash: str, decode: Callable[[], StoredRecord]) -> StoredRecord:
    """``decode()``, or, when the row does not decode, its :func:`poisoned_record` placeholder.

    ``decode`` turns one row already read into a record (through :func:`decode_record`);
    it may also raise a store's own :class:`~celery_persist.errors.IntegrityError`
    (a file store's truncated header). Driver and I/O errors pass through.
    """
    try:
        return decode()
    except (UndecodableRecord, IntegrityError) as exc:
        return poisoned_record(key_hash, _reason(exc))
    except ROW_ERRORS as exc:
        return poisoned_record(key_hash, _reason(exc))


def decoded(record: StoredRecord, *, store: str) -> StoredRecord:
    """``record`` itself, for :meth:`BaseStore.get`; a poisoned placeholder raises instead.

    Raises:
        IntegrityError: The row does not decode; the message is the reason.
    """
    if record.poisoned is not None:
        raise IntegrityError(record.poisoned, key=record.key_hash[:12], store=store)
    return record


class BaseStore(abc.ABC):
    """Abstract store; subclasses implement the six abstract methods.

    ``put``, ``get``, ``delete``, ``transition``, ``scan`` and ``due`` are abstract;
    ``setup``, ``put_many``, ``transition_many``, ``delete_many``, ``replace_blob``,
    ``quarantine``, ``health`` and ``close`` have working defaults. Implementations connect lazily, reconnect after ``fork()``,
    map their driver's transient errors to :class:`~celery_persist.errors.StoreUnavailable`
    (the message names the driver's cause, masked: see :func:`.drivers.describe`),
    and decode rows through :func:`decode_record` / :func:`salvage`.
    """

    #: URL schemes this class serves (for messages and the conformance suite).
    schemes: ClassVar[tuple[str, ...]] = ()
    #: True when claims are atomic across processes (False only for memory://).
    shared_across_processes: ClassVar[bool] = True
    #: True when records survive a restart of the process.
    durable: ClassVar[bool] = True

    #: Masked URL for logs and errors (never contains a password).
    name: str = "store"

    def setup(self) -> None:
        """Create tables, indexes, directories; run migrations. Idempotent."""

    @abc.abstractmethod
    def put(self, record: StoredRecord) -> None:
        """Insert or replace the whole record."""

    def put_many(self, records: Iterable[StoredRecord]) -> None:
        """Write many records; stores override this with a batched form."""
        for record in records:
            self.put(record)

    @abc.abstractmethod
    def get(self, key_hash: str) -> StoredRecord | None:
        """The record, or None."""

    @abc.abstractmethod
    def delete(self, key_hash: str) -> bool:
        """Remove the record; True if it existed."""

    @abc.abstractmethod
    def transition(
        self,
        key_hash: str,
        expect: Collection[Status],
        to: Status,
        *,
        due_at: float | None | Keep = KEEP,
        now: float,
        version: int | None = None,
        seal: str | None = None,
        expect_version: int | None = None,
    ) -> bool:
        """Atomically set ``status = to`` if the current status is in ``expect``
        (and the current version is ``expect_version``, when one is given).

        The check and every write happen in one atomic step: of many concurrent
        callers with the same expectations, exactly one wins.

        Args:
            key_hash: The record.
            expect: Statuses from which the move is allowed.
            to: The new status.
            due_at: New ``due_at`` (``KEEP`` leaves it unchanged).
            now: Stored as ``updated_at``.
            version: New ``version`` (None leaves it unchanged).
            seal: New ``seal`` (None leaves it unchanged).
            expect_version: Move only if the stored ``version`` equals this
                (None: any version).

        Returns:
            True if this call made the change; False if the record is missing,
            its status was not in ``expect`` or its version was not
            ``expect_version`` (someone else won). A False leaves the record as it was.
        """

    def transition_many(self, changes: Sequence[TransitionSpec], *, now: float) -> list[str]:
        """Many :meth:`transition` calls as one batch; the key hashes of the records that moved, in ``changes`` order.

        Each change is its own compare-and-set, atomic per record exactly as
        :meth:`transition` is (of concurrent callers expecting the same status and
        version, one moves a record); a record that is missing, or whose status or
        version does not match, is left as it was and not returned. The batch as a
        whole is not atomic: a crash may leave part of it applied. Each record may
        appear once per call (:class:`ValueError` otherwise). All share ``updated_at = now``.

        Default: :meth:`transition` for each change, one after another. Stores
        override it to send the batch in one round trip (one statement, pipeline or
        bulk write): see each store's docstring.
        """
        return [
            c.key_hash
            for c in distinct_changes(changes)
            if self.transition(
                c.key_hash, c.expect, c.to, due_at=c.due_at, now=now, version=c.version, seal=c.seal, expect_version=c.expect_version
            )
        ]

    def delete_many(self, key_hashes: Sequence[str]) -> int:
        """Remove every record named in ``key_hashes`` (a repeated one once); how many existed.

        Each record is removed as by :meth:`delete` (its blob with it); the batch as a
        whole is not atomic. Default: :meth:`delete` for each; stores override it
        with one statement or round trip per batch.
        """
        return sum(1 for kh in dict.fromkeys(key_hashes) if self.delete(kh))

    @abc.abstractmethod
    def scan(
        self,
        *,
        kind: Kind | None = None,
        status: Status | None = None,
        limit: int = 100,
        cursor: str | None = None,
        with_blob: bool = False,
    ) -> Page:
        """Records in ``key_hash`` order after ``cursor``; items are :class:`StoredRecord`.

        ``with_blob=False`` lets a store skip reading blobs (items carry ``b""``).
        """

    @abc.abstractmethod
    def due(self, now: float, limit: int = 100) -> list[StoredRecord]:
        """Up to ``limit`` records with ``due_at <= now``, earliest first, with blobs."""

    def quarantine(self, key_hash: str) -> bool:
        """Take the record out of the due index for good, keeping the row for inspection.

        For a record cleanup must stop looking at: one that does not decode (a
        ``poisoned`` placeholder), or whose seal does not verify. Its ``due_at``
        becomes None; nothing else changes, so nothing but a later ``put`` (or a
        ``transition`` that sets ``due_at``) puts it back in :meth:`due`. Works on
        a row that does not decode: it never decodes the row. Atomic per store.

        Default: a ``transition`` from each status to itself with ``due_at=None``,
        which keeps every field but ``due_at`` and ``updated_at``; it cannot reach a
        row whose status itself is unreadable, so every bundled store overrides it.

        Returns:
            True if the record existed.
        """
        now = time.time()
        return any(self.transition(key_hash, {status}, status, due_at=None, now=now) for status in Status)

    def replace_blob(
        self,
        key_hash: str,
        old_blob: bytes,
        new_blob: bytes,
        *,
        now: float,
        version: int | None = None,
        seal: str | None = None,
    ) -> bool:
        """Swap the blob if it is still ``old_blob`` (key rotation), and set ``version`` /
        ``seal`` when given (None leaves them unchanged).

        Default: get + put, not atomic; stores override it with a compare-and-set.

        Returns:
            True if this call swapped the blob.
        """
        current = self.get(key_hash)
        if current is None or current.blob != old_blob:
            return False
        self.put(current.replace(blob=new_blob, updated_at=now, **token_changes(version, seal)))
        return True

    def health(self) -> dict[str, Any]:
        """``{"ok": bool, "store": name, ...}``; never raises for a down store."""
        try:
            self.scan(limit=1)
        except Exception as exc:  # noqa: BLE001 - health reports, it does not raise
            return {"ok": False, "store": self.name, "error": type(exc).__name__}
        return {"ok": True, "store": self.name}

    def close(self) -> None:
        """Release connections. The store reconnects if used again."""

    def __enter__(self) -> BaseStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"
