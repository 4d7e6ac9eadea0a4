"""The reference store, in-process; ``corrupt`` plants records whose fields are not what their types say."""

from __future__ import annotations

from typing import Any

from . import BAD_METADATA, BAD_STATUS, Backend


def corrupt(store: Any, key_hash: str, how: str) -> None:
    """Replace the kept record with one that does not decode (memory keeps records, not rows)."""
    with store._lock:
        rec = store._records[key_hash]
        changes = {"metadata": {"metadata": BAD_METADATA}, "status": {"status": BAD_STATUS}, "field": {"created_at": None}}[how]
        store._records[key_hash] = rec.replace(**changes)


BACKENDS = [Backend("memory", url=lambda: "memory://contract", cross_process=False, corrupt=corrupt)]
