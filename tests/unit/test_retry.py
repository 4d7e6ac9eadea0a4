"""``with_store_retry``: StoreUnavailable is retried with growing pauses until the budget ends."""

from __future__ import annotations

import pytest

from celery_persist.errors import IntegrityError, StoreUnavailable
from celery_persist.retry import with_store_retry


class Clock:
    def __init__(self) -> None:
        self.now = 0.0
        self.pauses: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.pauses.append(seconds)
        self.now += seconds

    def __call__(self) -> float:
        return self.now


def test_retries_until_the_store_answers() -> None:
    clock = Clock()
    answers = iter([StoreUnavailable("connection refused to 127.0.0.1:5432")] * 4 + [None])

    def call() -> str:
        err = next(answers)
        if err is not None:
            raise err
        return "written"

    assert with_store_retry(call, 60, what="a park", sleep=clock.sleep, clock=clock) == "written"
    assert clock.pauses == [0.1, 0.2, 0.4, 0.8]


def test_gives_up_with_the_last_error_when_the_budget_ends() -> None:
    clock = Clock()
    calls = 0

    def call() -> None:
        nonlocal calls
        calls += 1
        raise StoreUnavailable(f"down ({calls})")

    with pytest.raises(StoreUnavailable, match=r"down \(\d+\)"):
        with_store_retry(call, 10, what="a park", sleep=clock.sleep, clock=clock)
    assert clock.now == pytest.approx(10)  # never sleeps past the budget
    assert max(clock.pauses) <= 5.0 and calls > 3


def test_other_errors_are_answers_not_outages() -> None:
    clock = Clock()

    def call() -> None:
        raise IntegrityError("tampered")

    with pytest.raises(IntegrityError):
        with_store_retry(call, 60, what="a park", sleep=clock.sleep, clock=clock)
    assert clock.pauses == []


def test_a_zero_budget_tries_once() -> None:
    clock = Clock()

    def call() -> None:
        raise StoreUnavailable("down")

    with pytest.raises(StoreUnavailable):
        with_store_retry(call, 0, what="a park", sleep=clock.sleep, clock=clock)
    assert clock.pauses == []
