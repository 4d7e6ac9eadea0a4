"""Waits benchmark: durable timers and event signals, real Celery worker and beat.

``python -m benchmarks.waits`` (``--quick`` for small N, ``--stores redis,postgresql``).

Per store (Redis, PostgreSQL), measured through ``celery -A benchmarks.celery_app worker -P
prefork -c 2`` subprocesses (and a real ``celery beat`` for the timers):

1. **Timer lateness.** N flows ``chain(celery_persist.sleep.s(until=T), cp_bench.stamp.s(...))``
   parked before T (all due at the same instant T); the beat entry ``celery-persist-timers``
   (``persist_timer_interval``, default 1 s) runs ``celery_persist.fire_timers``. ``stamp``
   records ``time.time()`` into Redis as it starts: lateness = start - T (p50/p99/max), fired
   (unique flows), duplicates, and how many started before T (must be 0).
2. **Signal fan-out.** One ``persist.signal(topic, key)`` waking F flows parked with
   ``await_event``: the call itself, and until every next step started.
3. **Signal among many waits.** One waiter per (topic, key) among 1,000 and among 1,000,000
   other waits on other keys (index records written with the hub's own record builder, as
   ``hub.save_indexed`` writes them, through ``store.put_many``), two stores side by side, signals
   interleaved: median ``persist.signal`` of K keys, and the lookup alone (``hub.indexed``, the
   library's 500-record page, and a 16-record page for comparison).

Isolation: broker and results in Redis db 12 under a per-stack namespace (queue name and
``global_keyprefix``), deleted at the end; stores under a unique prefix (Redis db 13 keys
``{wbench:<id>...}``, PostgreSQL tables ``wbench_<id>_*``), deleted / dropped at the end.
Workers and beat run in their own process groups and are stopped at the end.

Findings (full run of 2026-11-28 11:41, see benchmarks/README.md, "Waits"):
- Timers: goal MISSED by far. 10,000 due at once: p99 lateness 55 s (Redis) / 142 s (PostgreSQL),
  every timer fired exactly once, none early. A fire pass is serial, in the one pool process
  that took the ``fire_timers`` message: 182 / 71 timers/s in that run (load average 5-10 from
  other jobs; 280-350 / 210 per s on a quieter machine), so lateness ~ N / fire rate.
  cProfile of a pass (``--profile``, Redis, 5.6 ms per timer under the profiler): 75% is
  ``continue_flow``: the next step's publish (~1.5 ms), ``_send_events`` (two events through a
  fresh ``default_dispatcher`` per timer, ~1.6 ms), ``mark_as_done`` (~1 ms); kombu builds a new
  redis-py client per publish (3,000 ``Redis.__init__`` per 1,000 timers, ~0.5 s). PostgreSQL
  adds a commit per fire for the EXPIRED compare-and-set (``_move``, 2.7 ms quiet, 9 ms loaded)
  and, in the tree measured, one more for the history entry (``hub._history`` -> ``save_indexed``).
  To close the gap (~5,000 fires/s for 10,000 within 2 s): fire in parallel (the pass claims due
  records by chunk with one batched transition, then sends one ``fire`` task per chunk so every
  pool process and worker dispatches), and batch per chunk: one producer/connection for all
  publishes (pipelined), one event dispatcher per pass (or no task events for timers), backend
  writes pipelined, history entries in the same write as the transition. A serial pass at ~1 ms
  per timer floors at 10 s for 10,000.
- Signal among 1M: Redis met (1.06x) but both costs are inflated: ``hub.indexed`` reads a full
  500-record page (with blobs) past the prefix for every lookup, 34 ms of the 41 ms signal
  (page of 16: 2-3 ms). PostgreSQL MISSED (6.4x, lookup 209 ms at 1M): ``SQLStore.scan(cursor=...,
  with_blob=True)`` is a merge join whose blobs side walks ``<prefix>blobs_pkey`` from its start
  (the cursor bound is only on the records table), so a lookup costs O(rows before the prefix),
  whatever the page size. Repeating the bound on the blobs key (``blobs.key_hash > cursor``) takes
  it from 52 to 0.45 ms (page 16) at 300k rows. Every ``await_event`` park pays it too
  (``take_buffered`` walks the buffer prefix). Starting ``indexed`` with a small page (or giving
  ``scan`` an upper bound at the prefix's end) fixes the 500-record read on every store.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import math
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .celery_bench import REPO, _env_for, _redis_reason, _wait_ready, _Worker, drop_namespace, pct, restore_env
from .machine import format_machine, machine_info
from .report import fmt_ms, markdown_table
from .targets import _tcp_reason, env_url

STORES = ("redis", "postgresql")
TOPIC = "bench.event"

__all__ = ["main"]


def _progress(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- processes -------------------------------------------------------------------------------


class _Beat(_Worker):
    """``celery beat`` for the app the workers run, in its own process group (same stop as a worker)."""

    def start(self) -> None:
        env = {**os.environ, **self.env}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
        base = self.log.with_suffix("")
        cmd = [
            sys.executable, "-m", "celery", "-A", "benchmarks.celery_app", "beat",
            "-s", f"{base}.schedule", "--pidfile", f"{base}.pid", "--loglevel", "WARNING",
        ]  # fmt: skip
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


class Stack:
    """One store (unique prefix) with its own broker namespace, worker and, optionally, beat."""

    def __init__(self, label: str, store: str, url: str, prefix: str, redis_url: str, keys: str, tmp: Path) -> None:
        self.label, self.store, self.url, self.prefix, self.tmp = label, store, url, prefix, tmp
        self.ns = f"cp-waits-{secrets.token_hex(4)}"
        self.env = _env_for(self.ns, url, prefix, keys, redis_url)
        saved = {k: os.environ.get(k) for k in self.env}
        os.environ.update(self.env)
        try:
            from celery_persist import Persist

            from . import celery_app

            self.app = celery_app.make_app()
            self.persist = Persist(self.app)
            self.hub = self.persist.ready()  # tables before any worker starts
        finally:
            restore_env(saved)
        self.worker = _Worker(self.env, tmp / f"worker-{self.ns}.log", f"waits-{self.ns}@%h")
        self.beat: _Beat | None = None

    def start_worker(self) -> None:
        self.worker.start()

    def wait_worker(self) -> None:
        _wait_ready(self.app, self.worker)

    def start_beat(self) -> None:
        self.beat = _Beat(self.env, self.tmp / f"beat-{self.ns}.log", "beat")
        self.beat.start()

    def stop_beat(self) -> None:
        if self.beat is not None:
            self.beat.stop()

    def stamps_key(self, run: str) -> str:
        return f"{self.ns}:stamps:{run}"

    def sig(self, name: str, *args: Any, **kwargs: Any) -> Any:
        return self.app.signature(name, args=args, kwargs=kwargs)

    def tails(self) -> str:
        out = [f"--- worker {self.ns}:\n{self.worker.tail(20)}"]
        if self.beat is not None:
            out.append(f"--- beat {self.ns}:\n{self.beat.tail(10)}")
        return "\n".join(out)

    def close(self, r: Any) -> None:
        self.stop_beat()
        self.worker.stop()
        with contextlib.suppress(Exception):
            self.app.close()
        with contextlib.suppress(Exception):
            _drop_store(self.hub.store, self.url, self.prefix)
        with contextlib.suppress(Exception):
            self.hub.store.close()
        drop_namespace(r, self.ns)


def _drop_store(store: Any, url: str, prefix: str) -> None:
    """Drop the SQL tables, or delete the Redis keys of this prefix (streamed: there may be millions)."""
    drop = getattr(store, "drop", None)
    if callable(drop):
        drop()
        return
    if url.startswith(("redis://", "rediss://", "unix://")):
        import redis

        r = redis.Redis.from_url(url)
        try:
            batch: list[bytes] = []
            for k in r.scan_iter(match=f"{{{prefix}}}:*", count=5000):
                batch.append(k)
                if len(batch) >= 2000:
                    r.unlink(*batch)
                    batch.clear()
            if batch:
                r.unlink(*batch)
        finally:
            r.close()


# -- helpers -----------------------------------------------------------------------------------


def _stamps(r: Any, key: str) -> list[tuple[int, float]]:
    return [(int(f), float(s)) for f, s in (json.loads(x) for x in r.lrange(key, 0, -1))]


def _wait_stamps(r: Any, key: str, n: int, deadline: float, stack: Stack) -> None:
    while r.llen(key) < n:
        if time.time() > deadline:
            return
        if not stack.worker.alive():
            raise RuntimeError(f"worker died:\n{stack.tails()}")
        time.sleep(0.2)


def _count_indexed(hub: Any, prefix: str) -> int:
    return sum(1 for _ in hub.indexed(prefix))


def _count_parked_timers(hub: Any, wake_iso: str) -> int:
    from celery_persist.stores.base import Kind, Status

    n, cursor = 0, None
    while True:
        page = hub.store.scan(kind=Kind.SUSPENSION, status=Status.SUSPENDED, limit=1000, cursor=cursor)
        n += sum(1 for rec in page.items if rec.metadata.get("wake_at") == wake_iso)
        if page.next_cursor is None:
            return n
        cursor = page.next_cursor


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, tz=timezone.utc).isoformat()


def _timer_flow(stack: Stack, until: str, run: str, i: int) -> Any:
    from celery import chain

    return chain(stack.sig("celery_persist.sleep", until=until), stack.sig("cp_bench.stamp", run, i))


def _event_flow(stack: Stack, key: str, run: str, i: int) -> Any:
    from celery import chain

    return chain(stack.sig("celery_persist.await_event", TOPIC, key=key), stack.sig("cp_bench.stamp", run, i))


# -- 1. timers ----------------------------------------------------------------------------------


@dataclass
class TimerResult:
    store: str
    timers: int = 0
    interval: float = 1.0
    parked_at_t: int = 0
    park_seconds: float = float("nan")
    fired: int = 0
    duplicates: int = 0
    early: int = 0
    lateness: list[float] = field(default_factory=list)
    first_to_last: float = float("nan")
    floor: list[float] = field(default_factory=list)
    floor_span: float = float("nan")
    error: str | None = None
    profile: str = ""

    def goal_met(self) -> bool:
        return not self.error and self.fired == self.timers and not self.duplicates and pct(self.lateness, 99) <= self.interval + 1.0


def run_timers(stack: Stack, r: Any, n: int, progress: Callable[[str], None]) -> TimerResult:
    res = TimerResult(stack.store, timers=n)
    res.interval = float(stack.persist.config.timer_interval or 0)
    # Calibration: how fast do parks go (client sending, worker parking)? These wake in a day: never here.
    cal = max(20, min(200, n // 20))
    cal_iso = _iso(math.floor(time.time()) + 86400)
    t0 = time.monotonic()
    for i in range(cal):
        _timer_flow(stack, cal_iso, "cal", i).apply_async()
    while _count_parked_timers(stack.hub, cal_iso) < cal:
        if time.monotonic() - t0 > 120:
            raise RuntimeError(f"calibration timers not parked in 120 s:\n{stack.tails()}")
        time.sleep(0.5)
    rate = cal / (time.monotonic() - t0)
    T = float(math.ceil(time.time() + 1.6 * n / rate + 10))
    t_iso = _iso(T)
    progress(f"waits[{stack.store}]: parking {n} timers (~{rate:.0f}/s) due at {t_iso} ({T - time.time():.0f} s from now)")
    run = "timers"
    skey = stack.stamps_key(run)
    p0 = time.monotonic()
    for i in range(n):
        _timer_flow(stack, t_iso, run, i).apply_async()
    parked = 0
    while time.time() < T - 1.0:
        parked = _count_parked_timers(stack.hub, t_iso)
        if parked >= n:
            res.park_seconds = time.monotonic() - p0
            break
        time.sleep(1.0)
    res.parked_at_t = parked
    if parked < n:
        progress(f"waits[{stack.store}]: only {parked} of {n} timers parked 1 s before T")
    if stack.beat is None or not stack.beat.alive():
        raise RuntimeError(f"beat is not running:\n{stack.tails()}")
    progress(f"waits[{stack.store}]: all parked in {res.park_seconds:.0f} s; waiting for T and the fires")
    time.sleep(max(0.0, T - time.time()))
    _wait_stamps(r, skey, n, T + 60 + n * 0.1, stack)
    time.sleep(2 * max(res.interval, 1.0) + 2)  # late duplicates, if any, get a chance to show up
    stamps = _stamps(r, skey)
    first: dict[int, float] = {}
    for flow_id, started in stamps:
        first.setdefault(flow_id, started)
    res.fired = len(first)
    res.duplicates = len(stamps) - len(first)
    res.lateness = [s - T for s in first.values()]
    res.early = sum(1 for x in res.lateness if x < 0)
    if first:
        res.first_to_last = max(first.values()) - min(first.values())
    r.delete(skey)
    res.floor, res.floor_span = run_floor(stack, r, n, progress)
    return res


def run_floor(stack: Stack, r: Any, n: int, progress: Callable[[str], None]) -> tuple[list[float], float]:
    """The plain-Celery floor for the same measure: N ``stamp`` tasks published at once, no store.

    One client sends them pipelined through one producer (kombu's ``Producer.batch``, the
    best case for the sender) at T0; lateness = task start - T0, on the same worker.
    """
    run = "floor"
    skey = stack.stamps_key(run)
    progress(f"waits[{stack.store}]: plain Celery floor: {n} stamp tasks sent at once")
    t0 = time.time()
    with stack.app.producer_or_acquire() as producer, producer.batch():
        for i in range(n):
            stack.sig("cp_bench.stamp", None, run, i).apply_async(producer=producer)
    _wait_stamps(r, skey, n, t0 + 60 + n * 0.1, stack)
    starts = [started for _, started in _stamps(r, skey)]
    r.delete(skey)
    return [s - t0 for s in starts], (max(starts) - min(starts)) if starts else float("nan")


def profile_fire_pass(stack: Stack, r: Any, n: int, progress: Callable[[str], None]) -> str:
    """cProfile of one fire pass over ``n`` due timers, in this process (beat stopped): what dominates."""
    import cProfile
    import io
    import pstats

    stack.stop_beat()
    T = float(math.ceil(time.time() + max(15.0, n * 0.06)))  # ~20 parks/s even on a busy machine
    t_iso = _iso(T)
    for i in range(n):
        _timer_flow(stack, t_iso, "prof", i).apply_async()
    while _count_parked_timers(stack.hub, t_iso) < n:
        if time.time() > T - 0.5:
            break
        time.sleep(0.5)
    time.sleep(max(0.0, T - time.time()) + 0.05)
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    fired = stack.persist.cleanup()
    prof.disable()
    took = time.perf_counter() - t0
    buf = io.StringIO()
    per = took / max(fired, 1) * 1e3
    buf.write(f"fire pass over {fired} due timers ({stack.store}): {took:.2f} s, {per:.2f} ms per timer (under cProfile)\n")
    stats = pstats.Stats(prof, stream=buf)
    stats.sort_stats("cumulative").print_stats(40)
    stats.sort_stats("tottime").print_stats(15)
    _wait_stamps(r, stack.stamps_key("prof"), n, time.time() + 60, stack)
    r.delete(stack.stamps_key("prof"))
    progress(f"waits[{stack.store}]: profiled a fire pass of {fired} timers: {took:.2f} s")
    return buf.getvalue()


# -- 2. fan-out ---------------------------------------------------------------------------------


@dataclass
class FanoutResult:
    store: str
    flows: int = 0
    woken: int = 0
    call: float = float("nan")
    all_started: float = float("nan")
    starts: list[float] = field(default_factory=list)
    duplicates: int = 0
    error: str | None = None


def run_fanout(stack: Stack, r: Any, n: int, progress: Callable[[str], None]) -> FanoutResult:
    res = FanoutResult(stack.store, flows=n)
    run, key = "fanout", "order-fanout"
    skey = stack.stamps_key(run)
    prefix = stack.hub.index_prefix("event", TOPIC, key)
    for i in range(n):
        _event_flow(stack, key, run, i).apply_async()
    deadline = time.monotonic() + 60 + n * 0.2
    while _count_indexed(stack.hub, prefix) < n:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{n} event waits not indexed in time:\n{stack.tails()}")
        time.sleep(1.0)
    progress(f"waits[{stack.store}]: {n} flows wait on one (topic, key); signalling")
    t0 = time.time()
    res.woken = stack.persist.signal(TOPIC, key, {"paid": True})
    res.call = time.time() - t0
    _wait_stamps(r, skey, n, time.time() + 60 + n * 0.1, stack)
    time.sleep(1.0)
    stamps = _stamps(r, skey)
    first: dict[int, float] = {}
    for flow_id, started in stamps:
        first.setdefault(flow_id, started)
    res.duplicates = len(stamps) - len(first)
    res.starts = [s - t0 for s in first.values()]
    if len(first) == n:
        res.all_started = max(res.starts)
    else:
        res.error = f"only {len(first)} of {n} next steps started"
    r.delete(skey)
    return res


# -- 3. one signal among many waits -------------------------------------------------------------


@dataclass
class AmongResult:
    store: str
    others: int
    signal: list[float] = field(default_factory=list)
    lookup: list[float] = field(default_factory=list)
    lookup_small: list[float] = field(default_factory=list)
    woken: int = 0
    started: int = 0
    load_seconds: float = float("nan")
    error: str | None = None


def _write_others(hub: Any, count: int, progress: Callable[[str], None], label: str) -> None:
    """``count`` event-index records on other keys, exactly as ``hub.save_indexed`` builds them, put in batches."""
    from celery_persist.stores.base import Kind, Status

    now = hub.clock()
    batch = []
    t0 = time.monotonic()
    for i in range(count):
        kh = hub.index_prefix("event", TOPIC, f"other-{i}") + secrets.token_hex(20)
        state = {"journal": f"event:{uuid.uuid4()}", "hash": secrets.token_hex(32)}
        batch.append(hub._build(kh, Kind.CHECKPOINT, Status.ACTIVE, state, {"index": "event"}, now, None, kh[:12]))
        if len(batch) >= 5000:
            hub.store.put_many(batch)
            batch.clear()
            if (i + 1) % 100_000 == 0:
                progress(f"waits[{label}]: {i + 1:,} other waits written ({time.monotonic() - t0:.0f} s)")
    if batch:
        hub.store.put_many(batch)
    found = list(hub.indexed(hub.index_prefix("event", TOPIC, "other-0")))
    if len(found) != 1 or found[0][1].get("journal", "")[:6] != "event:":
        raise RuntimeError("the written index records do not read back through hub.indexed")


def _analyze(stack: Stack) -> None:
    """PostgreSQL: fresh statistics after a bulk load, as autovacuum would give a live table."""
    if stack.store != "postgresql":
        return
    import psycopg

    with psycopg.connect(stack.url, autocommit=True) as conn:
        for table in ("records", "blobs"):
            conn.execute(f'ANALYZE "{stack.prefix}{table}"')


def run_among(stacks: list[Stack], others: list[int], r: Any, k: int, progress: Callable[[str], None]) -> list[AmongResult]:
    results = [AmongResult(s.store, o) for s, o in zip(stacks, others, strict=True)]
    for stack, res in zip(stacks, results, strict=True):
        t0 = time.monotonic()
        _write_others(stack.hub, res.others, progress, f"{stack.store}/{res.others:,}")
        _analyze(stack)
        res.load_seconds = time.monotonic() - t0
        progress(f"waits[{stack.store}]: {res.others:,} other waits stored in {res.load_seconds:.0f} s")
    for stack in stacks:
        stack.start_worker()
    for stack in stacks:
        stack.wait_worker()
    keys = [f"w-{j}" for j in range(k)]
    prefixes = [stacks[0].hub.index_prefix("event", TOPIC, key) for key in keys]
    for stack in stacks:
        for j, key in enumerate(keys):
            _event_flow(stack, key, "among", j).apply_async()
    deadline = time.monotonic() + 120 + 2 * k
    for stack in stacks:
        for p in prefixes:
            while _count_indexed(stack.hub, p) < 1:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"waiters not indexed in time:\n{stack.tails()}")
                time.sleep(0.2)
    progress(f"waits: {k} waiters parked in each of {len(stacks)} stores; lookups, then signals (interleaved)")
    for j, p in enumerate(prefixes):
        order = list(zip(stacks, results, strict=True))
        if j % 2:
            order.reverse()
        for stack, res in order:
            t0 = time.perf_counter()
            found = _count_indexed(stack.hub, p)
            res.lookup.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            found_small = sum(1 for _ in stack.hub.indexed(p, batch=16))
            res.lookup_small.append(time.perf_counter() - t0)
            if (found, found_small) != (1, 1):
                res.error = f"lookup found {found} / {found_small} waiters on key {keys[j]}"
    for j, key in enumerate(keys):
        order = list(zip(stacks, results, strict=True))
        if j % 2:
            order.reverse()
        for stack, res in order:
            t0 = time.perf_counter()
            woken = stack.persist.signal(TOPIC, key, {"j": j})
            res.signal.append(time.perf_counter() - t0)
            res.woken += woken
    for stack, res in zip(stacks, results, strict=True):
        skey = stack.stamps_key("among")
        _wait_stamps(r, skey, k, time.time() + 60, stack)
        res.started = len({f for f, _ in _stamps(r, skey)})
        if res.woken != k or res.started != k:
            res.error = (res.error + "; " if res.error else "") + f"woken {res.woken}, next steps started {res.started} of {k}"
    return results


# -- driver -------------------------------------------------------------------------------------


@dataclass
class StoreRun:
    store: str
    timers: TimerResult | None = None
    fanout: FanoutResult | None = None
    among: list[AmongResult] = field(default_factory=list)
    error: str | None = None


def _store_target(store: str, rid: str) -> tuple[str, str, str | None]:
    """(url, prefix, reason to skip) of a fresh, uniquely named store."""
    tag = secrets.token_hex(3)
    if store == "redis":
        url = env_url("redis", "redis://127.0.0.1:6379/13")
        return url, f"wbench:{rid}:{tag}", _redis_reason(url)
    url = env_url("postgres", "postgresql://127.0.0.1/test")
    return url, f"wbench_{rid}_{tag}_", _tcp_reason(url, 5432)


def run_store(store: str, args: argparse.Namespace, redis_url: str, keys: str, tmp: Path, rid: str) -> StoreRun:
    import redis

    out = StoreRun(store)
    r = redis.Redis.from_url(redis_url)
    stacks: list[Stack] = []

    def new_stack(label: str) -> Stack:
        url, prefix, why = _store_target(store, rid)
        if why:
            raise RuntimeError(why)
        s = Stack(label, store, url, prefix, redis_url, keys, tmp)
        stacks.append(s)
        return s

    try:
        if "timers" in args.parts or "fanout" in args.parts:
            a = new_stack("a")
            a.start_worker()
            if "timers" in args.parts:
                a.start_beat()
            a.wait_worker()
            if "timers" in args.parts:
                try:
                    out.timers = run_timers(a, r, args.timers, _progress)
                except Exception as exc:  # noqa: BLE001 - reported in the table
                    out.timers = TimerResult(store, timers=args.timers, error=f"{type(exc).__name__}: {exc}")
                    _progress(a.tails())
                if args.profile:
                    out.timers.profile = profile_fire_pass(a, r, min(args.timers, 1000), _progress)
                a.stop_beat()
            if "fanout" in args.parts:
                try:
                    out.fanout = run_fanout(a, r, args.fanout, _progress)
                except Exception as exc:  # noqa: BLE001
                    out.fanout = FanoutResult(store, flows=args.fanout, error=f"{type(exc).__name__}: {exc}")
                    _progress(a.tails())
            a.close(r)
            stacks.remove(a)
        if "signal" in args.parts:
            among = [new_stack(f"among-{o}") for o in args.others]
            try:
                out.among = run_among(among, args.others, r, args.signals, _progress)
            except Exception as exc:  # noqa: BLE001
                out.among = [AmongResult(store, o, error=f"{type(exc).__name__}: {exc}") for o in args.others]
                for s in among:
                    _progress(s.tails())
    except Exception as exc:  # noqa: BLE001 - keep the other store
        out.error = f"{type(exc).__name__}: {exc}"
    finally:
        for s in stacks:
            s.close(r)
        r.close()
    return out


def _ms(x: float) -> str:
    return fmt_ms(x * 1e3) if math.isfinite(x) else "-"


def _s(x: float) -> str:
    return f"{x:.2f} s" if math.isfinite(x) else "-"


def tables(runs: list[StoreRun]) -> str:
    parts = []
    rows = []
    for run in runs:
        t = run.timers
        if t is None:
            continue
        if t.error and not t.lateness:
            rows.append([run.store, f"{t.timers:,}", "error: " + t.error[:90], "", "", "", "", "", "", "", "", "", ""])
            continue
        met = t.goal_met()
        rows.append(
            [
                run.store,
                f"{t.timers:,}",
                f"{t.parked_at_t:,}" + (f" ({t.park_seconds:.0f} s)" if math.isfinite(t.park_seconds) else ""),
                f"{t.fired:,}",
                str(t.duplicates),
                str(t.early),
                _s(pct(t.lateness, 50)),
                _s(pct(t.lateness, 99)),
                _s(max(t.lateness) if t.lateness else float("nan")),
                f"{t.fired / t.first_to_last:.0f}/s" if t.first_to_last > 0 else "-",
                ("met" if met else "MISSED") + f" (<= {t.interval + 1:.0f} s)",
                f"{_s(pct(t.floor, 50))} / {_s(pct(t.floor, 99))}" if t.floor else "-",
                f"{len(t.floor) / t.floor_span:.0f}/s" if t.floor and t.floor_span > 0 else "-",
            ]
        )
    if rows:
        parts.append(
            "#### Timers: N flows `sleep(until=T)`, lateness = next step start - T\n\n"
            "`floor`: the same N next steps as plain Celery tasks, published at once by one client (pipelined),\n"
            "on the same worker: lateness = start - send time. No Celery flow on this worker can start its\n"
            "next steps faster.\n\n"
            + markdown_table(
                [
                    "store",
                    "timers",
                    "parked before T",
                    "fired",
                    "dup",
                    "early",
                    "p50",
                    "p99",
                    "max",
                    "fire rate",
                    "goal p99",
                    "floor p50 / p99",
                    "floor rate",
                ],
                rows,
                "lrrrrrrrrrlrr",
            )
        )
    rows = []
    for run in runs:
        f = run.fanout
        if f is None:
            continue
        if f.error and not f.starts:
            rows.append([run.store, f"{f.flows:,}", "error: " + f.error[:90], "", "", "", ""])
            continue
        rows.append(
            [
                run.store,
                f"{f.flows:,}",
                f"{f.woken:,}",
                _s(f.call),
                f"{f.call / max(f.woken, 1) * 1e3:.1f} ms",
                _s(pct(f.starts, 50)),
                _s(f.all_started) + (f" ({f.error})" if f.error else "") + (f", {f.duplicates} dup" if f.duplicates else ""),
            ]
        )
    if rows:
        parts.append(
            "#### Fan-out: one `persist.signal(topic, key)`, F flows waiting (`await_event`)\n\n"
            + markdown_table(
                ["store", "flows", "woken", "signal() call", "per flow", "p50 next step start", "all next steps started"],
                rows,
                "lrrrrrr",
            )
        )
    rows = []
    for run in runs:
        base = None
        for a in run.among:
            if a.error and not a.signal:
                rows.append([run.store, f"{a.others:,}", "error: " + a.error[:90], "", "", "", "", ""])
                continue
            med = statistics.median(a.signal)
            base = med if base is None else base
            ratio = med / base
            goal = "" if a is run.among[0] else ("met" if ratio <= 1.5 else "MISSED") + " (<= 1.5x)"
            rows.append(
                [
                    run.store,
                    f"{a.others:,}",
                    _ms(med),
                    _ms(pct(a.signal, 90)),
                    _ms(statistics.median(a.lookup)),
                    _ms(statistics.median(a.lookup_small)),
                    f"{ratio:.2f}" + (f" {goal}" if goal else ""),
                    f"{a.woken}/{len(a.signal)}" + (f" ({a.error})" if a.error else ""),
                ]
            )
    if rows:
        parts.append(
            "#### One signal (1 waiter) among other stored waits (ms; median and p90 of K keys)\n\n"
            + markdown_table(
                [
                    "store",
                    "other waits",
                    "signal() p50",
                    "p90",
                    "lookup p50 (page 500)",
                    "lookup p50 (page 16)",
                    "ratio vs first",
                    "woken",
                ],
                rows,
                "lrrrrrrl",
            )
        )
    return "\n\n".join(parts)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.waits", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="small N: 500 timers, 100 fan-out flows, 1k vs 100k other waits")
    p.add_argument("--stores", default=",".join(STORES), help="comma list from redis,postgresql")
    p.add_argument("--parts", default="timers,fanout,signal", help="comma list from timers,fanout,signal")
    p.add_argument("--timers", type=int, default=None, help="timers due at the same time (default 10000; --quick 500)")
    p.add_argument("--fanout", type=int, default=None, help="flows woken by one signal (default 1000; --quick 100)")
    p.add_argument("--others", default=None, help="other waits, comma list (default 1000,1000000; --quick 1000,100000)")
    p.add_argument("--signals", type=int, default=50, help="signals (one waiter each) per store and count of other waits")
    p.add_argument("--profile", action="store_true", help="also cProfile one fire pass over min(N, 1000) timers (stderr)")
    p.add_argument("--json", dest="json_path", default=None, help="write every sample to this JSON file")
    args = p.parse_args(argv)
    args.stores = [("postgresql" if s == "postgres" else s) for s in (x.strip() for x in args.stores.split(",")) if s]
    bad = [s for s in args.stores if s not in STORES]
    if bad:
        p.error(f"unknown store(s) {bad}; choose from {','.join(STORES)}")
    args.parts = {x.strip() for x in args.parts.split(",") if x.strip()}
    args.timers = args.timers or (500 if args.quick else 10_000)
    args.fanout = args.fanout or (100 if args.quick else 1000)
    args.others = [int(x) for x in (args.others or ("1000,100000" if args.quick else "1000,1000000")).split(",")]
    return args


@contextlib.contextmanager
def _tmpdir() -> Iterator[Path]:
    import shutil

    d = tempfile.mkdtemp(prefix="cp-waits-bench-", dir="/tmp")
    try:
        yield Path(d)
    finally:
        shutil.rmtree(d, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    redis_url = os.environ.get("CP_BENCH_REDIS_URL", "redis://127.0.0.1:6379/12")
    started = time.time()
    info = machine_info()
    command = " ".join(["python -m benchmarks.waits", *(sys.argv[1:] if argv is None else argv)])
    print(f"celery-persist waits benchmark, {time.strftime('%Y-%m-%d %H:%M')}, `{command}`")
    print(format_machine(info))
    print(f"- Library: {_git_state()}\n", flush=True)
    reason = _redis_reason(redis_url)
    if reason:
        print(f"skipped: {reason}")
        return 1
    rid = secrets.token_hex(3)
    keys = "bench:" + base64.b64encode(os.urandom(32)).decode()
    saved = {"CELERY_PERSIST_KEYS": os.environ.get("CELERY_PERSIST_KEYS")}
    os.environ["CELERY_PERSIST_KEYS"] = keys
    runs = []
    try:
        with _tmpdir() as tmp:
            for store in args.stores:
                _progress(f"waits[{store}]: start")
                runs.append(run_store(store, args, redis_url, keys, tmp, rid))
    finally:
        restore_env(saved)
    print(tables(runs))
    for run in runs:
        if run.error:
            print(f"\n{run.store}: error: {run.error}")
        if run.timers is not None and run.timers.profile:
            print(f"\n{run.store}: fire pass profile\n{run.timers.profile}", file=sys.stderr)
    print(
        "\nGoals: p99 lateness <= persist_timer_interval + 1 s at 10,000 timers due; signal among 1M within 1.5x of among 1k "
        "(`ratio vs first`; lookup = `hub.indexed` alone)."
    )
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"Run took {time.time() - started:.0f} s; load average at the end: {load}.")
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump({"machine": info, "runs": [_asdict(r) for r in runs]}, f, indent=1, default=str)
    return 0


def _git_state() -> str:
    """The commit the run measured, and whether the library's files differed from it."""

    def git(*cmd: str) -> str:
        return subprocess.run(["git", *cmd], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()

    try:
        head, dirty = git("log", "-1", "--format=%h %cs"), git("status", "--porcelain", "celery_persist")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"commit {head}" + (f", {len(dirty.splitlines())} files of celery_persist/ modified" if dirty else "")


def _asdict(run: StoreRun) -> dict[str, Any]:
    import dataclasses

    return dataclasses.asdict(run)


if __name__ == "__main__":
    raise SystemExit(main())
