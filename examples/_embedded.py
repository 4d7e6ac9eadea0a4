"""What every example shares: its Celery app, the worker subprocesses it starts, its output.

By default an example needs no server, like ``celery-persist demo``: the
broker is kombu's filesystem transport, the result backend Celery's file
backend, the store SQLite, all in one directory. Environment variables point
the same code at real services (the ``docker/docker-compose.yml`` ones, say):

==================================  ==========================================================
``CELERY_BROKER_URL``               broker (default: filesystem transport in the example dir)
``CELERY_RESULT_BACKEND``           result backend (default: ``file://<example dir>/results``)
``CELERY_PERSIST_STORE_URL``        store (default: ``sqlite:///<example dir>/persist.db``)
``CELERY_PERSIST_STORE_OPTIONS``    store options as JSON, e.g. ``{"prefix": "shop_"}``
``CELERY_PERSIST_KEYS``             encryption keys (default: a key made once in the example dir)
``CELERY_PERSIST_SIGNING_SECRET``   optional HMAC secret for suspension keys
``CELERY_PERSIST_EXAMPLE_QUEUE``    queue of the example's tasks (default ``examples.<name>``)
``CELERY_PERSIST_EXAMPLE_DIR``      directory of the embedded parts and example data
                                    (default: a fresh temporary directory, removed after a
                                    successful run)
==================================  ==========================================================

The app is built at import time of ``examples.<name>.app`` from these
variables, so the example's own process, the worker subprocesses it starts
and the ``celery -A examples.<name>.app ...`` commands it runs all see the
same configuration: the first of them to need the example directory creates
it and exports ``CELERY_PERSIST_EXAMPLE_DIR`` to the others.

Monitoring events (``-E``, ``task-suspended``) are switched on only with a
real broker, where Flower can watch them (see ``tests/e2e/test_flower.py``).
In the embedded setup nothing watches: the filesystem transport would drop
them, as no queue is bound to the event exchange.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from celery import Celery

if TYPE_CHECKING:
    from celery.result import AsyncResult

    from celery_persist import Persist

__all__ = [
    "REPO",
    "Run",
    "Worker",
    "embedded_broker",
    "example_dir",
    "main",
    "make_app",
    "next_suspension",
    "wait_for",
]

T = TypeVar("T")

REPO = Path(__file__).resolve().parent.parent
ENV_DIR = "CELERY_PERSIST_EXAMPLE_DIR"
ENV_QUEUE = "CELERY_PERSIST_EXAMPLE_QUEUE"
ENV_STORE_OPTIONS = "CELERY_PERSIST_STORE_OPTIONS"
WORKER_START_TIMEOUT = 60.0

# Directories this process created (not handed to it): removed after a successful run.
_created_dirs: set[Path] = set()


def embedded_broker() -> bool:
    """True when the broker is the filesystem transport (no ``CELERY_BROKER_URL``)."""
    return not os.environ.get("CELERY_BROKER_URL")


def example_dir(name: str) -> Path:
    """The directory of the embedded parts and example data; created on first use.

    A directory made here is exported in ``CELERY_PERSIST_EXAMPLE_DIR``, so
    subprocesses started afterwards (workers, ``celery`` commands) share it.
    """
    raw = os.environ.get(ENV_DIR)
    if raw:
        path = Path(raw).resolve()
        path.mkdir(parents=True, exist_ok=True)
        return path
    path = Path(tempfile.mkdtemp(prefix=f"celery-persist-{name}-")).resolve()
    os.environ[ENV_DIR] = str(path)
    _created_dirs.add(path)
    return path


def _example_keys(base: Path) -> str:
    # One AES key per example directory (mode 0600), so every process of the run decrypts the
    # same records; real deployments set CELERY_PERSIST_KEYS instead.
    path = base / "example.key"
    with contextlib.suppress(FileExistsError):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(base64.b64encode(os.urandom(32)).decode("ascii"))
    return f"example:{path.read_text().strip()}"


def make_app(name: str) -> Celery:
    """The Celery app of example ``name``: embedded parts unless the environment names servers."""
    env = os.environ
    app = Celery(f"examples.{name}")
    conf: dict[str, Any] = {
        "task_default_queue": env.get(ENV_QUEUE) or f"examples.{name}",
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "worker_hijack_root_logger": False,
        "broker_connection_retry_on_startup": True,
        "persist_encryption": "required",
    }
    if embedded_broker():
        base = example_dir(name)
        for sub in ("queue", "control"):
            (base / sub).mkdir(exist_ok=True)
        conf["broker_url"] = "filesystem://"
        conf["broker_transport_options"] = {
            "data_folder_in": str(base / "queue"),
            "data_folder_out": str(base / "queue"),
            "control_folder": str(base / "control"),
            "store_processed": False,
            "polling_interval": 0.05,
        }
        conf["persist_send_events"] = False
    else:
        conf["broker_url"] = env["CELERY_BROKER_URL"]
    if env.get("CELERY_RESULT_BACKEND"):
        conf["result_backend"] = env["CELERY_RESULT_BACKEND"]
    else:
        results = example_dir(name) / "results"
        results.mkdir(exist_ok=True)
        conf["result_backend"] = f"file://{results}"
    conf["persist_store_url"] = env.get("CELERY_PERSIST_STORE_URL") or f"sqlite:///{example_dir(name) / 'persist.db'}"
    if env.get(ENV_STORE_OPTIONS):
        conf["persist_store_options"] = json.loads(env[ENV_STORE_OPTIONS])
    if not (env.get("CELERY_PERSIST_KEYS") or env.get("CELERY_PERSIST_KEY")):
        conf["persist_keys"] = _example_keys(example_dir(name))
    app.conf.update(conf)
    return app


def wait_for(predicate: Callable[[], T | None], timeout: float, what: str, interval: float = 0.05) -> T:
    """Poll ``predicate`` until it returns something truthy; TimeoutError after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def next_suspension(result: AsyncResult, seen: set[str], timeout: float = 30.0) -> tuple[str, dict[str, Any]] | None:
    """Wait until the task behind ``result`` is parked under a key not in ``seen``, or succeeded.

    ``persist.suspension_key()`` does for a chain step, which parks once. A
    ``PersistentTask`` parks again under a new key after each resume, and
    until its re-run parks, the result backend still shows the previous
    SUSPENDED state and key; hence the ``seen`` set.

    Returns:
        ``(key, info)`` (``key`` is added to ``seen``), or None once the task succeeded.

    Raises:
        RuntimeError: The task failed.
        TimeoutError: Neither happened within ``timeout`` seconds.
    """

    def poll() -> list[tuple[str, dict[str, Any]] | None] | None:
        state = result.state
        if state == "FAILURE":
            raise RuntimeError(f"task {result.id} failed: {result.result!r}")
        if state == "SUCCESS":
            return [None]
        info = result.info
        if state == "SUSPENDED" and isinstance(info, dict):
            key = info.get("suspension_key")
            if key and key not in seen:
                return [(str(key), info)]
        return None

    found = wait_for(poll, timeout, f"task {result.id} to park again or finish")[0]
    if found is not None:
        seen.add(found[0])
    return found


