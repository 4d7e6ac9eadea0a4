"""Codecs (object <-> bytes) and compressions (bytes <-> fewer bytes), by name and id.

Codecs:

* ``json`` (id 1). Two payload forms, told apart by the first byte:

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

* ``msgpack`` (id 4, ormsgpack). The payload is plain msgpack; types msgpack
  has no exact form for are extension values (ext types 1-17 below), so one
  decoder reads both paths:

  - Fast path, tried first: ``ormsgpack.packb`` writes str, int (64 bits),
    float (NaN and infinities too), bool, None, bytes, str-keyed dicts and
    lists natively, and calls our hook for datetime, date, time, timedelta,
    tuple, set, frozenset, Decimal, UUID and bigger ints, which become
    extension values (a tuple's items are packed by a nested ``packb``). A
    state that needed none keeps the documented msgpack semantics: a container
    shared by two parents comes back as two equal copies, and bytearray and
    memoryview come back as bytes. A state that needed one is then walked once
    (~130 ms per 10 MB workflow state on this hardware; a plain state never
    pays it): if a dict or list is reached twice or a bytearray is present, it
    takes the tagged path. So a state with any extension value keeps identity,
    as json's tagged path does.
  - Tagged path: everything else (a cycle, non-str dict keys, nesting past
    ormsgpack's 255 levels, a hook refusal). Containers reached more than once
    are written once as a definition (ext 13-15: id, then the contents) and
    referred to by id (ext 16); dicts whose keys are not all strings are flat
    key/value arrays (ext 12); bytearrays ext 11; every 200 levels of nesting
    is packed apart (ext 17). As in json, a cycle through a tuple or set is
    refused, Enum members are written as their value, and subclasses of
    builtin types, other objects and deeper nesting than the recursion limit
    raise :class:`~celery_persist.errors.SerializationError`.

  Whatever json's tagged path gives back exactly, msgpack does too
  (tests/unit/test_codecs.py runs the same cases on both); beyond it, msgpack
  keeps tuples, UUIDs, NaN and infinities exact on its fast path. Loading
  builds only the types listed; payloads that do not decode (bad msgpack, an
  unknown extension code, an extension value of the wrong shape or out of
  range) raise :class:`~celery_persist.errors.IntegrityError`.

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
import struct
import uuid
import zlib
from collections.abc import Callable
from decimal import Decimal
from enum import Enum
from typing import Any, Protocol

import orjson
import ormsgpack

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


# -- msgpack ---------------------------------------------------------------------------------

# Extension type codes: msgpack leaves 0..127 to applications. Stored blobs hold these
# numbers, so a code is never renumbered or reused; new types take new codes.
_X_DATETIME = 1  # isoformat, ASCII
_X_DATE = 2
_X_TIME = 3
_X_TIMEDELTA = 4  # >iii: days, seconds, microseconds
_X_TUPLE = 5  # a packed array
_X_SET = 6
_X_FROZENSET = 7
_X_DECIMAL = 8  # str(), ASCII
_X_UUID = 9  # the 16 bytes
_X_BIGINT = 10  # two's complement, big-endian
_X_BYTEARRAY = 11
_X_MAP = 12  # a dict with a key that is not a str: packed flat array k1, v1, k2, v2...
_X_DEF_LIST = 13  # >I id, then the packed array
_X_DEF_DICT = 14  # >I id, then the packed str-keyed map
_X_DEF_MAP = 15  # >I id, then the packed flat array of a dict with other keys
_X_REF = 16  # >I id of a container defined earlier
_X_NEST = 17  # a packed list or dict: restarts ormsgpack's nesting limit
_SEQ_X: dict[type, int] = {tuple: _X_TUPLE, set: _X_SET, frozenset: _X_FROZENSET}
_TD = struct.Struct(">iii")
_ID = struct.Struct(">I")
_MSGPACK_OPTS = (
    ormsgpack.OPT_PASSTHROUGH_BIG_INT
    | ormsgpack.OPT_PASSTHROUGH_DATACLASS
    | ormsgpack.OPT_PASSTHROUGH_DATETIME
    | ormsgpack.OPT_PASSTHROUGH_SUBCLASS
    | ormsgpack.OPT_PASSTHROUGH_TUPLE
    | ormsgpack.OPT_PASSTHROUGH_UUID
)
# Nested packb calls from the fast path's hook (tuples and sets in tuples and sets...) before
# it hands over to the tagged path, which has no C recursion.
_MAX_HOOK_DEPTH = 32
# ormsgpack refuses more than 255 nested containers in one packb call.
_NEST_EVERY = 200


def _leaf_ext(obj: Any, t: type) -> ormsgpack.Ext | None:
    """The extension value of a non-container type msgpack has no exact form for, or None."""
    if t is dt.datetime:
        return ormsgpack.Ext(_X_DATETIME, obj.isoformat().encode("ascii"))
    if t is dt.date:
        return ormsgpack.Ext(_X_DATE, obj.isoformat().encode("ascii"))
    if t is dt.time:
        return ormsgpack.Ext(_X_TIME, obj.isoformat().encode("ascii"))
    if t is dt.timedelta:
        return ormsgpack.Ext(_X_TIMEDELTA, _TD.pack(obj.days, obj.seconds, obj.microseconds))
    if t is Decimal:
        return ormsgpack.Ext(_X_DECIMAL, str(obj).encode("ascii"))
    if t is uuid.UUID:
        return ormsgpack.Ext(_X_UUID, obj.bytes)
    if t is int:
        return ormsgpack.Ext(_X_BIGINT, obj.to_bytes(obj.bit_length() // 8 + 1, "big", signed=True))
    if t is bytearray:
        return ormsgpack.Ext(_X_BYTEARRAY, bytes(obj))
    return None


class _ExtHook:
    """ormsgpack's ``default`` on the fast path: exact types as extension values.

    Anything it refuses (an unknown type, a subclass, tuples nested too deep) makes
    ``packb`` fail, and the codec falls back to the tagged path, which raises the
    proper error or encodes it.
    """

    __slots__ = ("fired", "depth")

    def __init__(self) -> None:
        self.fired = False
        self.depth = 0

    def __call__(self, obj: Any) -> ormsgpack.Ext:
        self.fired = True
        t = type(obj)
        code = _SEQ_X.get(t)
        if code is not None:
            if self.depth >= _MAX_HOOK_DEPTH:
                raise _NotPlain
            self.depth += 1
            try:
                return ormsgpack.Ext(code, ormsgpack.packb(list(obj), default=self, option=_MSGPACK_OPTS))
            finally:
                self.depth -= 1
        ext = _leaf_ext(obj, t)
        if ext is None:
            raise _NotPlain
        return ext


def _loses_identity(root: Any) -> bool:
    """True when the fast path would not give ``root`` back exactly: a dict or list reached
    twice (it would come back as two copies) or a bytearray (msgpack writes it as bytes)."""
    seen: set[int] = set()
    stack = [root]
    while stack:
        node = stack.pop()
        t = type(node)
        if t is dict or t is list:
            i = id(node)
            if i in seen:
                return True
            seen.add(i)
            stack.extend(node.values() if t is dict else node)
        elif t is tuple or t is set or t is frozenset:
            stack.extend(node)
        elif t is bytearray:
            return True
    return False


class _MsgpackTagger:
    """The tagged path: a tree of msgpack values and extension values, identity kept.

    Loops rather than comprehensions or callbacks: one Python frame per nesting level,
    so the tagged path takes states nested as deep as json's does.
    """

    def __init__(self, root: Any) -> None:
        self.multi = _count_refs(root)
        self.ids: dict[int, int] = {}
        self.active: set[int] = set()  # tuples/sets being encoded, to catch cycles through them
        self.level = 0  # plain containers nested since the last packb boundary

    def enc(self, obj: Any) -> Any:
        t = type(obj)
        if t is str or t is bool or t is float or t is bytes or obj is None:
            return obj
        if t is int and -(2**63) <= obj < 2**64:
            return obj
        if t is dict or t is list:
            i = id(obj)
            if i in self.multi:
                seen = self.ids.get(i)
                if seen is not None:
                    return ormsgpack.Ext(_X_REF, _ID.pack(seen))
                n = self.ids[i] = len(self.ids)
                code = _X_DEF_LIST if t is list else _X_DEF_DICT if all(type(k) is str for k in obj) else _X_DEF_MAP
                return ormsgpack.Ext(code, _ID.pack(n) + self._boundary(obj, code != _X_DEF_MAP))
            if t is dict and not all(type(k) is str for k in obj):
                return ormsgpack.Ext(_X_MAP, self._boundary(obj, False))
            if self.level >= _NEST_EVERY:
                return ormsgpack.Ext(_X_NEST, self._boundary(obj, True))
            self.level += 1
            try:
                return self._body(obj, True)
            finally:
                self.level -= 1
        seq_code = _SEQ_X.get(t)
        if seq_code is not None:
            i = id(obj)
            if i in self.active:
                raise SerializationError(f"the msgpack codec cannot encode a cycle through a {t.__name__}; use pickle")
            self.active.add(i)
            try:
                return ormsgpack.Ext(seq_code, self._boundary(obj, True))
            finally:
                self.active.discard(i)
        if t is memoryview:
            return obj.tobytes()  # as the fast path writes it: bytes
        ext = _leaf_ext(obj, t)
        if ext is not None:
            return ext
        if issubclass(t, Enum):
            return self.enc(obj.value)  # as ormsgpack writes an Enum on the fast path
        raise SerializationError(
            f"the msgpack codec cannot encode objects of type {t.__module__}.{t.__qualname__}; "
            "convert it to supported types or choose the pickle codec"
        )

    def _body(self, obj: Any, native: bool) -> Any:
        """A list/tuple/set as an array, a dict as a map (``native``) or a flat k, v array."""
        enc = self.enc
        if type(obj) is not dict:
            items = []
            for v in obj:
                items.append(enc(v))
            return items
        if native:
            out = {}
            for k, v in obj.items():
                out[k] = enc(v)
            return out
        flat = []
        for k, v in obj.items():
            flat.append(enc(k))
            flat.append(enc(v))
        return flat

    def _boundary(self, obj: Any, native: bool) -> bytes:
        """``_body`` packed on its own: extension data, where ormsgpack's nesting count restarts."""
        saved, self.level = self.level, 0
        try:
            body = self._body(obj, native)
        finally:
            self.level = saved
        return ormsgpack.packb(body)


