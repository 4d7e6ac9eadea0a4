"""Codecs (json and msgpack with cycles and tags, pickle, dill) and compressions (none, gzip, zstd)."""

from __future__ import annotations

import copy
import datetime as dt
import enum
import gc
import struct
import sys
import uuid
import zlib
from decimal import Decimal
from typing import Any

import ormsgpack
import pytest
import zstandard

from celery_persist import codecs
from celery_persist.codecs import (
    CODEC_IDS,
    CODECS,
    COMPRESSION_IDS,
    COMPRESSIONS,
    DillCodec,
    GzipCompression,
    JsonCodec,
    MsgpackCodec,
    NoCompression,
    PickleCodec,
    ZstdCompression,
    get_codec,
    get_compression,
    zstd_available,
)
from celery_persist.errors import ConfigurationError, IntegrityError, SerializationError

from ._helpers import assert_same

json_codec = JsonCodec()
msgpack_codec = MsgpackCodec()
#: The codecs that never run code on load: every fidelity case runs on both.
SAFE = pytest.mark.parametrize("codec", [json_codec, msgpack_codec], ids=["json", "msgpack"])
UTC = dt.timezone.utc
IST = dt.timezone(dt.timedelta(hours=5, minutes=30))
WHEN = dt.datetime(2024, 1, 2, 3, 4, 5, 6)


class Color(enum.Enum):
    RED = "red"


class Level(enum.IntEnum):
    HIGH = 3


class Point:
    """Module-level, so pickle can find it."""

    def __init__(self, x: int) -> None:
        self.x = x

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Point) and other.x == self.x


def rt(obj: Any, codec: Any = json_codec) -> Any:
    return codec.loads(codec.dumps(obj))


# -- json and msgpack: tagged values ------------------------------------------------------------

TAGGED_VALUES = {
    "datetime naive": WHEN,
    "datetime utc": dt.datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC),
    "datetime +05:30": dt.datetime(2024, 1, 2, 3, 4, 5, 999999, tzinfo=IST),
    "datetime min": dt.datetime.min,
    "date": dt.date(1970, 1, 1),
    "time": dt.time(23, 59, 59, 1),
    "time aware": dt.time(1, 2, tzinfo=IST),
    "timedelta": dt.timedelta(days=-2, seconds=5, microseconds=7),
    "timedelta zero": dt.timedelta(0),
    "timedelta extremes": (dt.timedelta.max, dt.timedelta.min),
    "bytes": bytes(range(256)),
    "bytes empty": b"",
    "bytearray": bytearray(b"\x00mutable\xff"),
    "tuple": (1, "a", None),
    "tuple empty": (),
    "tuple nested": ((1, 2), [3, (4,)]),
    "set": {1, 2, 3},
    "set empty": set(),
    "set of tuples": {(1, 2), (3, 4)},
    "frozenset": frozenset({"a", "b"}),
    "frozenset nested": frozenset({frozenset({1}), 2}),
    "decimal": Decimal("1.10"),
    "decimal exp": Decimal("-1E+400"),
    "decimal nan": Decimal("NaN"),
    "uuid": uuid.UUID("12345678-1234-5678-1234-567812345678"),
    "big int": 2**64,
    "big negative": -(2**63) - 1,
    "huge int": 10**400,
    "huge negative": -(10**400),
    "nan": float("nan"),
    "inf": float("inf"),
    "-inf": float("-inf"),
    "int keys": {1: "a", 2: "b"},
    "mixed keys": {1: "a", "b": 2, None: 3, 1.5: 4, (1, 2): 5, frozenset({9}): 6, False: 7},
    "dt key": {dt.date(2024, 1, 1): "new year"},
    "bytes and big int keys": {b"k": 1, 2**70: 2, Decimal("1.5"): 3, uuid.UUID(int=1): 4},
    "cp key": {"$cp": "dt", "v": "2024-01-01"},
    "cp key ref": {"$cp": "ref", "id": 0},
    "cp key nested": {"outer": [{"$cp": "t", "v": [1]}]},
    "cp and int keys": {"$cp": 1, 2: 3},
}


@SAFE
@pytest.mark.parametrize("value", list(TAGGED_VALUES.values()), ids=list(TAGGED_VALUES))
def test_round_trips_exact_types(codec: Any, value: Any) -> None:
    # Wrapped with a datetime so json's tagged path is used and every type is kept.
    state = {"value": value, "list": [value], "anchor": WHEN}
    blob = codec.dumps(state)
    if codec is json_codec:
        assert blob[:1] == b"T"
    assert_same(codec.loads(blob), state)


