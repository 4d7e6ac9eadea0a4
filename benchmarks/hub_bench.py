"""Hub suspend/resume against the raw floor, store by store.

For one cell (store, state kind, size, compression) the loop runs
``warmup + runs`` rounds. Each round times, on a fresh key each:

* ours: ``key = hub.suspend(state)`` then ``hub.resume(key)`` (validate key,
  get, decrypt, checksum, decompress, deserialize, claim and complete: two
  status transitions);
* floor: ``pipeline.seal + raw.put`` then ``raw.get + pipeline.open``.

Ours and the floor alternate which goes first, so drift on this shared
machine hits both; the records are deleted (untimed) after each round. The
cyclic GC is collected before every timed section, and the input state is
frozen out of the GC's sight, so one section's garbage is not charged to the
next. The first round also checks both sides give back an equal state.
"""

from __future__ import annotations

import gc
import hashlib
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from celery_persist import Keyring, PersistenceHub, StateSerializer
from celery_persist.keys import key_hash
from celery_persist.stores import BaseStore

from . import floors
from .states import format_size, make_state

__all__ = ["Cell", "CellResult", "run_cell", "default_runs", "set_clock", "CODEC_FOR_KIND", "STATES"]

#: Codec per state kind: the library default (json) for the dict; pickle for raw bytes,
#: which JSON cannot carry natively (the json codec would base64 them on its slow tagged path).
CODEC_FOR_KIND = {"dict": "json", "bytes": "pickle"}
_COMP_NAMES = {0: "none", 1: "gzip", 2: "zstd"}
TARGET_RATIO = 1.3


@dataclass(frozen=True)
class Cell:
    store: str
    kind: str
    size: int
    compression: str
    codec: str
    runs: int
    warmup: int


@dataclass
class CellResult:
    store: str
    kind: str
    codec: str
    size: int
    compression: str
    applied: str = ""
    stored_bytes: int = 0
    runs: int = 0
    ours_suspend: list[float] = field(default_factory=list)
    ours_resume: list[float] = field(default_factory=list)
    floor_suspend: list[float] = field(default_factory=list)
    floor_resume: list[float] = field(default_factory=list)
    error: str | None = None

    @staticmethod
    def _med(xs: list[float]) -> float:
        return statistics.median(xs) if xs else float("nan")

    @property
    def suspend_ms(self) -> float:
        return self._med(self.ours_suspend) * 1e3

    @property
    def resume_ms(self) -> float:
        return self._med(self.ours_resume) * 1e3

    @property
    def floor_suspend_ms(self) -> float:
        return self._med(self.floor_suspend) * 1e3

    @property
    def floor_resume_ms(self) -> float:
        return self._med(self.floor_resume) * 1e3

    @property
    def suspend_ratio(self) -> float:
        return self.suspend_ms / self.floor_suspend_ms if self.floor_suspend else float("nan")

    @property
    def resume_ratio(self) -> float:
        return self.resume_ms / self.floor_resume_ms if self.floor_resume else float("nan")

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(
            size_label=format_size(self.size),
            suspend_ms=self.suspend_ms,
            resume_ms=self.resume_ms,
            floor_suspend_ms=self.floor_suspend_ms,
            floor_resume_ms=self.floor_resume_ms,
            suspend_ratio=self.suspend_ratio,
            resume_ratio=self.resume_ratio,
        )
        return d


def default_runs(size: int, quick: bool = False) -> tuple[int, int]:
    """(runs, warmup) for a state of ``size`` bytes."""
    if quick:
        return (9, 1) if size < 100_000 else (5, 1) if size < 5_000_000 else (3, 1)
    if size < 100_000:
        return 41, 3
    if size < 5_000_000:
        return 15, 2
    return 7, 1


class _StateCache:
    """States are built once per (kind, size) and kept out of the GC's sight."""

    def __init__(self) -> None:
        self._states: dict[tuple[str, int], Any] = {}

    def get(self, kind: str, size: int) -> Any:
        key = (kind, size)
        if key not in self._states:
            # Only the current size is kept alive: a 10 MB dict is ~100 MB of objects.
            self._states.clear()
            gc.unfreeze()
            gc.collect()
            self._states[key] = make_state(kind, size)
            gc.collect()
            gc.freeze()
        return self._states[key]

    def clear(self) -> None:
        self._states.clear()
        gc.unfreeze()
        gc.collect()