class _ExtDecoder:
    """ormsgpack's ``ext_hook``: builds the extension values of one payload (fast or tagged).

    Containers are unpacked right here (one Python frame per nesting level), so what the
    tagged path writes decodes at any depth it can write.
    """

    __slots__ = ("defs",)

    def __init__(self) -> None:
        self.defs: dict[int, Any] = {}

    def __call__(self, code: int, data: bytes) -> Any:
        if code == _X_DATETIME:
            return dt.datetime.fromisoformat(data.decode("ascii"))
        if code == _X_DATE:
            return dt.date.fromisoformat(data.decode("ascii"))
        if code == _X_TIME:
            return dt.time.fromisoformat(data.decode("ascii"))
        if code == _X_TIMEDELTA:
            days, seconds, micros = _TD.unpack(data)
            return dt.timedelta(days=days, seconds=seconds, microseconds=micros)
        if code == _X_DECIMAL:
            return Decimal(data.decode("ascii"))
        if code == _X_UUID:
            return uuid.UUID(bytes=data)
        if code == _X_BIGINT:
            return int.from_bytes(data, "big", signed=True)
        if code == _X_BYTEARRAY:
            return bytearray(data)
        if code == _X_REF:
            return self.defs[_ID.unpack(data)[0]]
        out: Any
        if code <= _X_MAP:
            value = ormsgpack.unpackb(data, ext_hook=self)
            if type(value) is not list:
                raise TypeError("extension value holds no array")
            if code == _X_TUPLE:
                return tuple(value)
            if code == _X_SET:
                return set(value)
            if code == _X_FROZENSET:
                return frozenset(value)
            if code == _X_MAP:
                return _from_flat({}, value)
        elif code == _X_NEST:
            value = ormsgpack.unpackb(data, ext_hook=self)
            if type(value) is list or type(value) is dict:
                return value
        elif code <= _X_DEF_MAP:
            # A definition registers its (empty) container before decoding the contents,
            # so references inside them, cycles included, resolve to it.
            (n,) = _ID.unpack_from(data)
            out = self.defs[n] = [] if code == _X_DEF_LIST else {}
            value = ormsgpack.unpackb(memoryview(data)[_ID.size :], ext_hook=self)
            if code == _X_DEF_LIST and type(value) is list:
                out.extend(value)
                return out
            if code == _X_DEF_DICT and type(value) is dict:
                out.update(value)
                return out
            if code == _X_DEF_MAP and type(value) is list:
                return _from_flat(out, value)
        raise ValueError(f"extension type {code} is unknown or holds the wrong value")


