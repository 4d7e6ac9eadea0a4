"""Workers that die or restart: parked flows and checkpoints survive them."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable

import kombu.transport.redis
import pytest
from celery import chain
from celery.result import AsyncResult

from celery_persist.journal import name_of as journal_name
from tests.e2e.harness import Stack, wait_for

pytestmark = pytest.mark.e2e

TOTAL_STEPS = 6
BLOCK_AFTER = 3
VISIBILITY_TIMEOUT = 8
#: kombu 5.7 sweeps unacked messages back every ``unacked_restore_interval`` seconds; older
#: kombu sweeps when a worker starts, then only every 100 s.
PERIODIC_RESTORE = hasattr(kombu.transport.redis.Channel, "unacked_restore_interval")


def test_parked_flows_survive_a_worker_restart(stack: Stack) -> None:
    tag = stack.tag()
    flows = [
        chain(
            stack.sig("e2e.review", f"{tag}-{n}"),
            stack.await_input(prompt="after restart?", timeout=300),
            stack.sig("e2e.publish", tag=tag),
        )
        for n in range(2)
    ]
    results = [f.apply_async() for f in flows]
    keys = [stack.persist.suspension_key(r, timeout=20) for r in results]
    task = stack.sig("e2e.two_awaits", tag=f"{tag}:task").apply_async()
    task_key = stack.persist.suspension_key(task, timeout=20)

    stack.worker.stop()
    # Resumed while no worker runs: the continuation waits in the broker.
    stack.persist.resume(keys[0], "while down")
    stack.worker.start(stack.app)
    # Resumed after the new worker is up.
    stack.persist.resume(keys[1], "after restart")
    stack.persist.resume(task_key, "one")

    assert results[0].get(timeout=30) == {"published": "while down"}
    assert results[1].get(timeout=30) == {"published": "after restart"}
    second = stack.persist.suspension_key(task, timeout=20)
    assert second != task_key
    stack.persist.resume(second, "two")
    assert task.get(timeout=30) == {"first": "one", "second": "two", "task_id": task.id}


@pytest.fixture(scope="module")
def crash_stack(make_stack: Callable[..., Stack]) -> Stack:
    """A worker whose broker gives unacked messages back quickly after a crash.

    The Redis transport redelivers a message whose consumer died only when some
    worker's restore sweep finds it older than ``visibility_timeout``; the test
    kills the worker well within that window, so the first worker cannot
    redeliver to itself before it dies. (kombu before 5.7 ignores the two
    ``unacked_restore_*`` options.)
    """
    return make_stack(store="sqlite", visibility_timeout=VISIBILITY_TIMEOUT, unacked_restore_interval=1, unacked_restore_throttle=1)


def run_until_blocked(stack: Stack, tag: str) -> tuple[AsyncResult, int]:
    res = stack.sig("e2e.steps", tag, TOTAL_STEPS, BLOCK_AFTER).apply_async()
    (pid,) = stack.wait_recorded(f"{tag}:blocked", 1, timeout=20)
    assert stack.recorded(f"{tag}:ran") == list(range(BLOCK_AFTER))
    checkpoint = stack.persist.hub.load_checkpoint(journal_name(res.id))
    assert checkpoint is not None and checkpoint["state"] == {"done": BLOCK_AFTER}
    return res, int(pid)


def assert_resumed_from_checkpoint(stack: Stack, tag: str, res: AsyncResult) -> list[dict[str, int]]:
    assert res.get(timeout=45) == {"done": TOTAL_STEPS}
    starts: list[dict[str, int]] = stack.recorded(f"{tag}:starts")
    assert [s["done"] for s in starts] == [0, BLOCK_AFTER], "the re-run started from the checkpoint, not from 0"
    assert stack.recorded(f"{tag}:ran") == list(range(TOTAL_STEPS)), "no step ran twice"
    wait_for(lambda: stack.persist.hub.load_checkpoint(journal_name(res.id)) is None, 10, "the checkpoint to go on success")
    return starts


def test_sigkill_of_the_pool_process_redelivers_from_checkpoint(crash_stack: Stack) -> None:
    tag = crash_stack.tag()
    res, pid = run_until_blocked(crash_stack, tag)
    assert pid != crash_stack.worker.pid

    os.kill(pid, signal.SIGKILL)  # the pool child running the task; the worker lives on

    first, second = assert_resumed_from_checkpoint(crash_stack, tag, res)
    assert first["pid"] == pid and second["pid"] != pid
    assert first["worker"] == second["worker"] == crash_stack.worker.pid


def test_sigkill_of_the_whole_worker_redelivers_to_a_new_worker(crash_stack: Stack) -> None:
    tag = crash_stack.tag()
    res, _ = run_until_blocked(crash_stack, tag)
    old_worker = crash_stack.worker.pid

    crash_stack.worker.kill()  # SIGKILL to the worker and its pool: nothing acks, nothing requeues
    if not PERIODIC_RESTORE:
        # Older kombu's sweep at start-up is the one that can bring the message back within
        # the test: start the new worker once the message (fetched before the kill) is past
        # visibility_timeout.
        time.sleep(VISIBILITY_TIMEOUT + 1)
    crash_stack.worker.start(crash_stack.app)

    first, second = assert_resumed_from_checkpoint(crash_stack, tag, res)
    assert first["worker"] == old_worker
    assert second["worker"] == crash_stack.worker.pid != old_worker, "redelivered to the new worker"
