"""``celery-persist demo``: an expense approval that survives a worker restart, with no server.

Everything is embedded: the broker is kombu's filesystem transport, the
result backend Celery's file backend, the store SQLite, all under one
directory. The command starts a worker subprocess, parks an approval flow,
stops the worker, shows the suspension is still in the store, starts a new
worker, resumes the flow and prints its result.

The worker subprocess imports the same app from :mod:`celery_persist.demo_app`
(``-A celery_persist.demo_app``); ``CELERY_PERSIST_DEMO_DIR`` tells it where
the files are. Importing this module builds nothing: the CLI imports it at
its top.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from celery import Celery, chain

from .persist import Persist
from .tasks import await_input

__all__ = ["make_app", "directory", "run"]

DIR_ENV = "CELERY_PERSIST_DEMO_DIR"


def directory() -> Path:
    """The demo's directory, as the runner hands it to its workers."""
    return Path(os.environ.get(DIR_ENV, ".celery-persist-demo")).resolve()


def make_app(base: Path) -> Celery:
    """The demo app (its tasks and ``Persist(app)`` included), keeping every file under ``base``."""
    queue = base / "queue"
    base.mkdir(mode=0o700, parents=True, exist_ok=True)
    for sub in ("queue", "processed", "results", "control"):
        (base / sub).mkdir(mode=0o700, parents=True, exist_ok=True)
    demo = Celery("celery_persist_demo")
    demo.conf.update(
        broker_url="filesystem://",
        broker_transport_options={
            "data_folder_in": str(queue),
            "data_folder_out": str(queue),
            "processed_folder": str(base / "processed"),
            "control_folder": str(base / "control"),
            "store_processed": False,
            "polling_interval": 0.05,
        },
        result_backend=f"file://{base / 'results'}",
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True,
        persist_store_url=f"sqlite:///{base / 'persist.db'}",
        # No key setting: the SQLite store makes its own key file (0600) beside the database.
        # Nothing watches events on the embedded broker; don't fill its folders with them.
        persist_send_events=False,
        persist_cleanup_interval=None,
    )
    demo.task(name="demo.prepare_expense")(prepare_expense)
    demo.task(name="demo.book_expense")(book_expense)
    Persist(demo)
    return demo


def prepare_expense(expense_id: int, amount: float) -> dict[str, Any]:
    return {"expense_id": expense_id, "amount": amount, "checked": True}


def book_expense(decision: dict[str, Any]) -> str:
    verdict = "booked" if decision.get("input", {}).get("approved") else "rejected"
    expense = decision["previous"]
    return f"expense #{expense['expense_id']} (EUR {expense['amount']:.2f}) {verdict} by {decision['input'].get('by')}"


def _say(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def _start_worker(base: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, DIR_ENV: str(base)}
    # Private like the rest of the demo's files (a worker log names task ids and prompts).
    log = os.fdopen(os.open(base / "worker.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "ab")
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "celery_persist.demo_app",
            "worker",
            "--pool=solo",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
            "--loglevel=INFO",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def _wait_ready(proc: subprocess.Popen[bytes], base: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    log = base / "worker.log"
    start = log.stat().st_size if log.exists() else 0
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the demo worker exited early; see {log}")
        if log.exists():
            with open(log, "rb") as fh:
                fh.seek(start)
                if b"ready." in fh.read():
                    return
        time.sleep(0.1)
    raise RuntimeError(f"the demo worker did not start within {timeout:.0f} s; see {log}")


def _stop_worker(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def run(base: Path) -> str:
    """Run the demo end to end in ``base``; returns the flow's result."""
    base = base.resolve()
    app = make_app(base)
    persist = Persist.of(app)
    started = time.monotonic()
    _say(f"working directory: {base} (store: sqlite, broker: filesystem, results: files)")
    keyring = persist.hub.keyring
    _say(f"states are encrypted with AES-256-GCM (key id {keyring.active_id if keyring else '-'}, kept in persist.db.key, mode 0600)")
    worker = _start_worker(base)
    try:
        _wait_ready(worker, base)
        _say("worker started")
        flow = chain(
            app.signature("demo.prepare_expense", (42, 1234.5)),
            await_input.s(prompt="Approve expense #42 (EUR 1234.50)?", timeout=3600, include_previous=True),
            app.signature("demo.book_expense"),
        )
        result = flow.apply_async()
        key = persist.suspension_key(result, timeout=30)
        parked = persist.load(key)
        _say(f"flow parked: step {parked.metadata['task']} is {result.parent.state}, suspension {parked.fingerprint}")
        _say(f"prompt: {parked.metadata['prompt']!r}; expires {parked.expires_at:%Y-%m-%d %H:%M:%S} UTC")
        _say("the resume key went to the approver only; logs and this screen show its fingerprint")
    finally:
        _stop_worker(worker)
    _say("worker stopped; the broker holds nothing for this flow:")
    still = persist.load(key)
    _say(f"  store says suspension {still.fingerprint} is {still.status!r}, state intact: {still.state['previous']}")
    worker = _start_worker(base)
    try:
        _wait_ready(worker, base)
        _say("new worker started; resuming with {'approved': True, 'by': 'alice'}")
        persist.resume(key, {"approved": True, "by": "alice"})
        value: str = result.get(timeout=30)
        _say(f"result: {value}")
        _say(f"suspension is now {persist.load(key).status!r}; done in {time.monotonic() - started:.1f} s")
        return value
    finally:
        _stop_worker(worker)


if __name__ == "__main__":
    # `celery-persist demo [--dir DIR]` runs `python -m celery_persist.demo DIR`.
    os.environ[DIR_ENV] = str(Path(sys.argv[1] if len(sys.argv) > 1 else directory()).resolve())
    run(directory())