@pytest.mark.parametrize(
    "value", [v for k, v in TAGGED_VALUES.items() if k != "bytearray"], ids=[k for k in TAGGED_VALUES if k != "bytearray"]
)
def test_msgpack_keeps_exact_types_without_an_anchor(value: Any) -> None:
    """Unlike json's fast path, msgpack's keeps tuples, UUIDs, NaN... as they are (extension types)."""
    state = {"value": value, "list": [copy.deepcopy(value)]}
    assert_same(rt(state, msgpack_codec), state)


@SAFE
def test_dicts_with_the_tag_key_never_decode_as_tags(codec: Any) -> None:
    for state in ({"$cp": "dt", "v": "2024-01-01"}, {"$cp": "def", "id": 0, "v": []}, {"x": {"$cp": "b", "v": "AA=="}}):
        assert_same(rt(state, codec), state)  # fast path
        tagged = {"s": state, "anchor": WHEN}
        assert_same(rt(tagged, codec), tagged)


@SAFE
@pytest.mark.parametrize("value", [2**64 - 1, -(2**63), 0, -1, 1.5, -0.0, 1e308, 5e-324, "", "\u2713\x00", True, None])
def test_boundaries_on_the_fast_path(codec: Any, value: Any) -> None:
    blob = codec.dumps([value])
    if codec is json_codec:
        assert blob[:1] == b"P"
    else:
        assert blob == ormsgpack.packb([value])
    assert_same(codec.loads(blob), [value])


@pytest.mark.parametrize(("value", "form"), [(2**64, b"T"), (-(2**63) - 1, b"T"), (2**64 - 1, b"P"), (-(2**63), b"P")])
def test_big_int_boundary_chooses_the_path(value: int, form: bytes) -> None:
    assert json_codec.dumps({"n": value})[:1] == form
    assert_same(rt({"n": value}), {"n": value})
    assert_same(rt({"n": value}, msgpack_codec), {"n": value})


def test_fast_path_for_plain_json() -> None:
    state = {"a": [1, 2.5, True, None, "x"], "b": {"c": {}}, "d": []}
    blob = json_codec.dumps(state)
    assert blob[:1] == b"P"
    assert_same(json_codec.loads(blob), state)
    assert json_codec.dumps([])[:1] == b"P" and json_codec.dumps(None) == b"Pnull"


def test_msgpack_plain_state_is_plain_msgpack() -> None:
    """No marker, no wrapper: any msgpack reader reads a plain state (and bytes stay bytes)."""
    state = {"a": [1, 2.5, True, None, "x"], "b": {"c": {}}, "raw": b"\x00\xff", "nan": float("inf")}
    blob = msgpack_codec.dumps(state)
    assert blob == ormsgpack.packb(state)
    assert_same(ormsgpack.unpackb(blob), state)
    assert_same(msgpack_codec.loads(blob), state)
    assert msgpack_codec.dumps(None) == b"\xc0"


def test_fast_path_json_semantics_are_documented() -> None:
    """The codecs docstring: with no tagged type present, the fast path keeps
    JSON semantics: tuple -> list, UUID -> str, NaN/inf -> null, a shared
    container -> two equal copies. The tagged path keeps them all exactly."""
    shared = [1, 2]
    u = uuid.UUID(int=5)
    state = {"t": (1, 2), "u": u, "nan": float("nan"), "inf": float("inf"), "a": shared, "b": shared}
    blob = json_codec.dumps(state)
    assert blob[:1] == b"P"
    back = json_codec.loads(blob)
    assert back == {"t": [1, 2], "u": str(u), "nan": None, "inf": None, "a": [1, 2], "b": [1, 2]}
    assert back["a"] is not back["b"]

    tagged = dict(state, anchor=WHEN)  # one tagged type anywhere switches the whole state
    back = rt(tagged)
    assert_same(back, tagged)
    assert back["a"] is back["b"]