class Worker:
    """One ``celery worker`` subprocess of an example, leader of its own process group."""

    def __init__(self, name: str, app: Celery, *, label: str = "worker", pool: str = "solo", concurrency: int = 1) -> None:
        self.name = name
        self.app = app
        self.label = label
        self.pool = pool
        self.concurrency = concurrency
        self.log_path = example_dir(name) / f"{label}.log"
        self.hostname = f"{name}-{label}-{uuid.uuid4().hex[:6]}@{socket.gethostname()}"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise RuntimeError("the worker is not running")
        return self.proc.pid

    #: What the subprocess logs once it serves (a subclass may run another celery command).
    ready_marker = b" ready."

    def command(self) -> list[str]:
        """The ``celery`` command line of this subprocess."""
        queue = self.app.conf.task_default_queue
        cmd = [
            sys.executable, "-m", "celery", "-A", f"examples.{self.name}.app", "worker",
            "--pool", self.pool, "--concurrency", str(self.concurrency), "--queues", queue,
            "--hostname", self.hostname,
            "--without-gossip", "--without-mingle", "--without-heartbeat", "--loglevel", "INFO",
        ]  # fmt: skip
        if not embedded_broker():
            cmd.append("--task-events")
        return cmd

    def start(self, timeout: float = WORKER_START_TIMEOUT) -> Worker:
        cmd = self.command()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(  # noqa: S603 - our interpreter, our arguments
                cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        try:
            wait_for(lambda: self._ready(offset), timeout, f"the {self.label} to start (log: {self.log_path})", interval=0.1)
        except BaseException:
            self.kill()
            raise
        return self

    def _ready(self, offset: int) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"the {self.label} exited with {self.proc.returncode}; log:\n{self.log_tail()}")
        with self.log_path.open("rb") as fh:
            fh.seek(offset)
            return self.ready_marker in fh.read()

    def stop(self, timeout: float = 20.0, *, wait: bool = True) -> None:
        """Warm shutdown (SIGTERM); with ``wait``, :meth:`wait_stopped` too."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        if wait:
            self.wait_stopped(timeout)

    def wait_stopped(self, timeout: float = 20.0) -> None:
        """Wait for the worker to exit, then SIGKILL whatever is left of its process group."""
        if self.proc is None:
            return
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout)
        self.kill()

    def kill(self) -> None:
        """SIGKILL the whole process group (the main process and its pool children)."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)
        self.proc = None

    def owns(self, pid: int) -> bool:
        """Whether ``pid`` is this worker or one of its pool processes."""
        try:
            return self.proc is not None and os.getpgid(pid) == self.proc.pid
        except ProcessLookupError:
            return False

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "<no log>"


