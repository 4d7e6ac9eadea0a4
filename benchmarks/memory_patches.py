"""BENCHMARK-ONLY patches for :mod:`benchmarks.memory`: proposed fixes, tried without editing ``celery_persist/``.

Each entry monkeypatches the library *in the worker process* (the pool
children inherit it through fork) the way a proposed change to
``celery_persist/`` would behave. Selected with ``--patch NAME`` on
``python -m benchmarks.memory`` (``CP_MEM_PATCH`` in the worker's
environment); output of a patched run is labelled as such. Nothing here is
imported by the library or its tests.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

PATCHES: dict[str, Callable[[], None]] = {}


def _break_park_cycle(sender: Any = None, retval: Any = None, state: str | None = None, **_: Any) -> None:
    """``task_postrun``: drop the traceback of the ``Ignore`` a park raised.

    Celery's tracer keeps ``I = TraceInfo(IGNORED, exc)`` and ``R = ExceptionInfo()``
    in ``trace_task``'s frame while ``exc.__traceback__`` points back at that frame:
    a reference cycle that only a full (generation 2) collection frees, holding
    billiard's pickleable traceback copy (``_Code._co_positions``: one tuple per
    bytecode instruction of every frame, ~0.4 MB for ``trace_task``) until then.
    Clearing ``__traceback__`` here (postrun runs inside ``trace_task``, after the
    ``except`` block) breaks the cycle: all of it is freed by reference counting
    as soon as ``fast_trace_task`` returns.
    """
    if state == "IGNORED" and isinstance(retval, BaseException) and getattr(sender, "name", "") == "celery_persist.await_input":
        retval.__traceback__ = None


def postrun_clear_traceback() -> None:
    """The proposed handlers.py change, as a separate receiver (the library is not edited)."""
    from celery import signals

    signals.task_postrun.connect(_break_park_cycle, weak=False, dispatch_uid="benchmarks.memory_patches.break_park_cycle")


PATCHES["postrun-clear-traceback"] = postrun_clear_traceback


def gc_after_park() -> None:
    """Comparison only (not proposed): a young-generation ``gc.collect(1)`` after every task."""
    import gc

    from celery import signals

    def collect(**_: Any) -> None:
        gc.collect(1)

    signals.task_postrun.connect(collect, weak=False, dispatch_uid="benchmarks.memory_patches.gc_after_task")


PATCHES["gc-young-after-task"] = gc_after_park


def apply(names: str) -> list[str]:
    """Apply the comma-separated patches ``names``; returns the names applied."""
    done = []
    for name in filter(None, (n.strip() for n in names.split(","))):
        if name not in PATCHES:
            raise SystemExit(f"unknown memory patch {name!r}; known: {sorted(PATCHES)}")
        PATCHES[name]()
        done.append(name)
    return done
