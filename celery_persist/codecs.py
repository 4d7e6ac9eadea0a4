"""Codecs (object <-> bytes) and compressions (bytes <-> fewer bytes), by name and id.

Codecs:

* ``json`` (id 1, the default). Two payload forms, told apart by the first byte:

  - ``P`` + plain JSON from orjson: the fast path, tried first. orjson
    gives up (and we fall back) on a cycle, on any type it cannot write
    natively (datetime, date, bytes, set, Decimal, subclasses...: our
    ``default`` hook refuses them all, so no ambiguous tag ever lands in a
    plain payload), on non-str dict keys and on ints beyond 64 bits. What
    orjson writes natively keeps JSON semantics on this path: a tuple comes
    back as a list, a UUID as its string, NaN and infinities as null, and a
    container shared by two parents as two equal copies. Any pre-walk that
    could catch those cost 5-8x orjson's own time on a 10 MB state on this
    hardware (measured), so the fast path does not pay it; choose the
    pickle codec when exact Python types matter.
  - ``T`` + tagged JSON: everything else. Tagged values are objects
    ``{"$cp": tag, "v": value}`` for datetime, date, time, bytes, tuple, set,
    frozenset, Decimal, UUID, non-finite floats, big ints and dicts whose keys
    are not all strings. Containers reached more than once (shared or
    circular) are written once with ``{"$cp": "def", "id": n, "v": ...}``
    and referred to with ``{"$cp": "ref", "id": n}``, so identity survives.
    Only dicts and lists can take part in a cycle (tuples and sets are
    immutable, so a cycle through one cannot be rebuilt; it is refused).
    Enum members are written as their value on both paths, as orjson does.

  A payload that does not decode (not JSON, an unknown tag, a tagged value out
  of range such as a ``td`` past ``timedelta.max``) raises
  :class:`~celery_persist.errors.IntegrityError`, as a bad envelope does.

* ``pickle`` (id 2) and ``dill`` (id 3): any Python object. They are
  *unsafe*: :class:`~celery_persist.serializer.StateSerializer` decodes them
  only from bytes whose authenticity was proven by the caller.

Compressions: ``none`` (0), ``gzip`` (1, zlib in gzip framing; level 1 by
default because level 6 costs 5x the time for ~5% smaller output), ``zstd``
(2, level 1 by default; needs the ``zstd`` extra). Decompression is always
bounded by the expected size, so a forged size header cannot balloon memory.
"""

from __future__ import annotations

import base64
import datetime as dt
import gc
import json
import math
import pickle
import uuid
import zlib
from collections.abc import Callable
from decimal import Decimal
from enum import Enum
from typing import Any, Protocol

import orjson

from .errors import ConfigurationError, IntegrityError, SerializationError

__all__ = ["Codec", "Compression", "CODECS", "COMPRESSIONS", "get_codec", "get_compression", "zstd_available"]


class Codec(Protocol):
    name: str
    id: int
    #: True when decoding untrusted bytes could run code (pickle, dill).
    unsafe: bool

    def dumps(self, obj: Any) -> bytes: ...

    def loads(self, data: bytes | memoryview) -> Any: ...


class Compression(Protocol):
    name: str
    id: int
    default_level: int

    def compress(self, data: bytes, level: int) -> bytes: ...

    def decompress(self, data: bytes | memoryview, size: int) -> bytes | memoryview:
        """Return exactly ``size`` bytes or raise IntegrityError; never allocate more."""
        ...


# -- json ------------------------------------------------------------------------------------

_TAG = "$cp"
_PLAIN = b"P"
_TAGGED = b"T"
_ORJSON_OPTS = orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_SUBCLASS | orjson.OPT_PASSTHROUGH_DATACLASS


_SEQ_TAGS: dict[type, str] = {tuple: "t", set: "s", frozenset: "fs"}


class _NotPlain(Exception):
    pass


def _refuse(obj: Any) -> Any:
    raise _NotPlain


def _count_refs(root: Any) -> set[int]:
    """Ids of dicts/lists reached more than once (shared or circular)."""
    seen: set[int] = set()
    multi: set[int] = set()
    stack = [root]
    while stack:
        node = stack.pop()
        t = type(node)
        if t is dict or t is list:
            i = id(node)
            if i in seen:
                multi.add(i)
                continue
            seen.add(i)
            stack.extend(node.values() if t is dict else node)
            if t is dict:
                stack.extend(k for k in node if type(k) in (tuple, frozenset))
        elif t is tuple or t is set or t is frozenset:
            stack.extend(node)
    return multi


