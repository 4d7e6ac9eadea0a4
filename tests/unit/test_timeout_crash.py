"""A cleanup that dies half way through applying timeouts loses none and applies none twice.

The process is "killed" by a handler that raises a ``BaseException`` (nothing in
cleanup catches it, as nothing runs after a SIGKILL). Before the lease, cleanup
moved a whole page to ``expired`` first and applied the policies after: the
records after the crash point were never handled.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest

from celery_persist.hub import PersistenceHub, Suspension
from celery_persist.keys import key_hash
from celery_persist.stores.base import Status

from ._helpers import FakeClock, RecordingStore

FLOWS = 6
CRASH_AT = 3


class Killed(BaseException):
    """The process died here."""


def _park(hub: PersistenceHub, clock: FakeClock) -> list[str]:
    hashes = [key_hash(hub.suspend({"flow": n}, ttl=10)) for n in range(FLOWS)]
    clock.advance(10)
    return hashes


def test_a_cleanup_killed_half_way_loses_no_timeout_and_a_worker_runs_each_once(
    hub: PersistenceHub, store: RecordingStore, clock: FakeClock
) -> None:
    hashes = _park(hub, clock)
    first: list[Suspension] = []

    def dies_midway(s: Suspension) -> None:
        if len(first) == CRASH_AT:
            raise Killed
        first.append(s)

    with pytest.raises(Killed):
        hub.cleanup(on_expired=dies_midway)
    assert len(first) == CRASH_AT
    assert {store.raw(kh).status for kh in hashes} == {Status.CLAIMED}, "held under the lease, not expired"  # type: ignore[union-attr]

    # The first continuation sent before the crash reaches a worker before the lease lapses:
    # it runs, and expires its suspension (nobody else finished it).
    reached, *lost = first
    assert reached.delivery is not None and hub.take_delivery(reached.delivery) is True
    assert hub.take_delivery(reached.delivery) is True, "the same message delivered again still runs"
    assert store.raw(reached.key_hash).status is Status.EXPIRED  # type: ignore[union-attr]

    # Within the lease nobody touches the others (the dead cleanup might still be alive and slow).
    again: list[Suspension] = []
    assert hub.cleanup(on_expired=again.append) == 0 and again == []

    clock.advance(hub.lease + 1)
    hub.cleanup(on_expired=again.append)
    assert sorted(s.key_hash for s in again) == sorted(set(hashes) - {reached.key_hash}), "every other timeout applied, none lost"
    assert {store.raw(kh).status for kh in hashes} == {Status.EXPIRED}  # type: ignore[union-attr]
    assert hub.cleanup(on_expired=again.append) == 0 and len(again) == FLOWS - 1, "and applied only once more"

    # The continuations sent before the crash that had not reached a worker are now stale:
    # a worker drops them, and runs the ones of the second firing.
    by_hash = {s.key_hash: s.delivery for s in again}
    for early in lost:
        late = by_hash[early.key_hash]
        assert early.delivery is not None and late is not None and early.delivery != late
        assert late.startswith(early.key_hash + ":t")
        assert hub.take_delivery(early.delivery) is False
        assert hub.take_delivery(late) is True


def test_a_handler_that_fails_after_sending_makes_that_copy_stale(hub: PersistenceHub, clock: FakeClock) -> None:
    key = hub.suspend({"flow": 1}, ttl=10)
    clock.advance(10)
    tags: list[str | None] = []

    def sends_then_fails(s: Suspension) -> None:
        tags.append(s.delivery)
        if len(tags) == 1:
            raise RuntimeError("failed after its message went out")

    assert hub.cleanup(on_expired=sends_then_fails, retry_after=30) == 1
    clock.advance(30)
    assert hub.cleanup(on_expired=sends_then_fails, retry_after=30) == 1
    stale, good = tags
    assert stale is not None and good is not None
    assert hub.take_delivery(stale) is False and hub.take_delivery(good) is True
    assert hub.peek(key_hash(key)).status == Status.EXPIRED.value  # type: ignore[union-attr]


def test_a_batch_that_fails_to_go_out_is_sent_again_after_the_lease(hub: PersistenceHub, clock: FakeClock) -> None:
    hashes = _park(hub, clock)
    handled: list[Suspension] = []

    @contextlib.contextmanager
    def broker_down() -> Iterator[None]:
        yield
        raise ConnectionError("broker went away while flushing")

    assert hub.cleanup(on_expired=handled.append, around_handlers=broker_down) == 0
    assert len(handled) == FLOWS
    assert hub.peek(hashes[0]).status == Status.CLAIMED.value  # type: ignore[union-attr]

    handled.clear()
    clock.advance(hub.lease + 1)
    assert hub.cleanup(on_expired=handled.append) == 2 * FLOWS  # each re-opened, then fired again
    assert sorted(s.key_hash for s in handled) == sorted(hashes)


def test_a_timeout_races_a_resume_and_only_one_wins(hub: PersistenceHub, clock: FakeClock) -> None:
    key = hub.suspend({"flow": 1}, ttl=10)
    clock.advance(10)
    seen: list[Suspension] = []

    def resume_meanwhile(s: Suspension) -> None:
        seen.append(s)
        with pytest.raises(Exception, match="expired|claimed|resumed"):
            hub.claim(key, "late")

    assert hub.cleanup(on_expired=resume_meanwhile) == 1
    assert len(seen) == 1
    assert hub.peek(key_hash(key)).status == Status.EXPIRED.value  # type: ignore[union-attr]
