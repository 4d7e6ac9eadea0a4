"""StateSerializer: the versioned envelope, compression choices, and refusals."""

from __future__ import annotations

import os
import pickle
import struct
import tracemalloc
import zlib
from collections.abc import Callable
from typing import Any

import pytest
import zstandard

from celery_persist import serializer as serializer_module
from celery_persist.codecs import GzipCompression, get_compression
from celery_persist.errors import (
    ConfigurationError,
    IntegrityError,
    SerializationError,
    StateTooLarge,
    UnsupportedFormatVersion,
)
from celery_persist.serializer import DEFAULT_MAX_STATE_SIZE, FORMAT_VERSION, MAGIC, StateSerializer

from ._helpers import assert_same, frame, reframe

STATE = {"name": "state", "items": list(range(50)), "nested": {"a": [1, 2, {"b": None}]}}
BIG_TEXT = {"text": "lorem ipsum dolor sit amet " * 2000}


def _fields(blob: bytes) -> tuple[bytes, int, int, int, int, int, int]:
    magic, version, crc = struct.unpack_from(">2sBI", blob)
    codec, comp, flags, size = struct.unpack_from(">BBBQ", blob, 7)
    return magic, version, crc, codec, comp, flags, size


def test_envelope_layout() -> None:
    blob = StateSerializer("json", "none").dumps(STATE)
    magic, version, crc, codec, comp, flags, size = _fields(blob)
    assert (magic, version, codec, comp, flags) == (MAGIC, FORMAT_VERSION, 1, 0, 0)
    assert size == len(blob) - 18 and blob[18:19] == b"P"
    assert crc == zlib.crc32(blob[:3] + blob[7:])


@pytest.mark.parametrize("codec", ["json", "msgpack", "pickle", "dill"])
@pytest.mark.parametrize("compression", ["none", "gzip", "zstd"])
def test_round_trip_every_codec_and_compression(codec: str, compression: str) -> None:
    s = StateSerializer(codec, compression, threshold=0)
    state = dict(BIG_TEXT, loop=[])
    state["loop"].append(state["loop"])
    blob = s.dumps(state)
    _, _, _, codec_id, comp_id, _, size = _fields(blob)
    assert codec_id == {"json": 1, "pickle": 2, "dill": 3, "msgpack": 4}[codec]
    assert comp_id == {"none": 0, "gzip": 1, "zstd": 2}[compression]
    assert len(blob) < size / 10 if compression != "none" else len(blob) == size + 18
    back = s.loads(blob, trusted=True)
    assert back["text"] == state["text"] and back["loop"][0] is back["loop"]


def test_auto_compression(monkeypatch: pytest.MonkeyPatch) -> None:
    assert StateSerializer().compression == "zstd"
    monkeypatch.setattr(serializer_module, "zstd_available", lambda: False)
    assert StateSerializer().compression == "gzip"
    assert StateSerializer(compression="auto").codec == "msgpack"


def test_threshold() -> None:
    s = StateSerializer("json", "gzip", threshold=1024)
    small = {"text": "a" * 900}
    assert _fields(s.dumps(small))[4] == 0
    at = {"text": "a" * 1100}
    assert _fields(s.dumps(at))[4] == 1
    assert _fields(StateSerializer("json", "gzip", threshold=0).dumps({"t": "a" * 50}))[4] == 1


def test_data_that_does_not_shrink_is_stored_uncompressed() -> None:
    s = StateSerializer("pickle", "zstd", threshold=0)
    for raw in (os.urandom(4096), os.urandom(20)):
        blob = s.dumps(raw)
        assert _fields(blob)[4] == 0
        assert s.loads(blob, trusted=True) == raw


@pytest.mark.parametrize("compression", ["gzip", "zstd"])
def test_incompressible_big_payload_is_judged_on_a_sample(compression: str, monkeypatch: pytest.MonkeyPatch) -> None:
    comp = get_compression(compression)
    seen: list[int] = []
    real = type(comp).compress

    def spy(self: Any, data: bytes, level: int) -> bytes:
        seen.append(len(data))
        return real(self, data, level)

    monkeypatch.setattr(type(comp), "compress", spy)
    s = StateSerializer("pickle", compression, threshold=0)
    raw = os.urandom(1 << 20)
    blob = s.dumps(raw)
    assert _fields(blob)[4] == 0  # envelope says: not compressed
    assert seen == [64 * 1024]  # only the sample was compressed, not the whole MiB
    assert s.loads(blob, trusted=True) == raw
    seen.clear()
    compressible = b"abc" * (1 << 19)
    assert _fields(s.dumps(compressible))[4] == comp.id
    assert seen == [64 * 1024, len(pickle.dumps(compressible, protocol=5))]


