"""``python -m benchmarks.cleanup_bench``: cleanup throughput, batched (``transition_many`` / ``delete_many``) vs per record.

Per store (Redis and PostgreSQL by default):

1. **population**: N suspended records that are not due (random 64-hex key hashes, a random blob
   of the size the hub seals the bench state to, realistic metadata, due 1 hour to 7 days ahead),
   written with ``put_many``.
2. **prune**: E records past their time are added (half finished suspensions past retention,
   ``resumed``; half checkpoints past their ttl), sealed as the hub seals them, then
   ``hub.cleanup(now)`` deletes them. Timed: the whole ``cleanup`` call (``due()`` pages
   with their blobs, seal checks, deletes).
3. **expiry with a timeout policy**: E suspensions past their expiry, each a real sealed
   state (AES-256-GCM, json, zstd: what ``hub.suspend`` writes), then
   ``hub.cleanup(now, on_expired=handler)``: each is moved to ``expired``, its state opened and
   the handler called once (the handler only counts: what a policy itself does, e.g. Celery's
   result-backend writes in ``flow.expire_flow``, is not in the figure).

Each of 2 and 3 runs **after** (the store's own ``transition_many`` / ``delete_many``: one
round trip per page) and **before** (the same cleanup over a proxy whose ``transition_many`` /
``delete_many`` are :class:`~celery_persist.stores.base.BaseStore`'s defaults: one
``transition`` / ``delete`` per record, what cleanup did until now), among N, on fresh records
each time. The batched path also runs on a store that holds only the E records (**among E**):
the ratio of the two rates shows whether the cost follows the expired records or the stored ones.

Checked, not just timed: cleanup must report E, every record of the group must be gone (prune)
or ``expired`` (expiry), the handler must have run exactly E times, once per record.

Isolation: Redis keys under ``{scale-<run>-cb...}:`` in ``redis://127.0.0.1:6379/14``
(``CELERY_PERSIST_SCALE_REDIS_URL``), PostgreSQL tables ``scale_<run>_cb..._*`` in
``postgresql://127.0.0.1/test`` (``CELERY_PERSIST_SCALE_POSTGRES_URL``); removed at the end
(``python -m benchmarks.scale --clean <run>`` after a crash).

    .venv/bin/python -m benchmarks.cleanup_bench --quick      # N = 100,000, E = 5,000 (~3 min)
    .venv/bin/python -m benchmarks.cleanup_bench              # N = 1,000,000, E = 10,000 (~12 min)
    .venv/bin/python -m benchmarks.cleanup_bench --stores redis --records 200000 --expired 20000
"""

from __future__ import annotations

import argparse
import os
import random
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    __package__ = "benchmarks"  # noqa: A001

from celery_persist import Keyring, PersistenceHub  # noqa: E402
from celery_persist.hub import Suspension  # noqa: E402
from celery_persist.stores.base import BaseStore, Kind, Status, StoredRecord, TransitionSpec  # noqa: E402

from .scale import DAY, HOUR, TARGETS, Target, bench_metadata, bench_state, machine, sealed_size  # noqa: E402

DEFAULT_STORES = ("redis", "postgres")
RETENTION = 7 * DAY


class PerRecord:
    """``store`` with BaseStore's default ``transition_many`` / ``delete_many``: one call per record (the "before")."""

    def __init__(self, store: BaseStore) -> None:
        self._store = store

    def transition_many(self, changes: Sequence[TransitionSpec], *, now: float) -> list[str]:
        return BaseStore.transition_many(cast(BaseStore, self), changes, now=now)

    def delete_many(self, key_hashes: Sequence[str]) -> int:
        return BaseStore.delete_many(cast(BaseStore, self), key_hashes)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


@dataclass
class Run:
    """One timed cleanup."""

    what: str  # "prune" | "expire"
    path: str  # "after" | "before"
    among: str  # "N" | "E"
    count: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.count / self.seconds if self.seconds else 0.0


@dataclass
class Result:
    store: str
    n: int = 0
    e: int = 0
    write_rate: float = 0.0
    runs: list[Run] = field(default_factory=list)
    skipped: str | None = None

    def rates(self, what: str, path: str, among: str = "N") -> list[float]:
        return sorted(r.rate for r in self.runs if (r.what, r.path, r.among) == (what, path, among))

    def rate(self, what: str, path: str, among: str = "N") -> float:
        """The median of the repeats (the machine is shared: single runs drift by 30% and more)."""
        rates = self.rates(what, path, among)
        return statistics.median(rates) if rates else 0.0

    def cell(self, what: str, path: str, among: str = "N") -> str:
        rates = self.rates(what, path, among)
        if len(rates) < 2:
            return f"{self.rate(what, path, among):,.0f}/s"
        return f"{self.rate(what, path, among):,.0f}/s ({rates[0]:,.0f}-{rates[-1]:,.0f})"


