"""Golden blobs: every format version ever written must stay readable.

``tests/data/v<N>/*.bin`` were written by the release that introduced format
version N (see ``scripts/make-golden-blobs``); each has a ``.json`` sidecar
with the value it must decode to. Never regenerate an old version's files:
add a directory for a new version instead.
"""

from __future__ import annotations

import datetime
import hashlib
import json
from decimal import Decimal
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest

from celery_persist.crypto import Keyring
from celery_persist.errors import EncryptionError, IntegrityError
from celery_persist.hub import PersistenceHub
from celery_persist.keys import key_hash
from celery_persist.serializer import FORMAT_VERSION, StateSerializer
from celery_persist.stores.base import Kind, Status, StoredRecord
from celery_persist.stores.memory import MemoryStore

from ._helpers import FakeClock, assert_same

# Public test data, repeated in scripts/make-golden-blobs.
GOLDEN_KEY_ID = "golden-2026"
GOLDEN_KEY = bytes(range(32))
GOLDEN_SECRET = "golden-signing-secret-0123456789"

DATA = Path(__file__).resolve().parent.parent / "data"
SIDECARS = sorted(DATA.glob("v*/*.json"))


def _meta(path: Path) -> dict[str, Any]:
    return dict(json.loads(path.read_text(encoding="utf-8")))


ENVELOPES = [p for p in SIDECARS if _meta(p)["kind"] == "envelope"]
RECORDS = [p for p in SIDECARS if _meta(p)["kind"] == "hub_record"]
# Uncompressed json and msgpack blobs of the current version: their bytes depend on our code
# (and, for msgpack, on ormsgpack's writer, which is stable); compressed and pickled bytes
# also depend on zlib/zstandard/pickle versions.
STABLE = [
    p
    for p in ENVELOPES
    if _meta(p)["codec"] in ("json", "msgpack") and (_meta(p)["compression"], _meta(p)["format_version"]) == ("none", FORMAT_VERSION)
]
#: Whatever codec a deployment is configured with, it reads every blob: the envelope names the codec.
READERS = ("json", "msgpack")

_NAMES: dict[str, Any] = {"datetime": datetime, "Decimal": Decimal, "UUID": UUID, "nan": float("nan"), "inf": float("inf")}
_BUILTINS = {"__builtins__": {"set": set, "frozenset": frozenset, "bytearray": bytearray}}


def expected_value(sidecar: dict[str, Any]) -> Any:
    if "expected" in sidecar:
        return sidecar["expected"]
    value = eval(sidecar["expected_repr"], dict(_BUILTINS), dict(_NAMES))  # noqa: S307 - repo test data
    for container_path, key, target_path in sidecar.get("links", []):
        container, target = value, value
        for step in container_path:
            container = container[step]
        for step in target_path:
            target = target[step]
        container[key] = target
    return value


def _load(path: Path) -> tuple[bytes, dict[str, Any]]:
    sidecar = json.loads(path.read_text(encoding="utf-8"))
    blob = path.with_suffix(".bin").read_bytes()
    assert hashlib.sha256(blob).hexdigest() == sidecar["sha256"], f"{path.name}: blob changed on disk"
    return blob, sidecar


