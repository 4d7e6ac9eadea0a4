"""``file://``: records as files in a local directory, no server needed.

URL: ``file:///absolute/dir`` (``file://localhost/absolute/dir`` too; relative
paths are refused). The path is percent-decoded.

Options:
    ``prefix``: a subdirectory of the URL's directory, so two apps (or two tests)
    can share it. One path component: letters, digits, ``.``, ``_``, ``-``.

Layout under ``<dir>/<prefix>/``::

    records/ab/ab12...ef      one file per record, named by its key_hash and
                              sharded by the first two hex digits
    due/<bucket>/<due>-<kh>   empty marker files: the due_at index (see _DueMarkers)
    locks/ab                  256 striped lock files, one per shard

A record file is ``b"CPR1"``, a 4-byte big-endian header length, a JSON header
(kind, status, metadata, times, version, seal, blob size; a header written
before version and seal existed reads as version 0, seal ``""``) and the blob
bytes; a reader copies the blob once, with one ``readall()`` sized from ``fstat``.

Atomicity: writes go to a temp file in the record's shard directory
(``O_EXCL``, mode 0600), are ``fsync``-ed, ``os.replace``-d over the record,
and the directory is ``fsync``-ed: a reader sees the old record or the new one,
never a torn one, and a crash leaves at worst a stale ``.tmp-*`` file that
:meth:`FileStore.setup` removes. Every write of a record (put, delete,
transition, replace_blob) holds its shard's lock, an in-process
``threading.Lock`` plus ``fcntl.flock`` on ``locks/<shard>`` opened afresh for
each operation (a fresh open file description, so threads and forked children
never share a lock by accident). ``transition()`` reads, checks (status, and
version when asked) and rewrites the record under that lock, so across
processes exactly one caller wins.
Readers take no lock: ``rename(2)`` is atomic. A transition rewrites the whole
file, but copies the blob inside the kernel (``copy_file_range``). The due
markers a write needs are created (and made durable) before the record is
renamed into place, and stale ones removed after, so a crash can leave an
extra marker, never a missing one.
``transition_many()`` and ``delete_many()`` are the contract's defaults: one
``transition()`` / ``delete()`` (and its fsyncs) per record.

Safety: key hashes must be 64 lowercase hex digits (nothing can name a path
outside the directory). Only the URL's own directory may be a symlink (the
operator chose it): every directory below it (the prefix, ``records``, ``due``,
``locks``, shards, buckets) is opened component by component from a directory
fd with ``O_NOFOLLOW`` (``openat``), and every record, marker and lock file with
``O_NOFOLLOW`` (and ``O_NONBLOCK``, so a planted FIFO cannot hang an open;
record files must then be regular files). A planted symlink is tampering: it
is refused with :class:`~celery_persist.errors.IntegrityError`, never followed,
and what it points at is never read or written (``delete()`` removes a planted
record link itself). Everything the store creates is private to its user:
files 0600, directories 0700 (missing parents of the URL's directory too).

Records that do not decode: a record file whose header is not JSON, is
truncated, holds an unknown status or a missing or mistyped field (or is a
planted link) makes ``get()``, ``transition()`` and ``replace_blob()`` raise
``IntegrityError``, and comes back from ``scan()`` / ``due()`` as a poisoned
placeholder (its due marker is kept, so cleanup sees it). ``quarantine()``
rewrites the header with ``due_at`` null under the shard lock and removes the
marker (every marker of the key, when the header does not parse), leaving the
rest of the file as it was.

Fork: the store keeps no open file or connection between calls; a child
re-creates its in-process locks (one held by another parent thread at fork
time would never be released in the child).

Tested: ext4 on Linux. Needs ``flock`` that excludes across processes, i.e. a
local filesystem (NFS emulates ``flock`` with POSIX locks, which do not exclude
threads of one process; the in-process lock covers that, but NFS is untested).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import io
import json
import math
import os
import re
import secrets
import shutil
import stat
import struct
import threading
import time
from collections.abc import Callable, Collection, Generator, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ClassVar, TypeVar
from urllib.parse import unquote, urlsplit

from ..errors import ConfigurationError, IntegrityError, StoreUnavailable
from .base import (
    KEEP,
    BaseStore,
    Keep,
    Kind,
    Page,
    ScanRange,
    Status,
    StoredRecord,
    UndecodableRecord,
    decode_record,
    decoded,
    poisoned_record,
    salvage,
    token_changes,
)
from .drivers import describe, mask_url

__all__ = ["FileStore", "BUCKET_SECONDS", "make_private_dirs"]

#: Width of a due-index bucket directory, in seconds.
BUCKET_SECONDS = 900.0

_MAGIC = b"CPR1"
_PREFIX = struct.Struct(">4sI")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_HEX2 = re.compile(r"[0-9a-f]{2}")
_HEX16 = re.compile(r"[0-9a-f]{16}")
_PREFIX_OPTION = re.compile(r"[A-Za-z0-9._-]+")
_MASK64 = (1 << 64) - 1
_SIGN = 1 << 63
# A temp file this old belongs to a writer that died; setup() removes it.
_STALE_TMP_SECONDS = 3600.0
# O_NONBLOCK: a FIFO planted where a file should be must not hang the open (no effect on
# regular files, which are checked with fstat after the open).
_OPEN_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
#: The URL's own directory only: the operator may have made it a symlink.
_OPEN_DIR_FOLLOW = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_OPEN_TMP = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_OPEN_MARKER = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_OPEN_LOCK = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
# Errors that mean "the disk or the mount is in trouble", worth a retry later.
_TRANSIENT = frozenset(
    {
        errno.EIO,
        errno.ENOSPC,
        errno.EDQUOT,
        errno.EROFS,
        errno.ESTALE,
        errno.EAGAIN,
        errno.ETIMEDOUT,
        errno.EINTR,
        errno.ENOMEM,
        errno.EMFILE,
        errno.ENFILE,
        errno.EBUSY,
    }
)


def encode_time(value: float) -> str:
    """16 hex digits whose string order is the numeric order of float64 ``value``."""
    (bits,) = struct.unpack(">Q", struct.pack(">d", value))
    bits = (bits ^ _MASK64) if bits & _SIGN else (bits | _SIGN)
    return f"{bits:016x}"


def decode_time(text: str) -> float:
    """Inverse of :func:`encode_time`."""
    bits = int(text, 16)
    bits = (bits & ~_SIGN & _MASK64) if bits & _SIGN else (bits ^ _MASK64)
    (value,) = struct.unpack(">d", struct.pack(">Q", bits))
    return float(value)


def _bucket(due_at: float) -> str:
    start = math.floor(due_at / BUCKET_SECONDS) * BUCKET_SECONDS if math.isfinite(due_at) else due_at
    return encode_time(start)


_T = TypeVar("_T")


def _checked(value: Any, kind: type[_T], name: str) -> _T:
    """``value`` if it is a ``kind`` (a bool is not an int here); UndecodableRecord otherwise."""
    if type(value) is not kind:
        raise UndecodableRecord(f"{name} is not {'an integer' if kind is int else 'text'}")
    return value


def make_private_dirs(path: str) -> bool:
    """Create directory ``path`` and its missing parents, each with mode 0700; True if any was created.

    ``os.makedirs`` gives only the last directory its ``mode``; the parents it creates
    get 0777 less the umask, which would leave a store's new tree open to others. A
    directory that exists is left as it is (its owner chose its mode). The SQLite
    store creates its database's directory with this too.

    Raises:
        FileExistsError: A file (or a dangling symlink) is in the way.
    """
    if os.path.isdir(path):
        return False
    parent = os.path.dirname(path.rstrip(os.sep))
    created = bool(parent) and parent != path and make_private_dirs(parent)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        if not os.path.isdir(path):
            raise
        return created
    return True


def _fsync_all(fds: list[int]) -> None:
    """fsync every descriptor; many at once let the filesystem commit them as one journal transaction."""
    if len(fds) < 8:
        for fd in fds:
            os.fsync(fd)
        return
    with ThreadPoolExecutor(max_workers=8, thread_name_prefix="celery-persist-fsync") as pool:
        for _ in pool.map(os.fsync, fds):
            pass


def _fsync_dir(path: str) -> None:
    fd = os.open(path, _OPEN_DIR_FOLLOW)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _open_subdir(dir_fd: int, name: str) -> int:
    """An fd of directory ``name`` inside ``dir_fd``, never through a symlink.

    Raises:
        OSError: ``ELOOP`` when ``name`` is a symlink (a planted link: the store maps it
            to IntegrityError), ``FileNotFoundError`` when it is missing.
    """
    try:
        return os.open(name, _OPEN_DIR, dir_fd=dir_fd)
    except OSError as exc:
        # O_DIRECTORY | O_NOFOLLOW on a symlink fails with ENOTDIR on Linux, not ELOOP.
        if exc.errno in (errno.ENOTDIR, errno.ELOOP) and stat.S_ISLNK(os.lstat(name, dir_fd=dir_fd).st_mode):
            raise OSError(errno.ELOOP, "a store directory is a symlink") from None
        raise


class _DueMarkers:
    """The due index: empty marker files ``due/<bucket>/<due>-<key_hash>``.

    ``<due>`` is :func:`encode_time` of ``due_at``, so a sorted listing is time
    order, exact for any float. Markers sit in bucket directories of
    ``BUCKET_SECONDS`` named the same way, so :meth:`walk` lists only the bucket
    names and the buckets that have started, never the markers of records due
    later: O(buckets + due markers), not O(records). Markers are hints: a writer
    :meth:`add`-s the marker a record needs before renaming the record into place
    and :meth:`remove`-s the old one after, and readers check each marker against
    its record. (A sorted directory keeps one source of truth on one kind of
    storage, with the same crash rules as the records, where an SQLite index file
    would not.)

    ``open_due`` opens ``due/`` (an fd, no symlink on the way followed) and
    ``make_dirs`` creates the store's directories; every bucket is opened from
    that fd with ``O_NOFOLLOW``, so a planted symlink is refused, not followed.
    """

    def __init__(self, open_due: Callable[[], int], make_dirs: Callable[[], None]) -> None:
        self._open_due = open_due
        self._make_dirs = make_dirs

    @staticmethod
    def locate(due_at: float, key_hash: str) -> tuple[str, str]:
        """``(bucket, name)`` of the marker for a record due at ``due_at``."""
        return _bucket(due_at), f"{encode_time(due_at)}-{key_hash}"

    @classmethod
    def needed(cls, old: float | None, new: float | None, key_hash: str) -> list[tuple[str, str]]:
        """The marker to add when ``due_at`` moves from ``old`` to ``new`` (none if it stays)."""
        if new is None or (old is not None and encode_time(old) == encode_time(new)):
            return []
        return [cls.locate(new, key_hash)]

    @contextlib.contextmanager
    def _due(self, *, create: bool) -> Iterator[int | None]:
        """``due/`` as an fd; None when it does not exist and ``create`` is False."""
        try:
            dfd = self._open_due()
        except FileNotFoundError:
            if not create:
                yield None
                return
            self._make_dirs()
            dfd = self._open_due()
        try:
            yield dfd
        finally:
            os.close(dfd)

    def add(self, markers: Iterable[tuple[str, str]]) -> None:
        """Create markers and make them durable (before the records that need them)."""
        by_bucket: dict[str, list[str]] = {}
        for bucket, name in markers:
            by_bucket.setdefault(bucket, []).append(name)
        if not by_bucket:
            return
        with self._due(create=True) as dfd:
            if dfd is None:  # not reached: create=True opens it or raises
                return
            for bucket, names in by_bucket.items():
                for _attempt in range(100):
                    try:
                        self._add_to_bucket(dfd, bucket, names)
                        break
                    except FileNotFoundError:
                        # walk() removes empty past buckets; re-create and try again.
                        continue
                else:
                    raise OSError(errno.EAGAIN, "due bucket keeps disappearing")

    @staticmethod
    def _add_to_bucket(dfd: int, bucket: str, names: list[str]) -> None:
        try:
            bfd = _open_subdir(dfd, bucket)
        except FileNotFoundError:
            try:
                os.mkdir(bucket, 0o700, dir_fd=dfd)
            except FileExistsError:
                pass
            else:
                os.fsync(dfd)
            bfd = _open_subdir(dfd, bucket)
        try:
            for name in names:
                os.close(os.open(name, _OPEN_MARKER, 0o600, dir_fd=bfd))
            os.fsync(bfd)
        finally:
            os.close(bfd)

    def remove(self, due_at: float | None, key_hash: str, *, keep: float | None) -> None:
        """Remove the marker for ``due_at``, unless the record is still due at ``keep``."""
        if due_at is None or (keep is not None and encode_time(due_at) == encode_time(keep)):
            return
        self.unlink(*self.locate(due_at, key_hash))

    def unlink(self, bucket: str, name: str) -> None:
        with self._due(create=False) as dfd:
            if dfd is None:
                return
            try:
                bfd = _open_subdir(dfd, bucket)
            except FileNotFoundError:
                return
            try:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(name, dir_fd=bfd)
            finally:
                os.close(bfd)

    def purge(self, key_hash: str) -> None:
        """Remove every marker of ``key_hash``, wherever it is (when its ``due_at`` cannot be read).

        Lists every bucket: O(markers), for the rare record that does not decode.
        """
        suffix = "-" + key_hash
        with self._due(create=False) as dfd:
            if dfd is None:
                return
            for bucket in sorted(n for n in os.listdir(dfd) if _HEX16.fullmatch(n)):
                try:
                    bfd = _open_subdir(dfd, bucket)
                except FileNotFoundError:
                    continue
                try:
                    for name in os.listdir(bfd):
                        if name.endswith(suffix):
                            with contextlib.suppress(FileNotFoundError):
                                os.unlink(name, dir_fd=bfd)
                finally:
                    os.close(bfd)

    def walk(self, now: float) -> Generator[tuple[str, str, str, str], None, None]:
        """``(bucket, name, encoded due_at, key_hash)`` of the markers due by ``now``, earliest first.

        Removes the empty buckets of the past on the way. Close the generator when
        done early (it holds a directory open).
        """
        with self._due(create=False) as dfd:
            if dfd is None:
                return
            buckets = sorted(n for n in os.listdir(dfd) if _HEX16.fullmatch(n))
            for bucket in buckets:
                start = decode_time(bucket)
                if start > now:
                    break
                try:
                    bfd = _open_subdir(dfd, bucket)
                except FileNotFoundError:
                    continue
                try:
                    names = sorted(os.listdir(bfd))
                finally:
                    os.close(bfd)
                if not names and start + BUCKET_SECONDS < now:
                    with contextlib.suppress(OSError):  # not empty any more, or already gone
                        os.rmdir(bucket, dir_fd=dfd)
                    continue
                for name in names:
                    enc, _, kh = name.partition("-")
                    if not (_HEX16.fullmatch(enc) and _HEX64.fullmatch(kh)):
                        continue
                    if decode_time(enc) > now:
                        break
                    yield bucket, name, enc, kh


def _stale(record: StoredRecord, enc: str) -> bool:
    """True when a marker for ``enc`` no longer matches ``record`` (a poisoned one always keeps its marker)."""
    return record.poisoned is None and (record.due_at is None or encode_time(record.due_at) != enc)


class FileStore(BaseStore):
    """One file per record under a directory; see the module docstring.

    Args:
        url: ``file:///absolute/dir``.
        prefix: Subdirectory of ``dir`` holding this store's records.

    Example:
        >>> store = open_store("file:///var/lib/celery-persist", prefix="shop")
        >>> store.setup()
    """

    schemes: ClassVar[tuple[str, ...]] = ("file",)

    def __init__(self, url: str, *, prefix: str = "") -> None:
        # Messages show the URL masked: it is the operator's, and may carry anything.
        self.name = mask_url(url)
        try:
            parts = urlsplit(url)
        except ValueError:
            raise ConfigurationError(f"cannot parse file store URL {self.name!r}: use file:///absolute/dir") from None
        if parts.scheme.lower() != "file":
            raise ConfigurationError(f"FileStore serves file:// URLs, not {parts.scheme!r}")
        path = unquote(parts.path)
        if "\0" in url or "\0" in path:
            raise ConfigurationError(f"file store URL {self.name!r} holds a NUL byte: use file:///absolute/dir")
        if parts.netloc not in ("", "localhost"):
            raise ConfigurationError(f"file store URL {self.name!r} names a host: use file:///absolute/dir")
        if not path.startswith("/"):
            raise ConfigurationError(f"file store URL {self.name!r} needs an absolute path: file:///absolute/dir")
        if prefix and (not _PREFIX_OPTION.fullmatch(prefix) or prefix in (".", "..")):
            raise ConfigurationError(f"file store prefix {prefix!r} must be one path component of [A-Za-z0-9._-]")
        self._prefix = prefix
        self._base = os.path.normpath(path)
        self.root = os.path.join(self._base, prefix) if prefix else self._base
        self._records = os.path.join(self.root, "records")
        self._due = os.path.join(self.root, "due")
        self._locks = os.path.join(self.root, "locks")
        self._markers = _DueMarkers(lambda: self._open_dir("due"), self._make_dirs)
        self._pid = os.getpid()
        self._thread_locks = [threading.Lock() for _ in range(256)]

    # -- plumbing ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        """The one place OS errors become store errors; the message names the cause."""
        try:
            yield
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.EMLINK):
                raise IntegrityError("a store file or directory is a symlink; refusing to follow it", store=self.name) from exc
            if exc.errno in _TRANSIENT:
                raise StoreUnavailable(f"file store I/O failed ({describe(exc)})", store=self.name) from exc
            if exc.errno in (errno.EACCES, errno.EPERM, errno.ENOTDIR):
                raise ConfigurationError(
                    f"file store directory is not usable ({describe(exc)}); check the path and permissions",
                    store=self.name,
                ) from exc
            raise StoreUnavailable(f"file store I/O failed ({describe(exc)})", store=self.name) from exc

    def _check_key(self, key_hash: str) -> None:
        if not isinstance(key_hash, str) or not _HEX64.fullmatch(key_hash):
            raise ValueError("key_hash must be 64 lowercase hex digits")

    def _open_dir(self, *parts: str) -> int:
        """An fd of ``root/<parts...>``, opened component by component from the URL's directory.

        Only the URL's directory itself may be a symlink (the operator chose it); the
        prefix directory and everything below it are opened with ``O_NOFOLLOW``, so a
        symlink planted there is refused (``ELOOP``), never followed.

        Raises:
            FileNotFoundError: A directory on the way is missing.
        """
        fd = os.open(self._base, _OPEN_DIR_FOLLOW)
        try:
            for part in (self._prefix, *parts) if self._prefix else parts:
                sub = _open_subdir(fd, part)
                os.close(fd)
                fd = sub
        except BaseException:
            os.close(fd)
            raise
        return fd

    @contextlib.contextmanager
    def _locked(self, shard: str) -> Iterator[None]:
        if self._pid != os.getpid():
            self._thread_locks = [threading.Lock() for _ in range(256)]
            self._pid = os.getpid()
        tlock = self._thread_locks[int(shard, 16)]
        with tlock:
            try:
                dfd = self._open_dir("locks")
            except FileNotFoundError:
                self._make_dirs()
                dfd = self._open_dir("locks")
            try:
                fd = os.open(shard, _OPEN_LOCK, 0o600, dir_fd=dfd)
            finally:
                os.close(dfd)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                os.close(fd)  # closing the only descriptor releases the flock

    def _make_dirs(self) -> None:
        # The URL's own directory may be a symlink (the operator chose it); the
        # directories the store creates inside it may not.
        owned = [self._records, self._due, self._locks]
        if self._prefix:
            owned.insert(0, self.root)
        created = False
        for path in [self.root, *owned]:
            try:
                created |= make_private_dirs(path)  # 0700, parents the store creates included
            except FileExistsError:
                pass  # a file or dangling symlink is in the way; the check below names it
        for path in owned:
            if not stat.S_ISDIR(os.lstat(path).st_mode):
                where = os.path.relpath(path, self._base)
                raise ConfigurationError(
                    f"file store path {where!r} (under the URL's directory) exists and is not a directory (symlinks are refused)",
                    store=self.name,
                )
        if created:
            _fsync_dir(self.root)
            _fsync_dir(os.path.dirname(self.root))

    def _shard_dir(self, shard: str, *, create: bool) -> int:
        """An fd of ``records/<shard>``; raises FileNotFoundError when it is missing and not created."""
        try:
            rfd = self._open_dir("records")
        except FileNotFoundError:
            if not create:
                raise
            self._make_dirs()
            rfd = self._open_dir("records")
        try:
            try:
                return _open_subdir(rfd, shard)
            except FileNotFoundError:
                if not create:
                    raise
            try:
                os.mkdir(shard, 0o700, dir_fd=rfd)
            except FileExistsError:
                pass
            else:
                os.fsync(rfd)
            return _open_subdir(rfd, shard)
        finally:
            os.close(rfd)

    # -- record files -----------------------------------------------------------------------

    @staticmethod
    def _header(record: StoredRecord, blob_size: int) -> bytes:
        header = {
            "key_hash": record.key_hash,
            "kind": str(record.kind),
            "status": str(record.status),
            "metadata": dict(record.metadata),
            "created_at": record.created_at,
            "expires_at": record.expires_at,
            "due_at": record.due_at,
            "updated_at": record.updated_at,
            "version": record.version,
            "seal": record.seal,
            "blob_size": blob_size,
        }
        return FileStore._pack_header(header)

    @staticmethod
    def _pack_header(header: dict[str, Any]) -> bytes:
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        return _PREFIX.pack(_MAGIC, len(text)) + text

    def _parse(self, f: io.FileIO, key_hash: str) -> tuple[dict[str, Any], int]:
        """Header dict and the offset of the blob.

        Raises:
            IntegrityError: Truncated, not this format, not JSON, or another record's file.
        """
        head = f.read(_PREFIX.size)
        if head is None or len(head) != _PREFIX.size:
            raise IntegrityError("record file is truncated", store=self.name)
        magic, size = _PREFIX.unpack(head)
        if magic != _MAGIC:
            raise IntegrityError("record file has an unknown format", store=self.name)
        text = f.read(size)
        if text is None or len(text) != size:
            raise IntegrityError("record file is truncated", store=self.name)
        try:
            header = json.loads(text)
        except (ValueError, RecursionError):
            raise IntegrityError("record file header is not valid JSON", store=self.name) from None
        if not isinstance(header, dict) or header.get("key_hash") != key_hash:
            raise IntegrityError("record file does not belong to its name", store=self.name)
        return header, _PREFIX.size + size

    def _record(self, header: dict[str, Any], blob: bytes) -> StoredRecord:
        """The header's record.

        Raises:
            UndecodableRecord: A field is missing, mistyped or unknown (:func:`salvage`
                turns it into a poisoned placeholder, :meth:`get` into IntegrityError).
        """
        return decode_record(
            str(header["key_hash"]),
            kind=header.get("kind"),
            status=header.get("status"),
            blob=blob,
            metadata=header.get("metadata"),
            created_at=header.get("created_at"),
            expires_at=header.get("expires_at"),
            due_at=header.get("due_at"),
            updated_at=header.get("updated_at"),
            # JSON keeps types: stricter than the text-only stores. Absent from files
            # written before records carried them.
            version=_checked(header.get("version", 0), int, "version"),
            seal=_checked(header.get("seal", ""), str, "seal"),
        )

    def _open_record(self, key_hash: str, dir_fd: int | None = None) -> io.FileIO | None:
        """The record file, opened for reading; None when it (or its shard) does not exist.

        Raises:
            IntegrityError: The record file is a symlink or not a regular file (planted).
            OSError: ``ELOOP`` for a symlinked directory on the way, and other I/O errors.
        """
        if dir_fd is None:
            try:
                shard = self._shard_dir(key_hash[:2], create=False)
            except FileNotFoundError:
                return None
            try:
                return self._open_record(key_hash, shard)
            finally:
                os.close(shard)
        try:
            fd = os.open(key_hash, _OPEN_READ, dir_fd=dir_fd)
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise IntegrityError("record file is a symlink; refusing to follow it", store=self.name) from None
            raise
        f = io.FileIO(fd, "rb", closefd=True)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            f.close()
            raise IntegrityError("record file is not a regular file", store=self.name)
        return f

    def _read(self, key_hash: str, *, with_blob: bool, dir_fd: int | None = None, strict: bool = False) -> StoredRecord | None:
        """The record; None when missing; a poisoned placeholder when its file does not decode
        (or, unless ``strict``, is a planted link). A symlinked directory on the way raises (``ELOOP``)."""
        try:
            f = self._open_record(key_hash, dir_fd)
        except IntegrityError as exc:
            if strict:
                raise
            return poisoned_record(key_hash, exc.message)
        if f is None:
            return None
        with f:
            return salvage(key_hash, lambda: self._decode_file(f, key_hash, with_blob=with_blob))

    def _decode_file(self, f: io.FileIO, key_hash: str, *, with_blob: bool) -> StoredRecord:
        header, _ = self._parse(f, key_hash)
        blob = b""
        if with_blob:
            size = header.get("blob_size")
            if type(size) is not int:
                raise UndecodableRecord("blob_size is not an integer")
            # readall() sizes its buffer from fstat: one copy of the blob, no regrowth.
            blob = f.readall() if size else b""
            if len(blob) != size:
                raise IntegrityError("record blob is truncated", store=self.name)
        return self._record(header, blob)

    def _create_temp(
        self, dir_fd: int, key_hash: str, chunks: list[bytes], copy_from: tuple[int, int, int] | None = None
    ) -> tuple[str, int]:
        """A new temp file in the shard holding ``chunks`` (+ ``copy_from``), not yet synced: (name, open fd).

        ``copy_from`` is ``(fd, offset, count)``: bytes appended from another file inside the kernel.
        """
        tmp = f".tmp-{key_hash[:16]}-{os.getpid()}-{secrets.token_hex(4)}"
        fd = os.open(tmp, _OPEN_TMP, 0o600, dir_fd=dir_fd)
        try:
            views = [memoryview(c) for c in chunks if c]
            while views:
                written = os.writev(fd, views)
                while views and written >= len(views[0]):
                    written -= len(views[0])
                    views.pop(0)
                if views and written:
                    views[0] = views[0][written:]
            if copy_from is not None:
                self._copy(copy_from, fd)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=dir_fd)
            raise
        return tmp, fd

    def _write(self, dir_fd: int, key_hash: str, chunks: list[bytes], copy_from: tuple[int, int, int] | None = None) -> str:
        """A temp file in the shard, written and ``fsync``-ed (not yet renamed); returns its name."""
        tmp, fd = self._create_temp(dir_fd, key_hash, chunks, copy_from)
        try:
            os.fsync(fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=dir_fd)
            raise
        finally:
            os.close(fd)
        return tmp

    @staticmethod
    def _copy(source: tuple[int, int, int], dst: int) -> None:
        src, offset, count = source
        try:
            while count > 0:
                n = os.copy_file_range(src, dst, count, offset)
                if n == 0:
                    raise OSError(errno.EIO, "record file shrank while being copied")
                offset += n
                count -= n
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                raise
            while count > 0:
                data = os.pread(src, min(count, 1 << 22), offset)
                if not data:
                    raise OSError(errno.EIO, "record file shrank while being copied") from None
                os.write(dst, data)
                offset += len(data)
                count -= len(data)

    def _commit(self, dir_fd: int, tmp: str, key_hash: str) -> None:
        try:
            os.replace(tmp, key_hash, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=dir_fd)
            raise

    # -- the contract -----------------------------------------------------------------------

    def setup(self) -> None:
        """Create the directories and remove temp files left by writers that died."""
        with self._errors():
            self._make_dirs()
            cutoff = time.time() - _STALE_TMP_SECONDS
            rfd = self._open_dir("records")
            try:
                for entry in os.scandir(rfd):
                    if not (_HEX2.fullmatch(entry.name) and entry.is_dir(follow_symlinks=False)):
                        continue
                    try:
                        sfd = _open_subdir(rfd, entry.name)
                    except FileNotFoundError:
                        continue
                    try:
                        for item in os.scandir(sfd):
                            if item.name.startswith(".tmp-") and item.stat(follow_symlinks=False).st_mtime < cutoff:
                                with contextlib.suppress(FileNotFoundError):
                                    os.unlink(item.name, dir_fd=sfd)
                    finally:
                        os.close(sfd)
            finally:
                os.close(rfd)

    def put(self, record: StoredRecord) -> None:
        self.put_many([record])

    def put_many(self, records: Iterable[StoredRecord]) -> None:
        """Write records in one pass: shard locks (taken in order), one sync per marker bucket,
        the new files staged and ``fsync``-ed in parallel, then committed by renames and one
        sync per shard directory.

        Other writers of those shards wait for the whole batch; callers batch in thousands.
        """
        batch: dict[str, StoredRecord] = {}
        for record in records:
            self._check_key(record.key_hash)
            batch[record.key_hash] = record  # last one wins, as with put() in a loop
        if not batch:
            return
        with self._errors(), self._shards_locked(sorted({k[:2] for k in batch})) as dirs:
            old: dict[str, float | None] = {}
            for key in batch:
                # strict: a record file planted as a symlink is refused, not replaced.
                current = self._read(key, with_blob=False, dir_fd=dirs[key[:2]], strict=True)
                old[key] = current.due_at if current is not None else None
            self._markers.add([m for key, rec in batch.items() for m in _DueMarkers.needed(old[key], rec.due_at, key)])
            self._commit_staged(self._stage(batch, dirs))
            _fsync_all(list(dirs.values()))
            for key, rec in batch.items():
                self._markers.remove(old[key], key, keep=rec.due_at)

    @contextlib.contextmanager
    def _shards_locked(self, shards: list[str]) -> Iterator[dict[str, int]]:
        """Lock ``shards`` (in the order given), then open their directories: ``{shard: fd}``."""
        with contextlib.ExitStack() as stack:
            for shard in shards:
                stack.enter_context(self._locked(shard))
            dirs: dict[str, int] = {}
            for shard in shards:
                dirs[shard] = self._shard_dir(shard, create=True)
                stack.callback(os.close, dirs[shard])
            yield dirs

    def _stage(self, batch: dict[str, StoredRecord], dirs: dict[str, int]) -> list[tuple[int, str, str]]:
        """Write every record to a temp file and ``fsync`` them all: ``[(shard dir fd, temp name, key)]``.

        On failure no temp file is left behind.
        """
        temps: list[tuple[int, str, str]] = []
        fds: list[int] = []
        try:
            for key, rec in batch.items():
                dfd = dirs[key[:2]]
                name, fd = self._create_temp(dfd, key, [self._header(rec, len(rec.blob)), rec.blob])
                temps.append((dfd, name, key))
                fds.append(fd)
            _fsync_all(fds)
        except BaseException:
            for dfd, name, _ in temps:
                with contextlib.suppress(OSError):
                    os.unlink(name, dir_fd=dfd)
            raise
        finally:
            for fd in fds:
                os.close(fd)
        return temps

    @staticmethod
    def _commit_staged(temps: list[tuple[int, str, str]]) -> None:
        """Rename staged temp files over their records; on failure remove the ones not renamed yet."""
        for i, (dfd, name, key) in enumerate(temps):
            try:
                os.replace(name, key, src_dir_fd=dfd, dst_dir_fd=dfd)
            except BaseException:
                for rest_dfd, rest, _ in temps[i:]:
                    with contextlib.suppress(OSError):
                        os.unlink(rest, dir_fd=rest_dfd)
                raise

    def get(self, key_hash: str) -> StoredRecord | None:
        self._check_key(key_hash)
        with self._errors():
            found = self._read(key_hash, with_blob=True)
        return None if found is None else decoded(found, store=self.name)

    def delete(self, key_hash: str) -> bool:
        self._check_key(key_hash)
        with self._shard_for_update(key_hash) as dfd:
            if dfd is None:
                return False
            current = self._read(key_hash, with_blob=False, dir_fd=dfd)
            if current is None:
                return False
            os.unlink(key_hash, dir_fd=dfd)  # a planted symlink itself, never what it points at
            os.fsync(dfd)
            if current.poisoned is None:
                self._markers.remove(current.due_at, key_hash, keep=None)
            else:
                self._markers.purge(key_hash)
            return True

    def quarantine(self, key_hash: str) -> bool:
        """Under the shard lock: rewrite the header with ``due_at`` null (blob copied in the kernel),
        then remove its marker. A header that does not parse is left as it is, and every
        marker of the key is removed. Nothing is decoded beyond the header's JSON."""
        self._check_key(key_hash)
        with self._shard_for_update(key_hash) as dfd:
            if dfd is None:
                return False
            try:
                f = self._open_record(key_hash, dfd)
            except IntegrityError:  # a planted link or special file: keep it for inspection
                self._markers.purge(key_hash)
                return True
            if f is None:
                return False
            with f:
                try:
                    header, offset = self._parse(f, key_hash)
                except IntegrityError:
                    self._markers.purge(key_hash)
                    return True
                due_at = header.get("due_at")
                if due_at is None:
                    return True
                size = os.fstat(f.fileno()).st_size - offset
                tmp = self._write(dfd, key_hash, [self._pack_header({**header, "due_at": None})], (f.fileno(), offset, size))
            self._commit(dfd, tmp, key_hash)
            os.fsync(dfd)
            if isinstance(due_at, int | float) and not isinstance(due_at, bool):
                self._markers.unlink(*self._markers.locate(float(due_at), key_hash))
            else:
                self._markers.purge(key_hash)
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
        self._check_key(key_hash)
        changes: dict[str, Any] = {"status": to, "updated_at": now, **token_changes(version, seal)}
        if not isinstance(due_at, Keep):
            changes["due_at"] = due_at
        return self._rewrite(
            key_hash,
            lambda rec: rec.status in expect and (expect_version is None or rec.version == expect_version),
            changes,
        )

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
        self._check_key(key_hash)
        with self._shard_for_update(key_hash) as dfd:
            if dfd is None:
                return False
            found = self._read(key_hash, with_blob=True, dir_fd=dfd)
            if found is None:
                return False
            current = decoded(found, store=self.name)
            if current.blob != old_blob:
                return False
            new = current.replace(blob=new_blob, updated_at=now, **token_changes(version, seal))
            tmp = self._write(dfd, key_hash, [self._header(new, len(new_blob)), new_blob])
            self._commit(dfd, tmp, key_hash)
            os.fsync(dfd)
            return True

    def _rewrite(self, key_hash: str, allowed: Callable[[StoredRecord], bool], changes: dict[str, Any]) -> bool:
        """Under the shard lock: if ``allowed(record)``, rewrite its header with ``changes`` (blob copied in the kernel)."""
        with self._shard_for_update(key_hash) as dfd:
            if dfd is None:
                return False
            f = self._open_record(key_hash, dfd)
            if f is None:
                return False
            with f:
                header, offset = self._parse(f, key_hash)
                current = decoded(salvage(key_hash, lambda: self._record(header, b"")), store=self.name)
                size = header.get("blob_size")
                if type(size) is not int:
                    raise IntegrityError("blob_size is not an integer", key=key_hash[:12], store=self.name)
                if not allowed(current):
                    return False
                new = current.replace(**changes)
                self._markers.add(_DueMarkers.needed(current.due_at, new.due_at, key_hash))
                tmp = self._write(dfd, key_hash, [self._header(new, size)], (f.fileno(), offset, size))
            self._commit(dfd, tmp, key_hash)
            os.fsync(dfd)
            self._markers.remove(current.due_at, key_hash, keep=new.due_at)
            return True

    @contextlib.contextmanager
    def _shard_for_update(self, key_hash: str) -> Iterator[int | None]:
        """The record's shard directory (an fd), locked, errors mapped; None when it was never written."""
        shard = key_hash[:2]
        if not os.path.isdir(self._locks):  # never written to: nothing to change, nothing to create
            yield None
            return
        with self._errors(), self._locked(shard):
            try:
                dfd = self._shard_dir(shard, create=False)
            except FileNotFoundError:
                yield None
                return
            try:
                yield dfd
            finally:
                os.close(dfd)

    def scan(
        self,
        *,
        kind: Kind | None = None,
        status: Status | None = None,
        limit: int = 100,
        cursor: str | None = None,
        with_blob: bool = False,
    ) -> Page:
        items: list[StoredRecord] = []
        if limit <= 0:
            return Page(items, None)
        wanted = ScanRange(kind, status, limit, cursor)
        with self._errors():
            try:
                rfd = self._open_dir("records")
            except FileNotFoundError:
                return Page(items, None)
            try:
                shards = sorted(n for n in os.listdir(rfd) if _HEX2.fullmatch(n))
                first = cursor[:2] if cursor else ""
                for shard in shards:
                    if shard < first:
                        continue
                    try:
                        sfd = _open_subdir(rfd, shard)
                    except FileNotFoundError:
                        continue
                    try:
                        names = sorted(n for n in os.listdir(sfd) if _HEX64.fullmatch(n))
                        for name in names:
                            if cursor is not None and name <= cursor:
                                continue
                            rec = self._read(name, with_blob=with_blob, dir_fd=sfd)
                            if rec is None:  # deleted since the listing
                                continue
                            if wanted.matches(rec):
                                items.append(rec)
                                if len(items) >= limit:
                                    return Page(items, name)
                    finally:
                        os.close(sfd)
            finally:
                os.close(rfd)
        return Page(items, None)

    def due(self, now: float, limit: int = 100) -> list[StoredRecord]:
        out: list[StoredRecord] = []
        if limit <= 0:
            return out
        seen: set[str] = set()
        with self._errors(), contextlib.closing(self._markers.walk(now)) as markers:
            for bucket, name, enc, kh in markers:
                if kh in seen:
                    continue
                rec = self._read(kh, with_blob=True)
                if rec is None or _stale(rec, enc):
                    self._drop_stale(bucket, name, kh, enc)
                    continue
                # A poisoned record has no due_at to check: its marker says it is due.
                seen.add(kh)
                out.append(rec)
                if len(out) >= limit:
                    return out
        return out

    def _drop_stale(self, bucket: str, name: str, key_hash: str, enc: str) -> None:
        # Under the lock: a writer creates the marker before renaming the record,
        # so a marker that looks stale may be one whose record is on its way.
        with self._locked(key_hash[:2]):
            rec = self._read(key_hash, with_blob=False)
            if rec is None or _stale(rec, enc):
                self._markers.unlink(bucket, name)

    def health(self) -> dict[str, Any]:
        try:
            st = os.statvfs(self.root)
            if not os.access(self.root, os.W_OK | os.X_OK):
                return {"ok": False, "store": self.name, "error": "directory is not writable"}
        except OSError as exc:
            return {"ok": False, "store": self.name, "error": os.strerror(exc.errno or 0)}
        return {"ok": True, "store": self.name, "free_bytes": st.f_bavail * st.f_frsize}

    def drop(self) -> None:
        """Remove this store's directory and everything in it (tests, uninstall). Irreversible."""
        with self._errors():
            if os.path.lexists(self.root) and not os.path.islink(self.root):
                shutil.rmtree(self.root)
