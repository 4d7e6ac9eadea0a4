"""Timers, events and parallel waits through real workers and a real ``celery beat``.

Each store gets a stack of its own with a beat subprocess (timers fire only
through the beat entry ``celery-persist-timers``; no test calls cleanup by
hand here). Steps record when they started (``e2e.stamp``), so lateness and
"never early" are checked against the wall clock.
"""

from __future__ import annotations

import multiprocessing
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from celery import chain, chord, group

from celery_persist import AwaitTimeout, ConfigurationError, StateTooLarge
from celery_persist.persist import SUSPENDED
from tests.e2e import flows
from tests.e2e.harness import Stack, wait_for, wait_state

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def beat_stack(request: pytest.FixtureRequest, make_stack: Callable[..., Stack]) -> Iterator[Stack]:
    stack = make_stack(store=request.param, timer_interval=0.5)
    stack.start_beat()
    yield stack
    stack.close()


def _sleep(stack: Stack, **kwargs: Any) -> Any:
    return stack.app.signature("celery_persist.sleep", kwargs=kwargs)


def _await_event(stack: Stack, topic: str, **kwargs: Any) -> Any:
    return stack.app.signature("celery_persist.await_event", args=(topic,), kwargs=kwargs)


# -- timers ------------------------------------------------------------------------------------


def test_a_chain_sleeps_in_the_store_and_wakes_once_never_early(beat_stack: Stack) -> None:
    tag = beat_stack.tag()
    wake_at = time.time() + 3
    res = chain(
        beat_stack.sig("e2e.review", tag),
        _sleep(beat_stack, until=datetime.fromtimestamp(wake_at, tz=timezone.utc).isoformat()),
        beat_stack.sig("e2e.stamp", tag=tag),
    ).apply_async()
    sleeping = wait_state(res.parent, SUSPENDED)
    assert sleeping.info["wait"] == "timer"
    assert datetime.fromisoformat(sleeping.info["wake_at"]).timestamp() == pytest.approx(wake_at, abs=1e-3)
    assert res.get(timeout=30) == f"reviewed:{tag}"  # the previous result passes through the sleep
    [fired] = beat_stack.recorded(tag)
    assert fired["at"] >= wake_at, "a timer fired early"
    assert fired["at"] - wake_at < 0.5 + 5, "the timer fired far later than the beat interval allows"


def test_timers_survive_worker_and_beat_restarts_and_two_beats(beat_stack: Stack) -> None:
    tags = [beat_stack.tag() for _ in range(4)]
    results = [chain(_sleep(beat_stack, seconds=4), beat_stack.sig("e2e.stamp", tag=t)).apply_async((t,)) for t in tags]
    for r in results:
        wait_state(r.parent, SUSPENDED)
    # Everything that could hold a timer goes down: the worker and the beat.
    beat_stack.worker.stop(warm=False)
    for beat in beat_stack.beats:
        beat.stop()
    beat_stack.worker.start(beat_stack.app)
    beat_stack.start_beat("second")
    beat_stack.start_beat("third")  # two beats at once: each timer must still fire once
    for t in tags:
        wait_for(lambda t=t: beat_stack.recorded(t), 40, f"timer {t} to fire")
    # An observation window, not synchronisation: five more ticks of each beat, and no timer fires again.
    time.sleep(2.5)
    assert [len(beat_stack.recorded(t)) for t in tags] == [1, 1, 1, 1]


#: Timers parked for the kill test: one page of a fire pass (500), so no continuation is
#: out when the pass is caught half way.
KILLED_TIMERS = 300


