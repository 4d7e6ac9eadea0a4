"""What the file store promises beyond the generic contract: safe names, crash leftovers, O(due) index."""

from __future__ import annotations

import hashlib
import json
import os
import random
import struct
import time
from pathlib import Path
from typing import Any

import pytest

from celery_persist.errors import ConfigurationError, IntegrityError
from celery_persist.stores import Kind, Status, StoredRecord, open_store
from celery_persist.stores.filesystem import FileStore, decode_time, encode_time

pytestmark = pytest.mark.integration

NOW = 1_750_000_000.25


def kh(*parts: object) -> str:
    return hashlib.sha256(":".join(map(str, parts)).encode()).hexdigest()


def rec(key: str, due_at: float | None = NOW + 60, blob: bytes = b"blob") -> StoredRecord:
    return StoredRecord(key, Kind.SUSPENSION, Status.SUSPENDED, blob, {"m": 1}, NOW, due_at, due_at, NOW)


@pytest.fixture
def fstore(tmp_path: Path) -> FileStore:
    s = open_store(f"file://{tmp_path}", prefix="app")
    assert isinstance(s, FileStore)
    s.setup()
    return s


def record_path(store: FileStore, key: str) -> Path:
    return Path(store.root) / "records" / key[:2] / key


@pytest.mark.parametrize("bad", ["../../etc/passwd", "A" * 64, "a" * 63, "a" * 65, "a" * 63 + "/", "a" * 64 + "\n", "", "g" * 64])
def test_key_hash_must_be_64_lowercase_hex(fstore: FileStore, bad: str) -> None:
    for call in (
        lambda: fstore.get(bad),
        lambda: fstore.delete(bad),
        lambda: fstore.put(rec(bad)),
        lambda: fstore.transition(bad, {Status.SUSPENDED}, Status.CLAIMED, now=NOW),
        lambda: fstore.replace_blob(bad, b"", b"", now=NOW),
    ):
        with pytest.raises(ValueError):
            call()
    assert not any(p.name.startswith("passwd") for p in Path(fstore.root).rglob("*"))