def test_msgpack_fast_path_semantics_are_documented() -> None:
    """The codecs docstring: a state of msgpack's own types only (no extension value needed)
    comes back with a shared container as two equal copies, and bytearray and memoryview as
    bytes. One extension value anywhere (a tuple, a datetime...) makes the codec check the
    state, and then sharing and bytearrays are kept exactly, as on json's tagged path."""
    shared = [1, 2]
    state = {"nan": float("nan"), "raw": b"x", "a": shared, "b": shared, "buf": bytearray(b"y"), "view": memoryview(b"z")}
    back = rt(state, msgpack_codec)
    assert back["a"] == back["b"] == [1, 2] and back["a"] is not back["b"]
    assert back["buf"] == b"y" and type(back["buf"]) is bytes and back["view"] == b"z"

    for anchor in (WHEN, (1,), Decimal(1), {3}):
        back = rt(dict(state, anchor=anchor), msgpack_codec)
        assert back["a"] is back["b"] and type(back["buf"]) is bytearray and back["view"] == b"z"
        assert_same(back["anchor"], anchor)


@SAFE
def test_enums_encode_as_their_value_on_both_paths(codec: Any) -> None:
    # The fast path writes an Enum as its value (orjson, ormsgpack); the tagged path must
    # not then refuse the same state because an unrelated datetime sits next to it.
    assert rt({"c": Color.RED, "l": Level.HIGH}, codec) == {"c": "red", "l": 3}
    back = rt({"c": Color.RED, "l": Level.HIGH, "when": WHEN}, codec)
    assert back == {"c": "red", "l": 3, "when": WHEN} and type(back["l"]) is int
    shared: list[Any] = []
    back = rt({"c": Color.RED, "s": shared, "t": shared, "me": {1: 2}}, codec)  # tagged for both
    assert back["c"] == "red" and back["s"] is back["t"]


# -- json and msgpack: references ---------------------------------------------------------------


@SAFE
def test_circular_dict(codec: Any) -> None:
    d: dict[str, Any] = {"name": "root"}
    d["self"] = d
    blob = codec.dumps(d)
    if codec is json_codec:
        assert blob[:1] == b"T"
    back = codec.loads(blob)
    assert back["self"] is back and back["name"] == "root"


@SAFE
def test_circular_list_and_mutual_cycles(codec: Any) -> None:
    a: list[Any] = [1]
    b: dict[str, Any] = {"a": a}
    a.append(b)
    a.append(a)
    back = rt({"root": a}, codec)
    ra = back["root"]
    assert ra[0] == 1 and ra[1]["a"] is ra and ra[2] is ra
    assert_same(back, {"root": a})


@SAFE
def test_shared_references_keep_identity(codec: Any) -> None:
    leaf = {"k": [1, 2]}
    items = [leaf, leaf, leaf["k"]]
    state = {"items": items, "again": items, "when": WHEN}
    back = rt(state, codec)
    assert back["items"] is back["again"]
    assert back["items"][0] is back["items"][1]
    assert back["items"][2] is back["items"][0]["k"]
    assert_same(back, state)


@SAFE
def test_shared_empty_containers_and_shared_odd_dicts(codec: Any) -> None:
    empty_list: list[Any] = []
    empty_dict: dict[Any, Any] = {}
    odd: dict[Any, Any] = {1: "int key"}
    odd["me"] = odd
    state = [empty_list, empty_list, empty_dict, empty_dict, odd, odd]
    back = rt(state, codec)
    assert back[0] is back[1] and back[2] is back[3] and back[4] is back[5] and back[4]["me"] is back[4]
    assert_same(back, state)


@SAFE
def test_cycle_through_a_tuple_via_a_list(codec: Any) -> None:
    holder: list[Any] = []
    holder.append((holder, 1))
    back = rt(holder, codec)
    assert back[0][0] is back and back[0][1] == 1


@SAFE
def test_shared_list_inside_tuples_and_set_keys(codec: Any) -> None:
    inner = [7]
    state = {"t1": (inner,), "t2": (inner,), "keys": {(1, "a"): inner}}
    back = rt(state, codec)
    assert back["t1"][0] is back["t2"][0] is back["keys"][(1, "a")]


def test_msgpack_cycle_between_a_dict_and_a_tuple() -> None:
    # Not run for json: orjson 3.13 does not count tuples in its nesting limit when they
    # alternate with dicts, and overflows the C stack (segfault) on this state.
    d: dict[str, Any] = {}
    t = (d,)
    d["t"] = t
    with pytest.raises(SerializationError, match="cycle through a tuple"):
        msgpack_codec.dumps({"t": t})  # the tuple would have to exist before its own contents
    back = rt({"d": d}, msgpack_codec)  # entered through the dict: rebuilt
    assert back["d"]["t"][0] is back["d"]
    nested: Any = ()
    for _ in range(10_000):
        nested = ({"a": nested},)
    with pytest.raises(SerializationError):
        msgpack_codec.dumps(nested)


