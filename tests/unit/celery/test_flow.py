"""The Celery layer's logic on Celery request contexts, without a worker.

A real app (memory broker, in-memory result backend, SQLite store in a temp
dir) and real Celery task objects; what a worker would do is stood in for by
pushing a request onto the task. What the layer sends is read off Celery's own
``before_task_publish`` signal, so nothing under test is replaced.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery, signals
from celery.exceptions import Ignore

from celery_persist import AwaitTimeout, ConfigurationError, Persist, PersistentTask
from celery_persist import journal as journal_mod
from celery_persist.flow import SUSPENDED, capture, expire_flow, park, revoke_flow
from celery_persist.handlers import on_postrun, on_prerun
from celery_persist.registry import BEAT_ENTRY, bind, binding_of


@pytest.fixture
def sent() -> Iterator[list[dict[str, Any]]]:
    """Every task message published while the test runs: ``{"task", "id", "args", "embed", "headers"}``."""
    messages: list[dict[str, Any]] = []

    def record(sender: Any = None, body: Any = None, headers: Any = None, **_: Any) -> None:
        args, kwargs, embed = body
        messages.append(
            {"task": headers["task"], "id": headers["id"], "args": list(args), "kwargs": kwargs, "embed": embed, "headers": headers}
        )

    signals.before_task_publish.connect(record, weak=False)
    yield messages
    signals.before_task_publish.disconnect(record)


def _sig(app: Celery, name: str, task_id: str, *args: Any) -> dict[str, Any]:
    return dict(app.signature(name, args, options={"task_id": task_id}))


@pytest.fixture(autouse=True)
def ids() -> dict[str, str]:
    """Task ids unique to the test: the in-memory result backend is shared by the whole process."""
    suffix = uuid.uuid4().hex[:8]
    IDS.update({name: f"{name}-{suffix}" for name in ("parked", "root", "b", "c", "link", "err", "job")})
    return IDS


IDS: dict[str, str] = {}


def _request(app: Celery, **extra: Any) -> dict[str, Any]:
    """What a worker puts on ``task.request`` for the parked step of ``a | await_input | b | c``."""
    return {
        "id": IDS["parked"],
        "task": "celery_persist.await_input",
        "root_id": IDS["root"],
        "parent_id": IDS["root"],
        "group": None,
        # Celery carries the rest of the chain reversed: the next step last.
        "chain": [_sig(app, "t.c", IDS["c"]), _sig(app, "t.b", IDS["b"], "extra")],
        "callbacks": [_sig(app, "t.link", IDS["link"])],
        "errbacks": [_sig(app, "t.err", IDS["err"])],
        "delivery_info": {"priority": 3, "exchange": "", "routing_key": "approvals"},
        "hostname": "worker@test",
        "called_directly": False,
        "is_eager": False,
        **extra,
    }


def test_capture_keeps_the_chain_as_plain_dicts_with_frozen_ids(app: Celery) -> None:
    Persist(app)
    task = app.tasks["celery_persist.await_input"]
    task.push_request(**_request(app))
    try:
        state = capture(task.request, kind="chain", previous=41, include_previous=False)
    finally:
        task.pop_request()
    assert state["task_id"] == IDS["parked"] and state["root_id"] == IDS["root"]
    assert [s["task"] for s in state["chain"] or []] == ["t.c", "t.b"]
    assert [s["options"]["task_id"] for s in state["chain"] or []] == [IDS["c"], IDS["b"]]
    assert all(type(s) is dict for s in state["chain"] or [])  # no Signature objects in the stored state
    assert state["routing_key"] == "approvals" and state["priority"] == 3
    assert state["previous"] == 41


def test_park_stores_one_suspension_shows_suspended_and_stops_the_chain(app: Celery) -> None:
    persist = Persist(app)
    task = app.tasks["celery_persist.await_input"]
    task.push_request(**_request(app))
    try:
        state = capture(task.request, kind="chain", previous=1, include_previous=False, on_timeout="fail", default=None, prompt="ok?")
        with pytest.raises(Ignore):
            park(task, persist.binding, state, prompt="ok?", timeout=60, on_timeout="fail", notify=None, journal_name="await:parked-id")
        meta = app.backend.get_task_meta(IDS["parked"])
        key = persist.hub.unwrap_key(meta["result"]["suspension_key"])
        assert key not in str(meta)  # the result backend holds the key wrapped, never as it is
        assert meta["status"] == SUSPENDED and meta["result"]["prompt"] == "ok?" and meta["result"]["expires_at"]
        suspension = persist.load(key)
        assert suspension.status == "suspended"
        assert suspension.metadata["chain_ids"] == [IDS["b"], IDS["c"]]  # in run order
        # A redelivered message parks nothing new: the same suspension is announced again.
        with pytest.raises(Ignore):
            park(task, persist.binding, state, prompt="ok?", timeout=60, on_timeout="fail", notify=None, journal_name="await:parked-id")
        assert persist.hub.unwrap_key(app.backend.get_task_meta(IDS["parked"])["result"]["suspension_key"]) == key
        assert len(persist.hub.list(status="suspended").items) == 1
    finally:
        task.pop_request()


def test_park_refuses_to_run_eagerly(app: Celery) -> None:
    persist = Persist(app)
    task = app.tasks["celery_persist.await_input"]
    task.push_request(**_request(app, is_eager=True))
    try:
        with pytest.raises(ConfigurationError, match="eagerly"):
            park(task, persist.binding, {"kind": "chain"}, prompt=None, timeout=None, on_timeout="fail", notify=None, journal_name="x")
        with pytest.raises(ConfigurationError):
            task.run(1)  # the task body itself, under an eager request
    finally:
        task.pop_request()


def _parked(app: Celery, **request: Any) -> tuple[Persist, str]:
    persist = Persist(app)
    task = app.tasks["celery_persist.await_input"]
    task.push_request(**_request(app, **request))
    try:
        with pytest.raises(Ignore):
            task.run(7, prompt="approve?", timeout=60)
    finally:
        task.pop_request()
    return persist, app.backend.get_task_meta(IDS["parked"])["result"]["suspension_key"]


def test_resume_sends_the_next_step_with_the_input_first_and_the_frozen_id(app: Celery, sent: list[dict[str, Any]]) -> None:
    persist, key = _parked(app)
    result = persist.resume(key, {"approved": True})
    assert result.id == IDS["b"]
    by_task = {m["task"]: m for m in sent}
    nxt = by_task["t.b"]
    assert nxt["id"] == IDS["b"] and nxt["args"] == [{"approved": True}, "extra"]
    assert nxt["headers"]["parent_id"] == IDS["parked"] and nxt["headers"]["root_id"] == IDS["root"]
    assert [s["task"] for s in nxt["embed"]["chain"]] == ["t.c"]  # the rest of the chain rides along
    assert by_task["t.link"]["args"] == [{"approved": True}]  # the parked step's callbacks run too
    assert app.backend.get_task_meta(IDS["parked"])["status"] == "SUCCESS"
    assert persist.load(key).status == "resumed"


def test_include_previous_passes_both(app: Celery, sent: list[dict[str, Any]]) -> None:
    persist = Persist(app)
    task = app.tasks["celery_persist.await_input"]
    task.push_request(**_request(app))
    try:
        with pytest.raises(Ignore):
            task.run(7, include_previous=True)
    finally:
        task.pop_request()
    key = app.backend.get_task_meta(IDS["parked"])["result"]["suspension_key"]
    persist.resume(key, "yes")
    assert next(m for m in sent if m["task"] == "t.b")["args"][0] == {"previous": 7, "input": "yes"}


def test_timeout_fails_the_step_and_runs_errbacks(app: Celery, sent: list[dict[str, Any]]) -> None:
    persist, key = _parked(app)
    expire_flow(persist.binding, persist.load(key))
    meta = app.backend.get_task_meta(IDS["parked"])
    assert meta["status"] == "FAILURE" and isinstance(meta["result"], AwaitTimeout)
    assert [m["task"] for m in sent] == ["t.err"]


def test_timeout_with_default_resumes_with_the_default(app: Celery, sent: list[dict[str, Any]]) -> None:
    persist = Persist(app)
    task = app.tasks["celery_persist.await_input"]
    task.push_request(**_request(app))
    try:
        with pytest.raises(Ignore):
            task.run(7, timeout=60, on_timeout="default", default="fallback")
    finally:
        task.pop_request()
    key = app.backend.get_task_meta(IDS["parked"])["result"]["suspension_key"]
    expire_flow(persist.binding, persist.load(key))
    assert next(m for m in sent if m["task"] == "t.b")["args"][0] == "fallback"


def test_cancel_revokes_the_parked_step_and_the_chain_after_it(app: Celery) -> None:
    persist, key = _parked(app)
    suspension = persist.hub.cancel(key)
    revoke_flow(persist.binding, suspension)
    for task_id in (IDS["parked"], IDS["b"], IDS["c"]):
        assert app.backend.get_task_meta(task_id)["status"] == "REVOKED", task_id


# -- PersistentTask and its journal -------------------------------------------------------------


@pytest.fixture
def crunch(app: Celery) -> Any:
    Persist(app)

    @app.task(base=PersistentTask, bind=True, shared=False, name="t.crunch")
    def crunch(self: PersistentTask, n: int) -> Any:
        state = self.checkpoint_state or {"done": 0}
        state["done"] += n
        self.checkpoint(state)
        first = self.await_input(prompt="first?")
        second = self.await_input(prompt="second?")
        return state, first, second

    return crunch


def _run(task: Any, task_id: str, *args: Any) -> Any:
    task.push_request(
        id=task_id, task=task.name, args=list(args), kwargs={}, called_directly=False, is_eager=False, hostname="w@t", delivery_info={}
    )
    try:
        return task.run(*args)
    finally:
        task.pop_request()


def test_persistent_task_parks_then_its_nth_await_returns_the_nth_input(app: Celery, crunch: Any, sent: list[dict[str, Any]]) -> None:
    persist = Persist.of(app)
    with pytest.raises(Ignore):
        _run(crunch, IDS["job"], 5)
    assert persist.checkpoint_state(IDS["job"]) == {"done": 5}
    persist.resume(app.backend.get_task_meta(IDS["job"])["result"]["suspension_key"], "one")
    rerun = sent[-1]
    assert rerun["task"] == "t.crunch" and rerun["id"] == IDS["job"] and rerun["args"] == [5]  # same id and arguments
    with pytest.raises(Ignore):
        _run(crunch, IDS["job"], 5)  # the re-run: first await answered, second parks
    persist.resume(app.backend.get_task_meta(IDS["job"])["result"]["suspension_key"], "two")
    state, first, second = _run(crunch, IDS["job"], 5)
    assert (first, second) == ("one", "two")
    assert state == {"done": 15}  # the checkpoint carried over each re-run (5 + 5 + 5)


def test_journal_record_input_is_idempotent_per_index(app: Celery) -> None:
    binding = Persist(app).binding
    journal_mod.record_input(binding, "t1", 0, "a")
    journal_mod.record_input(binding, "t1", 0, "a")  # a retried resume of the same await
    journal_mod.record_input(binding, "t1", 1, "b")
    assert journal_mod.load(binding, "t1")["inputs"] == ["a", "b"]
    journal_mod.record_input(binding, "t1", 1, "c")
    assert journal_mod.load(binding, "t1")["inputs"] == ["a", "c"]


def test_receivers_keep_the_run_record_and_drop_the_journal_on_success(app: Celery, crunch: Any) -> None:
    binding = Persist(app).binding
    crunch.push_request(id=IDS["job"], args=[1], kwargs={}, hostname="w@t", retries=0)
    try:
        on_prerun(task_id=IDS["job"], task=crunch, args=[1], kwargs={})
        crunch.checkpoint({"done": 1})
        record = journal_mod.checkpoint_record(binding, IDS["job"])
        assert record.metadata["worker"] == "w@t" and record.metadata["task"] == "t.crunch"
        assert len(record.metadata["args_fingerprint"]) == 12  # a fingerprint of the arguments, not the arguments
        on_postrun(task_id=IDS["job"], task=crunch, state="FAILURE")
        assert journal_mod.checkpoint_record(binding, IDS["job"]).metadata["outcome"] == "failure"
        on_postrun(task_id=IDS["job"], task=crunch, state="SUCCESS")
        assert journal_mod.checkpoint_record(binding, IDS["job"]) is None
    finally:
        crunch.pop_request()


# -- the registry --------------------------------------------------------------------------------


def test_one_binding_per_app_with_the_beat_entry(app: Celery) -> None:
    first = binding_of(app)
    assert bind(app, lease=1) is first and first.config.lease == 60.0  # later overrides are ignored
    assert Persist(app).binding is first
    assert app.conf.beat_schedule[BEAT_ENTRY]["task"] == "celery_persist.cleanup"


def test_a_chord_member_without_a_group_id_is_refused(app: Celery) -> None:
    persist = Persist(app)
    task = app.tasks["celery_persist.await_input"]
    task.push_request(**{**_request(app), "chord": {"task": "t.body"}})
    try:
        with pytest.raises(ConfigurationError, match="chord header without a group id"):
            task.run(1, prompt="in a chord?")
    finally:
        task.pop_request()
    assert persist.hub.list().items == []  # nothing parked, nothing to clean up


def test_rename_tasks_reaches_every_signature() -> None:
    from celery_persist.flow import rename_tasks

    link = {"task": "old.b", "options": {}}
    state = {
        "kind": "chain",
        "chain": [{"task": "old.c", "options": {"link": [link]}}, {"task": "keep.b", "options": {"link_error": [link]}}],
        "callbacks": [{"task": "old.b", "options": {}}],
        "errbacks": None,
    }
    new, changed = rename_tasks(state, {"old.b": "new.b", "old.c": "new.c"})
    assert changed == 4
    assert [s["task"] for s in new["chain"]] == ["new.c", "keep.b"]
    assert new["chain"][0]["options"]["link"][0]["task"] == "new.b" and new["chain"][1]["options"]["link_error"][0]["task"] == "new.b"
    assert state["chain"][0]["task"] == "old.c"  # the original is left as it was
    rerun, n = rename_tasks({"kind": "task", "task_name": "old.b"}, {"old.b": "new.b"})
    assert (rerun["task_name"], n) == ("new.b", 1)


def test_a_stranded_continuation_puts_its_suspension_back(app: Celery, sent: list[dict[str, Any]]) -> None:
    from celery_persist.keys import key_hash

    persist, wrapped = _parked(app)
    key = persist.hub.unwrap_key(wrapped)
    persist.resume(key, "x")
    assert persist.load(key).status == "resumed"
    assert persist.hub.strand(key_hash(key), "missing-task:t.b")
    assert persist.load(key).status == "suspended"
    assert not persist.hub.strand(key_hash(key), "again")  # only a dispatched suspension goes back
    persist.resume(key, "y")  # the same key resumes it once fixed
    assert [m["args"][0] for m in sent if m["task"] == "t.b"] == ["x", "y"]


def test_unknown_task_log_lines_do_not_print_a_continuation_body() -> None:
    import logging

    from celery_persist.keys import KeyRedactingFilter

    text = "Received unregistered task of type %s.\nThe full contents of the message body was:\n%s\n\nheaders:\n%s"
    record = logging.LogRecord(
        "celery", logging.ERROR, __file__, 1, text, ("'t.b'", "(['S3CRET'], {})", "{'persist_delivery': 'x:1'}"), None
    )
    KeyRedactingFilter().filter(record)
    assert "S3CRET" not in record.getMessage() and "t.b" in record.getMessage()
    other = logging.LogRecord("celery", logging.ERROR, __file__, 1, text, ("'t.x'", "(['visible'], {})", "{}"), None)
    KeyRedactingFilter().filter(other)
    assert "visible" in other.getMessage()  # other apps' unknown tasks are Celery's business
