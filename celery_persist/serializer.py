"""StateSerializer: codec -> compression -> versioned envelope with a checksum.

Envelope, format version 1 (all integers big-endian)::

    offset size  field
    0      2     magic  b"\\xa7E"
    2      1     format version (1)
    3      4     CRC-32 of every byte of the envelope except these four
    7      1     codec id        (1 json, 2 pickle, 3 dill, 4 msgpack)
    8      1     compression id  (0 none, 1 gzip, 2 zstd)
    9      1     flags (0; reserved)
    10     8     uncompressed payload length
    18     ...   payload

Bytes 0-6 are the frame every future version keeps: the checksum is verified
before the version is interpreted, so a flipped version byte reads as
corruption (:class:`IntegrityError`), while a genuine blob from a newer release
reads as :class:`UnsupportedFormatVersion`. Golden blobs of every version live
in ``tests/data/`` and must stay readable.

The CRC catches accidents; it is not authentication. Authenticity comes from
the layer above (AES-GCM or HMAC in the hub), which is why ``loads`` decodes
the unsafe codecs (pickle, dill) only when told the bytes were authenticated.
"""

from __future__ import annotations

import struct
import zlib
from typing import Any

from .codecs import CODEC_IDS, COMPRESSION_IDS, get_codec, get_compression, zstd_available
from .errors import ConfigurationError, IntegrityError, SerializationError, StateTooLarge, UnsupportedFormatVersion

__all__ = ["StateSerializer", "DEFAULT_MAX_STATE_SIZE", "FORMAT_VERSION", "MAGIC"]

DEFAULT_MAX_STATE_SIZE = 64 * 1024 * 1024
FORMAT_VERSION = 1
MAGIC = b"\xa7E"
_HEAD = struct.Struct(">2sBI")  # magic, version, crc32
_V1 = struct.Struct(">BBBQ")  # codec, compression, flags, raw length
_HEADER_SIZE = _HEAD.size + _V1.size
# Compression is skipped when a sample of the payload shrinks by less than this.
_MIN_GAIN = 0.9
_SAMPLE = 64 * 1024