def background(n: int, blob_size: int, now: float, seed: int) -> Iterator[list[StoredRecord]]:
    """N suspended records, none due before ``now + 1 h``, in batches of 1,000 (never opened: random blobs and seals)."""
    rng = random.Random(seed)
    for start in range(0, n, 1000):
        size = min(1000, n - start)
        keys, blobs = os.urandom(32 * size).hex(), os.urandom(blob_size * size)
        batch = []
        for k in range(size):
            due = now + rng.uniform(HOUR, 7 * DAY)
            created = now - rng.uniform(60.0, 3 * DAY)
            batch.append(
                StoredRecord(
                    key_hash=keys[64 * k : 64 * k + 64],
                    kind=Kind.SUSPENSION,
                    status=Status.SUSPENDED,
                    blob=blobs[blob_size * k : blob_size * k + blob_size],
                    metadata=bench_metadata(start + k, rng),
                    created_at=created,
                    expires_at=due,
                    due_at=due,
                    updated_at=created,
                    version=1,
                    seal=secrets.token_hex(32),
                )
            )
        yield batch


def prunable(hub: PersistenceHub, e: int, blob_size: int, now: float, rng: random.Random) -> list[StoredRecord]:
    """E records cleanup deletes: finished suspensions past retention and checkpoints past their ttl, sealed."""
    out = []
    for i in range(e):
        kh = secrets.token_hex(32)
        created = now - 9 * DAY
        due = now - rng.uniform(1.0, HOUR)
        blob = os.urandom(blob_size)
        if i % 2:
            kind, status, expires, meta = Kind.CHECKPOINT, Status.ACTIVE, due, {"task_id": f"t-{i}"}
        else:
            kind, status, expires, meta = Kind.SUSPENSION, Status.RESUMED, now - 8 * DAY, bench_metadata(i, rng)
        seal = hub._seal_fields(hub._fields(kh, kind, status, created, expires, due, 2, blob))
        out.append(StoredRecord(kh, kind, status, blob, meta, created, expires, due, due, version=2, seal=seal))
    return out


def expiring(hub: PersistenceHub, e: int, now: float, rng: random.Random) -> list[StoredRecord]:
    """E suspensions past their expiry, each sealed with a real state (as hub.suspend writes them)."""
    states = [bench_state() for _ in range(8)]
    out = []
    for i in range(e):
        kh = secrets.token_hex(32)
        expires = now - rng.uniform(1.0, HOUR)
        created = expires - DAY
        meta = bench_metadata(i, rng)
        out.append(hub._build(kh, Kind.SUSPENSION, Status.SUSPENDED, states[i % 8], meta, created, expires, kh[:12]))
    return out


def timed_cleanup(
    store: BaseStore, ring: Keyring, now: float, records: list[StoredRecord], what: str, path: str, among: str, batch: int
) -> Run:
    """Write ``records``, then time one ``hub.cleanup(now)`` over them and check what it did."""
    for start in range(0, len(records), 1000):
        store.put_many(records[start : start + 1000])
    used = cast(BaseStore, PerRecord(store)) if path == "before" else store
    hub = PersistenceHub(used, keyring=ring, encryption="required", retention=RETENTION, clock=lambda: now)
    seen: dict[str, int] = {}

    def handler(s: Suspension) -> None:
        seen[s.key_hash] = seen.get(s.key_hash, 0) + 1
        if s.state is None:
            raise AssertionError("the handler got no state")

    t = time.perf_counter()
    done = hub.cleanup(now, on_expired=handler if what == "expire" else None, batch=batch)
    seconds = time.perf_counter() - t
    if done != len(records):
        raise AssertionError(f"{what}/{path}/{among}: cleanup reported {done}, expected {len(records)}")
    sample = random.Random(1).sample(records, min(200, len(records)))
    if what == "prune":
        left = [r for r in sample if store.get(r.key_hash) is not None]
        if left:
            raise AssertionError(f"{what}/{path}: {len(left)} of 200 sampled records are still there")
    else:
        if len(seen) != len(records) or set(seen.values()) != {1}:
            raise AssertionError(f"expire/{path}: handler ran for {len(seen)} records, counts {sorted(set(seen.values()))}")
        wrong = [r for r in sample if (got := store.get(r.key_hash)) is None or got.status is not Status.EXPIRED]
        if wrong:
            raise AssertionError(f"expire/{path}: {len(wrong)} of 200 sampled records are not expired")
    return Run(what, path, among, len(records), seconds)


