"""Trust II on a real worker: faults that used to hang or lose a flow now fail loudly or recover."""

from __future__ import annotations

import multiprocessing
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from celery import chain, chord, group

from celery_persist import Persist
from celery_persist.flow import rename_tasks
from tests.e2e import flows
from tests.e2e.harness import Stack, wait_for
from tests.integration.test_redis_store import RedisServer

N_OUTAGE = 60

pytestmark = pytest.mark.e2e


def test_a_wait_in_a_chord_header_fails_the_chord_instead_of_hanging(stack: Stack) -> None:
    tag = stack.tag()
    res = chord(
        [stack.sig("e2e.review", "a"), stack.await_input(prompt="inside a chord?")],
        stack.sig("e2e.publish", tag=tag),
    ).apply_async()
    # 0.1 parked the header member and the body never ran, with no error anywhere.
    wait_for(lambda: res.state == "FAILURE", 30, f"the chord to fail (is {res.state})")
    assert "group or a chord header" in str(res.result)
    assert stack.recorded(tag) == []  # the body did not run


def test_a_wait_in_a_group_fails_that_member(stack: Stack) -> None:
    res = group(stack.sig("e2e.review", "a"), chain(stack.sig("e2e.review", "b"), stack.await_input())).apply_async()
    wait_for(lambda: res.ready(), 30, "the group to finish")
    states = sorted(r.state for r in res.results)
    assert states == ["FAILURE", "SUCCESS"], states


@pytest.fixture(scope="module")
def own_stack(make_stack: Callable[..., Stack]) -> Iterator[Stack]:
    """A stack of its own: these tests run cleanup as if leases had lapsed, for every record in its store."""
    s = make_stack(store="sqlite")
    yield s
    s.close()


@pytest.mark.parametrize("at", ["claimed", "recorded", "sent"])
def test_a_resumer_killed_at_any_step_runs_the_continuation_exactly_once(own_stack: Stack, at: str) -> None:
    stack = own_stack
    tag = stack.tag()
    res = chain(stack.await_input(prompt=f"killed {at}", timeout=600), stack.sig("e2e.publish", tag=tag)).apply_async()
    key = stack.persist.suspension_key(res, timeout=20)
    proc = multiprocessing.get_context("fork").Process(target=flows.resume_and_die, args=(stack.config, key, "first", at))
    proc.start()
    proc.join(timeout=60)
    assert proc.exitcode == -signal.SIGKILL
    assert stack.persist.load(key).status == "claimed"
    # Cleanup once the lease has lapsed: re-open a bare claim, finish a recorded dispatch.
    assert stack.persist.cleanup(now=time.time() + stack.persist.config.lease + 1) >= 1
    if at == "claimed":
        assert stack.persist.load(key).status == "suspended"
        stack.persist.resume(key, "second")
        expected = "second"
    else:
        assert stack.persist.load(key).status == "resumed"
        expected = "first"  # the input the dead resumer recorded; never another one
    assert res.get(timeout=30) == {"published": expected}
    if at == "sent":
        # The resumer's copy and cleanup's copy both reached the worker: one was dropped.
        wait_for(lambda: b"dropped a second copy" in stack.worker.log_path.read_bytes(), 30, "the duplicate to be dropped")
    stack.sig("e2e.publish", "sentinel", tag=f"{tag}:sentinel").apply_async()
    stack.wait_recorded(f"{tag}:sentinel", 1, timeout=30)
    assert stack.recorded(tag) == [expected]


