"""``python -m examples.etl``: a long task is killed with SIGKILL and finishes from its checkpoint.

``load_orders`` (:mod:`examples.etl.app`) is a ``PersistentTask`` with
``acks_late=True`` (and ``reject_on_worker_lost=True``, which PersistentTask
sets): it loads 20 batches of orders into a SQLite warehouse and checkpoints
after each one. The story is a maintenance that goes wrong:

1. worker-1 (prefork pool, one process) starts the load.
2. After batch 5 is checkpointed, the operator drains worker-1:
   ``app.control.cancel_consumer(queue, destination=[worker-1])``. It stops
   fetching messages; the running task goes on.
3. The operator does not want to wait and runs ``kill -9`` on the pool
   process that runs the task. worker-1's main process sees its child die
   with the message unacknowledged (acks_late); with reject_on_worker_lost it
   *rejects the message with requeue*, so the message goes back to the queue
   (here a file in ``queue/``: printed and checked). Being drained, worker-1
   does not take it again; it is stopped.
4. worker-2 starts, receives the same message (same task id), and the task
   re-executes with ``self.checkpoint_state`` equal to its last checkpoint,
   so it starts at the first batch that was not checkpointed. The example
   reads the warehouse's ``load_log`` (batch, pid) and checks that every
   batch checkpointed before the kill was loaded exactly once, by the killed
   process, that the rest was loaded by worker-2, and that the totals match.

Why kill the pool process and not the whole worker? An acks_late message is
redelivered when someone notices the loss:

* Pool process killed, main process alive (what the OOM killer usually
  does): the main process requeues the message at once, on every broker.
  Undrained, worker-1 would take it back itself and a new pool process
  would finish the task from the checkpoint, just the same.
* Whole worker killed (``kill -9`` of the main process too, a machine
  crash): nobody is left to requeue, and it depends on the broker. RabbitMQ
  requeues unacked messages when the connection drops: the next worker gets
  it at once. Redis keeps them in its ``unacked`` hash and restores them
  after ``visibility_timeout`` (one hour by default). kombu's filesystem
  transport, this example's embedded broker, moves a message's file out of
  the queue when it is fetched, so an unacked message exists only in the
  worker's memory: a clean shutdown puts it back, a ``kill -9`` of the main
  process loses it. The checkpoint survives in the store either way, but
  the message that would re-run it is gone; hence the pool process, the
  case that redelivers reliably on every broker.

Draining first matters for a second reason: SIGTERM (warm shutdown) and
then ``kill -9`` of the pool process also requeues the message, but the
worker may fetch it again before its consumer stops, run part of it in a
new pool process and kill that one on exit; it ends well (checkpoints), but
not the same way each run.

``worker_lost_wait`` is 1 s here (Celery's default: 10 s): how long the main
process waits for a result from a dead child before declaring it lost.

On Celery before 5.7 the example gives worker-2 a moment after the result
before stopping it: those versions send an ``acks_late`` acknowledgement from
the next turn of the worker's loop (within 2 s: its blocking loop waits for
messages 2 s at a time), and a warm shutdown skips that turn, so a worker
stopped right after the result is stored puts the message back in the queue
and the finished task would run again on the next worker. Celery 5.7 sends
such acknowledgements before it shuts down.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import time
from collections import Counter
from contextlib import closing
from typing import Any

import celery

from celery_persist.journal import name_of as journal_name
from examples._embedded import Run, embedded_broker, example_dir, main, wait_for
from examples.etl.app import expected_total, load_orders, persist, write_source

ORDERS = 1000
BATCH = 50
KILL_AFTER = 5  # checkpointed batches before the kill


def _checkpoint(task_id: str) -> dict[str, Any] | None:
    """The task's last checkpoint, read from outside (the library keeps it in a per-task journal)."""
    journal = persist.ready().load_checkpoint(journal_name(task_id))
    return journal["state"] if journal and journal.get("has_state") else None


def _load_log(warehouse: str) -> list[tuple[int, int]]:
    with closing(sqlite3.connect(warehouse, timeout=30)) as db:
        return [(b, p) for b, p in db.execute("SELECT batch, pid FROM load_log ORDER BY rowid")]


def _queued(queue: str) -> int:
    """Messages waiting in ``queue``, whatever the broker (a passive declare counts them)."""
    from kombu.exceptions import ChannelError

    with load_orders.app.connection_for_read() as conn:
        try:
            return int(conn.default_channel.queue_declare(queue=queue, passive=True).message_count)
        except ChannelError:  # Redis: an empty queue is no key at all, and a passive declare says "not found"
            return 0


#: Seconds a worker of Celery < 5.7 may take to send an acks_late acknowledgement (see above);
#: a control ping cannot stand in for the wait: on the filesystem broker its broadcast would
#: stay in the stopped worker-1's queue.
ACK_GRACE = 3.0 if celery.VERSION < (5, 7) else 0.0