def test_loads_accepts_bytes_likes() -> None:
    s = StateSerializer("json", "zstd", threshold=0)
    blob = s.dumps(BIG_TEXT)
    assert s.loads(bytearray(blob)) == BIG_TEXT
    assert s.loads(memoryview(blob)) == BIG_TEXT


# -- integrity ----------------------------------------------------------------------------------


def _small_blobs() -> dict[str, bytes]:
    return {
        "json-none": StateSerializer("json", "none").dumps({"a": [1, 2]}),
        "json-tagged": StateSerializer("json", "none").dumps({"s": {1}}),
        "gzip": StateSerializer("json", "gzip", threshold=0).dumps({"a": "x" * 60}),
        "zstd": StateSerializer("json", "zstd", threshold=0).dumps({"a": "x" * 60}),
        "pickle": StateSerializer("pickle", "none").dumps({"a": 1}),
        "msgpack": StateSerializer("msgpack", "none").dumps({"a": [1, 2]}),
        "msgpack-tagged": StateSerializer("msgpack", "none").dumps({"s": {1}, 1: b"x"}),
        "msgpack-zstd": StateSerializer("msgpack", "zstd", threshold=0).dumps({"a": "x" * 60}),
    }


def _expect_integrity_error(s: StateSerializer, data: bytes, what: str) -> None:
    try:
        s.loads(data, trusted=True)
    except IntegrityError:
        return
    except Exception as exc:  # noqa: BLE001 - the point: no other exception type
        pytest.fail(f"{what}: {type(exc).__name__} instead of IntegrityError: {exc}")
    pytest.fail(f"{what}: went unnoticed")


def test_every_flipped_byte_raises_integrity_error() -> None:
    s = StateSerializer()
    for name, blob in _small_blobs().items():
        assert s.loads(blob, trusted=True) is not None
        masks = range(1, 256) if name == "json-none" else (0x01, 0x10, 0x80, 0xFF)
        for i in range(len(blob)):
            for mask in masks:
                bad = bytearray(blob)
                bad[i] ^= mask
                _expect_integrity_error(s, bytes(bad), f"{name}: byte {i} ^ {mask:#x}")


def test_every_truncation_and_extension_raises_integrity_error() -> None:
    s = StateSerializer()
    for name, blob in _small_blobs().items():
        for n in range(len(blob)):
            _expect_integrity_error(s, blob[:n], f"{name}: first {n} bytes")
        for tail in (b"\x00", b"x" * 9):
            _expect_integrity_error(s, blob + tail, f"{name}: extended")


@pytest.mark.parametrize("data", [b"", b"\xa7", b"\xa7E", b"hello world, not an envelope", pickle.dumps({"a": 1})])
def test_foreign_bytes_raise_integrity_error(data: bytes) -> None:
    _expect_integrity_error(StateSerializer(), data, repr(data[:10]))


def test_valid_short_header_is_truncation() -> None:
    # Correct CRC, version 1, but fewer than the 18 header bytes.
    with pytest.raises(IntegrityError, match="truncated"):
        StateSerializer().loads(frame(b"\x01\x00\x00"))


# -- versions and ids ---------------------------------------------------------------------------


@pytest.mark.parametrize("version", [FORMAT_VERSION + 1, 7, 255])
def test_newer_format_version_is_unsupported(version: int) -> None:
    blob = StateSerializer("json", "none").dumps(STATE)
    newer = reframe(blob, version=version)
    with pytest.raises(UnsupportedFormatVersion, match="upgrade") as info:
        StateSerializer().loads(newer)
    assert type(info.value) is UnsupportedFormatVersion
    # A newer version may change everything after the frame: it must still be recognised.
    with pytest.raises(UnsupportedFormatVersion):
        StateSerializer().loads(frame(b"anything at all", version=version))


def test_format_version_zero_is_corrupt() -> None:
    blob = StateSerializer("json", "none").dumps(STATE)
    with pytest.raises(IntegrityError, match="invalid format version"):
        StateSerializer().loads(reframe(blob, version=0))