@SAFE
def test_deep_nesting_raises_serialization_error_not_recursion_error(codec: Any) -> None:
    deep: list[Any] = []
    for _ in range(5000):
        deep = [deep]
    with pytest.raises(SerializationError):
        codec.dumps(deep)


@SAFE
def test_moderate_nesting_past_the_fast_path_limit_round_trips(codec: Any) -> None:
    deep: Any = WHEN
    for _ in range(200):
        deep = [deep]
    assert rt(deep, codec) == deep
    nested: Any = {"leaf": (1,)}
    for _ in range(300):  # past ormsgpack's 255 levels: the tagged path splits the nesting
        nested = {"n": nested}
    assert_same(rt(nested, codec), nested)


def test_msgpack_deeply_nested_tuples_round_trip() -> None:
    deep: Any = ()
    for _ in range(300):
        deep = (deep, [1], {2})
    assert_same(rt(deep, msgpack_codec), deep)


# -- json and msgpack: refusals -----------------------------------------------------------------


@SAFE
@pytest.mark.parametrize(
    "value",
    [
        object(),
        Point(1),
        type("S", (str,), {})("sub"),
        type("F", (float,), {})(1.5),
        type("D", (dict,), {})(a=1),
        {1, object()},
        (1, object()),
        lambda: 1,
        dt.timezone.utc,
    ],
)
def test_refuses_unknown_types(codec: Any, value: Any) -> None:
    with pytest.raises(SerializationError, match=f"{codec.name} codec cannot encode"):
        codec.dumps({"v": value})


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"X{}",
        b"P{not json",
        b"Tnot json",
        b'T{"$cp":"nope","v":1}',
        b'T{"$cp":"ref","id":9}',
        b'T{"$cp":"i","v":"x"}',
        b'T{"$cp":"t","v":5}',
        b'T{"$cp":"m","v":[[1]]}',
        b'T{"$cp":"dt","v":"yesterday"}',
        b"P\xff\xfe",
        b"T" + b"[" * 100_000,
    ],
)
def test_json_garbage_payloads_raise_integrity_error(payload: bytes) -> None:
    with pytest.raises(IntegrityError):
        json_codec.loads(payload)


@pytest.mark.parametrize(
    "payload",
    [
        b'T{"$cp":"td","v":[1000000000,0,0]}',  # past timedelta.max: OverflowError
        b'T{"$cp":"td","v":[1e308,0,0]}',
        b'T{"$cp":"td","v":[0,0,1e300]}',
        b'T{"$cp":"dec","v":"not a number"}',  # decimal.InvalidOperation, an ArithmeticError
        b'T{"$cp":"dt","v":"99999-01-01T00:00:00"}',
        b'T{"$cp":"d","v":"0000-01-01"}',
        b'T{"$cp":"i","v":"' + b"9" * 5000 + b'"}',  # past int's string-conversion limit
    ],
)
def test_json_crafted_tagged_values_raise_integrity_error(payload: bytes) -> None:
    """A tagged value the decoder cannot build is corrupt data, never a bare OverflowError or ValueError."""
    with pytest.raises(IntegrityError, match="json payload does not decode"):
        json_codec.loads(payload)


def _ext(code: int, data: bytes) -> bytes:
    return ormsgpack.packb([ormsgpack.Ext(code, data)])


def _nested_exts(depth: int) -> bytes:
    data = ormsgpack.packb([])
    for _ in range(depth):
        data = ormsgpack.packb([ormsgpack.Ext(5, data)])
    return data


_I = struct.Struct(">I")