class _Tagger:
    def __init__(self, root: Any) -> None:
        self.multi = _count_refs(root)
        self.ids: dict[int, int] = {}
        self.active: set[int] = set()  # tuples/sets being encoded, to catch cycles through them

    def enc(self, obj: Any) -> Any:
        t = type(obj)
        if t is str or t is bool or obj is None:
            return obj
        if t is int:
            return obj if -(2**63) <= obj < 2**64 else {_TAG: "i", "v": str(obj)}
        if t is float:
            return obj if math.isfinite(obj) else {_TAG: "f", "v": repr(obj)}
        if t is dict or t is list:
            i = id(obj)
            if i in self.multi:
                if i in self.ids:
                    return {_TAG: "ref", "id": self.ids[i]}
                n = self.ids[i] = len(self.ids)
                return {_TAG: "def", "id": n, "v": self._container(obj)}
            return self._container(obj)
        if t is tuple or t is set or t is frozenset:
            i = id(obj)
            if i in self.active:
                raise SerializationError(f"the json codec cannot encode a cycle through a {t.__name__}; use pickle")
            self.active.add(i)
            try:
                items = [self.enc(v) for v in obj]
            finally:
                self.active.discard(i)
            return {_TAG: _SEQ_TAGS[t], "v": items}
        if t is dt.datetime:
            return {_TAG: "dt", "v": obj.isoformat()}
        if t is dt.date:
            return {_TAG: "d", "v": obj.isoformat()}
        if t is dt.time:
            return {_TAG: "tm", "v": obj.isoformat()}
        if t is dt.timedelta:
            return {_TAG: "td", "v": [obj.days, obj.seconds, obj.microseconds]}
        if t is bytes or t is bytearray:
            return {_TAG: "b" if t is bytes else "ba", "v": base64.b64encode(obj).decode("ascii")}
        if t is Decimal:
            return {_TAG: "dec", "v": str(obj)}
        if t is uuid.UUID:
            return {_TAG: "u", "v": str(obj)}
        if issubclass(t, Enum):
            # orjson writes an Enum as its value on the fast path; do the same here, so
            # whether a state encodes does not depend on a datetime elsewhere in it.
            return self.enc(obj.value)
        raise SerializationError(
            f"the json codec cannot encode objects of type {t.__module__}.{t.__qualname__}; "
            "convert it to JSON types or choose the pickle codec"
        )

    def _container(self, obj: Any) -> Any:
        if type(obj) is list:
            return [self.enc(v) for v in obj]
        if all(type(k) is str for k in obj) and _TAG not in obj:
            return {k: self.enc(v) for k, v in obj.items()}
        return {_TAG: "m", "v": [[self.enc(k), self.enc(v)] for k, v in obj.items()]}


_SIMPLE_DECODERS: dict[str, Callable[[Any], Any]] = {
    "i": int,
    "f": float,
    "dt": dt.datetime.fromisoformat,
    "d": dt.date.fromisoformat,
    "tm": dt.time.fromisoformat,
    "td": lambda v: dt.timedelta(days=v[0], seconds=v[1], microseconds=v[2]),
    "b": lambda v: base64.b64decode(v),
    "ba": lambda v: bytearray(base64.b64decode(v)),
    "dec": Decimal,
    "u": uuid.UUID,
}


class _Untagger:
    def __init__(self) -> None:
        self.defs: dict[int, Any] = {}

    def dec(self, obj: Any) -> Any:
        t = type(obj)
        if t is list:
            return [self.dec(v) for v in obj]
        if t is not dict:
            return obj
        tag = obj.get(_TAG)
        if tag is None:
            return {k: self.dec(v) for k, v in obj.items()}
        value = obj.get("v")
        if tag == "ref":
            return self.defs[obj["id"]]
        if tag == "def":
            return self._define(obj["id"], value)
        if tag in ("t", "s", "fs"):
            items = [self.dec(v) for v in value]
            return tuple(items) if tag == "t" else (set(items) if tag == "s" else frozenset(items))
        if tag == "m":
            return {self.dec(k): self.dec(v) for k, v in value}
        return _SIMPLE_DECODERS[tag](value)

    def _define(self, n: int, value: Any) -> Any:
        # Register the (empty) container before filling it so cycles can point back at it.
        if type(value) is list:
            out_list: list[Any] = []
            self.defs[n] = out_list
            out_list.extend(self.dec(v) for v in value)
            return out_list
        out: dict[Any, Any] = {}
        self.defs[n] = out
        if value.get(_TAG) == "m":
            for k, v in value["v"]:
                out[self.dec(k)] = self.dec(v)
        else:
            for k, v in value.items():
                out[k] = self.dec(v)
        return out