class StateSerializer:
    """Turn states into self-describing bytes and back.

    Args:
        codec: ``json`` (default), ``msgpack``, ``pickle`` or ``dill``.
        compression: ``zstd``, ``gzip``, ``none``, or ``auto`` (default: zstd
            when the ``zstd`` extra is installed, else gzip).
        threshold: Payloads shorter than this many bytes are not compressed.
        level: Compression level (default: the fast level of each algorithm).
        max_size: Largest payload accepted on write and produced by decompression.

    Example:
        >>> s = StateSerializer()
        >>> s.loads(s.dumps({"a": [1, 2]}))
        {'a': [1, 2]}
    """

    __slots__ = ("codec", "compression", "threshold", "level", "max_size", "_codec", "_comp")

    def __init__(
        self,
        codec: str = "msgpack",
        compression: str = "auto",
        threshold: int = 1024,
        *,
        level: int | None = None,
        max_size: int = DEFAULT_MAX_STATE_SIZE,
    ) -> None:
        if compression == "auto":
            compression = "zstd" if zstd_available() else "gzip"
        self._codec = get_codec(codec)
        self._comp = get_compression(compression)
        self.codec = codec
        self.compression = compression
        if threshold < 0 or max_size <= 0:
            raise ConfigurationError("threshold must be >= 0 and max_size > 0")
        self.threshold = threshold
        self.level = self._comp.default_level if level is None else level
        if compression == "zstd" and not 1 <= self.level <= 22:
            raise ConfigurationError("zstd level must be between 1 and 22")
        if compression == "gzip" and not 0 <= self.level <= 9:
            raise ConfigurationError("gzip level must be between 0 and 9")
        self.max_size = max_size

    @property
    def unsafe_codec(self) -> bool:
        """True for codecs that may only decode authenticated bytes."""
        return self._codec.unsafe

    def with_max_size(self, max_size: int) -> StateSerializer:
        """A copy of this serializer with another size cap."""
        return StateSerializer(self.codec, self.compression, self.threshold, level=self.level, max_size=max_size)

    def dumps(self, obj: Any) -> bytes:
        """Encode ``obj`` into a versioned envelope.

        Raises:
            SerializationError: The codec cannot encode ``obj``.
            StateTooLarge: The encoded state exceeds ``max_size``.
        """
        payload = self._codec.dumps(obj)
        size = len(payload)
        if size > self.max_size:
            raise StateTooLarge(
                f"state is {size} bytes once encoded, over the limit of {self.max_size} "
                "(persist_max_state_size); store large data elsewhere and keep a reference"
            )
        comp = self._comp
        if comp.id and size >= self.threshold:
            if size > 4 * _SAMPLE and len(comp.compress(payload[:_SAMPLE], self.level)) > _MIN_GAIN * _SAMPLE:
                comp = get_compression("none")  # incompressible (already compressed, random...): don't burn CPU
            else:
                compressed = comp.compress(payload, self.level)
                if len(compressed) < size:
                    payload = compressed
                else:
                    comp = get_compression("none")
        else:
            comp = get_compression("none")
        body = _V1.pack(self._codec.id, comp.id, 0, size)
        crc = zlib.crc32(payload, zlib.crc32(body, zlib.crc32(MAGIC + bytes((FORMAT_VERSION,)))))
        return b"".join((_HEAD.pack(MAGIC, FORMAT_VERSION, crc), body, payload))

    def loads(self, data: bytes, *, trusted: bool = False) -> Any:
        """Decode an envelope written by any supported format version.

        Args:
            data: The envelope.
            trusted: True when the caller proved the bytes authentic (AEAD or
                HMAC). Required for pickle and dill payloads.

        Raises:
            IntegrityError: Flipped, truncated or foreign bytes.
            UnsupportedFormatVersion: Written by a newer release.
            StateTooLarge: Would decompress past ``max_size``.
            SerializationError: Unsafe codec on untrusted bytes, or undecodable payload.
        """
        view = memoryview(data)
        if len(view) < _HEAD.size or bytes(view[:2]) != MAGIC:
            raise IntegrityError("not a celery-persist state envelope (bad magic or truncated)")
        _, version, crc = _HEAD.unpack_from(view)
        if zlib.crc32(view[_HEAD.size :], zlib.crc32(view[:3])) != crc:
            raise IntegrityError("state envelope checksum mismatch: the bytes were changed or truncated")
        if version > FORMAT_VERSION:
            raise UnsupportedFormatVersion(
                f"state envelope has format version {version}; this release reads up to {FORMAT_VERSION}: upgrade celery-persist"
            )
        if version < 1:
            raise IntegrityError(f"state envelope has invalid format version {version}")
        if len(view) < _HEADER_SIZE:
            raise IntegrityError("state envelope is truncated")
        codec_id, comp_id, _flags, size = _V1.unpack_from(view, _HEAD.size)
        codec_name = CODEC_IDS.get(codec_id)
        comp_name = COMPRESSION_IDS.get(comp_id)
        if codec_name is None or comp_name is None:
            raise UnsupportedFormatVersion(f"state envelope uses unknown codec {codec_id} or compression {comp_id}")
        if size > self.max_size:
            raise StateTooLarge(f"state would decompress to {size} bytes, over the limit of {self.max_size}")
        codec = get_codec(codec_name)
        if codec.unsafe and not trusted:
            raise SerializationError(
                f"refusing to decode a {codec_name} payload from unauthenticated bytes; configure an encryption key or a signing secret"
            )
        payload = view[_HEADER_SIZE:]
        raw = get_compression(comp_name).decompress(payload, size)
        return codec.loads(raw)

    def __repr__(self) -> str:
        return f"StateSerializer(codec={self.codec!r}, compression={self.compression!r}, threshold={self.threshold})"