def test_a_worker_killed_while_it_fires_timers_loses_none_and_runs_none_twice(make_stack: Callable[..., Stack]) -> None:
    """SIGKILL of the whole worker in the middle of a fire pass.

    Before the fire lease, a pass moved its page to ``expired`` first and sent the
    continuations after: a kill in between lost every timer not yet sent.
    """
    stack = make_stack(
        store="sqlite", timer_interval=0.5, lease=3, visibility_timeout=8, unacked_restore_interval=1, unacked_restore_throttle=1
    )
    try:
        tag, hub = stack.tag(), stack.persist.hub
        wake_at = time.time() + 10
        until = datetime.fromtimestamp(wake_at, tz=timezone.utc).isoformat()
        results = [chain(_sleep(stack, until=until), stack.sig("e2e.stamp", tag=tag)).apply_async((i,)) for i in range(KILLED_TIMERS)]
        wait_state(results[0].parent, SUSPENDED, timeout=30)  # the worker has made the store's tables
        wait_for(lambda: len(hub.list(status="suspended", limit=KILLED_TIMERS).items) == KILLED_TIMERS, 60, "every timer to park")
        wait_for(lambda: time.time() > wake_at, 20, "the timers to fall due")
        stack.start_beat()

        def firing() -> bool:
            return bool(hub.list(status="claimed", limit=1).items or hub.list(status="expired", limit=1).items)

        wait_for(firing, 20, "a fire pass to take the timers", interval=0.005)
        stack.worker.kill()  # SIGKILL to the worker and its pool, in the middle of the pass
        assert len(stack.recorded(tag)) < KILLED_TIMERS, "the pass had finished before the kill: nothing was tested"

        stack.worker.start(stack.app)
        stack.wait_recorded(tag, KILLED_TIMERS, timeout=90)
        # An observation window, not synchronisation: a few more beat ticks, and nothing runs again.
        time.sleep(2)
        fired = stack.recorded(tag)
        assert sorted(r["value"] for r in fired) == list(range(KILLED_TIMERS)), "each timer fired exactly once"
        assert min(r["at"] for r in fired) >= wake_at, "a timer fired early"
        assert not hub.list(status="claimed", limit=1).items
    finally:
        stack.close()


def test_a_timer_in_the_past_fires_at_once_and_a_naive_until_is_refused(beat_stack: Stack) -> None:
    tag = beat_stack.tag()
    past = datetime.now(timezone.utc) - timedelta(hours=1)
    res = chain(_sleep(beat_stack, until=past.isoformat()), beat_stack.sig("e2e.stamp", tag=tag)).apply_async(("early",))
    assert res.get(timeout=20) == "early"
    naive = chain(_sleep(beat_stack, until="2030-01-01T00:00:00"), beat_stack.sig("e2e.stamp", tag=tag)).apply_async(("x",))
    with pytest.raises(ConfigurationError, match="timezone"):
        naive.get(timeout=20)


def test_a_persistent_task_sleeps_then_waits_for_an_event(beat_stack: Stack) -> None:
    tag, key = beat_stack.tag(), beat_stack.tag()
    res = beat_stack.sig("e2e.task_waits", tag, "task.topic", key).apply_async()
    started = time.time()
    wait_for(lambda: res.state == SUSPENDED and res.info.get("wait") == "event", 30, "the task to wait for its event")
    assert time.time() - started >= 0.9  # it slept first
    woken = beat_stack.persist.signal("task.topic", key, {"n": 1})
    assert woken == 1
    assert res.get(timeout=30) == {"payload": {"n": 1}}
    assert len(beat_stack.recorded(f"{tag}:runs")) == 3  # first run, after the timer, after the event


# -- events ------------------------------------------------------------------------------------


def test_a_signal_wakes_every_waiting_flow_once(beat_stack: Stack) -> None:
    tag, order = beat_stack.tag(), beat_stack.tag()
    waiting = [
        chain(beat_stack.sig("e2e.review", i), _await_event(beat_stack, "payment.settled", key=order), beat_stack.sig("e2e.stamp", tag=tag))
        for i in range(3)
    ]
    other = chain(_await_event(beat_stack, "payment.settled", key="someone-else"), beat_stack.sig("e2e.stamp", tag=f"{tag}:other"))
    results = [w.apply_async() for w in waiting]
    other_res = other.apply_async(("x",))
    for r in results:
        info = wait_state(r.parent, SUSPENDED).info
        assert (info["wait"], info["topic"], info["event_key"]) == ("event", "payment.settled", order)
    wait_state(other_res.parent, SUSPENDED)
    # From a bare Celery client, by task name.
    sent = beat_stack.app.send_task("celery_persist.signal", args=["payment.settled", order, {"amount": 12}])
    assert sent.get(timeout=20) == 3
    assert [r.get(timeout=20) for r in results] == [{"amount": 12}] * 3
    assert beat_stack.persist.signal("payment.settled", order, {"amount": 13}) == 0  # nobody waits any more
    assert len(beat_stack.recorded(tag)) == 3
    assert other_res.parent.state == SUSPENDED and beat_stack.recorded(f"{tag}:other") == []