class JsonCodec:
    """JSON with a fast orjson path and a tagged path for everything else (see module doc)."""

    name = "json"
    id = 1
    unsafe = False

    def dumps(self, obj: Any) -> bytes:
        try:
            return _PLAIN + orjson.dumps(obj, default=_refuse, option=_ORJSON_OPTS)
        except (_NotPlain, TypeError):
            pass  # a cycle, a type that needs a tag, non-str keys, ints beyond 64 bits, deep nesting
        try:
            tree = _Tagger(obj).enc(obj)
            return _TAGGED + json.dumps(tree, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8")
        except (ValueError, RecursionError) as exc:
            raise SerializationError(f"the json codec cannot encode this state: {type(exc).__name__}") from None

    def loads(self, data: bytes | memoryview) -> Any:
        form, body = data[:1], memoryview(data)[1:]
        # As in PickleCodec.loads: building a big dict graph triggers collection after
        # collection over the new containers; pausing the GC cut a 10 MB orjson.loads
        # from ~176 to ~110 ms CPU (benchmarks/README.md). Nothing here can form a cycle
        # the GC would have to break: orjson builds trees, _Untagger's cycles are wanted.
        enabled = gc.isenabled()
        gc.disable()
        try:
            if form == _PLAIN:
                return orjson.loads(body)
            if form == _TAGGED:
                return _Untagger().dec(json.loads(bytes(body)))
        except (ValueError, KeyError, TypeError, IndexError, AttributeError, RecursionError, ArithmeticError) as exc:
            # Corrupt or crafted bytes, as a bad envelope is: OverflowError from a "td" beyond
            # timedelta's range, decimal.InvalidOperation (an ArithmeticError) from a bad "dec".
            raise IntegrityError(f"json payload does not decode: {type(exc).__name__}") from None
        finally:
            if enabled:
                gc.enable()
        raise IntegrityError("json payload has an unknown form marker")


class PickleCodec:
    """pickle protocol 5. Decoded only from authenticated bytes (see StateSerializer)."""

    name = "pickle"
    id = 2
    unsafe = True

    def dumps(self, obj: Any) -> bytes:
        try:
            return pickle.dumps(obj, protocol=5)
        except (pickle.PicklingError, TypeError, AttributeError) as exc:
            raise SerializationError(f"the pickle codec cannot encode this state: {exc.__class__.__name__}") from None

    def loads(self, data: bytes | memoryview) -> Any:
        # The cyclic GC rescans every new container while a big dict graph is built;
        # pausing it cuts load time by ~40% (PERF-NOTES).
        enabled = gc.isenabled()
        gc.disable()
        try:
            return pickle.loads(data)  # noqa: S301 - authenticated bytes only, enforced by StateSerializer
        except Exception as exc:  # noqa: BLE001 - unpickling can raise anything
            raise SerializationError(f"pickle payload does not decode: {type(exc).__name__}") from None
        finally:
            if enabled:
                gc.enable()


class DillCodec:
    """dill (closures, lambdas...). Slow to dump (~20x pickle); authenticated bytes only."""

    name = "dill"
    id = 3
    unsafe = True

    def __init__(self) -> None:
        try:
            import dill
        except ImportError:
            raise ConfigurationError("the dill codec needs 'dill': pip install 'celery-persist[dill]'") from None
        self._dill = dill

    def dumps(self, obj: Any) -> bytes:
        try:
            data: bytes = self._dill.dumps(obj, protocol=5)
            return data
        except Exception as exc:  # noqa: BLE001
            raise SerializationError(f"the dill codec cannot encode this state: {type(exc).__name__}") from None

    def loads(self, data: bytes | memoryview) -> Any:
        try:
            return self._dill.loads(data)  # noqa: S301 - authenticated bytes only
        except Exception as exc:  # noqa: BLE001
            raise SerializationError(f"dill payload does not decode: {type(exc).__name__}") from None


# -- compression -----------------------------------------------------------------------------


class NoCompression:
    name = "none"
    id = 0
    default_level = 0

    def compress(self, data: bytes, level: int) -> bytes:
        return data

    def decompress(self, data: bytes | memoryview, size: int) -> bytes | memoryview:
        if len(data) != size:
            raise IntegrityError("payload length does not match its header")
        # No copy: every codec's loads takes a buffer (pickle.loads, orjson.loads and
        # dill.loads all do). A 10 MB copy here cost ~1 ms of memcpy plus ~7 ms of page
        # faults on fresh memory per resume (benchmarks/README.md).
        return data


class GzipCompression:
    name = "gzip"
    id = 1
    default_level = 1

    def compress(self, data: bytes, level: int) -> bytes:
        c = zlib.compressobj(level, zlib.DEFLATED, 31)
        return c.compress(data) + c.flush()

    def decompress(self, data: bytes | memoryview, size: int) -> bytes:
        d = zlib.decompressobj(31)
        try:
            out = d.decompress(data, size + 1)
        except zlib.error:
            raise IntegrityError("gzip payload is corrupt") from None
        if len(out) != size or d.unconsumed_tail or not d.eof:
            raise IntegrityError("gzip payload does not match its declared size")
        return out


class ZstdCompression:
    name = "zstd"
    id = 2
    default_level = 1

    def __init__(self) -> None:
        try:
            import zstandard
        except ImportError:
            raise ConfigurationError("zstd compression needs 'zstandard': pip install 'celery-persist[zstd]'") from None
        self._z = zstandard
        self._compressors: dict[int, Any] = {}
        self._decompressor = zstandard.ZstdDecompressor()

    def compress(self, data: bytes, level: int) -> bytes:
        c = self._compressors.get(level)
        if c is None:
            c = self._compressors[level] = self._z.ZstdCompressor(level=level, write_content_size=True)
        out: bytes = c.compress(data)
        return out

    def decompress(self, data: bytes | memoryview, size: int) -> bytes:
        try:
            # The frame header states its content size; zstandard allocates exactly that,
            # so check it against the (authenticated) envelope size before decompressing.
            if self._z.frame_content_size(data) != size:
                raise IntegrityError("zstd payload does not match its declared size")
            out: bytes = self._decompressor.decompress(data)
        except self._z.ZstdError:
            raise IntegrityError("zstd payload is corrupt") from None
        if len(out) != size:
            raise IntegrityError("zstd payload does not match its declared size")
        return out


def zstd_available() -> bool:
    try:
        import zstandard  # noqa: F401
    except ImportError:
        return False
    return True


CODECS: dict[str, Callable[[], Codec]] = {"json": JsonCodec, "pickle": PickleCodec, "dill": DillCodec}
COMPRESSIONS: dict[str, Callable[[], Compression]] = {
    "none": NoCompression,
    "gzip": GzipCompression,
    "zstd": ZstdCompression,
}
CODEC_IDS = {1: "json", 2: "pickle", 3: "dill"}
COMPRESSION_IDS = {0: "none", 1: "gzip", 2: "zstd"}

_codec_cache: dict[str, Codec] = {}
_compression_cache: dict[str, Compression] = {}


def get_codec(name: str) -> Codec:
    """The codec called ``name`` (one shared instance)."""
    codec = _codec_cache.get(name)
    if codec is None:
        factory = CODECS.get(name)
        if factory is None:
            raise ConfigurationError(f"unknown codec {name!r}; choose one of {sorted(CODECS)}")
        codec = _codec_cache[name] = factory()
    return codec


def get_compression(name: str) -> Compression:
    """The compression called ``name`` (one shared instance)."""
    comp = _compression_cache.get(name)
    if comp is None:
        factory = COMPRESSIONS.get(name)
        if factory is None:
            raise ConfigurationError(f"unknown compression {name!r}; choose one of {sorted(COMPRESSIONS)}")
        comp = _compression_cache[name] = factory()
    return comp
