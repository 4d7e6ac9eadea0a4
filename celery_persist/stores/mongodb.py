"""``mongodb://``, ``mongodb+srv://``: records in MongoDB (pymongo).

URL:
    ``mongodb://[user:password@]host[:port][,host...][/database][?options]`` and
    ``mongodb+srv://...`` go to :class:`pymongo.MongoClient` unchanged. The
    database is the URL's path, ``celery_persist`` when it has none.

Options:
    ``prefix`` (default ``"persist_"``): collection name prefix; the store uses
    ``<prefix>records`` and ``<prefix>chunks``. ``inline_limit`` (default
    15 MiB): largest blob kept inside the record document. ``chunk_size``
    (default 8 MiB): size of the pieces a larger blob is split into.
    ``server_selection_timeout`` (seconds, default 10): used when the URL sets
    no ``serverSelectionTimeoutMS``, so a lost server becomes
    :class:`StoreUnavailable` in seconds rather than pymongo's 30.
    ``client_options``: extra keyword arguments for ``MongoClient``.
    ``client``: a client to use instead of one built from the URL (which then
    names only the database); anything with pymongo's ``MongoClient`` API, such
    as an in-process test double. It stays the caller's: the store never closes
    it, and uses it in forked children too (making it safe there is the caller's
    part; pymongo resets a client's sockets in the child).
    ``bulk`` (default True): False writes ``put_many()`` one record at a time,
    for clients whose ``bulk_write`` rejects the ``sort`` argument pymongo
    >= 4.9 gives ``ReplaceOne``.

Layout: one document per record in ``<prefix>records``::

    {_id: key_hash, kind, status, metadata: canonical JSON text, digest: sha256 of the blob,
     created_at, expires_at, updated_at: double (expires_at null when None),
     due_at: double (absent when None),
     version: int, seal: string                     -- absent in documents written before
                                                       they existed: read as 0 and ""
     op: string                                     -- the token of the transition_many
                                                       that last moved it (absent otherwise)
     blob: binary                                   -- blobs up to inline_limit
     gen, nchunks, size                             -- larger blobs, see below}

Metadata is stored as JSON text, not as a sub-document, so it comes back
exactly as written. MongoDB's document limit is 16 MB, so a blob over
``inline_limit`` is split into ``<prefix>chunks`` documents ``{rec: key_hash,
gen, n, data}``. The chunks of a new generation ``gen`` are written first and
the record document is then pointed at them in one write, after which the
chunks of the generation it replaced are deleted: a reader sees the old blob
or the new one, and re-reads the record if a writer removed the chunks it was
about to read. Indexes: ``_id``, ``(kind, status, _id)`` for filtered listing,
and ``(due_at, _id)`` restricted to documents that have a ``due_at`` (partial
index), so :meth:`due` costs O(due records); chunks by ``(rec, gen, n)``.
MongoDB's TTL monitor is not used: expiry has side effects that cleanup must run.

Atomicity:
    ``transition()`` is one ``find_one_and_update({_id, status: {$in: expect}
    [, version: expect_version]}, {$set: ...})``: MongoDB applies it to the
    document atomically, so of many concurrent callers exactly one matches. ``replace_blob()`` is the same
    compare-and-set on ``digest`` (the SHA-256 of the blob), after writing new
    chunks if the blob needs them. ``put()`` replaces the whole document in one
    write; ``put_many()`` sends one ``bulk_write`` per 1,000 records or 32 MiB.
    ``quarantine()`` is one ``update_one`` that unsets ``due_at``.
    ``transition_many()`` is one ``bulk_write`` (unordered) of ``UpdateOne`` with the same
    per-record filter as ``transition()``, each setting ``op`` to a token of the call, then
    one ``find`` of the batch's ids carrying that token: the records this call moved
    (per 1,000 changes). With ``bulk=False`` it is ``transition()`` per record.
    ``delete_many()`` is one ``find`` of the chunked records among the ids and one
    ``delete_many({_id: {$in: ...}})`` per 1,000 keys, then the chunks of those.
    No multi-document transactions are used, so standalone servers work.

Errors: messages name pymongo's cause (``ServerSelectionTimeoutError:
127.0.0.1:27017: [Errno 111] Connection refused ...``), URLs and passwords
masked. A document that does not decode is an :class:`IntegrityError` from
``get()`` and a poisoned placeholder in ``scan()`` / ``due()``.

Fork: pymongo clients are not fork-safe. The client is created on first use
and again when ``os.getpid()`` changes; the child never touches the parent's
client (pymongo's own at-fork hook has already dropped its sockets there).

Servers tested: mongomock 4.3 (an in-process double, given as ``client``) with
pymongo 4.20, always; a real MongoDB server only when
``CELERY_PERSIST_TEST_MONGODB_URL`` is set.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import secrets
import threading
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from types import ModuleType
from typing import Any, ClassVar
from urllib.parse import parse_qsl, unquote, urlsplit

from ..errors import ConfigurationError, StoreUnavailable
from .base import (
    KEEP,
    ROW_ERRORS,
    BaseStore,
    Keep,
    Kind,
    Page,
    ScanRange,
    Status,
    StoredRecord,
    TransitionSpec,
    UndecodableRecord,
    batches,
    decode_record,
    decoded,
    distinct_changes,
    dump_metadata,
    poisoned_record,
    salvage,
    token_changes,
)
from .drivers import describe, mask_url, require

__all__ = ["MongoStore"]

log = logging.getLogger(__name__)

MiB = 1024 * 1024
DEFAULT_DATABASE = "celery_persist"
#: Largest blob kept in the record document (the BSON limit is 16 MiB per document).
INLINE_LIMIT = 15 * MiB
#: Piece size for blobs over the inline limit.
CHUNK_SIZE = 8 * MiB
#: put_many() sends at most this many records / blob bytes per bulk_write.
BATCH_RECORDS = 1000
BATCH_BYTES = 32 * MiB
#: How often get() re-reads a record whose chunks a concurrent writer replaced.
READ_ATTEMPTS = 5

#: Fields read for listing: everything but the blob.
_LISTING_FIELDS = {
    "kind": 1,
    "status": 1,
    "metadata": 1,
    "created_at": 1,
    "expires_at": 1,
    "due_at": 1,
    "updated_at": 1,
    "version": 1,
    "seal": 1,
}


def _as_bytes(value: Any) -> bytes:
    # bytes(n) of an int edited into the document would allocate n bytes: refuse anything not bytes-like.
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    raise UndecodableRecord("blob is not bytes")


class MongoStore(BaseStore):
    """Records as MongoDB documents; see the module docstring for the layout."""

    schemes: ClassVar[tuple[str, ...]] = ("mongodb", "mongodb+srv")

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "persist_",
        inline_limit: int = INLINE_LIMIT,
        chunk_size: int = CHUNK_SIZE,
        server_selection_timeout: float = 10.0,
        client_options: Mapping[str, Any] | None = None,
        client: Any = None,
        bulk: bool = True,
    ) -> None:
        self.name = mask_url(url)
        # Needed with a given client too: pymongo brings bson, ReplaceOne and the error classes.
        self._pymongo: ModuleType = require("pymongo", extra="mongodb", store="mongodb")
        if not isinstance(prefix, str) or "$" in prefix or "\0" in prefix:
            raise ConfigurationError("mongodb prefix must be a string without '$' or NUL", store=self.name)
        if not 0 < chunk_size <= INLINE_LIMIT:
            raise ConfigurationError(f"mongodb chunk_size must be in 1..{INLINE_LIMIT}", store=self.name)
        if not 0 <= inline_limit <= INLINE_LIMIT:
            raise ConfigurationError(f"mongodb inline_limit must be in 0..{INLINE_LIMIT}", store=self.name)
        if client is not None and client_options:
            raise ConfigurationError("mongodb client_options do not apply to a given client; configure the client", store=self.name)
        self._url = url
        self._prefix = prefix
        self._inline_limit = inline_limit
        self._chunk_size = chunk_size
        self._given = client
        self._bulk = bool(bulk)
        self._client_options = dict(client_options or {})
        parts = urlsplit(url)
        if client is None and "serverselectiontimeoutms" not in {k.lower() for k, _ in parse_qsl(parts.query)}:
            self._client_options.setdefault("serverSelectionTimeoutMS", int(server_selection_timeout * 1000))
        self._database = unquote(parts.path.lstrip("/")) or DEFAULT_DATABASE
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._client: Any = None

    # -- connection -------------------------------------------------------------------------

    def _collections(self) -> tuple[Any, Any]:
        """(records, chunks) collections of a client created in this process."""
        pid = os.getpid()
        if self._client is None or self._pid != pid:
            if self._pid != pid:
                # A forked child: the parent's lock may be held by a thread that does not
                # exist here. The parent's client is dropped, not closed; pymongo's at-fork
                # hook has already reset it in this process. (A given client is used again.)
                self._lock = threading.Lock()
                self._client = None
                self._pid = pid
            with self._lock:
                if self._client is None:
                    self._client = self._connect()
        db = self._client[self._database]
        return db[f"{self._prefix}records"], db[f"{self._prefix}chunks"]

    def _connect(self) -> Any:
        if self._given is not None:
            return self._given
        log.debug("mongodb store %s: new client in process %d", self.name, os.getpid())
        with self._errors():
            return self._pymongo.MongoClient(self._url, **self._client_options)

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        """Map pymongo's exceptions onto the celery-persist error tree; messages name the cause, masked."""
        errors = self._pymongo.errors
        try:
            yield
        except (errors.ConnectionFailure, errors.ExecutionTimeout, errors.WTimeoutError) as exc:
            # ConnectionFailure covers AutoReconnect, NetworkTimeout and ServerSelectionTimeoutError.
            raise StoreUnavailable(f"MongoDB is unreachable ({self._describe(exc)})", store=self.name) from exc
        except errors.ConfigurationError as exc:
            raise ConfigurationError(f"bad MongoDB configuration ({self._describe(exc)})", store=self.name) from exc
        except errors.OperationFailure as exc:
            if exc.code in (13, 18):  # Unauthorized, AuthenticationFailed
                raise ConfigurationError(
                    f"MongoDB refused the credentials or the role (code {exc.code}, {self._describe(exc)})", store=self.name
                ) from exc
            raise

    def _describe(self, exc: BaseException) -> str:
        return describe(exc, url=self._url)

    # -- schema -----------------------------------------------------------------------------

    def setup(self) -> None:
        """Create the indexes (idempotent; index builds on an existing collection may take a while)."""
        with self._errors():
            records, chunks = self._collections()
            records.create_index([("kind", 1), ("status", 1), ("_id", 1)], name="listing")
            records.create_index([("due_at", 1), ("_id", 1)], name="due", partialFilterExpression={"due_at": {"$exists": True}})
            chunks.create_index([("rec", 1), ("gen", 1), ("n", 1)], name="chunk", unique=True)

    def drop(self) -> None:
        """Drop both collections (tests and uninstall)."""
        with self._errors():
            records, chunks = self._collections()
            records.drop()
            chunks.drop()

    # -- documents --------------------------------------------------------------------------

    def _document(self, record: StoredRecord, chunk_gen: str | None) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "_id": record.key_hash,
            "kind": record.kind.value,
            "status": record.status.value,
            "metadata": dump_metadata(record.metadata),
            "digest": hashlib.sha256(record.blob).hexdigest(),
            "created_at": float(record.created_at),
            "expires_at": None if record.expires_at is None else float(record.expires_at),
            "updated_at": float(record.updated_at),
            "version": int(record.version),
            "seal": str(record.seal),
        }
        if record.due_at is not None:
            doc["due_at"] = float(record.due_at)
        if chunk_gen is None:
            doc["blob"] = record.blob
        else:
            doc.update(gen=chunk_gen, nchunks=self._count_chunks(len(record.blob)), size=len(record.blob))
        return doc

    def _count_chunks(self, size: int) -> int:
        return -(-size // self._chunk_size)

    def _write_chunks(self, chunks: Any, key_hash: str, blob: bytes) -> str:
        """Write ``blob`` as a new chunk generation; returns its id."""
        gen = secrets.token_hex(8)
        view = memoryview(blob)
        docs = [
            {"rec": key_hash, "gen": gen, "n": n, "data": bytes(view[start : start + self._chunk_size])}
            for n, start in enumerate(range(0, len(blob), self._chunk_size))
        ]
        chunks.insert_many(docs, ordered=False)
        return gen

    def _chunk_gen_for(self, chunks: Any, record: StoredRecord) -> str | None:
        return self._write_chunks(chunks, record.key_hash, record.blob) if len(record.blob) > self._inline_limit else None

    def _record(self, doc: Mapping[str, Any], blob: bytes) -> StoredRecord:
        """The document's record, or its poisoned placeholder when the document does not decode."""
        key_hash = str(doc["_id"])
        return salvage(
            key_hash,
            lambda: decode_record(
                key_hash,
                kind=doc.get("kind"),
                status=doc.get("status"),
                blob=blob,
                metadata=doc.get("metadata"),
                created_at=doc.get("created_at"),
                expires_at=doc.get("expires_at"),
                due_at=doc.get("due_at"),
                updated_at=doc.get("updated_at"),
                version=doc.get("version"),
                seal=doc.get("seal"),
            ),
        )

    def _read(self, chunks: Any, doc: Mapping[str, Any]) -> StoredRecord | None:
        """The document's record with its blob (poisoned when it does not decode); None when its
        chunks were replaced while we read."""
        try:
            blob = self._blob(chunks, doc)
        except ROW_ERRORS:
            return poisoned_record(str(doc["_id"]), "blob or its chunk fields do not decode")
        return None if blob is None else self._record(doc, blob)

    def _fetch(self, records: Any, chunks: Any, key_hash: str) -> StoredRecord | None:
        """The record (poisoned when it does not decode), or None; re-read while a writer replaces its chunks."""
        for _ in range(READ_ATTEMPTS):
            doc = records.find_one({"_id": key_hash})
            if doc is None:
                return None
            record = self._read(chunks, doc)
            if record is not None:
                return record
        raise StoreUnavailable("the record kept changing while it was read; retry", store=self.name)

    def _blob(self, chunks: Any, doc: Mapping[str, Any]) -> bytes | None:
        """The document's blob; None when its chunks were replaced while we read."""
        if "gen" not in doc:
            blob = doc.get("blob", b"")
            # pymongo decodes binary subtype 0 to bytes; other clients may hand back what they stored.
            return blob if type(blob) is bytes else _as_bytes(blob)
        parts = list(chunks.find({"rec": doc["_id"], "gen": doc["gen"]}, {"_id": 0, "n": 1, "data": 1}).sort("n", 1))
        if len(parts) != int(doc["nchunks"]) or any(p["n"] != n for n, p in enumerate(parts)):
            return None
        blob = b"".join(_as_bytes(p["data"]) for p in parts)
        return blob if len(blob) == doc["size"] else None

    def _drop_generations(self, chunks: Any, stale: Iterable[tuple[str, str]]) -> None:
        pairs = [{"rec": rec, "gen": gen} for rec, gen in stale]
        if pairs:
            chunks.delete_many({"$or": pairs})

    # -- the contract -----------------------------------------------------------------------

    def put(self, record: StoredRecord) -> None:
        with self._errors():
            records, chunks = self._collections()
            gen = self._chunk_gen_for(chunks, record)
            old = records.find_one_and_replace({"_id": record.key_hash}, self._document(record, gen), upsert=True, projection={"gen": 1})
            if old is not None and old.get("gen"):
                self._drop_generations(chunks, [(record.key_hash, old["gen"])])

    def put_many(self, records: Iterable[StoredRecord]) -> None:
        for batch in batches(records, max_records=BATCH_RECORDS, max_bytes=BATCH_BYTES):
            self._put_batch(batch)

    def _put_batch(self, batch: list[StoredRecord]) -> None:
        if not self._bulk:
            # Inserting first costs one write for a new key (the common case: a
            # suspension is written once); only keys that exist are replaced.
            for record in batch:
                if len(record.blob) > self._inline_limit or not self._insert_new(record):
                    self.put(record)
            return
        replace_one = self._pymongo.ReplaceOne
        with self._errors():
            records, chunks = self._collections()
            ids = list({r.key_hash for r in batch})
            # Chunk generations these writes will orphan. A concurrent writer may replace
            # one first; its chunks then stay behind as garbage, never as a broken record.
            stale = [(d["_id"], d["gen"]) for d in records.find({"_id": {"$in": ids}, "gen": {"$exists": True}}, {"gen": 1})]
            ops = []
            for record in batch:
                gen = self._chunk_gen_for(chunks, record)
                ops.append(replace_one({"_id": record.key_hash}, self._document(record, gen), upsert=True))
                if gen is not None:
                    stale.append((record.key_hash, gen))
            records.bulk_write(ops, ordered=True)
            # The last write per key wins (ordered); keep the generation it points at.
            live = {d["_id"]: d.get("gen") for d in records.find({"_id": {"$in": ids}}, {"gen": 1})}
            self._drop_generations(chunks, [(k, g) for k, g in stale if live.get(k) != g])

    def _insert_new(self, record: StoredRecord) -> bool:
        """Insert an inline record whose key does not exist yet; False if it exists."""
        with self._errors():
            records, _ = self._collections()
            try:
                records.insert_one(self._document(record, None))
            except self._pymongo.errors.DuplicateKeyError:
                return False
        return True

    def get(self, key_hash: str) -> StoredRecord | None:
        with self._errors():
            records, chunks = self._collections()
            found = self._fetch(records, chunks, key_hash)
        return None if found is None else decoded(found, store=self.name)

    def quarantine(self, key_hash: str) -> bool:
        """One ``update_one`` that unsets ``due_at`` (the document is never decoded)."""
        with self._errors():
            records, _ = self._collections()
            return int(records.update_one({"_id": key_hash}, {"$unset": {"due_at": ""}}).matched_count) == 1

    def delete(self, key_hash: str) -> bool:
        with self._errors():
            records, chunks = self._collections()
            old = records.find_one_and_delete({"_id": key_hash}, projection={"gen": 1})
            if old is None:
                return False
            if old.get("gen"):
                self._drop_generations(chunks, [(key_hash, old["gen"])])
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
        update: dict[str, Any] = {"$set": {"status": to.value, "updated_at": float(now), **token_changes(version, seal)}}
        if due_at is None:
            update["$unset"] = {"due_at": ""}
        elif not isinstance(due_at, Keep):
            update["$set"]["due_at"] = float(due_at)
        match: dict[str, Any] = {"_id": key_hash, "status": {"$in": [Status(s).value for s in expect]}}
        if expect_version is not None:
            # A document written before versions existed has none: it is version 0.
            match["version"] = {"$in": [int(expect_version), None]} if expect_version == 0 else int(expect_version)
        with self._errors():
            records, _ = self._collections()
            doc = records.find_one_and_update(match, update, projection={"_id": 1})
        return doc is not None

    def transition_many(self, changes: Sequence[TransitionSpec], *, now: float) -> list[str]:
        """One unordered ``bulk_write`` of per-record compare-and-sets, then one ``find`` of the winners (per 1,000).

        Each ``UpdateOne`` has :meth:`transition`'s filter and also sets ``op`` to a token of
        this call, so the records carrying the token afterwards are exactly the ones this
        call moved (the bulk result only counts them).
        """
        ordered = distinct_changes(changes)
        if not self._bulk:
            return super().transition_many(ordered, now=now)
        update_one = self._pymongo.UpdateOne
        token = secrets.token_hex(12)
        moved: set[str] = set()
        with self._errors():
            records, _ = self._collections()
            wanted = [c for c in ordered if c.expect]
            for start in range(0, len(wanted), BATCH_RECORDS):
                part = wanted[start : start + BATCH_RECORDS]
                ops = [update_one(*self._transition_op(c, now, token)) for c in part]
                if not records.bulk_write(ops, ordered=False).matched_count:
                    continue
                found = records.find({"_id": {"$in": [c.key_hash for c in part]}, "op": token}, {"_id": 1})
                moved.update(str(d["_id"]) for d in found)
        return [c.key_hash for c in ordered if c.key_hash in moved]

    @staticmethod
    def _transition_op(c: TransitionSpec, now: float, token: str) -> tuple[dict[str, Any], dict[str, Any]]:
        """(filter, update) of one change: :meth:`transition`'s, plus the call's token in ``op``."""
        update: dict[str, Any] = {"$set": {"status": c.to.value, "updated_at": float(now), "op": token, **token_changes(c.version, c.seal)}}
        if c.due_at is None:
            update["$unset"] = {"due_at": ""}
        elif not isinstance(c.due_at, Keep):
            update["$set"]["due_at"] = float(c.due_at)
        match: dict[str, Any] = {"_id": c.key_hash, "status": {"$in": sorted(s.value for s in c.expect)}}
        if c.expect_version is not None:
            match["version"] = {"$in": [0, None]} if c.expect_version == 0 else int(c.expect_version)
        return match, update

    def delete_many(self, key_hashes: Sequence[str]) -> int:
        keys = list(dict.fromkeys(key_hashes))
        gone = 0
        with self._errors():
            records, chunks = self._collections()
            for start in range(0, len(keys), BATCH_RECORDS):
                part = keys[start : start + BATCH_RECORDS]
                # Chunk generations these deletes orphan; one written meanwhile stays behind as garbage.
                stale = [(d["_id"], d["gen"]) for d in records.find({"_id": {"$in": part}, "gen": {"$exists": True}}, {"gen": 1})]
                gone += int(records.delete_many({"_id": {"$in": part}}).deleted_count)
                self._drop_generations(chunks, stale)
        return gone

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
        with self._errors():
            records, chunks = self._collections()
            gen = self._write_chunks(chunks, key_hash, new_blob) if len(new_blob) > self._inline_limit else None
            update: dict[str, Any] = {
                "$set": {"digest": hashlib.sha256(new_blob).hexdigest(), "updated_at": float(now), **token_changes(version, seal)}
            }
            if gen is None:
                update["$set"]["blob"] = new_blob
                update["$unset"] = {"gen": "", "nchunks": "", "size": ""}
            else:
                update["$set"].update(gen=gen, nchunks=self._count_chunks(len(new_blob)), size=len(new_blob))
                update["$unset"] = {"blob": ""}
            old = records.find_one_and_update(
                {"_id": key_hash, "digest": hashlib.sha256(old_blob).hexdigest()}, update, projection={"gen": 1}
            )
            if old is None:
                if gen is not None:
                    self._drop_generations(chunks, [(key_hash, gen)])
                return False
            if old.get("gen"):
                self._drop_generations(chunks, [(key_hash, old["gen"])])
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
        if limit <= 0:
            return Page([], None)
        query: dict[str, Any] = {}
        if kind is not None:
            query["kind"] = Kind(kind).value
        if status is not None:
            query["status"] = Status(status).value
        if cursor is not None:
            query["_id"] = {"$gt": cursor}
        projection = None if with_blob else _LISTING_FIELDS
        wanted = ScanRange(kind, status, limit, cursor)
        with self._errors():
            records, chunks = self._collections()
            # One extra document tells whether another page exists.
            docs, next_cursor = wanted.page(list(records.find(query, projection).sort("_id", 1).limit(limit + 1)), lambda d: str(d["_id"]))
            items: list[StoredRecord] = []
            for doc in docs:
                if not with_blob:
                    items.append(self._record(doc, b""))
                    continue
                record = self._read(chunks, doc)
                if record is None:  # replaced while we read: take the new version, if it still matches
                    record = self._fetch(records, chunks, str(doc["_id"]))
                    if record is None or not wanted.matches(record):
                        continue
                items.append(record)
        return Page(items, next_cursor)

    def due(self, now: float, limit: int = 100) -> list[StoredRecord]:
        if limit <= 0:
            return []
        with self._errors():
            records, chunks = self._collections()
            docs = list(records.find({"due_at": {"$lte": float(now)}}).sort([("due_at", 1), ("_id", 1)]).limit(limit))
            out: list[StoredRecord] = []
            for doc in docs:
                record = self._read(chunks, doc)
                if record is None:  # replaced while we read: take the new version, if it is still due
                    record = self._fetch(records, chunks, str(doc["_id"]))
                    if record is None or (record.poisoned is None and (record.due_at is None or record.due_at > now)):
                        continue
                out.append(record)
        return out

    def health(self) -> dict[str, Any]:
        """``ok``, server version and ping latency; never raises."""
        report: dict[str, Any] = {"ok": False, "store": self.name, "prefix": self._prefix}
        try:
            with self._errors():
                records, _ = self._collections()
                client = self._client
                client.admin.command("ping")
                report["version"] = client.server_info().get("version")
                records.estimated_document_count()
        except Exception as exc:  # noqa: BLE001 - health reports, it does not raise
            report["error"] = type(exc).__name__
            return report
        report["ok"] = True
        return report

    def close(self) -> None:
        client, self._client = self._client, None
        if client is not None and self._given is None and self._pid == os.getpid():
            with contextlib.suppress(Exception):
                client.close()
