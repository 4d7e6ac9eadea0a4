"""Where a 10 MB suspend/resume spends its time: a stage breakdown plus cProfile.

``python -m benchmarks --profile [--stores sqlite,postgres] [--sizes 10MB] [--kinds dict]``

The breakdown runs the hub's own steps one at a time (serializer.dumps,
keyring.encrypt, store.put / store.get, keyring.decrypt, serializer.loads,
the two store.transition calls of a resume) beside the floor's equivalent
step, median of a few runs each, so the gap between ours and the floor can be
pinned on one stage. cProfile then runs the real ``hub.suspend`` /
``hub.resume`` and prints the functions with the largest cumulative and own
time.
"""

from __future__ import annotations

import cProfile
import gc
import io
import os
import pstats
import statistics
import time
from collections.abc import Callable
from typing import Any

from celery_persist import Keyring, PersistenceHub, StateSerializer
from celery_persist.keys import key_hash, new_suspension_key
from celery_persist.stores import BaseStore, Kind, Status, StoredRecord

from . import floors, hub_bench
from .hub_bench import _COMP_NAMES, CODEC_FOR_KIND, STATES
from .states import format_size

__all__ = ["breakdown", "profile_cell"]

NAN = float("nan")


def _median_ms(fn: Callable[[], Any], runs: int, after: Callable[[Any], None] | None = None) -> float:
    times = []
    for _ in range(runs):
        gc.collect()
        clock = hub_bench._clock
        t0 = clock()
        out = fn()
        times.append(clock() - t0)
        if after is not None:
            after(out)
        del out
    return statistics.median(times) * 1e3


def breakdown(
    store: BaseStore, raw: floors.RawStore, kind: str, size: int, compression: str, runs: int = 5
) -> list[tuple[str, float, float]]:
    """``[(stage, ours ms, floor ms)]`` for one state; NaN where the floor has no such stage."""
    codec = CODEC_FOR_KIND[kind]
    state = STATES.get(kind, size)
    kb = os.urandom(32)
    ring = Keyring([("bench", kb)])
    ser = StateSerializer(codec, compression)
    hub = PersistenceHub(store, keyring=ring, serializer=ser, encryption="required")
    applied = _COMP_NAMES[ser.dumps(state)[8]]
    pipe = floors.Pipeline(codec, applied, ser.level, kb)
    kh = key_hash(new_suspension_key())
    aad = hub._aad(kh, Kind.SUSPENSION, {})

    plain = ser.dumps(state)
    sealed = ring.encrypt(plain, aad)
    codec_bytes = ser._codec.dumps(state)
    floor_payload = pipe.codec_dumps(state)
    floor_plain = pipe.encode(state)
    floor_blob = pipe.encrypt(floor_plain, aad)
    now = time.time()
    rec = StoredRecord(kh, Kind.SUSPENSION, Status.SUSPENDED, sealed, {}, now, None, None, now)

    def ours_suspend() -> str:
        return hub.suspend(state)

    def drop_key(key: str) -> None:
        store.delete(key_hash(key))

    rows: list[tuple[str, float, float]] = [
        ("suspend: codec dumps", _median_ms(lambda: ser._codec.dumps(state), runs), _median_ms(lambda: pipe.codec_dumps(state), runs)),
        (
            "suspend: serializer.dumps (codec, compress, crc32, envelope)",
            _median_ms(lambda: ser.dumps(state), runs),
            _median_ms(lambda: pipe.encode(state), runs),
        ),
        ("suspend: encrypt", _median_ms(lambda: ring.encrypt(plain, aad), runs), _median_ms(lambda: pipe.encrypt(floor_plain, aad), runs)),
        (
            "suspend: store.put / raw put",
            _median_ms(lambda: store.put(rec), runs, lambda _: store.delete(kh)),
            _median_ms(lambda: raw.put("bd", floor_blob), runs, lambda _: raw.delete("bd")),
        ),
        (
            "suspend: whole (hub.suspend / floor)",
            _median_ms(ours_suspend, runs, drop_key),
            _median_ms(lambda: raw.put("bd", pipe.seal(state, aad)), runs, lambda _: raw.delete("bd")),
        ),
    ]
    store.put(rec)
    raw.put("bd", floor_blob)
    rows += [
        ("resume: store.get / raw get", _median_ms(lambda: store.get(kh), runs), _median_ms(lambda: raw.get("bd"), runs)),
        ("resume: decrypt", _median_ms(lambda: ring.decrypt(sealed, aad), runs), _median_ms(lambda: pipe.decrypt(floor_blob, aad), runs)),
        (
            "resume: serializer.loads (crc32, decompress, codec)",
            _median_ms(lambda: ser.loads(plain, trusted=True), runs),
            _median_ms(lambda: pipe.decode(floor_plain), runs),
        ),
        (
            "resume:   of which codec loads",
            _median_ms(lambda: ser._codec.loads(codec_bytes), runs),
            _median_ms(lambda: pipe.codec_loads(floor_payload), runs),
        ),
    ]

    def two_transitions() -> None:
        t = time.time()
        store.transition(kh, {Status.SUSPENDED}, Status.CLAIMED, due_at=t + 60, now=t)
        store.transition(kh, {Status.CLAIMED}, Status.RESUMED, due_at=t + 3600, now=t)

    def reset(_: Any) -> None:
        store.transition(kh, {Status.RESUMED}, Status.SUSPENDED, due_at=None, now=time.time())

    rows.append(("resume: 2 x store.transition (claim, complete)", _median_ms(two_transitions, runs, reset), NAN))
    store.delete(kh)

    keys: list[str] = []

    def fresh() -> None:
        keys.append(hub.suspend(state))

    def ours_resume() -> Any:
        return hub.resume(keys[-1])

    times = []
    for _ in range(runs):
        fresh()
        times.append(_median_ms(ours_resume, 1))
        drop_key(keys[-1])
    rows.append(("resume: whole (hub.resume / floor)", statistics.median(times), _median_ms(lambda: pipe.open(raw.get("bd"), aad), runs)))
    raw.delete("bd")
    return rows


def profile_cell(store: BaseStore, kind: str, size: int, compression: str, runs: int = 3, top: int = 25) -> str:
    """cProfile output (cumulative and own time) for ``runs`` suspend+resume rounds."""
    codec = CODEC_FOR_KIND[kind]
    state = STATES.get(kind, size)
    ring = Keyring([("bench", os.urandom(32))])
    hub = PersistenceHub(store, keyring=ring, serializer=StateSerializer(codec, compression), encryption="required")
    key = hub.suspend(state)
    hub.resume(key)
    store.delete(key_hash(key))
    prof = cProfile.Profile()
    for _ in range(runs):
        gc.collect()
        prof.enable()
        key = hub.suspend(state)
        hub.resume(key)
        prof.disable()
        store.delete(key_hash(key))
    out = io.StringIO()
    out.write(f"cProfile: {runs} x (suspend + resume), {kind} {format_size(size)}, {codec}/{compression}, {store.name}\n")
    stats = pstats.Stats(prof, stream=out)
    stats.sort_stats("cumulative").print_stats(top)
    stats.sort_stats("tottime").print_stats(top)
    return out.getvalue()
