"""The ETL example's Celery app and its one task, ``load_orders``.

``load_orders`` reads orders from a CSV file, converts them to EUR and loads
them into a SQLite "warehouse", one batch at a time. After each batch is
committed it calls ``self.checkpoint(...)``, so a re-execution of the same
task id (the redelivery after its process was killed) starts at the first
batch that was not checkpointed. The load is idempotent (an upsert keyed by
order id), so the one batch that may have been loaded but not checkpointed
when the process died is simply written again.

Every batch also appends ``(batch, pid)`` to the warehouse's ``load_log``:
that is how the example shows which process did which batch.
"""

from __future__ import annotations

import csv
import os
import sqlite3
import time
from collections.abc import Iterator
from contextlib import closing
from typing import Any

from celery_persist import Persist, PersistentTask
from examples._embedded import make_app

app = make_app("etl")
# How long the main process waits for a result from a dead pool process before it declares it
# lost and requeues the message (Celery's default: 10 s); short, so the example stays short.
app.conf.worker_lost_wait = 1.0
persist = Persist(app)

#: Simulated transform cost per batch (seconds): long enough to kill the task mid-run.
BATCH_SECONDS = 0.2
RATES = {"EUR": 1.0, "USD": 0.92, "GBP": 1.17, "CHF": 1.04}


def write_source(path: str, orders: int) -> None:
    """A deterministic orders file: ``order_id,customer,currency,amount``."""
    currencies = sorted(RATES)
    with open(path, "w", newline="") as fh:
        out = csv.writer(fh)
        out.writerow(["order_id", "customer", "currency", "amount"])
        for i in range(orders):
            out.writerow([i, f"c{i % 37:02d}", currencies[i % len(currencies)], f"{10 + (i * 7919) % 990}.{i % 100:02d}"])


def to_eur(row: dict[str, str]) -> float:
    return round(float(row["amount"]) * RATES[row["currency"]], 2)


def expected_total(path: str) -> float:
    """The EUR total of ``path``, computed in one pass, to check the warehouse against."""
    with open(path, newline="") as fh:
        return round(sum(to_eur(r) for r in csv.DictReader(fh)), 2)


def _batches(path: str, size: int) -> Iterator[list[dict[str, str]]]:
    with open(path, newline="") as fh:
        batch: list[dict[str, str]] = []
        for row in csv.DictReader(fh):
            batch.append(row)
            if len(batch) == size:
                yield batch
                batch = []
        if batch:
            yield batch


def _warehouse(path: str) -> sqlite3.Connection:
    db = sqlite3.connect(path, timeout=30)
    db.execute("CREATE TABLE IF NOT EXISTS orders (order_id INTEGER PRIMARY KEY, customer TEXT, amount_eur REAL, batch INTEGER)")
    db.execute("CREATE TABLE IF NOT EXISTS load_log (batch INTEGER, pid INTEGER, at REAL)")
    return db


@app.task(base=PersistentTask, bind=True, acks_late=True, name="examples.etl.load_orders")
def load_orders(self: PersistentTask, source: str, warehouse: str, batch_size: int) -> dict[str, Any]:
    """Load ``source`` into ``warehouse`` in batches, checkpointing after each one."""
    state = self.checkpoint_state or {"next_batch": 0, "rows": 0, "total_eur": 0.0}
    first = state["next_batch"]
    with closing(_warehouse(warehouse)) as db:
        for number, rows in enumerate(_batches(source, batch_size)):
            if number < state["next_batch"]:
                continue  # loaded and checkpointed by an earlier execution
            time.sleep(BATCH_SECONDS)  # stands for an expensive transform
            facts = [(int(r["order_id"]), r["customer"], to_eur(r), number) for r in rows]
            with db:  # one transaction per batch; the upsert makes a repeated batch harmless
                db.executemany("INSERT OR REPLACE INTO orders VALUES (?, ?, ?, ?)", facts)
                db.execute("INSERT INTO load_log VALUES (?, ?, ?)", (number, os.getpid(), time.time()))
            state = {
                "next_batch": number + 1,
                "rows": state["rows"] + len(facts),
                "total_eur": round(state["total_eur"] + sum(f[2] for f in facts), 2),
            }
            self.checkpoint(state)
    return {**state, "started_at_batch": first, "pid": os.getpid()}
