"""Approvals under contention: 8 processes race to approve a 3-of-8 suspension on a real store."""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable
from typing import Any

import pytest
from celery import chain

from celery_persist.keys import key_hash
from tests.e2e import flows
from tests.e2e.harness import Stack

pytestmark = pytest.mark.e2e

APPROVERS = [f"approver-{i}" for i in range(8)]


def _approve(config: dict[str, Any], key: str, by: str, barrier: Any, out: Any) -> None:
    from celery_persist import AlreadyResumed, Persist

    app = flows.make_app(config)
    persist = Persist.of(app)
    persist.ready()
    barrier.wait(timeout=60)
    try:
        result = persist.resume(key, {"signed": by}, by=by)
        out.put((by, "dispatched" if result is not None else "recorded"))
    except AlreadyResumed:
        out.put((by, "refused"))
    except Exception as exc:  # noqa: BLE001 - reported to the test
        out.put((by, f"error {type(exc).__name__}: {exc}"))
    app.close()


@pytest.mark.parametrize("store", ["sqlite", "postgresql"])
def test_eight_approvers_racing_for_three_dispatch_once_with_three_approvals(make_stack: Callable[..., Stack], store: str) -> None:
    stack = make_stack(store=store)
    try:
        tag = stack.tag()
        res = chain(stack.await_input(prompt="release?", approvals=3, approvers=APPROVERS), stack.sig("e2e.stamp", tag=tag)).apply_async()
        key = stack.persist.suspension_key(res, timeout=20)
        ctx = multiprocessing.get_context("spawn")
        barrier, out = ctx.Barrier(len(APPROVERS)), ctx.Queue()
        procs = [ctx.Process(target=_approve, args=(stack.config, key, by, barrier, out)) for by in APPROVERS]
        for p in procs:
            p.start()
        outcomes = dict(out.get(timeout=120) for _ in procs)
        for p in procs:
            p.join(timeout=30)
        assert not [o for o in outcomes.values() if o.startswith("error")], outcomes
        assert sorted(outcomes.values()).count("dispatched") == 1, outcomes
        assert sorted(outcomes.values()).count("recorded") == 2, outcomes
        assert sorted(outcomes.values()).count("refused") == 5, outcomes
        approvals = stack.persist.hub.approvals(key_hash(key))
        assert len(approvals) == 3 and len({a["by"] for a in approvals}) == 3
        final = res.get(timeout=30)
        assert [a["by"] for a in final] == [a["by"] for a in approvals]  # in arrival order
        stack.wait_recorded(tag, 1)
        assert len(stack.recorded(tag)) == 1  # exactly one continuation ran
    finally:
        stack.close()
