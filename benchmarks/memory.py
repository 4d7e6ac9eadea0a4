"""Memory of long-lived prefork pool children: parked+resumed flows against plain chains.

``python -m benchmarks.memory`` (``--flows 2000`` for a quick run; ``--help``).

Two runs, each on a fresh ``celery -A benchmarks.memory_app worker -P prefork -c 2``
(the same app, same settings, same store binding):

* **parked**: N flows ``chain(step.s(i), await_input.s(prompt=...), step.s())``, sent in
  batches; this process waits for each flow's suspension key, resumes it with
  ``persist.resume(key, i)`` and checks the final result is ``i``;
* **plain**: N plain 3-task chains ``chain(step.s(i), step.s(), step.s())``.

At 0, 5%, 25%, 50% and 100% of N flows (0 / 1k / 5k / 10k / 20k for the default
20,000) it reads each pool child's ``VmRSS`` from ``/proc/<pid>/status`` (children
found through ``/proc/<worker>/task/*/children``) and prints both runs side by side
with the difference. ``--tracemalloc FRAMES`` starts tracemalloc in every pool child
and prints, per child, the allocation sites that grew between the first batch and the
end (``cp_mem.probe``, see :mod:`benchmarks.memory_app`); that slows the run and
inflates RSS, so its figures are for finding causes, not for the table.
``--patch NAME`` applies a benchmark-only patch from :mod:`benchmarks.memory_patches`
in the worker (a proposed fix, tried without editing ``celery_persist/``); ``--library DIR``
runs the worker against ``DIR/celery_persist`` (e.g. a copy with
``benchmarks/proposals/09-park-traceback-cycle.diff`` applied). Both are labelled in the output.

Isolation: broker and result backend in Redis db 12 under a per-run
``global_keyprefix`` ``cp-mem-<id>:`` (only those keys are deleted); store tables
``mem_<id>_*`` (SQLite in a ``/tmp/cp-mem-<id>-*`` directory, or PostgreSQL
``test``), or Redis db 13 keys under ``{mem:<id>}:`` (only those deleted). The worker
runs in its own process group and is stopped (SIGTERM, then SIGKILL to the group).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .celery_bench import _Worker, drop_namespace, restore_env

REPO = Path(__file__).resolve().parents[1]
REDIS_URL = "redis://127.0.0.1:6379/12"
STORE_REDIS_URL = "redis://127.0.0.1:6379/13"
POSTGRES_URL = "postgresql://127.0.0.1:5432/test"
FRACTIONS = (0.0, 0.05, 0.25, 0.5, 1.0)
WORKER_START_TIMEOUT = 60.0


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- processes ----------------------------------------------------------------------------------


def children_of(pid: int) -> list[int]:
    """Child pids of ``pid`` (every thread's ``children`` file; a /proc scan as fallback)."""
    kids: set[int] = set()
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{tid}/children") as f:
                kids.update(int(x) for x in f.read().split())
    except OSError:
        pass
    if not kids:
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                with contextlib.suppress(OSError, IndexError, ValueError), open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        kids.add(int(entry))
    return sorted(kids)


def proc_status(pid: int) -> dict[str, int]:
    out: dict[str, int] = {}
    with contextlib.suppress(OSError), open(f"/proc/{pid}/status") as f:
        for line in f:
            name, _, rest = line.partition(":")
            if name in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "Threads"):
                out[name] = int(rest.split()[0])
    with contextlib.suppress(OSError):
        out["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    return out


class Worker(_Worker):
    """``celery -A benchmarks.memory_app worker -P prefork -c 2`` in its own process group
    (stopping and log tail as for the Celery benchmark's worker)."""

    def __init__(
        self, env: dict[str, str], logfile: Path, name: str, max_tasks_per_child: int | None = None, library: Path | None = None
    ) -> None:
        super().__init__(env, logfile, name)
        self.max_tasks = max_tasks_per_child
        self.library = library

    @property
    def logfile(self) -> Path:
        return self.log

    def start(self) -> None:
        env = {**os.environ, **self.env}
        # ``python -m`` puts the working directory first on sys.path: with --library the worker runs
        # in that directory, so its celery_persist is the one imported (benchmarks/ still from REPO).
        first = [str(self.library)] if self.library else []
        env["PYTHONPATH"] = os.pathsep.join(p for p in (*first, str(REPO), env.get("PYTHONPATH", "")) if p)
        cmd = [
            sys.executable, "-m", "celery", "-A", "benchmarks.memory_app", "worker",
            "-P", "prefork", "-c", "2", "-Q", self.env["CP_BENCH_NS"], "-n", self.name,
            "--without-gossip", "--without-mingle", "--without-heartbeat", "--loglevel", "WARNING",
        ]  # fmt: skip
        if self.max_tasks:
            cmd += ["--max-tasks-per-child", str(self.max_tasks)]
        with self.log.open("ab") as out:
            cwd = self.library or REPO
            self.proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid


@dataclass
class Sample:
    flows: int
    elapsed: float
    children: dict[int, dict[str, int]]  # pid -> /proc status
    worker: dict[str, int]


@dataclass
class RunResult:
    kind: str  # "parked" | "plain"
    samples: list[Sample] = field(default_factory=list)
    probes: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    seconds: float = 0.0
    error: str | None = None
    result_keys_deleted: int = 0


def checkpoints(n: int) -> list[int]:
    return sorted({int(round(n * f)) for f in FRACTIONS})


def probe_children(
    app: Any, pids: list[int], action: str, *, top: int, group_by: str = "traceback", depth: int = 8, collect: bool = True
) -> list[dict[str, Any]]:
    """Run ``cp_mem.probe(action)`` once in each child of ``pids``.

    Probes are sent two at a time and each holds its child for a moment, so the
    second lands on the other child; repeated until every pid answered.
    """
    got: dict[int, dict[str, Any]] = {}
    sig = app.signature("cp_mem.probe")
    for _ in range(20):
        if set(pids) <= set(got):
            break
        kw = {"action": action, "top": top, "hold": 0.6, "group_by": group_by, "depth": depth, "collect": collect}
        rs = [sig.clone(kwargs=kw).apply_async() for _ in range(2)]
        for r in rs:
            out = r.get(timeout=900)
            if out["pid"] in pids and out["pid"] not in got:
                got[out["pid"]] = out
            elif out["pid"] in got and action in ("mark", "diff"):
                pass  # a repeat in the same child: harmless for both actions
    return [got[p] for p in pids if p in got]


def _wait_ready(app: Any, worker: Worker) -> None:
    deadline = time.monotonic() + WORKER_START_TIMEOUT
    while True:
        if not worker.alive():
            raise RuntimeError(f"worker exited before it was ready:\n{worker.tail()}")
        try:
            app.signature("cp_mem.step", args=(1,)).delay().get(timeout=1.0)
            return
        except Exception:  # noqa: BLE001 - TimeoutError until the worker is up
            if time.monotonic() >= deadline:
                raise RuntimeError(f"worker not ready after {WORKER_START_TIMEOUT} s:\n{worker.tail()}") from None


def _pool_children(worker: Worker, timeout: float = 30.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        kids = children_of(worker.pid)
        if len(kids) >= 2 or time.monotonic() >= deadline:
            return kids
        time.sleep(0.2)


def run_one(
    kind: str,
    n: int,
    *,
    env: dict[str, str],
    tmp: Path,
    batch: int,
    tracemalloc_frames: int,
    top: int,
    max_tasks_per_child: int | None,
    deadline: float,
    library: Path | None = None,
) -> RunResult:
    from celery import chain

    from celery_persist import Persist

    from . import memory_app

    res = RunResult(kind)
    ns = env["CP_BENCH_NS"]
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update({k: v for k, v in env.items() if k.startswith(("CP_BENCH_", "CELERY_PERSIST_"))})
    app = memory_app.make_app()
    persist = Persist(app)
    worker = Worker(env, tmp / f"worker-{kind}.log", f"mem-{kind}-{ns}@%h", max_tasks_per_child, library)
    import redis

    r = redis.Redis.from_url(env["CP_BENCH_REDIS_URL"])
    step = app.signature("cp_mem.step")
    wait = app.signature("celery_persist.await_input", kwargs={"prompt": "memory benchmark"})
    marks = checkpoints(n)
    try:
        if kind == "parked":
            persist.ready()  # tables before the worker starts
        worker.start()
        _wait_ready(app, worker)
        pids = _pool_children(worker)
        log(f"{kind}: worker {worker.pid} ready, pool children {pids}")
        t0 = time.perf_counter()

        def sample(done: int) -> None:
            kids = children_of(worker.pid)
            res.samples.append(Sample(done, time.perf_counter() - t0, {p: proc_status(p) for p in kids}, proc_status(worker.pid)))
            rss = ", ".join(f"{p}: {s.get('VmRSS', 0) / 1024:.1f} MB" for p, s in res.samples[-1].children.items())
            log(f"{kind}: {done} flows, {time.perf_counter() - t0:.0f} s; RSS {rss}; result keys dropped {res.result_keys_deleted}")

        sample(0)
        done = 0
        for target in marks[1:]:
            while done < target:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"time budget spent after {done} flows")
                size = min(batch, target - done)
                ids = range(done, done + size)
                if kind == "parked":
                    results = [chain(step.clone(args=(i,)), wait.clone(), step.clone()).apply_async() for i in ids]
                    for i, res_ in zip(ids, results, strict=True):
                        key = persist.suspension_key(res_, timeout=300, interval=0.01)
                        persist.resume(key, i)
                else:
                    results = [chain(step.clone(args=(i,)), step.clone(), step.clone()).apply_async() for i in ids]
                for i, res_ in zip(ids, results, strict=True):
                    got = res_.get(timeout=300)
                    if got != i:
                        raise RuntimeError(f"{kind} flow {i} finished with {got!r}")
                # Keep Redis small: drop this batch's result keys (ours only: the namespace prefix).
                doomed = []
                for res_ in results:
                    node = res_
                    while node is not None:
                        doomed.append(f"{ns}:celery-task-meta-{node.id}")
                        node = node.parent
                res.result_keys_deleted += r.delete(*doomed)
                done += size
                if tracemalloc_frames and "mark" not in res.probes:
                    res.probes["mark"] = probe_children(app, children_of(worker.pid), "mark", top=top)
                    log(f"{kind}: tracemalloc mark taken in {[p['pid'] for p in res.probes['mark']]}")
            sample(done)
        res.seconds = time.perf_counter() - t0
        kids = children_of(worker.pid)
        if tracemalloc_frames:
            # First what is allocated now, uncollected cyclic garbage included (by line), then
            # what survives a full collection (by traceback).
            res.probes["diff_uncollected"] = probe_children(app, kids, "diff", top=top, group_by="lineno", collect=False)
            res.probes["diff"] = probe_children(app, kids, "diff", top=top)
        res.probes["garbage"] = probe_children(app, kids, "garbage", top=top)
        res.probes["trim"] = probe_children(app, kids, "trim", top=top)
    except Exception as exc:  # noqa: BLE001 - report it, clean up, keep the other run
        res.error = f"{type(exc).__name__}: {exc}"
        log(f"{kind}: ERROR {res.error}\n{worker.tail()}")
    finally:
        worker.stop()
        with contextlib.suppress(Exception):
            app.close()
        with contextlib.suppress(Exception):
            persist.hub.store.close()
        drop_namespace(r, ns)
        r.close()
        restore_env(saved)
    return res


# -- the report ---------------------------------------------------------------------------------


def _mb(kb: int | None) -> str:
    return "-" if kb is None else f"{kb / 1024:.1f}"


def _child_rss(s: Sample) -> list[int]:
    return [st.get("VmRSS", 0) for _, st in sorted(s.children.items())]


def table(parked: RunResult, plain: RunResult) -> str:
    head = (
        "| flows | parked: child 1 | child 2 | plain: child 1 | child 2 | parked - plain (mean) | parked - plain (max child vs max child) |"
    )
    lines = [head, "|" + "---|" * 7]
    for a, b in zip(parked.samples, plain.samples, strict=False):
        ra, rb = _child_rss(a), _child_rss(b)
        ra += [0] * (2 - len(ra))
        rb += [0] * (2 - len(rb))
        mean = (sum(ra) - sum(rb)) / 2
        mx = max(ra) - max(rb)
        lines.append(f"| {a.flows:,} | {_mb(ra[0])} | {_mb(ra[1])} | {_mb(rb[0])} | {_mb(rb[1])} | {mean / 1024:+.1f} | {mx / 1024:+.1f} |")
    return "\n".join(lines)


def growth(run: RunResult) -> str:
    if len(run.samples) < 2:
        return "-"
    first, last = run.samples[0], run.samples[-1]
    parts = []
    for pid, st in sorted(last.children.items()):
        start = first.children.get(pid, {}).get("VmRSS")
        extra = f", threads {st.get('Threads')}, fds {st.get('fds')}, RssAnon {_mb(st.get('RssAnon'))} MB"
        parts.append(f"child {pid}: {_mb(start)} -> {_mb(st.get('VmRSS'))} MB (HWM {_mb(st.get('VmHWM'))}){extra}")
    parts.append(f"main worker process: {_mb(first.worker.get('VmRSS'))} -> {_mb(last.worker.get('VmRSS'))} MB")
    return "; ".join(parts)


def probe_report(run: RunResult) -> str:
    out = []
    for p in run.probes.get("trim", []):
        mi = p.get("mallinfo", {})
        out.append(f"  pid {p['pid']}: celery_persist from {p.get('library')}; benchmark-only patches: {p.get('patches') or 'none'}")
        out.append(
            f"  pid {p['pid']}: RSS {_mb(p.get('rss_before_trim_kb'))} MB -> {_mb(p['status'].get('VmRSS'))} MB after malloc_trim(0); "
            f"malloc in use {mi.get('uordblks', 0) / 2**20:.1f} MB, free in arenas {mi.get('fordblks', 0) / 2**20:.1f} MB, "
            f"mmapped {mi.get('hblkhd', 0) / 2**20:.1f} MB; gc objects {p['gc_objects']:,}; "
            f"threads {p['status'].get('Threads')}, fds {p['status'].get('fds')}"
        )
        pm = p.get("pymalloc")
        if pm:
            out.append("    pymalloc: " + ", ".join(f"{k.lstrip('# ')} {v:,}" for k, v in pm.items()))
        mp = p.get("maps")
        if mp:
            out.append(
                f"    {mp['count']} mappings; RSS by mapping name (KiB): " + ", ".join(f"{n} {kb:,}" for n, kb in mp["by_name_kb"][:6])
            )
            out.append(
                "    anonymous mappings by size (size KiB x count: RSS KiB): "
                + ", ".join(f"{sz:,}x{c}: {kb:,}" for sz, c, kb in mp["anon_by_size"][:8])
            )
    for p in run.probes.get("garbage", []):
        stats = ", ".join(f"gen{i}: {st['collections']} collections, {st['collected']} collected" for i, st in enumerate(p["gc_stats"]))
        out.append(f"  pid {p['pid']}: gc counts {p['gc_count']} (thresholds {p['gc_threshold']}); {stats}")
        out.append(
            f"    cyclic garbage waiting for the collector: {p.get('unreachable', 0):,} objects; by type: "
            + ", ".join(f"{n} {c}" for n, c in p.get("garbage_types", [])[:12])
        )
        b, a = p.get("pymalloc_before_collect", {}), p.get("pymalloc", {})
        k = "# bytes in allocated blocks"
        if k in b and k in a:
            mb, ma = p.get("mallinfo_before_collect", {}), p.get("mallinfo", {})
            out.append(
                f"    collecting it freed {(b[k] - a[k]) / 2**20:.2f} MB of pymalloc blocks and "
                f"{(mb.get('uordblks', 0) - ma.get('uordblks', 0)) / 2**20:.2f} MB of malloc; "
                f"pymalloc arenas {a.get('# arenas allocated current')} (1 MiB each) hold {a[k] / 2**20:.1f} MB of live blocks"
            )
        if p.get("garbage_exceptions"):
            out.append("    exceptions in it: " + ", ".join(f"{n} {c}" for n, c in p["garbage_exceptions"]))
        if p.get("garbage_frames"):
            out.append("    frames in it: " + ", ".join(f"{n} {c}" for n, c in p["garbage_frames"][:12]))
    labels = {
        "diff_uncollected": "tracemalloc, by line, since the mark, BEFORE a full gc collection",
        "diff": "tracemalloc, by traceback, since the mark, after a full gc collection",
    }
    for key in ("diff_uncollected", "diff"):
        for p in run.probes.get(key, []):
            out.append(
                f"  pid {p['pid']} ({labels[key]}): traced {p.get('traced', (0, 0))[0] / 2**20:.1f} MB now, "
                f"{p.get('traced_diff', 0) / 2**20:+.2f} MB since the mark"
            )
            for t in p.get("top", [])[:25]:
                out.append(f"    {t['size_diff'] / 1024:+9.1f} KiB {t['count_diff']:+7d} blocks  {t['where']}")
            if key == "diff":
                for name, grown, total in p.get("types", [])[:15]:
                    out.append(f"    type {name}: +{grown} (now {total})")
    return "\n".join(out)


# -- main ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def _tmpdir(rid: str) -> Iterator[Path]:
    d = tempfile.mkdtemp(prefix=f"cp-mem-{rid}-", dir="/tmp")
    try:
        yield Path(d)
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _store(kind: str, tmp: Path, rid: str) -> tuple[str, str, Callable[[], None]]:
    """(store URL, prefix, cleanup) for ``kind``."""
    if kind == "sqlite":
        return f"sqlite:///{tmp}/mem.db", f"mem_{rid}_", lambda: None
    if kind == "postgresql":
        url, prefix = os.environ.get("CELERY_PERSIST_BENCH_POSTGRES_URL", POSTGRES_URL), f"mem_{rid}_"

        def drop() -> None:
            from celery_persist.stores import open_store

            store = open_store(url, prefix=prefix)
            try:
                store.drop()  # type: ignore[attr-defined]
            finally:
                store.close()

        return url, prefix, drop
    if kind == "redis":
        url, prefix = os.environ.get("CELERY_PERSIST_BENCH_REDIS_URL", STORE_REDIS_URL), f"mem:{rid}"

        def drop() -> None:
            import redis

            r = redis.Redis.from_url(url)
            doomed = list(r.scan_iter(match="{" + prefix + "}:*", count=1000))
            for i in range(0, len(doomed), 500):
                r.delete(*doomed[i : i + 500])
            r.close()

        return url, prefix, drop
    raise SystemExit(f"unknown store {kind!r}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.memory", description=__doc__.split("\n\n")[0])
    ap.add_argument("--flows", type=int, default=20000, help="flows per run (default 20000; 2000 for a quick run)")
    ap.add_argument("--store", choices=("sqlite", "postgresql", "redis"), default="sqlite")
    ap.add_argument("--batch", type=int, default=250, help="flows sent, parked and resumed per batch (default 250)")
    ap.add_argument("--only", choices=("both", "parked", "plain"), default="both")
    ap.add_argument("--patch", default="", help="benchmark-only patches (benchmarks/memory_patches.py), comma-separated")
    ap.add_argument("--tracemalloc", type=int, default=0, metavar="FRAMES", help="trace allocations in the pool children (slow)")
    ap.add_argument("--top", type=int, default=25, help="allocation sites / object types to list with --tracemalloc")
    ap.add_argument("--max-tasks-per-child", type=int, default=None)
    ap.add_argument(
        "--library",
        type=Path,
        metavar="DIR",
        help="run the WORKER against DIR/celery_persist (a patched copy of the library) instead of the repository's",
    )
    ap.add_argument("--max-seconds", type=float, default=3600.0, help="time budget for both runs (default 3600)")
    ap.add_argument("--json", metavar="FILE", help="write every sample as JSON")
    args = ap.parse_args(argv)
    if args.flows < 1 or args.batch < 1:
        ap.error("--flows and --batch must be positive")
    if args.library is not None:
        args.library = args.library.resolve()
        if not (args.library / "celery_persist" / "__init__.py").is_file():
            ap.error(f"--library {args.library}: no celery_persist package there")

    import redis

    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2).ping()
    except Exception as exc:  # noqa: BLE001
        print(f"Redis at {REDIS_URL} unavailable: {exc}", file=sys.stderr)
        return 2
    from . import memory_patches

    for name in filter(None, args.patch.split(",")):  # fail early on a typo
        if name not in memory_patches.PATCHES:
            ap.error(f"unknown patch {name!r}; known: {sorted(memory_patches.PATCHES)}")

    rid = secrets.token_hex(4)
    deadline = time.monotonic() + args.max_seconds
    started = time.strftime("%Y-%m-%d %H:%M")
    keys = "mem:" + base64.b64encode(os.urandom(32)).decode()
    runs: dict[str, RunResult] = {}
    with _tmpdir(rid) as tmp:
        url, prefix, drop = _store(args.store, tmp, rid)
        try:
            for kind in ("parked", "plain"):
                if args.only not in ("both", kind):
                    continue
                env = {
                    "CP_BENCH_NS": f"cp-mem-{rid}-{kind}",
                    "CP_BENCH_STORE_URL": url,
                    "CP_BENCH_STORE_PREFIX": prefix,
                    "CP_BENCH_REDIS_URL": REDIS_URL,
                    "CELERY_PERSIST_KEYS": keys,
                    "CP_MEM_PATCH": args.patch,
                }
                if args.tracemalloc:
                    env["CP_MEM_TRACEMALLOC"] = str(args.tracemalloc)
                log(
                    f"{kind}: {args.flows} flows, store {args.store}, batch {args.batch}"
                    + (f", PATCHED: {args.patch}" if args.patch else "")
                )
                runs[kind] = run_one(
                    kind,
                    args.flows,
                    env=env,
                    tmp=tmp,
                    batch=args.batch,
                    tracemalloc_frames=args.tracemalloc,
                    top=args.top,
                    max_tasks_per_child=args.max_tasks_per_child,
                    deadline=deadline,
                    library=args.library,
                )
        finally:
            with contextlib.suppress(Exception):
                drop()

    labels = [f"PATCHED (benchmark-only: {args.patch})" if args.patch else ""]
    labels.append(f"worker library from {args.library}/celery_persist" if args.library else "")
    label = "; ".join(x for x in labels if x) or "unpatched library"
    print(f"\n## Pool-child RSS (MB), store {args.store}, {args.flows:,} flows per run, {label}")
    cmdline = " ".join(argv if argv is not None else sys.argv[1:])
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"Run {started}, `python -m benchmarks.memory {cmdline}`; load average at the end {load}")
    if args.tracemalloc:
        print(f"NOTE: tracemalloc ({args.tracemalloc} frames) was on in the pool children: RSS figures are inflated.")
    if args.max_tasks_per_child:
        print(f"NOTE: --max-tasks-per-child {args.max_tasks_per_child}: children are replaced; columns follow pid order.")
    for kind, run in runs.items():
        t = f"{run.seconds:.0f} s" if not run.error else f"ERROR {run.error}"
        print(f"- {kind}: {t}; {growth(run)}")
    if "parked" in runs and "plain" in runs:
        print()
        print(table(runs["parked"], runs["plain"]))
    else:
        for kind, run in runs.items():
            print(f"\n{kind}:")
            for s in run.samples:
                print(f"  {s.flows:>7,} flows: " + ", ".join(f"{_mb(v)} MB" for v in _child_rss(s)))
    for kind, run in runs.items():
        rep = probe_report(run)
        if rep:
            print(f"\n### {kind}: per-child probes at the end")
            print(rep)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    k: {"samples": [s.__dict__ for s in v.samples], "probes": v.probes, "seconds": v.seconds, "error": v.error}
                    for k, v in runs.items()
                },
                f,
                indent=1,
                default=str,
            )
    return 1 if any(r.error for r in runs.values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