MSGPACK_GARBAGE = {
    "empty": b"",
    "never-used byte": b"\xc1",
    "truncated": ormsgpack.packb({"a": [1, 2, 3]})[:-1],
    "bad utf-8": b"\xa1\xff",
    "int map key": b"\x81\x01\x01",
    "deep arrays": b"\x91" * 100_000 + b"\xc0",
    "deep extension values": _nested_exts(5000),
    "unknown extension": _ext(99, b""),
    "timestamp extension": b"\x91\xd6\xff\x00\x00\x00\x00",
    "datetime text": _ext(1, b"yesterday"),
    "datetime not ascii": _ext(1, b"\xff"),
    "datetime year 99999": _ext(1, b"99999-01-01T00:00:00"),
    "date year 0": _ext(2, b"0000-01-01"),
    "timedelta past max": _ext(4, struct.pack(">iii", 1_000_000_000, 0, 0)),
    "timedelta short": _ext(4, b"\x00"),
    "decimal text": _ext(8, b"not a number"),
    "uuid 15 bytes": _ext(9, b"\x00" * 15),
    "tuple of a map": _ext(5, ormsgpack.packb({"a": 1})),
    "tuple of garbage": _ext(5, b"\xc1"),
    "set of lists": _ext(6, ormsgpack.packb([[1]])),
    "map odd items": _ext(12, ormsgpack.packb([1])),
    "map list key": _ext(12, ormsgpack.packb([[1], 2])),
    "ref unknown": _ext(16, _I.pack(9)),
    "ref short": _ext(16, b"\x00"),
    "def short": _ext(13, b"\x00"),
    "def list of a map": _ext(13, _I.pack(0) + ormsgpack.packb({})),
    "def dict of a list": _ext(14, _I.pack(0) + ormsgpack.packb([])),
    "def map odd": _ext(15, _I.pack(0) + ormsgpack.packb([1])),
    "nest of an int": _ext(17, ormsgpack.packb(1)),
}


@pytest.mark.parametrize("payload", list(MSGPACK_GARBAGE.values()), ids=list(MSGPACK_GARBAGE))
def test_msgpack_garbage_payloads_raise_integrity_error(payload: bytes) -> None:
    """Corrupt or crafted bytes (a wrong extension value included) are corrupt data, never another error."""
    with pytest.raises(IntegrityError, match="msgpack payload does not decode"):
        msgpack_codec.loads(payload)


def test_msgpack_extension_codes_are_stable() -> None:
    """Stored blobs hold these numbers: a change here makes old blobs unreadable."""

    def codes(state: Any) -> Any:
        return ormsgpack.unpackb(msgpack_codec.dumps(state), ext_hook=lambda code, data: code)

    shared: list[Any] = []
    deep: Any = []
    for _ in range(300):
        deep = [deep, WHEN]
    cases = [
        ([WHEN], [1]),
        ([dt.date(2024, 1, 1)], [2]),
        ([dt.time(1)], [3]),
        ([dt.timedelta(1)], [4]),
        ([(1,)], [5]),
        ([{1}], [6]),
        ([frozenset({1})], [7]),
        ([Decimal(1)], [8]),
        ([uuid.UUID(int=1)], [9]),
        ([2**64], [10]),
        ([bytearray(b"x"), WHEN], [11, 1]),
        ({1: 2}, 12),
        ([shared, shared, WHEN], [13, 16, 1]),
        ([{"a": shared}, {"b": shared}, {1: 1}], [{"a": 13}, {"b": 16}, 12]),
    ]
    for state, expected in cases:
        assert codes(state) == expected, state
    d: dict[Any, Any] = {1: 1}
    assert codes([d, d]) == [15, 16]
    e: dict[str, Any] = {}
    assert codes([e, e, {2: 2}]) == [14, 16, 12]
    level, depth = codes(deep), 0
    while type(level) is list:
        level, depth = level[0], depth + 1
    assert (level, depth) == (17, 200)  # a NEST value restarts ormsgpack's nesting count


# -- pickle / dill ------------------------------------------------------------------------------


@pytest.mark.parametrize("codec", [PickleCodec(), DillCodec()], ids=["pickle", "dill"])
def test_pickle_like_round_trips_with_cycles(codec: Any) -> None:
    d: dict[str, Any] = {"point": Point(3), "when": WHEN, "tags": {1, 2}, "t": (1,), "dec": Decimal("1.10")}
    d["self"] = d
    d["shared"] = [d["tags"], d["tags"]]
    back = codec.loads(codec.dumps(d))
    assert back["self"] is back and back["shared"][0] is back["shared"][1] and back["point"] == Point(3)
    assert_same(back["dec"], Decimal("1.10"))
    assert codec.unsafe is True


def test_dill_encodes_what_pickle_cannot() -> None:
    fn = lambda x: x + 1  # noqa: E731
    with pytest.raises(SerializationError, match="pickle codec cannot encode"):
        PickleCodec().dumps(fn)
    assert DillCodec().loads(DillCodec().dumps(fn))(1) == 2


def test_dill_refuses_what_it_cannot_encode() -> None:
    with pytest.raises(SerializationError, match="dill codec cannot encode"):
        DillCodec().dumps(x for x in [])