def test_a_buffered_signal_reaches_a_flow_that_waits_later(beat_stack: Stack) -> None:
    tag, order = beat_stack.tag(), beat_stack.tag()
    assert beat_stack.persist.signal("doc.signed", order, {"by": "ann"}, buffer=60) == 0
    res = chain(_await_event(beat_stack, "doc.signed", key=order), beat_stack.sig("e2e.stamp", tag=tag)).apply_async(("start",))
    assert res.get(timeout=20) == {"by": "ann"}
    second = chain(_await_event(beat_stack, "doc.signed", key=order), beat_stack.sig("e2e.stamp", tag=tag)).apply_async(("again",))
    assert second.get(timeout=20) == {"by": "ann"}  # each later waiter takes it once
    assert len(beat_stack.recorded(tag)) == 2


def test_an_event_wait_times_out_through_the_beat(beat_stack: Stack) -> None:
    tag = beat_stack.tag()
    by_default = chain(
        _await_event(beat_stack, "partner.replied", key=tag, timeout=1, on_timeout="default", default={"reply": None}),
        beat_stack.sig("e2e.stamp", tag=tag),
    ).apply_async(("asked",))
    never = _await_event(beat_stack, "partner.replied", key=f"{tag}-2", timeout=1)
    failing = chain(never, beat_stack.sig("e2e.stamp", tag=tag)).apply_async(("asked",))
    assert by_default.get(timeout=30) == {"reply": None}
    with pytest.raises(AwaitTimeout, match="await_event 'partner.replied' timed out before a signal came"):
        failing.get(timeout=30)
    assert beat_stack.persist.signal("partner.replied", tag, {"late": True}) == 0


def _signal_in_process(config: dict[str, Any], topic: str, key: str, payload: Any, barrier: Any, out: Any) -> None:
    from celery_persist import Persist

    app = flows.make_app(config)
    persist = Persist.of(app)
    persist.ready()
    barrier.wait(timeout=60)
    out.put(persist.signal(topic, key, payload))
    app.close()


