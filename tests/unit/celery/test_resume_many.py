"""``bulk.resume_many``: many parked flows resumed with claims in batches, one outcome per key."""

from __future__ import annotations

import contextlib
import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from celery import chain, shared_task
from celery.result import AsyncResult

from celery_persist import Persist, await_input, bulk
from celery_persist.bulk import resume_many
from celery_persist.errors import AlreadyResumed, InvalidInput, InvalidKey, SuspensionExpired
from celery_persist.keys import key_hash
from celery_persist.testing import WaitSuspended

_runs: Counter[int] = Counter()
_inputs: dict[int, Any] = {}
_lock = threading.Lock()


@shared_task(name="resume_many_test.start")
def start(n: int) -> int:
    return n


@shared_task(name="resume_many_test.record")
def record(value: Any, n: int) -> int:
    with _lock:
        _runs[n] += 1
        _inputs[n] = value
    return n


@pytest.fixture(autouse=True)
def _fresh_counts() -> None:
    _runs.clear()
    _inputs.clear()


def _park(n: int, **options: Any) -> AsyncResult:
    return chain(start.s(n), await_input.s(prompt=f"flow {n}?", **options), record.s(n)).apply_async()


def test_resume_many(persist_worker: object, persist: Persist, wait_suspended: WaitSuspended, monkeypatch: pytest.MonkeyPatch) -> None:
    flows = [_park(n) for n in range(50)]
    expiring = _park(50, timeout=1)
    typed = [_park(n, schema={"type": "object", "required": ["ok"]}) for n in (51, 52)]
    keys = [wait_suspended(r) for r in flows]
    expired_key = wait_suspended(expiring)
    typed_keys = [wait_suspended(r) for r in typed]

    earlier = range(0, 50, 7)  # resumed before: their continuations already ran, once
    for n in earlier:
        persist.resume(keys[n], f"early-{n}")
    _wait_until(lambda: all(_runs[n] == 1 for n in earlier))
    parked = persist.hub.peek(_hash(persist, expired_key))
    assert parked is not None and parked.expires_at is not None
    time.sleep(max(0.0, parked.expires_at.timestamp() - time.time() + 0.05))  # past its expiry, not yet cleaned up

    store = persist.hub.store
    batches: list[int] = []
    original = store.transition_many

    def counting(changes: Any, *, now: float) -> list[str]:
        batches.append(len(changes))
        return original(changes, now=now)

    monkeypatch.setattr(store, "transition_many", counting)
    items: list[tuple[str, Any]] = [(key, {"n": n}) for n, key in enumerate(keys)]
    items.insert(10, ("not-a-key", "x"))
    items.insert(20, (expired_key, "late"))
    items.append((keys[1], "again"))  # the same key twice in one call: the second is refused
    items += [(typed_keys[0], {"ok": True}), (typed_keys[1], {"no": 1})]
    outcomes = resume_many(persist.binding, items, batch=16)

    assert len(outcomes) == len(items)
    by_key = list(zip(items, outcomes, strict=True))
    for (key, value), outcome in by_key:
        n = keys.index(key) if key in keys else None
        if key == "not-a-key":
            assert isinstance(outcome, InvalidKey)
        elif key == expired_key:
            assert isinstance(outcome, SuspensionExpired)
        elif key == typed_keys[0]:
            assert isinstance(outcome, AsyncResult)
        elif key == typed_keys[1]:
            assert isinstance(outcome, InvalidInput)
        elif n is not None and (n in earlier or value == "again"):
            assert isinstance(outcome, AlreadyResumed), (n, outcome)
        else:
            assert isinstance(outcome, AsyncResult), (n, outcome)
    fresh = [n for n in range(50) if n not in earlier]
    results = [o for o in outcomes if isinstance(o, AsyncResult)]
    assert len(results) == len(fresh) + 1
    for result in results:
        result.get(timeout=20)
    _wait_until(lambda: all(_runs[n] == 1 for n in [*fresh, 51]))
    time.sleep(0.3)  # a second copy of any continuation would have run by now
    assert all(_runs[n] == 1 for n in range(50)), "each continuation ran exactly once"
    assert _runs[50] == 0 and _runs[52] == 0 and _runs[51] == 1
    assert all(_inputs[n] == {"n": n} for n in fresh) and all(_inputs[n] == f"early-{n}" for n in earlier)
    assert all(persist.hub.peek(_hash(persist, keys[n])).status == "resumed" for n in range(50))  # type: ignore[union-attr]
    # Per batch of 16 items, one transition_many claims (the schema-bound keys go one by one) and
    # one completes what was sent, the schema-bound one included.
    claims, completes = batches[0::2], batches[1::2]
    assert len(claims) == len(completes) == 4, batches
    assert sum(claims) == len(fresh) and sum(completes) == len(fresh) + 1, batches


def test_a_batch_that_does_not_go_out_is_sent_by_cleanup_once(
    persist_worker: object, persist: Persist, wait_suspended: WaitSuspended, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The broker fails while the batch flushes: no claim is completed, none is re-opened to
    another resumer, and cleanup sends each continuation after the lease; each runs once."""
    flows = [_park(n) for n in range(5)]
    keys = [wait_suspended(r) for r in flows]
    real = bulk.sending_together

    @contextlib.contextmanager
    def broker_down(binding: Any) -> Iterator[None]:
        with real(binding):
            yield
            raise ConnectionError("broker went away while flushing")

    monkeypatch.setattr(bulk, "sending_together", broker_down)
    outcomes = resume_many(persist.binding, [(k, {"n": n}) for n, k in enumerate(keys)])
    assert all(isinstance(o, ConnectionError) for o in outcomes), outcomes
    assert {persist.hub.peek(_hash(persist, k)).status for k in keys} == {"claimed"}  # type: ignore[union-attr]
    assert all(isinstance(o, AlreadyResumed) for o in resume_many(persist.binding, [(k, "other") for k in keys]))

    monkeypatch.setattr(bulk, "sending_together", real)
    assert persist.cleanup(now=time.time() + persist.config.lease + 1) == 5
    _wait_until(lambda: all(_runs[n] >= 1 for n in range(5)))
    time.sleep(0.3)  # a second copy of any continuation would have run by now
    assert [_runs[n] for n in range(5)] == [1] * 5 and [_inputs[n] for n in range(5)] == [{"n": n} for n in range(5)]
    assert {persist.hub.peek(_hash(persist, k)).status for k in keys} == {"resumed"}  # type: ignore[union-attr]


def _hash(persist: Persist, key: str) -> str:
    return key_hash(persist.hub.unwrap_key(key))


def _wait_until(check: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.02)
