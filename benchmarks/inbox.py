"""Inbox benchmark: how fast ``celery persist serve`` renders its pages over 10,000 pending suspensions.

``python -m benchmarks.inbox`` (``--count``, ``--runs``, ``--url``; ``--quick`` for 1,000 and 15 runs).

Writes ``--count`` pending suspensions into a fresh PostgreSQL store (tables
``ibench_<id>_*``, dropped at the end) straight through the hub's own record
builder and ``store.put_many`` (as :mod:`benchmarks.waits` does; parking them
through a worker would take minutes and measure something else). Each carries
the metadata ``await_input`` parks with: a prompt, the task, the chain, half
of them a JSON Schema, a fifth of them ``approvals=2`` (the inbox reads their
approvals so far, one store read per row). Then, in this process, through
Starlette's TestClient (ASGI, the thread pool, Jinja rendering; no socket),
times:

* ``GET /``: the first inbox page (50 rows);
* ``GET /?cursor=...``: a page deep in the list (the cursor of page 100 or the last);
* ``GET /?q=...``: a text filter matching 1 in 1,000 (the core reads pages until the page fills, bounded);
* ``GET /api/suspensions?limit=50``: the same rows as JSON;
* ``GET /s/<fingerprint>``: one suspension (describe, form, history);
* ``persist.inbox()`` alone: what the page costs without HTTP and rendering.

Target: ``GET /`` p50 under 100 ms. Nothing here needs a broker or a worker.
"""

from __future__ import annotations

import argparse
import base64
import os
import re
import secrets
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

from celery import Celery

from celery_persist import Persist
from celery_persist.stores.base import Kind, Status

from .targets import _tcp_reason, env_url

__all__ = ["main"]

TOKEN = "inbox-bench-" + secrets.token_hex(16)
SCHEMA = {
    "type": "object",
    "properties": {
        "approved": {"type": "boolean", "title": "Approved"},
        "comment": {"type": "string", "maxLength": 500, "title": "Comment"},
        "amount": {"type": "integer", "minimum": 0, "maximum": 100000, "title": "Amount"},
        "priority": {"enum": ["low", "normal", "high"], "type": "string", "title": "Priority"},
    },
    "required": ["approved"],
}


def _write(persist: Persist, count: int) -> str:
    """``count`` pending suspensions; returns the fingerprint of one of them."""
    hub = persist.ready()
    now = hub.clock()
    batch = []
    fp = ""
    for i in range(count):
        kh = secrets.token_hex(32)
        fp = fp or kh[:12]
        task_id = f"bench-{i}-{secrets.token_hex(8)}"
        metadata: dict[str, Any] = {
            "task_id": task_id,
            "task": "celery_persist.await_input",
            "kind": "chain",
            "prompt": f"Approve expense #{i} ({'rare' if i % 1000 == 7 else 'common'} vendor)?",
            "root_id": task_id,
            "chain_ids": [secrets.token_hex(16)],
            "chain_tasks": ["shop.book_expense"],
            "on_timeout": "fail",
            "wait": "input",
            "journal": f"park:{task_id}",
        }
        if i % 2 == 0:
            metadata["schema"] = SCHEMA
        if i % 5 == 0:
            metadata.update(approvals=2, approvers=None)
        state = {"kind": "chain", "task_id": task_id, "chain": [{"task": "shop.book_expense", "args": [i]}]}
        batch.append(hub._build(kh, Kind.SUSPENSION, Status.SUSPENDED, state, metadata, now - i, now + 7 * 86400, kh[:12]))
        if len(batch) >= 1000:
            hub.store.put_many(batch)
            batch.clear()
    if batch:
        hub.store.put_many(batch)
    return fp


