"""Celery benchmark: a real prefork worker, Redis broker and backend, SQLite and PostgreSQL stores.

``python -m benchmarks --celery`` (``--quick`` for a smoke run).

Per store, one worker subprocess (``celery -A benchmarks.celery_app worker -P
prefork -c 2``) serves a queue of its own; broker and result keys carry the
run's ``global_keyprefix`` in Redis db 12, and only those keys are deleted at
the end. Measured in the same run, interleaved flow by flow:

* resume -> next task start: ``persist.resume(key, input)`` on a parked
  ``chain(noop, await_input, stamp)``; ``stamp`` records ``time.time()`` into
  Redis when it starts (small state: the flow is ~1-2 KB once captured);
* plain dispatch -> task start: ``stamp.apply_async()``, the same stamp: what
  Celery alone costs to get a task started;
* ``noop.delay().get()``: a full Celery round trip, as PERF-NOTES quotes it;

then throughput: 2,000 flows parked and resumed (first ``apply_async`` to the
last final result), beside 2,000 plain 3-task chains without parking.

The worker and this process both run on the same 2-core machine as Redis and
PostgreSQL, so the figures include that contention.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
WORKER_START_TIMEOUT = 60.0

__all__ = ["CeleryResult", "run_celery_bench", "celery_tables"]


@dataclass
class CeleryResult:
    store: str
    flows: int = 0
    resume_to_start: list[float] = field(default_factory=list)
    resume_call: list[float] = field(default_factory=list)
    delay_to_start: list[float] = field(default_factory=list)
    noop_roundtrip: list[float] = field(default_factory=list)
    throughput_flows: int = 0
    throughput_seconds: float = float("nan")
    many_seconds: float = float("nan")
    baseline_chains: int = 0
    baseline_seconds: float = float("nan")
    rounds: int = 0
    error: str | None = None
    profile: str = ""

    def as_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        for name in ("resume_to_start", "resume_call", "delay_to_start", "noop_roundtrip"):
            xs = getattr(self, name)
            d[f"{name}_p50_ms"] = pct(xs, 50) * 1e3
            d[f"{name}_p99_ms"] = pct(xs, 99) * 1e3
        return d


def pct(xs: list[float], p: float) -> float:
    """Percentile with linear interpolation (p50 is the median)."""
    if not xs:
        return float("nan")
    s = sorted(xs)
    k = (len(s) - 1) * p / 100
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def _env_for(ns: str, store_url: str, prefix: str, keys: str, redis_url: str) -> dict[str, str]:
    return {
        "CP_BENCH_NS": ns,
        "CP_BENCH_STORE_URL": store_url,
        "CP_BENCH_STORE_PREFIX": prefix,
        "CP_BENCH_REDIS_URL": redis_url,
        "CELERY_PERSIST_KEYS": keys,
    }


def drop_namespace(r: Any, ns: str) -> None:
    """Delete this run's Redis keys (broker and backend keys carry the namespace prefix); best effort."""
    with contextlib.suppress(Exception):
        doomed = list(r.scan_iter(match=f"{ns}:*", count=1000))
        for i in range(0, len(doomed), 500):
            r.delete(*doomed[i : i + 500])


def restore_env(saved: dict[str, str | None]) -> None:
    """Put back the environment variables a run changed (None: it was unset)."""
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


class _Worker:
    """``celery worker`` in its own process group, stopped warm then killed by group id."""

    def __init__(self, env: dict[str, str], log: Path, name: str) -> None:
        self.env, self.log, self.name = env, log, name
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {**os.environ, **self.env}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
        cmd = [
            sys.executable, "-m", "celery", "-A", "benchmarks.celery_app", "worker",
            "-P", "prefork", "-c", "2", "-Q", self.env["CP_BENCH_NS"], "-n", self.name,
            "--without-gossip", "--without-mingle", "--without-heartbeat", "--loglevel", "WARNING",
        ]  # fmt: skip
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=20)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # pool children left behind, if any
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)
        self.proc = None

    def tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


