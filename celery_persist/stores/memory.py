"""``memory://``: the reference store and test double.

URL: ``memory://`` (every open gets a fresh, private store) or ``memory://NAME``
(stores opened with the same name and ``prefix`` in one process share records).
Options: ``prefix``.
Atomicity: one lock around every operation (a transition's status and version
checks and its writes included, and ``quarantine()``); claims are atomic between threads of one
process only, so it is not for real deployments. ``transition_many()`` and ``delete_many()``
hold the lock once for the whole batch and apply ``transition()`` / ``delete()`` to each record
under it (so a subclass that wraps those sees every record).
Fork: a child gets a copy of the records and its own lock; nothing is shared.
Tested: in-process only.
"""

from __future__ import annotations

import bisect
import heapq
import threading
from collections.abc import Collection, Sequence
from typing import ClassVar

from .base import (
    KEEP,
    BaseStore,
    Keep,
    Kind,
    Page,
    ScanRange,
    Status,
    StoredRecord,
    TransitionSpec,
    decode_record,
    decoded,
    dump_metadata,
    load_metadata,
    salvage,
    token_changes,
)
from .drivers import mask_url

__all__ = ["MemoryStore"]


def _detached(rec: StoredRecord) -> StoredRecord:
    # Real stores keep metadata as JSON text. Copy it in and out the same way, so a caller
    # mutating a dict it passed in or got back cannot change (and un-authenticate) a record.
    return rec.replace(metadata=load_metadata(dump_metadata(rec.metadata)))


def _read(rec: StoredRecord) -> StoredRecord:
    """What a reader gets: a detached copy, every field checked as a real store decodes its row
    (a test may plant a record whose fields are not what their types say), or its poisoned placeholder."""
    return salvage(
        rec.key_hash,
        lambda: decode_record(
            rec.key_hash,
            kind=rec.kind,
            status=rec.status,
            blob=rec.blob,
            metadata=rec.metadata,
            created_at=rec.created_at,
            expires_at=rec.expires_at,
            due_at=rec.due_at,
            updated_at=rec.updated_at,
            version=rec.version,
            seal=rec.seal,
        ),
    )


class _Shelf:
    """Records, their lock and the due-heap: what stores of one name share."""

    def __init__(self) -> None:
        self.records: dict[str, StoredRecord] = {}
        self.lock = threading.RLock()
        self.heap: list[tuple[float, str]] = []


_NAMED: dict[str, _Shelf] = {}
_NAMED_LOCK = threading.Lock()


class MemoryStore(BaseStore):
    """Records in a dict, ``due_at`` in a heap with lazy deletion."""

    schemes: ClassVar[tuple[str, ...]] = ("memory",)
    shared_across_processes: ClassVar[bool] = False
    durable: ClassVar[bool] = False

    def __init__(self, url: str = "memory://", *, prefix: str = "") -> None:
        name = url.partition("://")[2].strip("/")
        if name and prefix:
            name = f"{name}/{prefix}"
        self.name = mask_url(url) if name else "memory://"
        if name:
            with _NAMED_LOCK:
                shelf = _NAMED.setdefault(name, _Shelf())
        else:
            shelf = _Shelf()
        self._records, self._lock, self._heap = shelf.records, shelf.lock, shelf.heap

    def _index(self, rec: StoredRecord) -> None:
        if rec.due_at is not None:
            heapq.heappush(self._heap, (rec.due_at, rec.key_hash))

    def put(self, record: StoredRecord) -> None:
        record = _detached(record)
        with self._lock:
            self._records[record.key_hash] = record
            self._index(record)

    def get(self, key_hash: str) -> StoredRecord | None:
        with self._lock:
            rec = self._records.get(key_hash)
        return None if rec is None else decoded(_read(rec), store=self.name)

    def delete(self, key_hash: str) -> bool:
        with self._lock:
            return self._records.pop(key_hash, None) is not None

    def quarantine(self, key_hash: str) -> bool:
        with self._lock:
            rec = self._records.get(key_hash)
            if rec is None:
                return False
            self._records[key_hash] = rec.replace(due_at=None)  # its heap entries are now stale
            return True

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
        with self._lock:
            rec = self._records.get(key_hash)
            if rec is None or rec.status not in expect or (expect_version is not None and rec.version != expect_version):
                return False
            new = rec.replace(status=to, updated_at=now, due_at=rec.due_at if due_at is KEEP else due_at, **token_changes(version, seal))
            self._records[key_hash] = new
            self._index(new)
            return True

    def transition_many(self, changes: Sequence[TransitionSpec], *, now: float) -> list[str]:
        with self._lock:
            return super().transition_many(changes, now=now)

    def delete_many(self, key_hashes: Sequence[str]) -> int:
        with self._lock:
            return super().delete_many(key_hashes)

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
        with self._lock:
            rec = self._records.get(key_hash)
            if rec is None or rec.blob != old_blob:
                return False
            self._records[key_hash] = rec.replace(blob=new_blob, updated_at=now, **token_changes(version, seal))
            return True

    def scan(
        self,
        *,
        kind: Kind | None = None,
        status: Status | None = None,
        limit: int = 100,
        cursor: str | None = None,
        with_blob: bool = False,
    ) -> Page:
        wanted = ScanRange(kind, status, limit, cursor)
        with self._lock:
            keys = sorted(self._records)
            start = bisect.bisect_right(keys, cursor) if cursor else 0
            items: list[StoredRecord] = []
            last: str | None = None
            for kh in keys[start:]:
                rec = _read(self._records[kh])
                last = kh
                if wanted.matches(rec):
                    items.append(rec if with_blob else rec.replace(blob=b""))
                    if len(items) >= limit:
                        break
            more = last is not None and bisect.bisect_right(keys, last) < len(keys)
            return Page(items, last if (more and len(items) >= limit) else None)

    def due(self, now: float, limit: int = 100) -> list[StoredRecord]:
        with self._lock:
            out: list[StoredRecord] = []
            seen: set[str] = set()
            popped: list[tuple[float, str]] = []
            while self._heap and self._heap[0][0] <= now and len(out) < limit:
                entry = heapq.heappop(self._heap)
                rec = self._records.get(entry[1])
                # Lazy deletion: drop heap entries that no longer match the record.
                if rec is None or rec.due_at != entry[0] or entry[1] in seen:
                    continue
                seen.add(entry[1])
                popped.append(entry)
                out.append(_read(rec))
            for entry in popped:  # still due until the caller moves or deletes them
                heapq.heappush(self._heap, entry)
            return out