class Run:
    """One run of an example: its output prefix, clock, workers and the app's Persist."""

    def __init__(self, name: str, persist: Persist) -> None:
        self.name = name
        self.persist = persist
        self.app = persist.app
        self.started = time.monotonic()
        self.workers: list[Worker] = []

    def say(self, message: str) -> None:
        print(f"[{self.name} {self.elapsed():5.1f}s] {message}", flush=True)

    def worker(self, *, label: str = "worker", pool: str = "solo", concurrency: int = 1) -> Worker:
        """Start a worker subprocess (stopped when the run ends)."""
        worker = Worker(self.name, self.app, label=label, pool=pool, concurrency=concurrency)
        self.workers.append(worker)
        worker.start()
        self.say(f"{label} started (pid {worker.pid}, pool {pool}, queue {self.app.conf.task_default_queue})")
        return worker

    def describe(self) -> None:
        broker = "filesystem transport" if embedded_broker() else "CELERY_BROKER_URL"
        backend = "files" if not os.environ.get("CELERY_RESULT_BACKEND") else "CELERY_RESULT_BACKEND"
        self.say(f"store {self.persist.hub.store.name}, broker: {broker}, results: {backend}")
        if os.environ.get(ENV_DIR):
            self.say(f"example directory: {os.environ[ENV_DIR]}")

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    @contextlib.contextmanager
    def session(self) -> Iterator[Run]:
        try:
            yield self
        finally:
            # A worker on the filesystem transport takes about 5 s to shut down, even idle:
            # stop them all at once.
            for worker in self.workers:
                worker.stop(wait=False)
            for worker in self.workers:
                worker.wait_stopped()


def main(name: str, persist: Persist, body: Callable[[Run], None]) -> None:
    """Run an example's ``body``; exit 0 on success, 1 (with the worker logs) on failure."""
    run = Run(name, persist)

    def interrupted(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    # SIGTERM (a CI timeout, say) unwinds like Ctrl+C, so the workers are stopped, not orphaned.
    signal.signal(signal.SIGTERM, interrupted)
    try:
        with run.session():
            run.describe()
            body(run)
    except (Exception, KeyboardInterrupt):  # noqa: BLE001 - an example reports any failure and exits non-zero
        traceback.print_exc()
        for worker in run.workers:
            print(f"--- {worker.label} log ({worker.log_path}) ---\n{worker.log_tail()}", file=sys.stderr)
        sys.exit(1)
    run.say(f"done in {run.elapsed():.1f} s")
    for path in _created_dirs:
        shutil.rmtree(path, ignore_errors=True)