def test_a_deploy_that_renames_the_next_task_loses_nothing(make_stack: Callable[..., Stack]) -> None:
    stack = make_stack(store="sqlite")
    try:
        tag = stack.tag()
        res = chain(stack.sig("e2e.review", "doc"), stack.await_input(prompt="ship?"), stack.sig("e2e.publish", tag=tag)).apply_async()
        key = stack.persist.suspension_key(res, timeout=20)
        # Deploy: the new workers know e2e.publish only as e2e.publish_v2.
        stack.worker.stop()
        stack.config["renamed"] = {"e2e.publish": "e2e.publish_v2"}
        stack.start()
        stack.persist.resume(key, {"secret_input": "S3CRET-INPUT-7"})
        # The worker refuses the continuation; the flow is suspended again, not lost.
        wait_for(lambda: stack.persist.load(key).status == "suspended", 30, "the suspension to be put back")
        log = stack.worker.log_path.read_bytes()
        assert b"e2e.publish" in log and b"suspended again" in log
        assert b"S3CRET-INPUT-7" not in log  # the resume input never reaches the worker log
        # The operator renames the task in the parked flows, then the same key resumes.
        assert stack.persist.hub.rewrite_states(lambda s: flows_rename(s)) == 1
        stack.persist.resume(key, "approved")
        stack.wait_recorded(tag, 1, timeout=30)
        assert stack.recorded(tag) == ["approved"]
    finally:
        stack.close()


def flows_rename(state: object) -> tuple[object, int]:
    return rename_tasks(state, {"e2e.publish": "e2e.publish_v2"})


def test_task_aliases_send_a_parked_flow_to_the_renamed_task(make_stack: Callable[..., Stack]) -> None:
    stack = make_stack(store="sqlite")
    try:
        tag = stack.tag()
        res = chain(stack.await_input(prompt="ship?"), stack.sig("e2e.publish", tag=tag)).apply_async()
        key = stack.persist.suspension_key(res, timeout=20)
        stack.worker.stop()
        stack.config["renamed"] = {"e2e.publish": "e2e.publish_v2"}
        stack.start()
        resumer = flows.make_app({**stack.config, "aliases": {"e2e.publish": "e2e.publish_v2"}})
        try:
            Persist.of(resumer).resume(key, "via-alias")
        finally:
            resumer.close()
        stack.wait_recorded(tag, 1, timeout=30)
        assert stack.recorded(tag) == ["via-alias"]
        assert stack.persist.load(key).status == "resumed"
    finally:
        stack.close()


def test_parks_ride_out_store_restarts(make_stack: Callable[..., Stack], tmp_path: Path) -> None:
    """A private Redis store (AOF, fsync always) is killed and restarted twice while a real worker parks."""
    server = RedisServer(tmp_path / "store", appendonly="yes", appendfsync="always")
    server.start()
    stack = make_stack(store="sqlite", store_url=server.url)
    try:
        tag = stack.tag()
        first = chain(stack.await_input(prompt="warm-up", timeout=600), stack.sig("e2e.publish", tag=tag)).apply_async()
        keys = [stack.persist.suspension_key(first, timeout=20)]  # the worker has its store set up
        flows_ = [
            chain(stack.await_input(prompt=f"flow {i}", timeout=600), stack.sig("e2e.publish", tag=tag)).apply_async()
            for i in range(N_OUTAGE)
        ]
        for outage in (1.0, 3.0):  # seconds the store is away: what a restart or failover costs
            server.kill()
            time.sleep(outage)  # the fault itself, not a wait for something
            server.start()
        keys += [stack.persist.suspension_key(r, timeout=120) for r in flows_]
        assert len(set(keys)) == N_OUTAGE + 1  # every park survived: none failed on the outage
        assert b"store unavailable during the park" in stack.worker.log_path.read_bytes()  # the outage did hit parks
        for i, key in enumerate(keys):
            stack.persist.resume(key, i)
        assert [r.get(timeout=60) for r in [first, *flows_]] == [{"published": i} for i in range(N_OUTAGE + 1)]
        stack.sig("e2e.publish", "sentinel", tag=f"{tag}:sentinel").apply_async()
        stack.wait_recorded(f"{tag}:sentinel", 1, timeout=30)
        assert sorted(stack.recorded(tag)) == list(range(N_OUTAGE + 1))
    finally:
        stack.close()
        server.stop()
