"""``python -m examples.orders``: orders wait for their payment event, then sleep in the store.

The flow (:func:`examples.orders.app.order_flow`) is::

    chain(charge.s(order),
          await_event.s("payment.settled", key=order_id, timeout=3600, on_timeout="fail"),
          sleep.s(seconds=REMINDER_DELAY),
          remind.s())

1. A worker and a ``celery beat`` subprocess start. Beat runs the entry
   ``celery-persist-timers`` every ``persist_timer_interval`` (0.5 s): it
   fires due timers and applies timeouts.
2. Order A-1 is charged and parks on ``await_event``; ``celery -A
   examples.orders.app persist list --kind event`` lists it with its topic and key.
3. The payment provider's webhook would call ``persist.signal("payment.settled",
   "A-1", payload)``; here the script does, and it wakes exactly one flow.
   The payload goes on to the next step.
4. A-1 now sleeps: ``sleep`` parks it as a timer until ``wake_at`` (the
   reminder delay, two days in production, is shortened to 2 s here with
   ``ORDERS_REMINDER_SECONDS``). No ETA message sits in the broker.
5. Order B-2 is never paid: its ``await_event`` times out (after 3 s here,
   ``ORDERS_UNPAID_TIMEOUT_SECONDS``) and the step fails with
   ``AwaitTimeout``, as does the rest of its chain. A late payment wakes nobody.
6. A-1's reminder runs once beat fires its timer, after ``wake_at``.
7. Beat stops, the worker drains the queue, then stops: no message is left.

Exits 0 when both orders ended as expected.
"""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import datetime
from typing import Any

from kombu.exceptions import ChannelError

from celery_persist import AwaitTimeout
from celery_persist.persist import SUSPENDED
from examples._embedded import REPO, Run, Worker, example_dir, main, wait_for
from examples.orders.app import ENV_REMINDER, PAYMENT_SETTLED, app, order_flow, persist, reminder_delay

ENV_UNPAID_TIMEOUT = "ORDERS_UNPAID_TIMEOUT_SECONDS"


class Beat(Worker):
    """The example's ``celery beat`` subprocess, leader of its own process group."""

    ready_marker = b"beat: Starting..."

    def command(self) -> list[str]:
        schedule = example_dir(self.name) / "beat-schedule"
        return [
            sys.executable, "-m", "celery", "-A", f"examples.{self.name}.app", "beat",
            "--schedule", str(schedule), "--loglevel", "INFO", "--max-interval", "1",
        ]  # fmt: skip


def wait_step(result: Any, state: str, timeout: float = 30.0) -> Any:
    """Wait until the chain step behind ``result`` is in ``state``; returns its info."""

    def reached() -> list[Any] | None:
        if result.state == state:
            return [result.info]
        if result.state in ("FAILURE", "REVOKED") and state != result.state:
            raise RuntimeError(f"step {result.id} ended {result.state}: {result.info!r}")
        return None

    return wait_for(reached, timeout, f"step {result.id} to be {state}")[0]


def operator(run: Run, *args: str) -> list[str]:
    """Run ``celery -A examples.orders.app persist ARGS`` as an operator would; print and return its lines."""
    run.say(f"operator runs: celery -A examples.orders.app persist {' '.join(args)}")
    cli = subprocess.run(  # noqa: S603 - our own interpreter and arguments
        [sys.executable, "-m", "celery", "-A", "examples.orders.app", "persist", *args],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))},
        capture_output=True,
        text=True,
        timeout=60,
    )
    if cli.returncode != 0:
        raise RuntimeError(f"the CLI exited with {cli.returncode}: {cli.stderr.strip()}")
    lines = cli.stdout.rstrip().splitlines()
    for line in lines:
        run.say(f"  {line}")
    return lines


def queued(queue: str) -> int:
    """Messages waiting in ``queue``, whatever the broker (a passive declare counts them)."""
    with app.connection_for_read() as conn:
        try:
            return int(conn.default_channel.queue_declare(queue=queue, passive=True).message_count)
        except ChannelError:  # Redis: an empty queue is no key at all, and a passive declare says "not found"
            return 0


def idle(worker: Worker) -> bool:
    """Whether ``worker`` runs nothing and holds no prefetched message (it would requeue it at shutdown)."""
    inspect = app.control.inspect(destination=[worker.hostname], timeout=5)
    active, reserved = inspect.active() or {}, inspect.reserved() or {}
    return worker.hostname in active and not active[worker.hostname] and not reserved.get(worker.hostname)