STATES = _StateCache()


_clock: Callable[[], float] = time.perf_counter


def set_clock(name: str) -> None:
    """``wall`` (perf_counter, the default) or ``cpu`` (this process's CPU time, all threads)."""
    global _clock
    _clock = time.process_time if name == "cpu" else time.perf_counter


class _Settle:
    """A GC-allocated object with no free list: creating one runs any collection that is due."""


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    gc.collect()
    t0 = _clock()
    out = fn()
    # Allocating one GC object runs any collection the GC deferred while it was paused
    # (a loads that disabled it leaves a million new objects counted): both sides pay it
    # here, not whichever side happens to allocate first afterwards. Not a list: a list
    # taken from the free list is never counted, so after a pickle.loads `[out]` left the
    # floor's deferred collection (~20 ms of 10 MB) to fall outside its timed section.
    _settle = _Settle()
    elapsed = _clock() - t0
    del _settle
    return elapsed, out


def run_cell(cell: Cell, store: BaseStore, make_floor: Callable[[], floors.RawStore], raw: floors.RawStore | None = None) -> CellResult:
    """Measure one cell. ``raw`` is the floor's driver (opened by the caller, shared across cells)."""
    res = CellResult(cell.store, cell.kind, cell.codec, cell.size, cell.compression)
    state = STATES.get(cell.kind, cell.size)
    key_bytes = os.urandom(32)
    ring = Keyring([("bench", key_bytes)])
    serializer = StateSerializer(cell.codec, cell.compression)
    hub = PersistenceHub(store, keyring=ring, serializer=serializer, encryption="required")
    # What the serializer really applied (it skips compression when a sample does not shrink).
    envelope = serializer.dumps(state)
    res.applied = _COMP_NAMES.get(envelope[8], "?")
    del envelope
    pipe = floors.Pipeline(cell.codec, res.applied, serializer.level, key_bytes)
    own_raw = raw is None
    raw = raw if raw is not None else make_floor()
    try:
        for i in range(cell.warmup + cell.runs):
            check = i == 0
            if i % 2 == 0:
                o = _ours_round(hub, store, state, res, check)
                f = _floor_round(pipe, raw, state, f"k{i:04d}", check)
            else:
                f = _floor_round(pipe, raw, state, f"k{i:04d}", check)
                o = _ours_round(hub, store, state, res, check)
            if i >= cell.warmup:
                res.ours_suspend.append(o[0])
                res.ours_resume.append(o[1])
                res.floor_suspend.append(f[0])
                res.floor_resume.append(f[1])
        res.runs = cell.runs
    finally:
        if own_raw:
            raw.close()
    return res


def _ours_round(hub: PersistenceHub, store: BaseStore, state: Any, res: CellResult, check: bool) -> tuple[float, float]:
    ts, key = _timed(lambda: hub.suspend(state))
    if check:
        rec = store.get(key_hash(key))
        res.stored_bytes = len(rec.blob) if rec is not None else 0
    tr, s = _timed(lambda: hub.resume(key))
    ok = (not check) or (s.state == state and s.status == "resumed")
    del s
    store.delete(key_hash(key))
    if not ok:
        raise AssertionError("hub.resume gave back a different state")
    return ts, tr


def _floor_round(pipe: floors.Pipeline, raw: floors.RawStore, state: Any, fkey: str, check: bool) -> tuple[float, float]:
    aad = b"celery-persist-bench\0" + hashlib.sha256(fkey.encode()).hexdigest().encode()
    ts, _ = _timed(lambda: raw.put(fkey, pipe.seal(state, aad)))
    tr, back = _timed(lambda: pipe.open(raw.get(fkey), aad))
    ok = (not check) or back == state
    del back
    raw.delete(fkey)
    if not ok:
        raise AssertionError("the floor gave back a different state")
    return ts, tr
