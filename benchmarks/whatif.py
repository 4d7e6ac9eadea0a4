"""``--what-if NAME``: measure a proposed library change without editing the library.

Each entry patches celery-persist *in this benchmark process only*, the way a
proposal in ``benchmarks/proposals/`` would change the code, so its effect can
be measured in the same conditions as the unpatched run. Tables from such a
run are labelled; they are evidence for a proposal, not the library's figures.
"""

from __future__ import annotations

import functools
import gc
from collections.abc import Callable
from typing import Any

__all__ = ["WHAT_IFS", "apply"]


def _json_gc() -> None:
    """Proposal 01: pause the cyclic GC around JsonCodec.loads, as PickleCodec.loads does."""
    from celery_persist import codecs

    original = codecs.JsonCodec.loads
    if getattr(original, "_bench_patched", False):
        return

    @functools.wraps(original)
    def loads(self: Any, data: bytes) -> Any:
        enabled = gc.isenabled()
        gc.disable()
        try:
            return original(self, data)
        finally:
            if enabled:
                gc.enable()

    loads._bench_patched = True  # type: ignore[attr-defined]
    codecs.JsonCodec.loads = loads  # type: ignore[method-assign]


def _no_copy() -> None:
    """Proposal 03: NoCompression.decompress hands the payload view on instead of copying it."""
    from celery_persist import codecs
    from celery_persist.errors import IntegrityError

    def decompress(self: Any, data: Any, size: int) -> Any:
        if len(data) != size:
            raise IntegrityError("payload length does not match its header")
        return data

    codecs.NoCompression.decompress = decompress  # type: ignore[method-assign]


def _one_transition() -> None:
    """Proposal 02: hub.resume moves suspended -> resumed in one compare-and-set (no lease step)."""
    import time

    from celery_persist.hub import PersistenceHub
    from celery_persist.stores.base import Status

    def resume(self: Any, key: str, input: Any = None) -> Any:
        started = time.perf_counter()
        fp = self._check_key(key, "resume")
        now = self.clock()
        rec = self._get(key, fp, "resume")
        self._refuse(rec, fp, now, "resume")
        state = self._open_record(rec, fp)
        if not self.store.transition(rec.key_hash, {Status.SUSPENDED}, Status.RESUMED, due_at=now + self.retention, now=now):
            self._lost_race(rec.key_hash, fp, now, "resume")
        self._audit("claim", fp, "granted", seconds=time.perf_counter() - started, size=len(rec.blob))
        self._audit("resume", fp, "ok")
        return self._view(rec.replace(status=Status.RESUMED), key, state=state, input=input)

    PersistenceHub.resume = resume  # type: ignore[method-assign]


WHAT_IFS: dict[str, Callable[[], None]] = {"json-gc": _json_gc, "no-copy": _no_copy, "one-transition": _one_transition}


def apply(names: list[str]) -> None:
    for name in names:
        try:
            WHAT_IFS[name]()
        except KeyError:
            raise SystemExit(f"unknown --what-if {name!r}; choose from {', '.join(WHAT_IFS)}") from None