def body(run: Run) -> None:
    worker = run.worker()
    beat = Beat("orders", app, label="beat")
    run.workers.append(beat)  # stopped with the worker if anything fails
    beat.start()
    run.say(f"beat started (pid {beat.pid}): celery-persist-timers every {persist.config.timer_interval} s")

    # -- 1. order A-1 waits for its payment ----------------------------------------------------
    paid = order_flow({"id": "A-1", "amount": 42.0}).apply_async()
    waiting = paid.parent.parent  # the await_event step
    info = wait_step(waiting, SUSPENDED)
    run.say(
        f"order A-1 parked: await_event is SUSPENDED, wait {info['wait']!r}, topic {info['topic']!r}, "
        f"key {info['event_key']!r}, suspension {info['fingerprint']}, expires {info['expires_at'][11:19]} UTC"
    )
    lines = operator(run, "list", "--kind", "event")
    if not any(info["fingerprint"] in line and f"topic={PAYMENT_SETTLED} key=A-1" in line for line in lines):
        raise RuntimeError("`persist list --kind event` does not list order A-1")

    # -- 2. the payment arrives: a signal wakes the flow ------------------------------------------
    payment = {"order_id": "A-1", "amount": 42.0, "psp_reference": "psp_7731"}
    woken = persist.signal(PAYMENT_SETTLED, "A-1", payment)
    run.say(f"payment provider: persist.signal({PAYMENT_SETTLED!r}, 'A-1', ...) woke {woken} flow(s)")
    if woken != 1:
        raise RuntimeError(f"the signal woke {woken} flows, not 1")

    # -- 3. A-1 sleeps in the store until its reminder is due ------------------------------------
    sleeping = wait_step(paid.parent, SUSPENDED)
    wake_at = datetime.fromisoformat(sleeping["wake_at"])
    run.say(
        f"order A-1 paid, now asleep: sleep is SUSPENDED, wait {sleeping['wait']!r}, wake_at {sleeping['wake_at']} "
        f"(in {reminder_delay():g} s; {ENV_REMINDER} shortens the 2 days)"
    )

    # -- 4. order B-2 is never paid: its wait times out ------------------------------------------
    unpaid_timeout = float(os.environ[ENV_UNPAID_TIMEOUT])
    unpaid = order_flow({"id": "B-2", "amount": 17.5}, timeout=unpaid_timeout).apply_async()
    info = wait_step(unpaid.parent.parent, SUSPENDED)
    run.say(f"order B-2 parked: waiting for {info['topic']!r} key {info['event_key']!r}, times out after {unpaid_timeout:g} s")
    wait_for(lambda: unpaid.parent.parent.state == "FAILURE", 30 + unpaid_timeout, "order B-2's await_event to time out")
    error = unpaid.parent.parent.result
    if not isinstance(error, AwaitTimeout):
        raise RuntimeError(f"order B-2 failed with {error!r}, not AwaitTimeout")
    run.say(f"order B-2 unpaid: await_event failed with {type(error).__name__}: {error}")
    wait_for(lambda: unpaid.state == "FAILURE", 30, "order B-2's last step to fail too")
    run.say(f"  the rest of its chain failed with it (remind: {unpaid.state})")
    late = persist.signal(PAYMENT_SETTLED, "B-2", {"order_id": "B-2", "amount": 17.5, "psp_reference": "psp_late"})
    run.say(f"a late payment for B-2 woke {late} flow(s)")

    # -- 5. the timer fires: A-1's reminder runs after its wake time -----------------------------
    reminder = paid.get(timeout=60)
    ran_at = datetime.fromisoformat(reminder["at"])
    run.say(f"result: {reminder['message']}")
    run.say(f"reminder ran at {ran_at:%H:%M:%S.%f} UTC, {(ran_at - wake_at).total_seconds():.2f} s after wake_at {wake_at:%H:%M:%S.%f}")
    if ran_at < wake_at:
        raise RuntimeError("the reminder ran before its wake time")

    # -- 6. stop beat, let the worker drain the queue, then stop it ------------------------------
    beat.stop()
    queue = app.conf.task_default_queue
    wait_for(lambda: queued(queue) == 0 and idle(worker), 30, f"the worker to drain queue {queue}", interval=0.2)
    run.say(f"beat stopped; queue {queue} is empty and the worker idle (it stops next)")


if __name__ == "__main__":
    # A demo must not take two days: shorten the waits unless the caller chose other values.
    os.environ.setdefault(ENV_REMINDER, "2")
    os.environ.setdefault(ENV_UNPAID_TIMEOUT, "3")
    main("orders", persist, body)