def body(run: Run) -> None:
    base = example_dir("etl")
    source, warehouse = str(base / "orders.csv"), str(base / "warehouse.db")
    write_source(source, ORDERS)
    batches = -(-ORDERS // BATCH)
    run.say(f"source: {ORDERS} orders in {batches} batches of {BATCH}; warehouse: {warehouse}")

    # 1. worker-1 starts the load.
    worker1 = run.worker(label="worker-1", pool="prefork")
    result = load_orders.delay(source, warehouse, BATCH)
    run.say(f"task {result.id} sent")
    state = wait_for(
        lambda: (s := _checkpoint(result.id)) and s["next_batch"] >= KILL_AFTER and s,
        60,
        f"batch {KILL_AFTER} to be checkpointed",
    )
    run.say(f"checkpoint: {state}")

    # 2. Drain worker-1: it stops fetching messages, the running task goes on.
    queue = load_orders.app.conf.task_default_queue
    replies = load_orders.app.control.cancel_consumer(queue, destination=[worker1.hostname], reply=True, limit=1, timeout=10)
    if not replies:
        raise RuntimeError("worker-1 did not answer cancel_consumer")
    run.say(f"worker-1 drained: {list(replies[0].values())[0]['ok']}")

    # 3. kill -9 of the process running the task (the pid it wrote with its last batch).
    pid = _load_log(warehouse)[-1][1]
    if not worker1.owns(pid) or pid == worker1.pid:
        raise RuntimeError(f"pid {pid} is not a pool process of worker-1")
    os.kill(pid, signal.SIGKILL)
    run.say(f"kill -9 {pid} (worker-1's pool process, mid-run)")
    count = wait_for(lambda: _queued(queue), 30, "worker-1 to requeue the message")
    run.say(f"worker-1 saw its pool process die and requeued the message: queue {queue} holds {count} message(s)")
    if embedded_broker():
        files = [f for f in os.listdir(base / "queue") if f.endswith(f".{queue}.msg")]
        run.say(f"  (the filesystem broker keeps it as queue/{files[0] if files else '?'})")
    worker1.stop(wait=False)  # drained: it will not take the message back while it shuts down
    run.say("worker-1 is shutting down")
    killed_at = _checkpoint(result.id)
    assert killed_at is not None
    done_before = killed_at["next_batch"]
    run.say(f"last checkpoint: {killed_at['rows']} rows, next batch {done_before} of {batches}")
    if done_before >= batches:
        raise RuntimeError("the task finished before the kill; nothing to show")

    # 4. A new worker picks the message up; the task starts from its checkpoint.
    run.worker(label="worker-2", pool="prefork")
    outcome = result.get(timeout=60)
    run.say(f"result: {outcome}")
    time.sleep(ACK_GRACE)  # before anything stops worker-2 (see the module docstring)

    log = _load_log(warehouse)
    counts = Counter(b for b, _ in log)
    before = sorted({b for b, p in log if p == pid})
    after = sorted({b for b, p in log if p == outcome["pid"]})
    run.say(f"batches loaded by the killed process {pid}: {before[0]}-{before[-1]}")
    run.say(f"batches loaded by worker-2's process {outcome['pid']}: {after[0]}-{after[-1]}")
    if {p for _, p in log} != {pid, outcome["pid"]} or before != list(range(len(before))):
        raise RuntimeError(f"unexpected load log: {log}")
    redone = [b for b in range(done_before) if counts[b] != 1]
    if redone or outcome["started_at_batch"] != done_before:
        raise RuntimeError(f"checkpointed batches were redone: {redone}, restart at {outcome['started_at_batch']}")
    run.say(f"batches 0-{done_before - 1} were checkpointed before the kill and not redone (each loaded once)")
    inflight = [b for b in counts if counts[b] > 1]
    if inflight:
        run.say(f"batch {inflight} was loaded but not checkpointed when the process died: loaded again (idempotent upsert)")
    with closing(sqlite3.connect(warehouse)) as db:
        rows, total = db.execute("SELECT COUNT(*), ROUND(SUM(amount_eur), 2) FROM orders").fetchone()
    expected = expected_total(source)
    if set(counts) != set(range(batches)) or rows != ORDERS or abs(total - expected) > 0.01 or abs(outcome["total_eur"] - expected) > 0.01:
        raise RuntimeError(f"warehouse mismatch: {rows} rows, EUR {total}, task said {outcome['total_eur']}, expected {expected}")
    run.say(f"warehouse: {rows} orders, EUR {total:.2f} (expected {expected:.2f}); every batch loaded")
    if persist.ready().load_checkpoint(journal_name(result.id)) is not None:
        raise RuntimeError("the checkpoint should be deleted once the task succeeded")
    run.say("the task succeeded, so its checkpoint was deleted")


if __name__ == "__main__":
    main("etl", persist, body)