def _wait_ready(app: Any, worker: _Worker) -> None:
    """Poll with a deadline: a noop round trip answers once the worker consumes the queue."""
    deadline = time.monotonic() + WORKER_START_TIMEOUT
    while True:
        if not worker.alive():
            raise RuntimeError(f"worker exited before it was ready:\n{worker.tail()}")
        try:
            app.signature("cp_bench.noop", args=(1,)).delay().get(timeout=1.0)
            return
        except Exception:  # noqa: BLE001 - TimeoutError until the worker is up
            if time.monotonic() >= deadline:
                raise RuntimeError(f"worker not ready after {WORKER_START_TIMEOUT} s:\n{worker.tail()}") from None


def _flow(app: Any, run: str, i: int) -> Any:
    from celery import chain

    return chain(
        app.signature("cp_bench.noop", args=(i,)),
        app.signature("celery_persist.await_input", kwargs={"prompt": "bench"}),
        app.signature("cp_bench.stamp", args=(run, i)),
    )


def _plain_chain(app: Any, run: str, i: int) -> Any:
    from celery import chain

    return chain(
        app.signature("cp_bench.noop", args=(i,)),
        app.signature("cp_bench.noop"),
        app.signature("cp_bench.stamp", args=(run, i)),
    )


def _pop_stamp(r: Any, key: str, timeout: float = 30.0) -> tuple[int, float]:
    item = r.blpop([key], timeout=timeout)
    if item is None:
        raise TimeoutError(f"no task started within {timeout} s")
    flow, started = json.loads(item[1])
    return int(flow), float(started)