@pytest.mark.parametrize(
    "url, options",
    [
        ("file://relative/dir", {}),
        ("file://otherhost/dir", {}),
        ("file:///tmp/x", {"prefix": ".."}),
        ("file:///tmp/x", {"prefix": "a/b"}),
        ("file:///tmp/a%00b", {}),
        ("file:///tmp/a\x00b", {}),
        ("file://[::1/dir", {}),
    ],
)
def test_bad_configuration(url: str, options: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        open_store(url, **options)


@pytest.mark.parametrize(
    "url",
    [
        "file://user:S3CRET@otherhost/dir",
        "file://:S3CRET@localhost.example/dir?token=T0KEN",
        "file:relative/dir?token=T0KEN",
        "file:///tmp/a%00b?token=T0KEN",
    ],
)
def test_configuration_errors_show_the_url_masked(url: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        open_store(url)
    for secret in ("S3CRET", "T0KEN"):
        assert secret not in str(info.value)


def test_symlinked_record_is_refused_not_followed(fstore: FileStore, tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"not a record")
    key, other = kh("link"), kh("link", "other")
    fstore.put(rec(key))
    fstore.put(rec(other))
    path = record_path(fstore, key)
    path.unlink()
    path.symlink_to(victim)
    with pytest.raises(IntegrityError, match="symlink"):
        fstore.get(key)
    with pytest.raises(IntegrityError):
        fstore.transition(key, {Status.SUSPENDED}, Status.CLAIMED, now=NOW)
    with pytest.raises(IntegrityError):
        fstore.replace_blob(key, b"blob", b"new", now=NOW)
    with pytest.raises(IntegrityError):
        fstore.put(rec(key, blob=b"written through the link?"))
    # Listings show it as a poisoned placeholder, and the rest as they are.
    listed = {r.key_hash: r for r in fstore.scan(with_blob=True).items}
    assert listed[other] == rec(other) and listed[key].poisoned == "record file is a symlink; refusing to follow it"
    assert victim.read_bytes() == b"not a record"
    # delete() removes the planted link itself, never what it points at.
    assert fstore.delete(key) is True
    assert not os.path.lexists(path) and victim.read_bytes() == b"not a record"


def _record_bytes(tmp_path: Path, key: str) -> bytes:
    """A genuine record file for ``key``, written by a store of its own."""
    s = open_store(f"file://{tmp_path / 'donor'}")
    s.put(rec(key, blob=b"planted"))
    return (Path(s.root) / "records" / key[:2] / key).read_bytes()


def _tree(root: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def test_symlinked_shard_directory_is_refused_not_followed(fstore: FileStore, tmp_path: Path) -> None:
    key = kh("shard-link")
    neighbour = next(kh("shard-link", i) for i in range(10_000) if kh("shard-link", i)[:2] != key[:2])
    fstore.put(rec(neighbour))
    # Someone with write access to the directory plants records/<shard> -> a directory of theirs,
    # holding a well-formed record for the key.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / key).write_bytes(_record_bytes(tmp_path, key))
    shard = record_path(fstore, key).parent
    assert not shard.exists()
    shard.symlink_to(elsewhere, target_is_directory=True)
    before = _tree(elsewhere)
    for call in (
        lambda: fstore.get(key),
        lambda: fstore.put(rec(key, blob=b"through the link?")),
        lambda: fstore.transition(key, {Status.SUSPENDED}, Status.CLAIMED, due_at=NOW + 5, now=NOW),
        lambda: fstore.replace_blob(key, b"planted", b"new", now=NOW),
        lambda: fstore.delete(key),
        lambda: fstore.quarantine(key),
        lambda: fstore.scan(),
    ):
        with pytest.raises(IntegrityError, match="symlink"):
            call()
    assert _tree(elsewhere) == before, "the link's target was changed"
    assert fstore.get(neighbour) == rec(neighbour)


@pytest.mark.parametrize("planted", ["records", "due", "locks"])
def test_symlinked_store_subdirectory_is_refused_not_followed(fstore: FileStore, tmp_path: Path, planted: str) -> None:
    key = kh("subdir-link")
    fstore.put(rec(key, due_at=NOW - 1))
    real = Path(fstore.root) / planted
    elsewhere = tmp_path / f"elsewhere-{planted}"
    real.rename(elsewhere)  # everything the store had, now outside it
    real.symlink_to(elsewhere, target_is_directory=True)
    before = _tree(elsewhere)
    calls: dict[str, Any] = {
        "records": lambda: fstore.get(key),
        "due": lambda: fstore.due(NOW),
        "locks": lambda: fstore.transition(key, {Status.SUSPENDED}, Status.CLAIMED, due_at=None, now=NOW),
    }
    with pytest.raises(IntegrityError, match="symlink"):
        calls[planted]()
    with pytest.raises(IntegrityError, match="symlink"):
        fstore.put(rec(kh("subdir-link", "new"), due_at=NOW - 2))
    assert _tree(elsewhere) == before, "the link's target was changed"


def test_symlinked_lock_file_and_due_bucket_are_refused(fstore: FileStore, tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep me")
    key = kh("lock-link")
    lock = Path(fstore.root) / "locks" / key[:2]
    lock.symlink_to(victim)
    with pytest.raises(IntegrityError, match="symlink"):
        fstore.put(rec(key))
    bucket, _ = fstore._markers.locate(NOW + 60, key)
    bucket_dir = Path(fstore.root) / "due" / bucket
    elsewhere = tmp_path / "elsewhere-bucket"
    elsewhere.mkdir()
    bucket_dir.symlink_to(elsewhere, target_is_directory=True)
    other = next(kh("bucket-link", i) for i in range(10_000) if kh("bucket-link", i)[:2] != key[:2])
    with pytest.raises(IntegrityError, match="symlink"):
        fstore.put(rec(other, due_at=NOW + 60))
    with pytest.raises(IntegrityError, match="symlink"):
        fstore.due(NOW + 61)
    assert victim.read_bytes() == b"keep me" and list(elsewhere.iterdir()) == []


def test_planted_fifo_is_refused_without_blocking(fstore: FileStore) -> None:
    key = kh("fifo")
    fstore.put(rec(key))
    path = record_path(fstore, key)
    path.unlink()
    os.mkfifo(path)
    with pytest.raises(IntegrityError, match="not a regular file"):
        fstore.get(key)
    assert [r.poisoned for r in fstore.scan().items] == ["record file is not a regular file"]


def test_symlinked_store_directory_is_refused(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "app").symlink_to(elsewhere)
    s = open_store(f"file://{tmp_path / 'root'}", prefix="app")
    with pytest.raises(ConfigurationError, match="symlink"):
        s.setup()


def test_record_file_format_and_permissions(fstore: FileStore) -> None:
    key = kh("format")
    blob = os.urandom(1000)
    fstore.put(rec(key, blob=blob))
    path = record_path(fstore, key)
    data = path.read_bytes()
    magic, size = struct.unpack(">4sI", data[:8])
    assert magic == b"CPR1"
    assert data[8 + size :] == blob
    assert b'"key_hash":"%s"' % key.encode() in data[8 : 8 + size]
    assert path.stat().st_mode & 0o777 == 0o600
    assert (Path(fstore.root) / "records").stat().st_mode & 0o777 == 0o700


def test_everything_the_store_creates_is_private(tmp_path: Path) -> None:
    """Files 0600 and directories 0700, the missing parents of the URL's directory included,
    whatever the umask would have allowed."""
    old_umask = os.umask(0o022)
    try:
        s = open_store(f"file://{tmp_path}/new/parents/store", prefix="app")
        s.setup()
        key = kh("private")
        s.put(rec(key, due_at=NOW + 1))
        assert s.transition(key, {Status.SUSPENDED}, Status.CLAIMED, due_at=NOW + 2, now=NOW, version=1, seal="s")
        assert s.replace_blob(key, b"blob", b"rotated", now=NOW + 1, version=2, seal="t")
        s.put_many(rec(kh("private", i), due_at=NOW + 3600 * i) for i in range(10))
        assert s.delete(kh("private", 0))
    finally:
        os.umask(old_umask)
    created = [tmp_path / "new", *(p for p in (tmp_path / "new").rglob("*"))]
    dirs = [p for p in created if p.is_dir()]
    files = [p for p in created if p.is_file()]
    assert len(dirs) >= 8 and len(files) >= 10, (dirs, files)  # parents, root, records/due/locks, shards, buckets
    assert {str(p.relative_to(tmp_path)): oct(p.stat().st_mode & 0o777) for p in dirs if p.stat().st_mode & 0o777 != 0o700} == {}
    assert {str(p.relative_to(tmp_path)): oct(p.stat().st_mode & 0o777) for p in files if p.stat().st_mode & 0o777 != 0o600} == {}


def test_record_file_without_version_or_seal_reads_as_version_0(fstore: FileStore) -> None:
    """A record file written before records carried a version and a seal."""
    key = kh("old-format")
    fstore.put(rec(key, blob=b"old blob").replace(version=4, seal="abc"))
    path = record_path(fstore, key)
    data = path.read_bytes()
    (size,) = struct.unpack(">I", data[4:8])
    header = json.loads(data[8 : 8 + size])
    assert (header.pop("version"), header.pop("seal")) == (4, "abc")
    text = json.dumps(header, separators=(",", ":")).encode()
    path.write_bytes(b"CPR1" + struct.pack(">I", len(text)) + text + data[8 + size :])
    assert fstore.get(key) == rec(key, blob=b"old blob")
    assert fstore.transition(key, {Status.SUSPENDED}, Status.CLAIMED, now=NOW + 1, expect_version=1) is False
    assert fstore.transition(key, {Status.SUSPENDED}, Status.CLAIMED, now=NOW + 1, version=1, seal="s1", expect_version=0)
    assert fstore.get(key) == rec(key, blob=b"old blob").replace(status=Status.CLAIMED, updated_at=NOW + 1, version=1, seal="s1")


@pytest.mark.parametrize("field, value", [("version", "1"), ("version", True), ("version", 1.5), ("seal", 7), ("seal", None)])
def test_record_file_with_a_mistyped_version_or_seal_is_an_integrity_error(fstore: FileStore, field: str, value: Any) -> None:
    key = kh("mistyped")
    fstore.put(rec(key))
    path = record_path(fstore, key)
    data = path.read_bytes()
    (size,) = struct.unpack(">I", data[4:8])
    header = json.loads(data[8 : 8 + size])
    header[field] = value
    text = json.dumps(header, separators=(",", ":")).encode()
    path.write_bytes(b"CPR1" + struct.pack(">I", len(text)) + text + data[8 + size :])
    with pytest.raises(IntegrityError):
        fstore.get(key)


def test_truncated_record_is_an_integrity_error(fstore: FileStore) -> None:
    key = kh("trunc")
    fstore.put(rec(key, blob=b"x" * 100))
    path = record_path(fstore, key)
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(IntegrityError):
        fstore.get(key)


def test_due_reads_only_due_records(fstore: FileStore, monkeypatch: pytest.MonkeyPatch) -> None:
    fstore.put_many(rec(kh("later", i), NOW + 3600 * 24 * (1 + i % 30)) for i in range(1000))
    due = [kh("due", i) for i in range(10)]
    fstore.put_many(rec(k, NOW - 60 * i) for i, k in enumerate(due))
    reads: list[str] = []
    real_read = fstore._read

    def counting_read(key_hash: str, **kw: Any) -> StoredRecord | None:
        reads.append(key_hash)
        return real_read(key_hash, **kw)

    listed: list[str] = []
    real_listdir = os.listdir

    def counting_listdir(path: Any = ".") -> list[str]:
        names = real_listdir(path)
        listed.extend(names)
        return names

    monkeypatch.setattr(fstore, "_read", counting_read)
    monkeypatch.setattr(os, "listdir", counting_listdir)
    got = fstore.due(NOW, limit=100)
    assert sorted(r.key_hash for r in got) == sorted(due)
    assert sorted(reads) == sorted(due), "due() opened records that are not due"
    # Names listed: the bucket names plus the due buckets' markers, not the 1,000 later ones.
    assert len(listed) < 100, f"due() listed {len(listed)} names"


def test_stale_markers_from_a_crash_are_dropped(fstore: FileStore) -> None:
    live, gone, moved = kh("live"), kh("gone"), kh("moved")
    fstore.put(rec(live, NOW - 5))
    fstore.put(rec(moved, NOW + 10**6))
    # A writer died after creating markers: one for a record never written, one for an old due_at.
    for key, due_at in ((gone, NOW - 10), (moved, NOW - 7)):
        bucket, name = fstore._markers.locate(due_at, key)
        (Path(fstore.root) / "due" / bucket).mkdir(exist_ok=True)
        (Path(fstore.root) / "due" / bucket / name).touch()
    assert [r.key_hash for r in fstore.due(NOW)] == [live]
    markers = sorted(p.name for p in (Path(fstore.root) / "due").rglob("*") if p.is_file())
    assert markers == sorted([fstore._markers.locate(NOW - 5, live)[1], fstore._markers.locate(NOW + 10**6, moved)[1]])


def test_setup_removes_old_temp_files_only(fstore: FileStore) -> None:
    key = kh("tmp")
    fstore.put(rec(key))
    shard = record_path(fstore, key).parent
    old, fresh = shard / ".tmp-dead-1-aaaa", shard / ".tmp-live-2-bbbb"
    old.write_bytes(b"partial")
    fresh.write_bytes(b"in flight")
    an_hour_ago = time.time() - 7200
    os.utime(old, (an_hour_ago, an_hour_ago))
    assert [r.key_hash for r in fstore.scan().items] == [key], "scan must ignore temp files"
    fstore.setup()
    assert not old.exists() and fresh.exists()


def test_time_encoding_sorts_like_floats() -> None:
    rng = random.Random(5)
    values = [0.0, -0.5, 1e-310, -1e-310, 1e308, -1e308, NOW, NOW + 1e-6, float("inf"), float("-inf")]
    values += [rng.uniform(-1e12, 1e12) for _ in range(2000)]
    for v in values:
        assert decode_time(encode_time(v)) == v
        assert len(encode_time(v)) == 16
    assert sorted(values, key=encode_time) == sorted(values)


def test_transition_keeps_a_10mb_blob_byte_for_byte(fstore: FileStore) -> None:
    key = kh("big")
    blob = os.urandom(10 * 1024 * 1024)
    fstore.put(rec(key, blob=blob))
    assert fstore.transition(key, {Status.SUSPENDED}, Status.CLAIMED, due_at=NOW + 1, now=NOW)
    got = fstore.get(key)
    assert got is not None and got.blob == blob and got.status is Status.CLAIMED
    assert [r.key_hash for r in fstore.due(NOW + 1)] == [key]
    assert fstore.replace_blob(key, blob, b"small", now=NOW + 2)
    got = fstore.get(key)
    assert got is not None and got.blob == b"small" and got.status is Status.CLAIMED


def test_missing_directory_is_unhealthy_and_empty(tmp_path: Path) -> None:
    s = open_store(f"file://{tmp_path}/never-created")
    assert s.get(kh("x")) is None
    assert s.scan().items == [] and s.due(NOW) == []
    assert s.transition(kh("x"), {Status.SUSPENDED}, Status.CLAIMED, now=NOW) is False
    assert s.health()["ok"] is False
    s.put(rec(kh("x")))  # writing creates it
    assert s.health()["ok"] is True
