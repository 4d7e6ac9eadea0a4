"""Helpers shared by the unit tests: deep type-exact comparison, a fake clock,
a store that records its calls, and an envelope rebuilder with a valid CRC."""

from __future__ import annotations

import datetime as dt
import math
import struct
import zlib
from collections.abc import Collection
from decimal import Decimal
from typing import Any

from celery_persist.stores.base import KEEP, Kind, Page, Status, StoredRecord
from celery_persist.stores.memory import MemoryStore


def assert_same(actual: Any, expected: Any) -> None:
    """Assert ``actual`` equals ``expected`` with the same types all the way down.

    ``==`` alone is too lax for codec tests (``1 == 1.0 == True``, ``(1,) != [1]``
    but ``Decimal("1.10") == Decimal("1.1")``). Containers reached twice must map
    to containers reached twice: sharing and cycles must survive, and no sharing
    may be invented.
    """
    _same(actual, expected, "$", {}, {})


def _same(actual: Any, expected: Any, path: str, fwd: dict[int, int], back: dict[int, int]) -> None:
    assert type(actual) is type(expected), f"{path}: {type(actual).__name__} != {type(expected).__name__}"
    t = type(expected)
    if t in (dict, list):
        ie, ia = id(expected), id(actual)
        if ie in fwd or ia in back:
            assert fwd.get(ie) == ia and back.get(ia) == ie, f"{path}: shared/cyclic structure differs"
            return
        fwd[ie], back[ia] = ia, ie
        assert len(actual) == len(expected), f"{path}: length {len(actual)} != {len(expected)}"
        if t is list:
            for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
                _same(a, e, f"{path}[{i}]", fwd, back)
        else:
            for (ka, va), (ke, ve) in zip(actual.items(), expected.items(), strict=True):
                _same(ka, ke, f"{path}.key({ke!r})", fwd, back)
                _same(va, ve, f"{path}[{ke!r}]", fwd, back)
    elif t is tuple:
        assert len(actual) == len(expected), f"{path}: tuple length"
        for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
            _same(a, e, f"{path}({i})", fwd, back)
    elif t in (set, frozenset):
        assert {(type(x), x) for x in actual} == {(type(x), x) for x in expected}, f"{path}: {actual!r} != {expected!r}"
    elif t is float:
        if math.isnan(expected):
            assert math.isnan(actual), f"{path}: {actual!r} is not nan"
        else:
            assert actual == expected and math.copysign(1, actual) == math.copysign(1, expected), f"{path}: {actual!r} != {expected!r}"
    elif t is Decimal:
        assert str(actual) == str(expected), f"{path}: {actual!r} != {expected!r}"
    elif t in (dt.datetime, dt.time):
        assert actual == expected and (actual.tzinfo is None) == (expected.tzinfo is None), f"{path}: {actual!r} != {expected!r}"
        assert actual.utcoffset() == expected.utcoffset(), f"{path}: offsets differ"
        assert actual.isoformat() == expected.isoformat(), f"{path}: {actual!r} != {expected!r}"
    else:
        assert actual == expected, f"{path}: {actual!r} != {expected!r}"


class FakeClock:
    """A clock for ``PersistenceHub(clock=...)`` that only moves when told."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now


class RecordingStore(MemoryStore):
    """The reference store, noting the name of every operation called on it."""

    def __init__(self, url: str = "memory://", **options: Any) -> None:
        super().__init__(url, **options)
        self.calls: list[str] = []

    def put(self, record: StoredRecord) -> None:
        self.calls.append("put")
        super().put(record)

    def get(self, key_hash: str) -> StoredRecord | None:
        self.calls.append("get")
        return super().get(key_hash)

    def delete(self, key_hash: str) -> bool:
        self.calls.append("delete")
        return super().delete(key_hash)

    def transition(
        self,
        key_hash: str,
        expect: Collection[Status],
        to: Status,
        *,
        due_at: Any = KEEP,
        now: float,
        version: int | None = None,
        seal: str | None = None,
        expect_version: int | None = None,
    ) -> bool:
        self.calls.append("transition")
        return super().transition(key_hash, expect, to, due_at=due_at, now=now, version=version, seal=seal, expect_version=expect_version)

    def scan(self, **kwargs: Any) -> Page:
        self.calls.append("scan")
        return super().scan(**kwargs)

    def due(self, now: float, limit: int = 100) -> list[StoredRecord]:
        self.calls.append("due")
        return super().due(now, limit)

    def replace_blob(
        self, key_hash: str, old_blob: bytes, new_blob: bytes, *, now: float, version: int | None = None, seal: str | None = None
    ) -> bool:
        self.calls.append("replace_blob")
        return super().replace_blob(key_hash, old_blob, new_blob, now=now, version=version, seal=seal)

    def raw(self, key_hash: str) -> StoredRecord | None:
        """Read without recording (for assertions)."""
        return MemoryStore.get(self, key_hash)

    def raw_put(self, record: StoredRecord) -> None:
        """Write without recording (to simulate someone editing the store)."""
        MemoryStore.put(self, record)

    def suspensions(self) -> list[StoredRecord]:
        return [r for r in MemoryStore.scan(self, kind=Kind.SUSPENSION, limit=10**6, with_blob=True).items]


_HEAD = struct.Struct(">2sBI")
_V1 = struct.Struct(">BBBQ")


def reframe(
    blob: bytes,
    *,
    version: int | None = None,
    codec: int | None = None,
    compression: int | None = None,
    flags: int | None = None,
    size: int | None = None,
    payload: bytes | None = None,
) -> bytes:
    """Rebuild a v1 envelope with some fields changed and a CORRECT checksum.

    This is how a genuine blob from another writer looks: only the CRC-valid
    cases reach the checks after the checksum (version, ids, sizes, payload).
    """
    magic, v, _crc = _HEAD.unpack_from(blob)
    c, comp, f, n = _V1.unpack_from(blob, _HEAD.size)
    body = _V1.pack(
        c if codec is None else codec,
        comp if compression is None else compression,
        f if flags is None else flags,
        n if size is None else size,
    )
    data = blob[_HEAD.size + _V1.size :] if payload is None else payload
    v = v if version is None else version
    crc = zlib.crc32(body + data, zlib.crc32(magic + bytes((v,))))
    return _HEAD.pack(magic, v, crc) + body + data


def frame(head: bytes, *, version: int = 1) -> bytes:
    """An envelope of arbitrary bytes after the CRC, with a correct CRC."""
    crc = zlib.crc32(head, zlib.crc32(b"\xa7E" + bytes((version,))))
    return _HEAD.pack(b"\xa7E", version, crc) + head