@pytest.mark.parametrize("codec", [PickleCodec(), DillCodec()], ids=["pickle", "dill"])
def test_pickle_like_garbage_raises_serialization_error(codec: Any) -> None:
    for payload in (b"", b"garbage", b"\x80\x05K", b"\x80\x05cno_such_module\nThing\n)\x81."):
        with pytest.raises(SerializationError):
            codec.loads(payload)


@pytest.mark.parametrize("codec", [PickleCodec(), json_codec, msgpack_codec], ids=["pickle", "json", "msgpack"])
def test_loads_restores_gc_state(codec: Any) -> None:
    blob = codec.dumps({"a": [1]})
    assert gc.isenabled()
    codec.loads(blob)
    assert gc.isenabled()
    with pytest.raises((SerializationError, IntegrityError)):
        codec.loads(b"\xc1bad")
    assert gc.isenabled()
    gc.disable()
    try:
        codec.loads(blob)
        assert not gc.isenabled()  # a caller that paused GC keeps it paused
    finally:
        gc.enable()


def test_missing_optional_dependencies(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "dill", None)
    monkeypatch.setitem(sys.modules, "zstandard", None)
    with pytest.raises(ConfigurationError, match=r"celery-persist\[dill\]"):
        DillCodec()
    with pytest.raises(ConfigurationError, match=r"celery-persist\[zstd\]"):
        ZstdCompression()
    assert zstd_available() is False


# -- compressions -------------------------------------------------------------------------------

DATA = b"compressible state " * 500


@pytest.mark.parametrize("comp", [NoCompression(), GzipCompression(), ZstdCompression()], ids=["none", "gzip", "zstd"])
def test_compression_round_trip(comp: Any) -> None:
    for data in (b"", b"x", DATA):
        packed = comp.compress(data, comp.default_level)
        assert comp.decompress(packed, len(data)) == data
    if comp.id:
        assert len(comp.compress(DATA, comp.default_level)) < len(DATA) / 10


@pytest.mark.parametrize("comp", [NoCompression(), GzipCompression(), ZstdCompression()], ids=["none", "gzip", "zstd"])
def test_declared_size_must_match(comp: Any) -> None:
    packed = comp.compress(DATA, comp.default_level)
    for size in (0, len(DATA) - 1, len(DATA) + 1):
        with pytest.raises(IntegrityError):
            comp.decompress(packed, size)


@pytest.mark.parametrize("comp", [GzipCompression(), ZstdCompression()], ids=["gzip", "zstd"])
def test_corrupt_and_truncated_streams(comp: Any) -> None:
    packed = comp.compress(DATA, comp.default_level)
    for bad in (b"", b"\x00" * 20, packed[: len(packed) // 2], packed[:-1], packed[:3]):
        with pytest.raises(IntegrityError):
            comp.decompress(bad, len(DATA))


def test_gzip_bomb_is_bounded() -> None:
    c = zlib.compressobj(9, zlib.DEFLATED, 31)
    bomb = c.compress(b"\0" * (8 << 20)) + c.flush()
    with pytest.raises(IntegrityError):
        GzipCompression().decompress(bomb, 1000)


def test_zstd_frame_without_content_size_is_refused() -> None:
    packed = zstandard.ZstdCompressor(write_content_size=False).compress(DATA)
    with pytest.raises(IntegrityError):
        ZstdCompression().decompress(packed, len(DATA))


def test_registries_are_consistent() -> None:
    for cid, name in CODEC_IDS.items():
        assert CODECS[name]().id == cid and get_codec(name).name == name
    for cid, name in COMPRESSION_IDS.items():
        assert COMPRESSIONS[name]().id == cid and get_compression(name).name == name
    assert get_codec("json") is get_codec("json")
    assert get_compression("gzip") is get_compression("gzip")
    assert zstd_available() is True


def test_unknown_names() -> None:
    with pytest.raises(ConfigurationError, match="unknown codec 'yaml'"):
        get_codec("yaml")
    with pytest.raises(ConfigurationError, match="unknown compression 'lz4'"):
        get_compression("lz4")


def test_unsafe_flags() -> None:
    assert {name: get_codec(name).unsafe for name in CODECS} == {"json": False, "pickle": True, "dill": True, "msgpack": False}
    assert codecs.JsonCodec.unsafe is False and codecs.MsgpackCodec.unsafe is False
