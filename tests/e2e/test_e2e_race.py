"""Racing resumes: 8 processes resume the same 200 keys; each key resumes exactly once."""

from __future__ import annotations

import multiprocessing
import queue

import pytest
from celery import chain

from tests.e2e import flows
from tests.e2e.harness import Stack, wait_for

pytestmark = pytest.mark.e2e

PROCESSES = 8
KEYS = 200


def test_concurrent_resumes_run_each_continuation_once(stack: Stack) -> None:
    tag = stack.tag()
    results = [
        chain(stack.await_input(prompt=f"race {i}", timeout=600), stack.sig("e2e.publish", tag=tag)).apply_async() for i in range(KEYS)
    ]
    keys = [stack.persist.suspension_key(r, timeout=60) for r in results]
    assert len(set(keys)) == KEYS

    # fork: each child still builds its own app and store (flows.make_app); fork only
    # spares 8 fresh interpreters the import time, which would dominate this test.
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(PROCESSES)
    out = ctx.Queue()
    procs = [ctx.Process(target=flows.resume_every_key, args=(stack.config, n, keys, barrier, out), daemon=True) for n in range(PROCESSES)]
    for p in procs:
        p.start()
    reports = []
    try:
        for _ in procs:
            reports.append(out.get(timeout=120))
    except queue.Empty:
        pytest.fail(f"only {len(reports)} of {PROCESSES} resumer processes reported")
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]

    errors = [e for _, _, _, errs in reports for e in errs]
    assert errors == [], errors[:5]
    winners: dict[int, int] = {}
    for worker, won, already, _ in reports:
        assert len(won) + already == KEYS
        for i in won:
            assert i not in winners, f"key {i} resumed by workers {winners[i]} and {worker}"
            winners[i] = worker
    assert sum(len(won) for _, won, _, _ in reports) == KEYS
    assert sorted(winners) == list(range(KEYS))

    # Every continuation runs, with the input of the process that won its key...
    for i, r in enumerate(results):
        assert r.get(timeout=60) == {"published": {"index": i, "worker": winners[i]}}
    # ...and only once. A duplicate would be queued before this sentinel, which the
    # worker takes in order; its record is the bounded wait for absence.
    stack.sig("e2e.publish", "sentinel", tag=f"{tag}:sentinel").apply_async()
    stack.wait_recorded(f"{tag}:sentinel", 1, timeout=30)
    runs = wait_for(lambda: (r := stack.recorded(tag)) and len(r) >= KEYS and r, 10, "the continuation records")
    assert len(runs) == KEYS
    assert sorted(run["index"] for run in runs) == list(range(KEYS))
