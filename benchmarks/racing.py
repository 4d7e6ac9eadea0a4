"""Racing resumers through a real worker: does every parked flow continue exactly once?

``python -m benchmarks.racing`` (``--quick`` for 500 flows; ``--stores``,
``--flows``, ``--racers``, ``--json FILE``).

Per store (Redis, PostgreSQL), a real ``celery worker`` subprocess (prefork,
two children, as :mod:`benchmarks.celery_bench` starts it) serves a queue of
its own. This process parks N flows ``chain(noop(i), await_input, stamp)``
and collects every suspension key: the park phase, timed from the first
``apply_async`` to the last key in hand.

Then R resumer processes, each with its own app and ``Persist`` built from
the same environment, are released together. Every one of them holds *all*
N keys, shuffled in an order of its own, and feeds them to
``persist.resume_many`` 100 at a time with the flow's index as input, so
each key is fought over by R claimants at once, from different processes
and connections. Each racer counts its outcomes: won (an ``AsyncResult``:
this process sent the flow on), lost (``AlreadyResumed``) and anything else.
The resume phase is timed from the release to the moment the last ``stamp``
task started (``stamp`` records its flow index and ``time.time()`` into a
Redis list when it starts).

Verified, after all N stamps arrived and a further ~2 s of watching for
late duplicates: each flow index appears in the stamps exactly once (no
duplicate continuation, none lost); the racers' wins add up to exactly N,
no flow won twice; each flow's final result is its own index. A failure is
reported in the table's verdict and the next store still runs.

Everything (worker, resumers, Redis, PostgreSQL, this process) shares the
same small machine, so the rates include that contention; the load average
is printed at the start and the end.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import multiprocessing as mp
import os
import queue
import random
import secrets
import signal
import sys
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .celery_bench import _env_for, _flow, _tmpdir, _wait_ready, _Worker, close_run, restore_env

__all__ = ["RaceResult", "run_racing", "racing_table", "main"]

#: Keys per ``persist.resume_many`` call in each racer.
BATCH = 100
#: Seconds to keep watching the stamps after the N-th arrived, for late duplicates.
OBSERVE_SECONDS = 2.0
#: Seconds a racer may take to import Celery, build its app and open its store.
RACER_SETUP_TIMEOUT = 120.0
#: Seconds without a new continuation, once every racer exited, before giving up on the rest.
STALL_SECONDS = 60.0
#: Error reprs kept per racer.
KEEP_ERRORS = 5
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/12"


def _phase_timeout(n: int) -> float:
    """A generous deadline for a phase over ``n`` flows (the worker runs ~hundreds of tasks a second)."""
    return 120.0 + 0.1 * n


def _progress(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _loadavg() -> tuple[float, float, float]:
    try:
        return os.getloadavg()
    except OSError:
        return (float("nan"),) * 3


@dataclass
class RacerReport:
    """What one resumer process saw."""

    racer: int
    won: list[int] = field(default_factory=list)
    lost: int = 0
    other: int = 0
    other_kinds: dict[str, int] = field(default_factory=dict)
    other_reprs: list[str] = field(default_factory=list)
    started: float = float("nan")
    finished: float = float("nan")
    error: str | None = None


@dataclass
class RaceResult:
    store: str
    flows: int
    racers: int
    park_seconds: float = float("nan")
    resume_seconds: float = float("nan")
    racers_done_seconds: float = float("nan")
    won: int = 0
    lost: int = 0
    other: int = 0
    other_kinds: dict[str, int] = field(default_factory=dict)
    other_reprs: list[str] = field(default_factory=list)
    won_twice: int = 0
    not_won: int = 0
    continuations: int = 0
    duplicates: int = 0
    missing: int = 0
    strangers: int = 0
    results_checked: int = 0
    wrong_results: int = 0
    unfinished_results: int = 0
    result_errors: list[str] = field(default_factory=list)
    load_before: tuple[float, float, float] = (float("nan"),) * 3
    load_after: tuple[float, float, float] = (float("nan"),) * 3
    wall_seconds: float = float("nan")
    error: str | None = None

    def problems(self) -> list[str]:
        out = []
        if self.error:
            out.append(f"error: {self.error}")
        if self.duplicates:
            out.append(f"{self.duplicates} duplicate continuations")
        if self.missing:
            out.append(f"{self.missing} flows never continued")
        if self.strangers:
            out.append(f"{self.strangers} stamps of unknown flows")
        if self.won != self.flows and not self.error:
            out.append(f"won {self.won} != {self.flows}")
        if self.won_twice:
            out.append(f"{self.won_twice} flows won by more than one racer")
        if self.other:
            out.append(f"{self.other} other errors ({', '.join(f'{k} x{v}' for k, v in sorted(self.other_kinds.items()))})")
        if self.wrong_results:
            out.append(f"{self.wrong_results} wrong final results")
        if self.unfinished_results:
            out.append(f"{self.unfinished_results} final results not available")
        if not self.error and self.results_checked != self.flows:
            out.append(f"only {self.results_checked} of {self.flows} results checked")
        return out

    def verdict(self) -> str:
        problems = self.problems()
        return "exactly once" if not problems else "; ".join(problems)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["verdict"] = self.verdict()
        d["park_rate"] = self.flows / self.park_seconds if self.park_seconds > 0 else float("nan")
        d["resume_rate"] = self.flows / self.resume_seconds if self.resume_seconds > 0 else float("nan")
        return d


# -- the resumer processes ------------------------------------------------------------------------


def _racer(
    idx: int,
    env: dict[str, str],
    keys: list[str],
    seed: int,
    barrier: Any,
    out: Any,
) -> None:
    """One resumer: build an app and Persist from ``env``, wait for the start, resume every key in its own order."""
    report = RacerReport(idx)
    try:
        os.environ.update(env)
        from celery_persist import AlreadyResumed, Persist

        from . import celery_app

        app = celery_app.make_app()
        persist = Persist(app)
        persist.ready()
        order = list(range(len(keys)))
        random.Random(seed).shuffle(order)
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which aborts the race
        report.error = f"setup: {exc!r}"
        out.put(asdict(report))
        barrier.abort()
        return
    try:
        barrier.wait(timeout=RACER_SETUP_TIMEOUT)
    except threading.BrokenBarrierError:
        report.error = "the start barrier broke (another racer or the parent failed)"
        out.put(asdict(report))
        return
    kinds: Counter[str] = Counter()
    report.started = time.time()
    try:
        for start in range(0, len(order), BATCH):
            chunk = order[start : start + BATCH]
            try:
                outcomes: list[Any] = persist.resume_many([(keys[i], i) for i in chunk], batch=BATCH)
            except Exception as exc:  # noqa: BLE001 - resume_many should not raise; count it against the whole chunk
                outcomes = [exc] * len(chunk)
            for i, outcome in zip(chunk, outcomes, strict=True):
                if isinstance(outcome, AlreadyResumed):
                    report.lost += 1
                elif isinstance(outcome, BaseException) or outcome is None:
                    report.other += 1
                    kinds[type(outcome).__name__] += 1
                    if len(report.other_reprs) < KEEP_ERRORS:
                        report.other_reprs.append(f"flow {i}: {outcome!r}")
                else:
                    report.won.append(i)
    except Exception as exc:  # noqa: BLE001
        report.error = f"racing: {exc!r}"
    report.finished = time.time()
    report.other_kinds = dict(kinds)
    with contextlib.suppress(Exception):
        app.close()
    with contextlib.suppress(Exception):
        persist.hub.store.close()
    out.put(asdict(report))


def _collect(out: Any, procs: list[Any], n: int, deadline: float) -> list[RacerReport]:
    """Read ``n`` racer reports from ``out`` (before joining: a full pipe would block the child)."""
    reports: list[RacerReport] = []
    while len(reports) < n:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        try:
            d = out.get(timeout=min(1.0, remaining))
        except queue.Empty:
            if not any(p.is_alive() for p in procs) and out.empty():
                break  # every racer exited; whoever did not report crashed
            continue
        reports.append(RacerReport(**d))
    return reports


# -- one store ------------------------------------------------------------------------------------


def _race_store(
    name: str,
    store_url: str,
    prefix: str,
    flows: int,
    racers: int,
    redis_url: str,
    log_dir: Path,
    context: str,
) -> RaceResult:
    import redis

    res = RaceResult(name, flows, racers, load_before=_loadavg())
    wall0 = time.monotonic()
    rid = secrets.token_hex(4)
    ns = f"cp-race-{rid}"
    enc = "bench:" + base64.b64encode(os.urandom(32)).decode()
    env = _env_for(ns, store_url, prefix, enc, redis_url)
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    r = redis.Redis.from_url(redis_url)
    worker = _Worker(env, log_dir / f"worker-race-{name}.log", f"race-{rid}@%h")
    from celery_persist import Persist

    from . import celery_app

    run = f"race-{rid}"
    skey = celery_app.stamps_key(run)
    app = celery_app.make_app()
    persist = Persist(app)
    procs: list[Any] = []
    try:
        persist.ready()  # tables before the worker starts
        worker.start()
        _wait_ready(app, worker)

        # 1. Park N flows and collect every key.
        _progress(f"racing[{name}]: worker ready; parking {flows} flows")
        deadline = time.monotonic() + _phase_timeout(flows)
        t0 = time.perf_counter()
        parked = [_flow(app, run, i).apply_async() for i in range(flows)]
        keys = [persist.suspension_key(p, timeout=max(1.0, deadline - time.monotonic()), interval=0.005) for p in parked]
        res.park_seconds = time.perf_counter() - t0
        if len(set(keys)) != flows:
            raise RuntimeError(f"{flows - len(set(keys))} suspension keys repeated")
        _progress(f"racing[{name}]: parked {flows} in {res.park_seconds:.1f} s; starting {racers} resumer processes")

        # 2. R resumers, all holding all N keys, released together.
        ctx: Any = mp.get_context(context)  # BaseContext lacks Process in the stubs
        barrier = ctx.Barrier(racers + 1)
        out = ctx.Queue()
        seed = secrets.randbits(32)
        procs = [ctx.Process(target=_racer, args=(j, env, keys, seed + j, barrier, out), name=f"racer-{j}") for j in range(racers)]
        for p in procs:
            p.start()
        try:
            barrier.wait(timeout=RACER_SETUP_TIMEOUT)
        except threading.BrokenBarrierError:
            early = _collect(out, procs, racers, time.monotonic() + 10)
            why = "; ".join(f"racer {x.racer}: {x.error}" for x in early if x.error) or "a racer did not get ready"
            raise RuntimeError(f"the race did not start: {why}") from None
        start_wall = time.time()
        _progress(f"racing[{name}]: {racers} racers released, each resuming all {flows} keys")

        # 3. Wait (with a deadline) until N continuations started, then watch a little longer.
        deadline = time.monotonic() + _phase_timeout(flows)
        count, moved = 0, time.monotonic()
        while count < flows:
            now = time.monotonic()
            if now >= deadline:
                _progress(f"racing[{name}]: only {count} of {flows} continuations within the deadline")
                break
            if not worker.alive():
                raise RuntimeError(f"the worker died:\n{worker.tail()}")
            if now - moved > STALL_SECONDS and not any(p.is_alive() for p in procs):
                _progress(f"racing[{name}]: racers done and no continuation for {STALL_SECONDS:.0f} s: {count} of {flows}")
                break
            time.sleep(0.02)
            n = r.llen(skey)
            if n != count:
                count, moved = n, time.monotonic()
        reports = _collect(out, procs, racers, time.monotonic() + _phase_timeout(flows))
        for p in procs:
            p.join(timeout=30)
        time.sleep(OBSERVE_SECONDS)  # the observation window: a late duplicate would land here

        # 4. Verify.
        raw = r.lrange(skey, 0, -1)
        stamps = [json.loads(x) for x in raw]
        res.continuations = len(stamps)
        seen: Counter[int] = Counter(int(f) for f, _ in stamps)
        res.duplicates = sum(c - 1 for f, c in seen.items() if c > 1)
        res.strangers = sum(c for f, c in seen.items() if not 0 <= f < flows)
        res.missing = sum(1 for i in range(flows) if seen[i] == 0)
        if stamps:
            res.resume_seconds = max(float(t) for _, t in stamps) - start_wall

        if len(reports) < racers:
            missing_racers = sorted(set(range(racers)) - {x.racer for x in reports})
            codes = {p.name: p.exitcode for p in procs}
            res.error = f"racers {missing_racers} did not report (exit codes {codes})"
        wins: Counter[int] = Counter()
        kinds: Counter[str] = Counter()
        for rep in reports:
            wins.update(rep.won)
            res.won += len(rep.won)
            res.lost += rep.lost
            res.other += rep.other
            kinds.update(rep.other_kinds)
            res.other_reprs.extend(f"racer {rep.racer}: {x}" for x in rep.other_reprs)
            if rep.error:
                res.error = (res.error + "; " if res.error else "") + f"racer {rep.racer}: {rep.error}"
        res.other_kinds = dict(kinds)
        res.won_twice = sum(1 for c in wins.values() if c > 1)
        res.not_won = sum(1 for i in range(flows) if wins[i] == 0)
        finished = [x.finished for x in reports if x.finished == x.finished]
        if finished:
            res.racers_done_seconds = max(finished) - start_wall

        deadline = time.monotonic() + _phase_timeout(flows)
        for i, p in enumerate(parked):
            try:
                got = p.get(timeout=max(1.0, deadline - time.monotonic()))
            except Exception as exc:  # noqa: BLE001 - counted, the rest still checked
                res.unfinished_results += 1
                if len(res.result_errors) < KEEP_ERRORS:
                    res.result_errors.append(f"flow {i}: {exc!r}")
                continue
            res.results_checked += 1
            if got != i:
                res.wrong_results += 1
                if len(res.result_errors) < KEEP_ERRORS:
                    res.result_errors.append(f"flow {i}: result {got!r}")
    except Exception as exc:  # noqa: BLE001 - reported in the table, the next store still runs
        res.error = f"{type(exc).__name__}: {exc}"
        tail = worker.tail()
        if tail:
            _progress(f"racing[{name}]: worker log tail:\n{tail}")
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
            p.join(timeout=10)
        close_run(worker, app, persist, r, ns)
        with contextlib.suppress(Exception):
            r.delete(skey)
        r.close()
        restore_env(saved)
    res.load_after = _loadavg()
    res.wall_seconds = time.monotonic() - wall0
    return res


def run_racing(stores: list[str], flows: int, racers: int, redis_url: str | None = None, context: str = "spawn") -> list[RaceResult]:
    from .targets import _tcp_reason, env_url

    redis_url = redis_url or os.environ.get("CP_BENCH_REDIS_URL", DEFAULT_REDIS_URL)
    out: list[RaceResult] = []
    with _tmpdir() as tmp:
        for store in stores:
            rid = secrets.token_hex(3)
            if store == "redis":
                url, prefix = env_url("redis", "redis://127.0.0.1:6379/13"), f"bench:{rid}:"
            elif store == "postgres":
                url, prefix = env_url("postgres", "postgresql://127.0.0.1/test"), f"bench_{rid}_"
                why = _tcp_reason(url, 5432)
                if why:
                    out.append(RaceResult(store, flows, racers, error=why))
                    continue
            else:
                out.append(RaceResult(store, flows, racers, error=f"no racing benchmark set up for store {store!r}"))
                continue
            _progress(f"racing[{store}]: {flows} flows, {racers} racers, store {url} prefix {prefix}")
            res = _race_store(store, url, prefix, flows, racers, redis_url, Path(tmp), context)
            _progress(f"racing[{store}]: {res.verdict()} ({res.wall_seconds:.0f} s)")
            out.append(res)
    return out


# -- the table ------------------------------------------------------------------------------------


def _rate(n: int, seconds: float) -> str:
    if not seconds == seconds or seconds <= 0:
        return "-"
    return f"{seconds:.1f} s / {n / seconds:,.0f}/s"


def racing_table(results: list[RaceResult]) -> str:
    from .report import markdown_table

    header = [
        "store",
        "flows",
        "racers",
        "park (time / flows per s)",
        "resume, all racers (time / flows per s)",
        "won",
        "lost (AlreadyResumed)",
        "other errors",
        "continuations run",
        "duplicates",
        "missing",
        "verdict",
    ]
    rows = [
        [
            r.store,
            f"{r.flows:,}",
            str(r.racers),
            _rate(r.flows, r.park_seconds),
            _rate(r.flows, r.resume_seconds),
            f"{r.won:,}",
            f"{r.lost:,}",
            f"{r.other:,}",
            f"{r.continuations:,}",
            f"{r.duplicates:,}",
            f"{r.missing:,}",
            r.verdict(),
        ]
        for r in results
    ]
    return markdown_table(header, rows, "lrrrrrrrrrrl")


def _fmt_load(load: tuple[float, float, float]) -> str:
    return " / ".join(f"{x:.2f}" for x in load) + " (1 / 5 / 15 min)"


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.racing", description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--stores", default="redis,postgres", help="comma-separated: redis, postgres (default both)")
    p.add_argument("--flows", type=int, default=10_000, help="flows parked and raced per store (default 10000)")
    p.add_argument("--racers", type=int, default=3, help="resumer processes, each holding every key (default 3)")
    p.add_argument("--quick", action="store_true", help="500 flows")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the results as JSON")
    p.add_argument("--context", choices=("spawn", "fork", "forkserver"), default="spawn", help="multiprocessing start method")
    args = p.parse_args(argv)
    if args.quick:
        args.flows = 500
    if args.flows < 1 or args.racers < 1:
        p.error("--flows and --racers must be at least 1")
    return args


def _exit_on_term(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so each store's ``finally`` still stops the worker and drops its data.
    signal.signal(signal.SIGTERM, _exit_on_term)
    stores = [s.strip() for s in args.stores.split(",") if s.strip()]
    load_start = _loadavg()
    t0 = time.monotonic()
    print(f"load average at start: {_fmt_load(load_start)}", flush=True)
    results = run_racing(stores, args.flows, args.racers, context=args.context)
    load_end = _loadavg()
    print()
    print(f"#### {args.flows:,} flows parked and resumed through a real worker, {args.racers} racing resumer processes per store\n")
    print(racing_table(results))
    print()
    for r in results:
        for line in r.other_reprs[:KEEP_ERRORS] + r.result_errors[:KEEP_ERRORS]:
            print(f"- {r.store}: {line}")
    print(f"load average at start: {_fmt_load(load_start)}")
    print(f"load average at end:   {_fmt_load(load_end)}")
    print(f"total time: {time.monotonic() - t0:.0f} s ({', '.join(f'{r.store} {r.wall_seconds:.0f} s' for r in results)})")
    if args.json:
        doc = {
            "flows": args.flows,
            "racers": args.racers,
            "batch": BATCH,
            "context": args.context,
            "load_start": load_start,
            "load_end": load_end,
            "results": [r.as_dict() for r in results],
        }
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
    return 0 if all(not r.problems() for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