def _from_flat(out: dict[Any, Any], flat: list[Any]) -> dict[Any, Any]:
    if len(flat) % 2:
        raise ValueError("odd number of map items")
    it = iter(flat)
    for k in it:
        out[k] = next(it)
    return out


class MsgpackCodec:
    """msgpack (ormsgpack) with exact types as extension values and a tagged path for identity.

    See the module doc. ``loads`` builds only the types listed there: no code runs on load.
    """

    name = "msgpack"
    id = 4
    unsafe = False

    def dumps(self, obj: Any) -> bytes:
        hook = _ExtHook()
        try:
            data = ormsgpack.packb(obj, default=hook, option=_MSGPACK_OPTS)
        except (TypeError, ValueError, RecursionError):
            pass  # a cycle, non-str keys, nesting past 255, an unsupported type: the tagged path decides
        else:
            # Only a state that needed an extension value pays for this walk; a plain one
            # keeps the fast path's documented semantics, as json's fast path does.
            if not hook.fired or not _loses_identity(obj):
                return data
        try:
            tagger = _MsgpackTagger(obj)
            tree = tagger.enc(obj)
            return ormsgpack.packb(tree)
        except (TypeError, ValueError, RecursionError) as exc:
            raise SerializationError(f"the msgpack codec cannot encode this state: {type(exc).__name__}") from None

    def loads(self, data: bytes | memoryview) -> Any:
        # GC paused while the graph is built, as in JsonCodec.loads (same reason, same gain).
        enabled = gc.isenabled()
        gc.disable()
        try:
            return ormsgpack.unpackb(data, ext_hook=_ExtDecoder())
        except (ValueError, KeyError, TypeError, IndexError, RecursionError, ArithmeticError, struct.error) as exc:
            raise IntegrityError(f"msgpack payload does not decode: {type(exc).__name__}") from None
        finally:
            if enabled:
                gc.enable()


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


CODECS: dict[str, Callable[[], Codec]] = {"json": JsonCodec, "pickle": PickleCodec, "dill": DillCodec, "msgpack": MsgpackCodec}
COMPRESSIONS: dict[str, Callable[[], Compression]] = {
    "none": NoCompression,
    "gzip": GzipCompression,
    "zstd": ZstdCompression,
}
CODEC_IDS = {1: "json", 2: "pickle", 3: "dill", 4: "msgpack"}
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