@pytest.mark.parametrize(("field", "value"), [("codec", 0), ("codec", 5), ("codec", 255), ("compression", 3), ("compression", 200)])
def test_unknown_codec_or_compression_id_is_unsupported(field: str, value: int) -> None:
    blob = StateSerializer("json", "none").dumps(STATE)
    with pytest.raises(UnsupportedFormatVersion, match="unknown codec"):
        StateSerializer().loads(reframe(blob, **{field: value}))


def test_valid_crc_with_wrong_declared_size() -> None:
    blob = StateSerializer("json", "none").dumps(STATE)
    size = _fields(blob)[6]
    for wrong in (0, size - 1, size + 1):
        with pytest.raises(IntegrityError):
            StateSerializer().loads(reframe(blob, size=wrong))


def test_valid_crc_with_undecodable_payload_is_a_serialization_error() -> None:
    blob = StateSerializer("json", "none").dumps(STATE)
    with pytest.raises(SerializationError):
        StateSerializer().loads(reframe(blob, payload=b"Pnot json", size=9))


# -- size limits and bombs ----------------------------------------------------------------------


def test_state_too_large_on_write() -> None:
    s = StateSerializer(max_size=1000)
    s.dumps({"t": "x" * 900})
    with pytest.raises(StateTooLarge, match="persist_max_state_size") as info:
        s.dumps({"t": "SECRET-PAYLOAD" * 100})
    assert "SECRET-PAYLOAD" not in str(info.value)


def test_state_too_large_on_read() -> None:
    blob = StateSerializer("json", "zstd", threshold=0).dumps(BIG_TEXT)
    size = _fields(blob)[6]
    assert StateSerializer(max_size=size).loads(blob) == BIG_TEXT  # the cap is inclusive
    with pytest.raises(StateTooLarge):
        StateSerializer(max_size=size - 1).loads(blob)
    assert StateSerializer().with_max_size(10).max_size == 10


def _peak_while(fn: Callable[[], Any]) -> int:
    tracemalloc.start()
    try:
        fn()
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    return peak


def _gzip_stream(size: int) -> bytes:
    c = zlib.compressobj(9, zlib.DEFLATED, 31)
    return c.compress(b"\0" * size) + c.flush()


BOMB = 16 << 20  # what the stream expands to
CAP = 64 << 10  # max_size of the reader


def _bomb_envelope(compression_id: int, stream: bytes, declared: int) -> bytes:
    template = StateSerializer("json", "none").dumps({})
    return reframe(template, compression=compression_id, size=declared, payload=stream)


@pytest.mark.parametrize("compression", ["gzip", "zstd"])
def test_decompression_bomb_with_small_declared_size(compression: str) -> None:
    if compression == "gzip":
        stream = _gzip_stream(BOMB)
    else:
        stream = zstandard.ZstdCompressor(level=1).compress(b"\0" * BOMB)
    assert len(stream) < 20_000
    s = StateSerializer(max_size=CAP)
    for declared in (1000, CAP):
        blob = _bomb_envelope(get_compression(compression).id, stream, declared)

        def load(blob: bytes = blob) -> None:
            with pytest.raises(IntegrityError):
                s.loads(blob)

        assert _peak_while(load) < 4 * CAP + 200_000  # nowhere near the 16 MiB the stream holds


def test_decompression_bomb_zstd_without_content_size() -> None:
    stream = zstandard.ZstdCompressor(level=1, write_content_size=False).compress(b"\0" * BOMB)
    blob = _bomb_envelope(2, stream, 1000)

    def load() -> None:
        with pytest.raises(IntegrityError):
            StateSerializer(max_size=CAP).loads(blob)

    assert _peak_while(load) < 200_000


@pytest.mark.parametrize(("compression_id", "make"), [(1, _gzip_stream), (2, lambda n: zstandard.ZstdCompressor().compress(b"\0" * n))])
def test_decompression_bomb_with_huge_declared_size(compression_id: int, make: Callable[[int], bytes]) -> None:
    stream = make(1 << 20)
    for declared in (DEFAULT_MAX_STATE_SIZE + 1, 2**40, 2**64 - 1):
        blob = _bomb_envelope(compression_id, stream, declared)

        def load(blob: bytes = blob) -> None:
            with pytest.raises(StateTooLarge):
                StateSerializer().loads(blob)

        assert _peak_while(load) < 200_000