def test_racing_signals_and_a_timeout_give_each_flow_one_outcome(beat_stack: Stack) -> None:
    tag, order = beat_stack.tag(), beat_stack.tag()
    flows_n = 6
    results = [
        chain(
            _await_event(beat_stack, "race.topic", key=order, timeout=6, on_timeout="default", default="timeout"),
            beat_stack.sig("e2e.stamp", tag=tag),
        ).apply_async((i,))
        for i in range(flows_n)
    ]
    expiries = [datetime.fromisoformat(wait_state(r.parent, SUSPENDED).info["expires_at"]).timestamp() for r in results]
    # Two signalling processes are released together, at the moment the first waits expire
    # (the beat ticks every 0.5 s), so signals and timeouts race for the same flows.
    ctx = multiprocessing.get_context("spawn")
    barrier, out = ctx.Barrier(3), ctx.Queue()
    procs = [
        ctx.Process(target=_signal_in_process, args=(beat_stack.config, "race.topic", order, f"signal-{n}", barrier, out)) for n in range(2)
    ]
    for p in procs:
        p.start()
    wait_for(lambda: time.time() >= min(expiries), 30, "the first expiry")
    barrier.wait(timeout=60)
    woken = [out.get(timeout=90) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    outcomes = [r.get(timeout=30) for r in results]
    assert sum(woken) == sum(1 for o in outcomes if o != "timeout")
    assert len(beat_stack.recorded(tag)) == flows_n  # each flow went on exactly once
    assert all(o in ("signal-0", "signal-1", "timeout") for o in outcomes)


def test_bad_signals_are_refused_and_change_nothing(beat_stack: Stack) -> None:
    tag = beat_stack.tag()
    res = chain(_await_event(beat_stack, "big.topic", key=tag), beat_stack.sig("e2e.stamp", tag=tag)).apply_async(("x",))
    wait_state(res.parent, SUSPENDED)
    with pytest.raises(ConfigurationError, match="at most 256"):
        beat_stack.persist.signal("t" * 257, tag, None)
    with pytest.raises(ConfigurationError, match="non-empty string"):
        beat_stack.persist.signal("big.topic", 42, None)  # type: ignore[arg-type]
    with pytest.raises(StateTooLarge):
        beat_stack.persist.signal("big.topic", tag, "x" * (beat_stack.persist.config.max_state_size + 1))
    assert res.parent.state == SUSPENDED and beat_stack.recorded(tag) == []
    assert beat_stack.persist.signal("nobody.listens", tag, 1) == 0
    long_topic = chain(_await_event(beat_stack, "t" * 257, key=tag), beat_stack.sig("e2e.stamp", tag=tag)).apply_async(("x",))
    with pytest.raises(ConfigurationError, match="at most 256"):
        long_topic.get(timeout=20)


# -- parallel waits ----------------------------------------------------------------------------


def test_a_chord_of_waits_runs_its_body_once_with_results_in_order(beat_stack: Stack) -> None:
    tag, order = beat_stack.tag(), beat_stack.tag()
    header = [
        chain(beat_stack.sig("e2e.review", "a"), beat_stack.await_input(prompt="first?")),
        chain(beat_stack.sig("e2e.review", "b"), _sleep(beat_stack, seconds=1)),
        chain(beat_stack.sig("e2e.review", "c"), _await_event(beat_stack, "chord.topic", key=order)),
        beat_stack.await_input(prompt="fourth?"),
    ]
    res = chord(header, beat_stack.sig("e2e.collect", tag=tag)).apply_async()
    members = res.parent.results
    wait_state(members[0], SUSPENDED)
    wait_state(members[2], SUSPENDED)
    wait_state(members[3], SUSPENDED)
    keys = [beat_stack.persist.suspension_key(members[i], timeout=20) for i in (0, 3)]
    # Resumes arrive out of order and at once; the event and the timer join in.
    threads = [threading.Thread(target=beat_stack.persist.resume, args=(k, v)) for k, v in ((keys[1], "four"), (keys[0], "one"))]
    for t in threads:
        t.start()
    assert beat_stack.persist.signal("chord.topic", order, "three") == 1
    for t in threads:
        t.join(timeout=30)
    assert res.get(timeout=30) == ["one", "reviewed:b", "three", "four"]
    wait_for(lambda: beat_stack.recorded(tag), 10, "the chord body")
    assert beat_stack.recorded(tag) == [["one", "reviewed:b", "three", "four"]]  # the body ran once


def test_a_group_of_waits_resumes_member_by_member(beat_stack: Stack) -> None:
    res = group([beat_stack.await_input(prompt=f"m{i}") for i in range(3)]).apply_async()
    keys = [beat_stack.persist.suspension_key(r, timeout=20) for r in res.results]
    for i in (2, 0, 1):
        beat_stack.persist.resume(keys[i], i * 10)
    assert res.get(timeout=20) == [0, 10, 20]


def test_a_failing_timeout_in_a_chord_header_fails_the_chord(beat_stack: Stack) -> None:
    tag = beat_stack.tag()
    header = [beat_stack.await_input(prompt="never answered", timeout=1), beat_stack.sig("e2e.review", "ok")]
    res = chord(header, beat_stack.sig("e2e.collect", tag=tag)).apply_async()
    with pytest.raises(Exception) as raised:
        res.get(timeout=30)
    assert "AwaitTimeout" in type(raised.value).__name__ or "timed out" in str(raised.value)
    assert beat_stack.recorded(tag) == []  # the body never ran