def _analyze(url: str, prefix: str) -> None:
    """Fresh planner statistics after a bulk load, as autovacuum would give a live table."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        for (table,) in conn.execute("SELECT tablename FROM pg_tables WHERE tablename LIKE %s", (prefix + "%",)).fetchall():
            conn.execute(f'ANALYZE "{table}"')


def _time(fn: Callable[[], Any], runs: int, warmup: int = 3) -> list[float]:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1000)
    return samples


def _pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=10_000, help="pending suspensions to write (default 10,000)")
    parser.add_argument("--runs", type=int, default=50, help="timed requests per case (default 50)")
    parser.add_argument("--url", default=env_url("postgres", "postgresql://127.0.0.1/test"), help="PostgreSQL URL")
    parser.add_argument("--quick", action="store_true", help="1,000 suspensions, 15 runs")
    args = parser.parse_args(argv)
    if args.quick:
        args.count, args.runs = 1000, 15
    why = _tcp_reason(args.url, 5432)
    if why:
        print(f"inbox benchmark skipped: {why}", file=sys.stderr)
        return 0

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Starlette 1.x prefers httpx2 for its TestClient; httpx still works
        from starlette.testclient import TestClient

    from celery_persist.web import create_app

    prefix = f"ibench_{secrets.token_hex(3)}_"
    app = Celery("inbox-bench", broker="memory://", backend="cache+memory://", set_as_current=False)
    persist = Persist(
        app,
        store_url=args.url,
        store_options={"prefix": prefix},
        keys="bench:" + base64.b64encode(os.urandom(32)).decode("ascii"),
        web_tokens=[TOKEN],
        send_events=False,
    )
    try:
        t0 = time.monotonic()
        fp = _write(persist, args.count)
        _analyze(args.url, prefix)
        print(f"wrote {args.count:,} pending suspensions in {time.monotonic() - t0:.1f} s (tables {prefix}*)", file=sys.stderr)
        headers = {"Authorization": f"Bearer {TOKEN}"}
        rows: list[tuple[str, list[float]]] = []
        with TestClient(create_app(persist), headers=headers) as client:

            def get(path: str) -> Callable[[], Any]:
                def call() -> Any:
                    response = client.get(path)
                    if response.status_code != 200:
                        raise RuntimeError(f"GET {path}: {response.status_code}")
                    return response

                return call

            first = get("/")()
            if first.text.count('data-label="Prompt"') != 50:
                raise RuntimeError("the first inbox page does not show 50 rows")
            cursor_path = "/"
            for _ in range(min(99, args.count // 50 - 1)):
                found = re.search(r'href="(/\?[^"]*cursor=[^"]+)"', client.get(cursor_path).text)
                if found is None:
                    break
                cursor_path = found.group(1).replace("&amp;", "&")
            rows.append(("GET / (first page, 50 rows)", _time(get("/"), args.runs)))
            rows.append(("GET /?cursor= (a deep page)", _time(get(cursor_path), args.runs)))
            rows.append(("GET /?q=rare (1 in 1,000 match)", _time(get("/?q=rare"), args.runs)))
            rows.append(("GET /api/suspensions?limit=50", _time(get("/api/suspensions?limit=50"), args.runs)))
            rows.append(("GET /s/<fingerprint>", _time(get(f"/s/{fp}"), args.runs)))
            rows.append(("persist.inbox() alone", _time(lambda: persist.inbox(limit=50), args.runs)))
    finally:
        drop = getattr(persist.hub.store, "drop", None)
        if callable(drop):
            drop()
        persist.hub.close()

    print(f"\ninbox: {args.count:,} pending suspensions on PostgreSQL, {args.runs} runs per case (ms)\n")
    print(f"{'case':<36} {'p50':>8} {'p90':>8} {'max':>8}")
    for name, samples in rows:
        print(f"{name:<36} {statistics.median(samples):>8.1f} {_pct(samples, 0.9):>8.1f} {max(samples):>8.1f}")
    p50 = statistics.median(rows[0][1])
    print(f"\ntarget GET / p50 < 100 ms: {'met' if p50 < 100 else 'MISSED'} ({p50:.1f} ms)")
    return 0 if p50 < 100 else 1


if __name__ == "__main__":
    sys.exit(main())