def test_gzip_decompress_allocates_at_most_size_plus_one(monkeypatch: pytest.MonkeyPatch) -> None:
    limits: list[int] = []
    real = zlib.decompressobj

    class Spy:
        def __init__(self, wbits: int) -> None:
            self._d = real(wbits)

        def decompress(self, data: bytes, max_length: int = 0) -> bytes:
            limits.append(max_length)
            return self._d.decompress(data, max_length)

        def __getattr__(self, name: str) -> Any:
            return getattr(self._d, name)

    monkeypatch.setattr(zlib, "decompressobj", Spy)
    with pytest.raises(IntegrityError):
        GzipCompression().decompress(_gzip_stream(1 << 20), 100)
    assert limits == [101]


# -- unsafe codecs ------------------------------------------------------------------------------

TRIGGERED: list[str] = []


def _trigger(tag: str) -> str:
    TRIGGERED.append(tag)
    return tag


class Booby:
    def __reduce__(self) -> tuple[Any, ...]:
        return (_trigger, ("unpickled!",))


@pytest.mark.parametrize("codec", ["pickle", "dill"])
def test_unsafe_codec_refused_on_untrusted_bytes(codec: str) -> None:
    s = StateSerializer(codec, "none")
    blob = s.dumps({"x": Booby()})
    TRIGGERED.clear()
    with pytest.raises(SerializationError, match="unauthenticated") as info:
        s.loads(blob)
    assert type(info.value) is SerializationError
    assert TRIGGERED == []  # nothing was unpickled
    # A json reader refuses it as well: the envelope, not the reader, names the codec.
    with pytest.raises(SerializationError, match="unauthenticated"):
        StateSerializer("json").loads(blob)
    assert TRIGGERED == []
    assert s.loads(blob, trusted=True) == {"x": "unpickled!"} and TRIGGERED == ["unpickled!"]
    assert s.unsafe_codec and not StateSerializer().unsafe_codec


# -- configuration ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"codec": "yaml"},
        {"compression": "lz4"},
        {"threshold": -1},
        {"max_size": 0},
        {"compression": "zstd", "level": 0},
        {"compression": "zstd", "level": 23},
        {"compression": "gzip", "level": 10},
        {"compression": "gzip", "level": -2},
    ],
)
def test_bad_configuration(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        StateSerializer(**kwargs)


def test_levels_and_copies() -> None:
    for level in (0, 1, 9):
        s = StateSerializer("json", "gzip", threshold=0, level=level)
        assert s.loads(s.dumps(BIG_TEXT)) == BIG_TEXT
    s = StateSerializer("pickle", "gzip", 10, level=5, max_size=99_999)
    copy = s.with_max_size(5)
    assert (copy.codec, copy.compression, copy.threshold, copy.level, copy.max_size) == ("pickle", "gzip", 10, 5, 5)
    assert repr(s) == "StateSerializer(codec='pickle', compression='gzip', threshold=10)"


@pytest.mark.parametrize("codec", ["json", "msgpack"])
def test_tagged_state_round_trips_through_the_envelope(codec: str) -> None:
    import datetime as dt
    from decimal import Decimal

    state = {"when": dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc), "d": Decimal("2.50"), "t": (1, 2), "s": {3}}
    state["me"] = state
    s = StateSerializer(codec, threshold=0)
    back = s.loads(s.dumps(state))
    assert_same(back, state)


def test_any_reader_reads_json_and_msgpack_envelopes() -> None:
    """The envelope names the codec: a reader configured for one reads the other."""
    state = {"a": [1, 2], "b": {"c": None}, "x": "y" * 100}
    for writer, reader in (("json", "msgpack"), ("msgpack", "json")):
        blob = StateSerializer(writer, "zstd", threshold=0).dumps(state)
        assert _fields(blob)[3] == {"json": 1, "msgpack": 4}[writer]
        assert StateSerializer(reader).loads(blob) == state


def test_msgpack_payload_is_not_copied_when_uncompressed(monkeypatch: pytest.MonkeyPatch) -> None:
    """The codec decodes straight from the envelope's buffer (a 10 MB copy costs ~8 ms of page faults)."""
    import ormsgpack

    from celery_persist import codecs

    seen: list[type] = []
    real = ormsgpack.unpackb

    def spy(data: Any, **kwargs: Any) -> Any:
        seen.append(type(data))
        return real(data, **kwargs)

    monkeypatch.setattr(codecs.ormsgpack, "unpackb", spy)
    s = StateSerializer("msgpack", "none")
    assert s.loads(s.dumps({"a": "x" * 5000})) == {"a": "x" * 5000}
    assert seen == [memoryview]
