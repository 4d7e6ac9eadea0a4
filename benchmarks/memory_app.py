"""The Celery app of the memory benchmark: ``celery -A benchmarks.memory_app worker``.

Started by :mod:`benchmarks.memory` for both of its runs (parked flows and
plain chains), so both workers load exactly the same code: Celery, this
app, ``Persist(app)`` and its store binding. Configuration comes from the
environment, as for :mod:`benchmarks.celery_app`:

* ``CP_BENCH_REDIS_URL``: broker and result backend;
* ``CP_BENCH_NS``: queue name and Redis ``global_keyprefix``;
* ``CP_BENCH_STORE_URL`` / ``CP_BENCH_STORE_PREFIX``: the celery-persist store;
* ``CELERY_PERSIST_KEYS``: the run's random encryption key;
* ``CP_MEM_TRACEMALLOC``: frames to keep; when set, every pool child starts
  :mod:`tracemalloc` as it starts (investigation only: it slows tasks and
  inflates RSS);
* ``CP_MEM_PATCH``: comma-separated names of **benchmark-only** patches from
  :mod:`benchmarks.memory_patches`, applied in the worker (and so in its
  children) to try a proposed fix without editing ``celery_persist/``.

Tasks: ``cp_mem.step`` (returns its first argument) and ``cp_mem.probe``,
a debug task that reports on the pool child that runs it (pid, RSS, malloc
statistics, gc and object counts, and :mod:`tracemalloc` diffs between a
``mark`` and a later ``diff``).
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import gc
import os
import sys
import time
import tracemalloc
from collections.abc import Sequence
from typing import Any

from celery import Celery, signals

from celery_persist import Persist

from . import memory_patches

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/12"


def make_app() -> Celery:
    url = os.environ.get("CP_BENCH_REDIS_URL", DEFAULT_REDIS_URL)
    ns = os.environ.get("CP_BENCH_NS", "cp-mem")
    app = Celery("cp_mem", broker=url, backend=url, set_as_current=False)
    app.conf.update(
        task_default_queue=ns,
        broker_transport_options={"global_keyprefix": f"{ns}:"},
        result_backend_transport_options={"global_keyprefix": f"{ns}:"},
        result_expires=3600,
        worker_enable_remote_control=False,
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True,
        persist_store_url=os.environ.get("CP_BENCH_STORE_URL", "sqlite:////tmp/cp-mem.db"),
        persist_store_options={"prefix": os.environ["CP_BENCH_STORE_PREFIX"]} if os.environ.get("CP_BENCH_STORE_PREFIX") else {},
        persist_cleanup_interval=0,
    )
    return app


PATCHES = memory_patches.apply(os.environ.get("CP_MEM_PATCH", ""))
app = make_app()
persist = Persist(app)


@app.task(name="cp_mem.step")
def step(value: Any = None) -> Any:
    return value


# -- the probe -----------------------------------------------------------------------------------

_mark: dict[str, Any] = {}


@signals.worker_process_init.connect(weak=False)
def _start_tracemalloc(**_: Any) -> None:
    frames = int(os.environ.get("CP_MEM_TRACEMALLOC") or 0)
    if frames and not tracemalloc.is_tracing():
        tracemalloc.start(frames)


def _proc_status(pid: int | str = "self") -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                name, _, rest = line.partition(":")
                if name in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "VmData", "Threads"):
                    out[name] = int(rest.split()[0])
    except OSError:
        pass
    try:
        out["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        pass
    return out


class _Mallinfo2(ctypes.Structure):
    _fields_ = [
        (n, ctypes.c_size_t)
        for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")
    ]


def _mallinfo() -> dict[str, int]:
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _Mallinfo2
        mi = libc.mallinfo2()
        return {f[0]: int(getattr(mi, f[0])) for f in _Mallinfo2._fields_}
    except (OSError, AttributeError):
        return {}


def _maps(top: int) -> dict[str, Any]:
    """Resident memory per mapping (``/proc/self/smaps``): the biggest ones, and anonymous ones grouped by size."""
    maps: list[dict[str, Any]] = []
    cur: dict[str, Any] | None = None
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if head and "-" in head[0] and not head[0].endswith(":"):
                lo, hi = (int(x, 16) for x in head[0].split("-"))
                cur = {
                    "range": head[0],
                    "size_kb": (hi - lo) // 1024,
                    "name": " ".join(head[5:]) if len(head) > 5 else "[anon]",
                    "rss_kb": 0,
                }
                maps.append(cur)
            elif cur is not None and head and head[0] == "Rss:":
                cur["rss_kb"] = int(head[1])
    by_name: collections.Counter[str] = collections.Counter()
    anon_sizes: collections.Counter[int] = collections.Counter()
    anon_rss: collections.Counter[int] = collections.Counter()
    for m in maps:
        by_name[m["name"]] += m["rss_kb"]
        if m["name"] == "[anon]":
            anon_sizes[m["size_kb"]] += 1
            anon_rss[m["size_kb"]] += m["rss_kb"]
    return {
        "count": len(maps),
        "by_name_kb": by_name.most_common(top),
        "anon_by_size": sorted(((sz, anon_sizes[sz], anon_rss[sz]) for sz in anon_sizes), key=lambda x: -x[2])[:top],
        "biggest": sorted(maps, key=lambda m: -m["rss_kb"])[:top],
    }


def _pymalloc_stats() -> dict[str, Any]:
    """The summary lines of ``sys._debugmallocstats()`` (it writes to fd 2; captured through a temp file)."""
    import tempfile

    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            sys._debugmallocstats()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        tmp.seek(0)
        text = tmp.read().decode(errors="replace")
    out: dict[str, Any] = {}
    for line in text.splitlines():
        name, sep, value = line.rpartition("=")
        if sep and name.strip().startswith("#") or name.strip().startswith("bytes in"):
            with contextlib.suppress(ValueError):
                out[name.strip()] = int(value.strip().replace(",", ""))
    return out


def _type_counts() -> collections.Counter[str]:
    return collections.Counter(f"{type(o).__module__}.{type(o).__qualname__}" for o in gc.get_objects())


def _fmt_frame(tb: Sequence[tracemalloc.Frame]) -> str:
    site = os.sep + "site-packages" + os.sep
    parts = []
    for fr in tb:
        fn = fr.filename
        if site in fn:
            fn = fn.split(site, 1)[1]
        elif "/work/main/" in fn:
            fn = fn.split("/work/main/", 1)[1]
        parts.append(f"{fn}:{fr.lineno}")
    return " > ".join(parts)  # oldest frame first, the allocating line last


def _snapshot() -> tracemalloc.Snapshot:
    # No filter_traces(): with hundreds of thousands of traces it takes minutes on this VM.
    return tracemalloc.take_snapshot()


@app.task(name="cp_mem.probe")
def probe(
    action: str = "info", top: int = 25, hold: float = 0.0, group_by: str = "traceback", depth: int = 8, collect: bool = True
) -> dict[str, Any]:
    """Report on this pool child.

    ``info``: pid, /proc status, malloc statistics, gc counts.
    ``mark``: also take a tracemalloc snapshot and an object-type census to diff against later.
    ``diff``: the top ``top`` allocation sites (``group_by`` lineno or traceback) grown since
    ``mark``, and the object types whose count grew most; with ``collect=False`` the cyclic
    garbage still waiting for the collector is counted too (what it holds, and where it was allocated).
    ``garbage``: what the next full collection would free, by type, and how much memory that is.
    ``trim``: ``malloc_trim(0)`` then ``info``: RSS that drops was free memory malloc kept.
    ``hold`` seconds of sleep at the end keep this child busy, so a probe sent at the same
    time reaches the other child.
    """
    out: dict[str, Any] = {
        "pid": os.getpid(),
        "action": action,
        "gc_count": gc.get_count(),
        "gc_stats": gc.get_stats(),
        "gc_threshold": gc.get_threshold(),
    }
    if action == "garbage":
        # What the next collection would free, by type (DEBUG_SAVEALL keeps it in gc.garbage for us).
        out["status_before_collect"] = _proc_status()
        out["pymalloc_before_collect"] = _pymalloc_stats()
        out["mallinfo_before_collect"] = _mallinfo()
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            out["unreachable"] = gc.collect()
            census = collections.Counter(f"{type(o).__module__}.{type(o).__qualname__}" for o in gc.garbage)
            out["garbage_types"] = census.most_common(top)
            out["garbage_frames"] = collections.Counter(
                f"{o.f_code.co_filename.rsplit('site-packages/', 1)[-1]}:{o.f_code.co_name}"
                for o in gc.garbage
                if type(o).__name__ == "frame"
            ).most_common(top)
            out["garbage_exceptions"] = collections.Counter(
                type(o).__qualname__ for o in gc.garbage if isinstance(o, BaseException)
            ).most_common(top)
        finally:
            gc.garbage.clear()
            gc.set_debug(0)
    if collect:
        gc.collect()
    if action == "trim":
        before = _proc_status()
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        out["rss_before_trim_kb"] = before.get("VmRSS")
    out["status"] = _proc_status()
    out["mallinfo"] = _mallinfo()
    out["gc_objects"] = len(gc.get_objects())
    out["gc_garbage"] = len(gc.garbage)
    out["tracing"] = tracemalloc.is_tracing()
    out["modules"] = len(sys.modules)
    out["library"] = os.path.dirname(sys.modules["celery_persist"].__file__ or "")
    out["patches"] = PATCHES
    if action in ("maps", "trim", "garbage"):
        out["maps"] = _maps(top)
        out["pymalloc"] = _pymalloc_stats()
    if tracemalloc.is_tracing():
        out["traced"] = tracemalloc.get_traced_memory()
    if action == "mark":
        if tracemalloc.is_tracing():
            _mark["snap"] = _snapshot()
        _mark["types"] = _type_counts()
        _mark["t"] = time.time()
    elif action == "diff":
        if tracemalloc.is_tracing() and "snap" in _mark:
            snap = _snapshot()
            stats = snap.compare_to(_mark["snap"], group_by)
            stats.sort(key=lambda s: s.size_diff, reverse=True)
            out["top"] = [
                {
                    "size_diff": s.size_diff,
                    "count_diff": s.count_diff,
                    "size": s.size,
                    "where": _fmt_frame(s.traceback[-depth:] if group_by == "traceback" else s.traceback),
                }
                for s in stats[:top]
            ]
            out["traced_diff"] = sum(s.size_diff for s in stats)
        if "types" in _mark:
            now = _type_counts()
            grown = now.copy()
            grown.subtract(_mark["types"])
            out["types"] = [(k, v, now[k]) for k, v in grown.most_common(top) if v > 0]
    if hold:
        time.sleep(hold)
    return out