def _measure_store(
    name: str,
    store_url: str,
    prefix: str,
    flows: int,
    throughput: int,
    redis_url: str,
    log_dir: Path,
    progress: Callable[[str], None],
    profile: bool = False,
) -> CeleryResult:
    import redis

    res = CeleryResult(name)
    rid = secrets.token_hex(4)
    ns = f"cp-bench-{rid}"
    keys = "bench:" + base64.b64encode(os.urandom(32)).decode()
    env = _env_for(ns, store_url, prefix, keys, redis_url)
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    r = redis.Redis.from_url(redis_url)
    worker = _Worker(env, log_dir / f"worker-{name}.log", f"bench-{rid}@%h")
    from celery_persist import Persist

    from . import celery_app

    app = celery_app.make_app()
    persist = Persist(app)
    try:
        persist.ready()  # tables before the worker starts, so the timings never include setup
        worker.start()
        _wait_ready(app, worker)
        progress(f"celery[{name}]: worker ready; parking {flows} flows")
        lat_run, plain_run = f"lat-{rid}", f"plain-{rid}"
        lat_key, plain_key = celery_app.stamps_key(lat_run), celery_app.stamps_key(plain_run)
        warm = min(10, max(2, flows // 10))
        total = flows + warm
        parked = [_flow(app, lat_run, i).apply_async() for i in range(total)]
        keys_ = [persist.suspension_key(p, timeout=120, interval=0.005) for p in parked]
        progress(f"celery[{name}]: measuring latency over {flows} flows (+{warm} warm-up)")
        noop = app.signature("cp_bench.noop")
        stamp = app.signature("cp_bench.stamp")
        prof = None
        if profile:
            import cProfile

            prof = cProfile.Profile()
        for i, key in enumerate(keys_):
            t0 = time.perf_counter()
            noop.delay(i).get(timeout=30)
            rt = time.perf_counter() - t0

            t0 = time.time()
            stamp.apply_async((None, plain_run, i))
            flow, started = _pop_stamp(r, plain_key)
            plain = started - t0

            t0 = time.time()
            if prof is not None and i >= warm:
                prof.enable()
            persist.resume(key, {"ok": i})
            if prof is not None:
                prof.disable()
            t1 = time.time()
            flow, started = _pop_stamp(r, lat_key)
            if flow != i:
                raise RuntimeError(f"stamp of flow {flow} arrived while waiting for flow {i}")
            if i >= warm:
                res.noop_roundtrip.append(rt)
                res.delay_to_start.append(plain)
                res.resume_to_start.append(started - t0)
                res.resume_call.append(t1 - t0)
        if prof is not None:
            import io
            import pstats

            buf = io.StringIO()
            stats = pstats.Stats(prof, stream=buf)
            stats.sort_stats("cumulative").print_stats(30)
            stats.sort_stats("tottime").print_stats(15)
            res.profile = buf.getvalue()
        for i, p in enumerate(parked):
            if p.get(timeout=60) != {"ok": i}:
                raise RuntimeError(f"flow {i} finished with the wrong result")
        res.flows = flows

        if throughput:
            # Interleaved: each round runs the three side by side, so load changes hit all three.
            rounds = 4 if throughput >= 400 else 1
            per = throughput // rounds
            progress(f"celery[{name}]: throughput, {rounds} rounds of {per} flows (resume, resume_many) and {per} plain chains")
            res.throughput_seconds = res.many_seconds = res.baseline_seconds = 0.0
            for rnd in range(rounds):
                progress(f"celery[{name}]: round {rnd + 1}: persist.resume()")
                res.throughput_seconds += _park_and_resume(app, persist, f"tp-{rid}-{rnd}", per, many=False)
                progress(f"celery[{name}]: round {rnd + 1}: plain chains")
                res.baseline_seconds += _plain_chains(app, f"base-{rid}-{rnd}", per)
                progress(f"celery[{name}]: round {rnd + 1}: persist.resume_many()")
                res.many_seconds += _park_and_resume(app, persist, f"many-{rid}-{rnd}", per, many=True)
                for run in (f"tp-{rid}-{rnd}", f"base-{rid}-{rnd}", f"many-{rid}-{rnd}"):
                    r.delete(celery_app.stamps_key(run))
            res.throughput_flows = res.baseline_chains = per * rounds
            res.rounds = rounds
    except Exception as exc:  # noqa: BLE001 - report the failure in the table, keep the other store
        res.error = f"{type(exc).__name__}: {exc}"
        tail = worker.tail()
        if tail:
            progress(f"celery[{name}]: worker log tail:\n{tail}")
    finally:
        close_run(worker, app, persist, r, ns)
        r.close()
        restore_env(saved)
    return res


def close_run(worker: _Worker, app: Any, persist: Any, r: Any, ns: str) -> None:
    """Stop the worker, close the app, drop the run's store, delete its broker and backend keys."""
    worker.stop()
    with contextlib.suppress(Exception):
        app.close()
    with contextlib.suppress(Exception):
        drop = getattr(persist.hub.store, "drop", None)
        if callable(drop):
            drop()
        persist.hub.store.close()
    # Only this run's keys: broker and backend keys carry the namespace prefix.
    drop_namespace(r, ns)


#: Flows resumed per ``persist.resume_many`` call in the throughput rounds.
MANY_BATCH = 100


def _park_and_resume(app: Any, persist: Any, run: str, n: int, *, many: bool) -> float:
    """Seconds to park ``n`` flows and resume each (one ``persist.resume`` per flow, or
    ``persist.resume_many`` per batch of parked flows), until the last final result."""
    t0 = time.perf_counter()
    parked = [_flow(app, run, i).apply_async() for i in range(n)]
    if many:
        for start in range(0, n, MANY_BATCH):
            chunk = parked[start : start + MANY_BATCH]
            items = [(persist.suspension_key(p, timeout=300, interval=0.005), start + j) for j, p in enumerate(chunk)]
            failed = [o for o in persist.resume_many(items) if isinstance(o, Exception)]
            if failed:
                raise RuntimeError(f"resume_many: {failed[0]!r}")
    else:
        for i, p in enumerate(parked):
            persist.resume(persist.suspension_key(p, timeout=300, interval=0.005), i)
    for i, p in enumerate(parked):
        try:
            got = p.get(timeout=120)
        except Exception as exc:
            raise RuntimeError(f"throughput flow {i} ({p.id}, parent {p.parent.id} {p.parent.state}) did not finish: {exc!r}") from exc
        if got != i:
            raise RuntimeError(f"throughput flow {i} finished with the wrong result")
    return time.perf_counter() - t0


def _plain_chains(app: Any, run: str, n: int) -> float:
    """Seconds to run ``n`` plain 3-task chains, from the first ``apply_async`` to the last result."""
    t0 = time.perf_counter()
    chains = [_plain_chain(app, run, i).apply_async() for i in range(n)]
    for i, p in enumerate(chains):
        if p.get(timeout=300) != i:
            raise RuntimeError(f"baseline chain {i} finished with the wrong result")
    return time.perf_counter() - t0


def _redis_reason(url: str) -> str | None:
    try:
        import redis

        redis.Redis.from_url(url, socket_connect_timeout=2).ping()
    except Exception as exc:  # noqa: BLE001
        return f"Redis at {url} unavailable: {exc.__class__.__name__}"
    return None


def run_celery_bench(
    stores: list[str], flows: int, throughput: int, progress: Callable[[str], None], redis_url: str | None = None, profile: bool = False
) -> list[CeleryResult]:
    from .targets import _tcp_reason, env_url

    redis_url = redis_url or os.environ.get("CP_BENCH_REDIS_URL", "redis://127.0.0.1:6379/12")
    reason = _redis_reason(redis_url)
    if reason:
        return [CeleryResult(s, error=reason) for s in stores]
    out = []
    with _tmpdir() as tmp:
        for store in stores:
            rid = secrets.token_hex(3)
            if store == "sqlite":
                url, prefix = f"sqlite:///{tmp}/celery-bench.db", f"bench_{rid}_"
            elif store == "postgres":
                url, prefix = env_url("postgres", "postgresql://127.0.0.1/test"), f"bench_{rid}_"
                why = _tcp_reason(url, 5432)
                if why:
                    out.append(CeleryResult(store, error=why))
                    continue
            elif store == "redis":
                url, prefix = env_url("redis", "redis://127.0.0.1:6379/13"), f"bench:{rid}:"
            elif store == "file":
                url, prefix = f"file://{tmp}/files", "celery"
            else:
                out.append(CeleryResult(store, error=f"no Celery benchmark set up for store {store!r}"))
                continue
            out.append(_measure_store(store, url, prefix, flows, throughput, redis_url, Path(tmp), progress, profile))
    return out


@contextlib.contextmanager
def _tmpdir() -> Iterator[str]:
    import shutil

    d = tempfile.mkdtemp(prefix="cp-celery-bench-", dir="/tmp")
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def celery_tables(results: list[CeleryResult]) -> str:
    from .report import fmt_ms, markdown_table

    lat_rows, tp_rows = [], []
    for r in results:
        if r.error:
            lat_rows.append([r.store, "error: " + r.error[:80], "", "", "", ""])
            continue

        def pp(xs: list[float]) -> str:
            return f"{fmt_ms(pct(xs, 50) * 1e3)} / {fmt_ms(pct(xs, 99) * 1e3)}"

        lat_rows.append([r.store, pp(r.resume_to_start), pp(r.resume_call), pp(r.delay_to_start), pp(r.noop_roundtrip), str(r.flows)])
        if r.throughput_flows:
            flows_per_s = r.throughput_flows / r.throughput_seconds
            many_per_s = r.throughput_flows / r.many_seconds
            chains_per_s = r.baseline_chains / r.baseline_seconds
            tp_rows.append(
                [
                    r.store,
                    f"{r.throughput_flows} ({r.rounds} rounds)",
                    f"{r.baseline_seconds:.1f} s / {chains_per_s:.0f}",
                    f"{r.throughput_seconds:.1f} s / {flows_per_s:.0f}",
                    f"{flows_per_s / chains_per_s:.2f}x",
                    f"{r.many_seconds:.1f} s / {many_per_s:.0f}",
                    f"{many_per_s / chains_per_s:.2f}x",
                ]
            )
    out = "#### Latency (ms, p50 / p99)\n\n" + markdown_table(
        [
            "store",
            "persist.resume() -> next task starts",
            "resume() call returns",
            "plain apply_async() -> task starts",
            "noop.delay().get()",
            "flows",
        ],
        lat_rows,
        "lrrrrr",
    )
    if tp_rows:
        out += (
            "\n\n#### Throughput (interleaved rounds; seconds / per second; rate ratio vs plain chains, goal >= 0.8x)\n\n"
            + markdown_table(
                [
                    "store",
                    "flows",
                    "plain 3-task chains",
                    "park + persist.resume()",
                    "ratio",
                    f"park + persist.resume_many() (batches of {MANY_BATCH})",
                    "ratio",
                ],
                tp_rows,
                "lrrrrrr",
            )
        )
    return out
