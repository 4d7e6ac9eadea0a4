"""Trust II on a real worker: faults that used to hang or lose a flow now fail loudly or recover."""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from celery import chain, chord, group

from celery_persist import AlreadyResumed, Persist, StoreUnavailable
from celery_persist.flow import rename_tasks
from tests.e2e import flows
from tests.e2e.harness import Stack, wait_for
from tests.integration.test_postgres_restart import private_pg  # noqa: F401 - a fixture, used by name
from tests.integration.test_redis_store import RedisServer

#: Flows parked through the store restarts; CELERY_PERSIST_TEST_OUTAGE_FLOWS=1000 for the long run.
N_OUTAGE = int(os.environ.get("CELERY_PERSIST_TEST_OUTAGE_FLOWS", "60"))

pytestmark = pytest.mark.e2e


def test_a_wait_in_a_chord_header_parks_and_the_body_runs_once_resumed(stack: Stack) -> None:
    """0.1 parked the header member and the body never ran; 0.2 refused it; now the member reports when resumed."""
    tag = stack.tag()
    res = chord(
        [stack.sig("e2e.review", "a"), stack.await_input(prompt="inside a chord?")],
        stack.sig("e2e.publish", tag=tag),
    ).apply_async()
    member = res.parent.results[1]
    key = stack.persist.suspension_key(member, timeout=30)
    assert res.state == "PENDING" and stack.recorded(tag) == []  # the body waits for the parked member
    stack.persist.resume(key, "b")
    assert res.get(timeout=30) == {"published": ["reviewed:a", "b"]}
    assert stack.recorded(tag) == [["reviewed:a", "b"]]


def test_a_wait_in_a_group_parks_that_member_only(stack: Stack) -> None:
    res = group(stack.sig("e2e.review", "a"), chain(stack.sig("e2e.review", "b"), stack.await_input())).apply_async()
    key = stack.persist.suspension_key(res.results[1], timeout=30)
    wait_for(lambda: res.results[0].ready(), 30, "the other member to finish")
    assert not res.ready()
    stack.persist.resume(key, "done")
    assert res.get(timeout=30) == ["reviewed:a", "done"]


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


@pytest.fixture(params=["redis", "postgresql"])
def restartable(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, Callable[[float], None]]]:
    """A private store server of the test's own and a function that crash-restarts it."""
    if request.param == "redis":
        server = RedisServer(tmp_path / "store", appendonly="yes", appendfsync="always")
        server.start()

        def bounce(down: float) -> None:
            server.kill()
            time.sleep(down)  # the fault itself: how long a restart or failover keeps the store away
            server.start()

        yield server.url, bounce
        server.stop()
    else:
        cluster = request.getfixturevalue("private_pg")
        yield cluster.url, lambda down: cluster.restart()  # pg_ctl restart -m immediate: crash, recovery, back


def test_parks_and_resumes_ride_out_store_restarts(
    make_stack: Callable[..., Stack], restartable: tuple[str, Callable[[float], None]]
) -> None:
    """A private store server is crash-restarted again and again while a real worker parks N flows and
    this process resumes them: no park fails, no flow is lost, and every continuation runs exactly once."""
    url, bounce = restartable
    stack = make_stack(store="sqlite", store_url=url, start=False)
    stack.config["lease"] = 2  # a resume cut off by an outage is re-opened (or finished) quickly
    stack.app.close()
    stack.app = flows.make_app(stack.config)
    stack.persist = Persist.of(stack.app)
    stack.start()
    stop = threading.Event()
    outages: list[float] = []

    def restarts() -> None:
        pauses = [0.5, 2.0, 1.0, 3.0]
        while not stop.is_set():
            down = pauses[len(outages) % len(pauses)]
            bounce(down)
            outages.append(down)
            stop.wait(1.5)

    try:
        tag = stack.tag()
        warm = chain(stack.await_input(prompt="warm-up", timeout=900), stack.sig("e2e.publish", tag=tag)).apply_async()
        stack.persist.suspension_key(warm, timeout=20)  # the worker has its store set up
        results = [warm] + [
            chain(stack.await_input(prompt=f"flow {i}", timeout=900), stack.sig("e2e.publish", tag=tag)).apply_async()
            for i in range(1, N_OUTAGE)
        ]
        thread = threading.Thread(target=restarts, daemon=True)
        thread.start()
        keys = [_with_outages(lambda r=r: stack.persist.suspension_key(r, timeout=120)) for r in results]
        assert len(set(keys)) == N_OUTAGE  # every park survived
        for i, key in enumerate(keys):
            _resume_through_outages(stack, key, i)
        stop.set()
        thread.join(timeout=60)
        assert outages, "the store was never restarted"
        assert [r.get(timeout=120) for r in results] == [{"published": i} for i in range(N_OUTAGE)]
        stack.sig("e2e.publish", "sentinel", tag=f"{tag}:sentinel").apply_async()
        stack.wait_recorded(f"{tag}:sentinel", 1, timeout=60)
        runs = stack.recorded(tag)
        assert sorted(runs) == list(range(N_OUTAGE)), f"{len(runs)} runs for {N_OUTAGE} flows"  # none twice, none lost
    finally:
        stop.set()
        stack.close()


def _with_outages(call: Callable[[], str]) -> str:
    deadline = time.monotonic() + 120
    while True:
        try:
            return call()
        except StoreUnavailable:
            assert time.monotonic() < deadline, "the store stayed away"
            time.sleep(0.1)


def _resume_through_outages(stack: Stack, key: str, value: int) -> None:
    """What a careful caller does: retry an outage; a claim cut off by one is finished or re-opened by cleanup."""
    deadline = time.monotonic() + 120
    while True:
        assert time.monotonic() < deadline, f"could not resume {value}"
        try:
            stack.persist.resume(key, value)
            return
        except StoreUnavailable:
            time.sleep(0.1)
        except AlreadyResumed:
            status = _with_outages(lambda: stack.persist.load(key).status)
            if status == "resumed":
                return  # our cut-off resume had recorded its dispatch: cleanup sent it on
            _with_outages(lambda: str(stack.persist.cleanup(now=time.time() + 3)))