def run_store(
    target: Target, n: int, e: int, batch: int, repeat: int, blob_size: int, ring: Keyring, now: float, log: Callable[[str], None]
) -> Result:
    res = Result(store=target.name, n=n, e=e)
    main = target.open("cbmain")
    alone = target.open("cbalone")
    try:
        for s in (main, alone):
            s.setup()
        hub = PersistenceHub(main, keyring=ring, encryption="required", retention=RETENTION, clock=lambda: now)
        t = time.perf_counter()
        for i, chunk in enumerate(background(n, blob_size, now, seed=11)):
            main.put_many(chunk)
            if i % 100 == 99:
                log(f"  wrote {(i + 1) * 1000:,} of {n:,} ({(i + 1) * 1000 / (time.perf_counter() - t):,.0f}/s)")
        res.write_rate = n / (time.perf_counter() - t)
        log(f"  {n:,} records written ({res.write_rate:,.0f}/s)")
        rng = random.Random(5)
        # Interleaved so that "before" and "after" run next to each other under the same background load.
        plan = [
            ("prune", "after", "N"),
            ("prune", "before", "N"),
            ("prune", "after", "E"),
            ("expire", "after", "N"),
            ("expire", "before", "N"),
            ("expire", "after", "E"),
        ]
        for what, path, among in [step for _ in range(repeat) for step in plan]:
            records = prunable(hub, e, blob_size, now, rng) if what == "prune" else expiring(hub, e, now, rng)
            run = timed_cleanup(main if among == "N" else alone, ring, now, records, what, path, among, batch)
            res.runs.append(run)
            log(f"  {what:6} {path:6} among {among}: {run.count:,} in {run.seconds:.2f} s = {run.rate:,.0f}/s")
    finally:
        target.drop("cbmain", main)
        target.drop("cbalone", alone)
    return res


def table(results: list[Result]) -> str:
    lines = [
        "| store | N stored | E per run | prune: before (per record) | prune: after (batched) | speed-up "
        "| expiry + timeout policy: before | expiry: after | speed-up | after among E alone: prune / expiry | ratio N / E |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        if r.skipped:
            lines.append(f"| {r.store} | skipped: {r.skipped} |" + " |" * 9)
            continue

        def ratio(what: str, r: Result = r) -> str:
            alone, among = r.rate(what, "after", "E"), r.rate(what, "after")
            return f"{alone / among:.2f}x" if alone and among else "-"

        pb, pa, eb, ea = r.rate("prune", "before"), r.rate("prune", "after"), r.rate("expire", "before"), r.rate("expire", "after")
        lines.append(
            f"| {r.store} | {r.n:,} | {r.e:,} | {r.cell('prune', 'before')} | **{r.cell('prune', 'after')}** | {pa / pb:.1f}x "
            f"| {r.cell('expire', 'before')} | **{r.cell('expire', 'after')}** | {ea / eb:.1f}x "
            f"| {r.rate('prune', 'after', 'E'):,.0f}/s / {r.rate('expire', 'after', 'E'):,.0f}/s | {ratio('prune')} / {ratio('expire')} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.cleanup_bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--stores", default=",".join(DEFAULT_STORES), help="comma list of redis, postgres, sqlite, file, memory")
    ap.add_argument("--quick", action="store_true", help="N = 100,000 and E = 5,000")
    ap.add_argument("--records", type=int, default=None, help="N stored records (default 1,000,000; --quick 100,000)")
    ap.add_argument("--expired", type=int, default=None, help="E records per timed cleanup (default 10,000; --quick 5,000)")
    ap.add_argument("--batch", type=int, default=500, help="cleanup's page of due records (default 500, hub.cleanup's default)")
    ap.add_argument("--repeat", type=int, default=3, help="timed cleanups of each kind, interleaved; the table shows the median")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    names = [s.strip() for s in args.stores.split(",") if s.strip()]
    n = args.records if args.records is not None else (100_000 if args.quick else 1_000_000)
    e = args.expired or (5_000 if args.quick else 10_000)
    run = secrets.token_hex(4)
    workdir = os.path.join(tempfile.gettempdir(), f"cp-scale-{run}")
    os.makedirs(workdir, mode=0o700)
    ring = Keyring([("bench", os.urandom(32))])
    blob_size = sealed_size(ring)
    now = time.time()
    started = time.perf_counter()
    print(f"run {run} (clean up a crashed run: python -m benchmarks.scale --clean {run}); N = {n:,}, E = {e:,}, batch {args.batch}")
    results: list[Result] = []
    try:
        for name in names:
            target = TARGETS[name](run, workdir)
            reason = target.unavailable()
            if reason:
                results.append(Result(store=name, skipped=reason))
                continue
            print(f"[{name}]", flush=True)
            log = lambda line: print(line, flush=True)  # noqa: E731
            results.append(run_store(target, n, e, args.batch, args.repeat, blob_size, ring, now, log))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    cmd = "python -m benchmarks.cleanup_bench " + " ".join(argv if argv is not None else sys.argv[1:])
    print(f"\nCommand: `{cmd.strip()}` ({(time.perf_counter() - started) / 60:.1f} min). Blob {blob_size:,} bytes.\n")
    print(machine())
    print()
    print(table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