def test_there_are_golden_blobs_for_the_current_format_version() -> None:
    current = {p.stem for p in (DATA / f"v{FORMAT_VERSION}").glob("*.bin")}
    expected = {f"{c}_{z}" for c in ("json_fast", "pickle") for z in ("none", "gzip", "zstd")}
    assert expected <= current, "run scripts/make-golden-blobs for the new format version"
    assert {"json_tagged_none", "json_tagged_cycle_none", "dill_none", "hub_record_aesgcm", "hub_record_hmac"} <= current
    msgpack = {f"msgpack_{form}" for form in ("fast_none", "ext_none", "tagged_none", "tagged_cycle_none", "fast_zstd", "ext_zstd")}
    assert msgpack | {"hub_record_msgpack_aesgcm"} <= current
    for p in SIDECARS:
        assert p.with_suffix(".bin").exists(), p


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("path", ENVELOPES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_golden_envelope_loads(path: Path, reader: str) -> None:
    blob, sidecar = _load(path)
    assert blob[2] == sidecar["format_version"] == int(path.parent.name[1:])
    assert (blob[7], blob[8]) == (sidecar["codec_id"], sidecar["compression_id"])
    # Any reader configuration reads any blob: the envelope says how it was written.
    value = StateSerializer(reader, "none", max_size=1 << 20).loads(blob, trusted=sidecar["trusted"])
    assert_same(value, expected_value(sidecar))


@pytest.mark.parametrize("path", STABLE, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_current_writer_still_produces_the_golden_bytes(path: Path) -> None:
    """Detects an unintended change of the bytes written under the current version."""
    blob, sidecar = _load(path)
    again = StateSerializer(sidecar["codec"], "none").dumps(expected_value(sidecar))
    assert again == blob, f"the {sidecar['codec']} writer changed: bump FORMAT_VERSION or keep the bytes stable"


@pytest.mark.parametrize("path", [p for p in ENVELOPES if _meta(p)["codec"] == "msgpack"], ids=lambda p: p.stem)
def test_msgpack_golden_blobs_cover_each_path(path: Path) -> None:
    """Each msgpack blob exercises the path its sidecar names: no extension value, the fast path's
    extension values, or the tagged path's definitions and references."""
    import ormsgpack

    from celery_persist.codecs import get_compression

    blob, sidecar = _load(path)
    size = int.from_bytes(blob[10:18], "big")
    payload = get_compression(sidecar["compression"]).decompress(memoryview(blob)[18:], size)
    codes: set[int] = set()

    def hook(code: int, data: bytes) -> None:
        codes.add(code)
        if code in (5, 6, 7, 12, 17):
            ormsgpack.unpackb(data, ext_hook=hook)
        elif 13 <= code <= 15:
            ormsgpack.unpackb(data[4:], ext_hook=hook)

    ormsgpack.unpackb(payload, ext_hook=hook)
    form = "tagged" if codes & set(range(11, 18)) else "ext" if codes else "plain"
    assert form == sidecar["msgpack_form"] == {"fast": "plain", "ext": "ext", "tagged": "tagged"}[path.stem.split("_")[1]]


def _golden_hub(blob: bytes, sidecar: dict[str, Any], *, keyring: Keyring | None = None, reader: str | None = None) -> PersistenceHub:
    """A hub over a memory store holding the golden record exactly as the sidecar describes it."""
    store = MemoryStore()
    store.put(
        StoredRecord(
            key_hash=sidecar["key_hash"],
            kind=Kind(sidecar["record_kind"]),
            status=Status(sidecar["status"]),
            blob=blob,
            metadata=sidecar["metadata"],
            created_at=sidecar["created_at"],
            expires_at=sidecar["expires_at"],
            due_at=sidecar["due_at"],
            updated_at=sidecar["updated_at"],
        )
    )
    encrypted = sidecar["sealing"] == "aes-256-gcm"
    if keyring is None and encrypted:
        keyring = Keyring([(GOLDEN_KEY_ID, GOLDEN_KEY)])
    return PersistenceHub(
        store,
        keyring=keyring,
        signing_secret=GOLDEN_SECRET,
        encryption="auto" if encrypted else "off",
        serializer=StateSerializer(reader or sidecar["codec"]),
        clock=FakeClock(sidecar["created_at"] + 1),
    )


@pytest.mark.parametrize("reader", [None, *READERS])
@pytest.mark.parametrize("path", RECORDS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_golden_hub_record_opens(path: Path, reader: str | None) -> None:
    """A hub opens a record whatever codec it is configured to write with."""
    blob, sidecar = _load(path)
    hub = _golden_hub(blob, sidecar, reader=reader)
    key = sidecar["key"]
    assert key_hash(key) == sidecar["key_hash"]
    if hub._field_keys:
        # A 0.1 record carries no seal: refused until the operator adopts it once.
        with pytest.raises(IntegrityError):
            hub.load(key)
        assert hub.adopt_unsealed() == 1
    loaded = hub.load(key)
    assert_same(loaded.state, expected_value(sidecar))
    assert dict(loaded.metadata) == sidecar["metadata"] and loaded.status == "suspended"
    assert loaded.created_at == datetime.datetime.fromtimestamp(sidecar["created_at"], tz=datetime.timezone.utc)
    resumed = hub.resume(key, input={"approved": True})
    assert resumed.status == "resumed" and resumed.input == {"approved": True}


def test_golden_encrypted_record_needs_its_key() -> None:
    path = next(p for p in RECORDS if "aesgcm" in p.stem)
    blob, sidecar = _load(path)
    with pytest.raises((EncryptionError, IntegrityError)):
        _golden_hub(blob, sidecar, keyring=Keyring([(GOLDEN_KEY_ID, bytes(32))])).load(sidecar["key"])
