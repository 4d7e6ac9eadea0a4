"""Harness for the end-to-end suite: real ``celery worker`` subprocesses on real services.

A :class:`Stack` is one isolated deployment: a broker namespace (a unique
queue, and on Redis a ``global_keyprefix``), the Redis result backend, a store
(SQLite file in a temp dir, or PostgreSQL tables under a unique ``prefix``), an
encryption key and a signing secret, and a worker subprocess built from the
same config as the test process's app (see :mod:`tests.e2e.flows`).

Isolation: broker keys live in Redis db 8 under the session namespace, results
in db 9 (task ids are unique), task records in db 10 under the namespace.
Teardown deletes only keys and tables carrying this session's namespace; no
FLUSHDB, no shared data touched.

Synchronisation is by polling with deadlines (:func:`wait_for`); readiness is
a ``control.ping`` to the worker's own node name. A worker always ends with a
SIGKILL to its process group (it leads one), after a warm (SIGTERM) or, at
teardown, cold (SIGQUIT) shutdown had its chance. Results in db 9 are left to
expire (``result_expires`` is one hour).

Services: ``CELERY_PERSIST_TEST_REDIS_URL`` (default redis://127.0.0.1:6379),
``CELERY_PERSIST_TEST_POSTGRESQL_URL`` (postgresql://127.0.0.1/test),
``CELERY_PERSIST_TEST_RABBITMQ_URL`` (amqp://guest:guest@127.0.0.1:5672//).
A missing service skips locally and fails when ``CI=true``.

Why the workers stay subprocesses, not ``celery.contrib.testing.worker.start_worker``
(reviewed for every module here; crash, restart and fault tests need a process
to kill anyway): the worker cost is already amortised (one session-wide worker
per store; only the RabbitMQ test starts its own, about 2 s of its 4 s), and an
in-thread worker would weaken what this tier checks. It shares the test
process's app, binding, store connections, signal receivers and logging, so a
resumer and a worker that disagree across processes (keys from the
environment, SQLite/PostgreSQL visibility between processes, reconnect after
fork in the prefork pool, ``-E`` events from another process, keys masked in the
worker's own log file) would go unseen. Celery's stop flag
(``celery.worker.state.should_terminate``) is also process-wide, so the two
session stacks and a test's own stack could not be stopped one at a time. The
in-process worker belongs to user-facing tests: see ``celery_persist.testing``.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
import redis
from celery import Celery
from celery.result import AsyncResult

from celery_persist import Persist
from tests.e2e import flows

REPO = Path(__file__).resolve().parents[2]
REDIS_URL = os.environ.get("CELERY_PERSIST_TEST_REDIS_URL", "redis://127.0.0.1:6379")
POSTGRESQL_URL = os.environ.get("CELERY_PERSIST_TEST_POSTGRESQL_URL", "postgresql://127.0.0.1/test")
RABBITMQ_URL = os.environ.get("CELERY_PERSIST_TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672//")
BROKER_DB, BACKEND_DB, RECORD_DB = 8, 9, 10
WORKER_START_TIMEOUT = 60.0
IN_CI = os.environ.get("CI", "").lower() == "true"

SESSION_NS = f"e2e-{uuid.uuid4().hex[:10]}"


# -- helpers ---------------------------------------------------------------------------------


def redis_db(url: str, db: int) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{db}", parts.query, parts.fragment))


def missing(reason: str) -> None:
    """Skip on a laptop, fail in CI: green must mean it ran."""
    if IN_CI:
        pytest.fail(f"required service unavailable in CI: {reason}")
    pytest.skip(reason)


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll ``predicate`` until it returns a truthy value; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def wait_state(result: AsyncResult, state: str, timeout: float = 20.0) -> AsyncResult:
    wait_for(lambda: result.state == state, timeout, f"task {result.id} to be {state} (is {result.state})")
    return result


def redis_up() -> str | None:
    try:
        redis.Redis.from_url(redis_db(REDIS_URL, RECORD_DB), socket_connect_timeout=2).ping()
    except Exception as exc:  # noqa: BLE001 - any failure means "not usable here"
        return f"Redis at {REDIS_URL} unavailable: {exc}"
    return None


def postgres_up() -> str | None:
    import sqlalchemy as sa

    try:
        engine = sa.create_engine(POSTGRESQL_URL, connect_args={"connect_timeout": 3})
        try:
            with engine.connect() as conn:
                conn.execute(sa.text("SELECT 1"))
        finally:
            engine.dispose()
    except Exception as exc:  # noqa: BLE001
        return f"PostgreSQL at {POSTGRESQL_URL} unavailable: {exc}"
    return None


def rabbitmq_up() -> str | None:
    from kombu.connection import Connection

    try:
        with Connection(RABBITMQ_URL, connect_timeout=3) as conn:
            conn.ensure_connection(max_retries=1)
    except Exception as exc:  # noqa: BLE001
        return f"RabbitMQ at {RABBITMQ_URL} unavailable: {exc}"
    return None


# -- worker subprocess -----------------------------------------------------------------------


class Worker:
    """One ``celery worker`` subprocess, leader of its own process group."""

    def __init__(self, config: dict[str, Any], log_path: Path) -> None:
        self.config = config
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def hostname(self) -> str:
        return str(self.config["hostname"])

    def start(self, app: Celery) -> None:
        env = dict(os.environ)
        env[flows.CONFIG_ENV] = json.dumps(self.config)
        env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        env.pop("CELERY_PERSIST_KEYS", None)  # the config carries this stack's keys
        cmd = [
            sys.executable, "-m", "celery", "-A", "tests.e2e.worker_app", "worker",
            "-P", "prefork", "-c", "2", "--without-gossip", "--without-mingle", "--without-heartbeat",
            "-Q", self.config["queue"], "-E", "-n", self.hostname, "--loglevel", self.config.get("loglevel", "INFO"),
        ]  # fmt: skip
        log = self.log_path.open("ab")
        try:
            self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        finally:
            log.close()
        self.wait_ready(app)

    def wait_ready(self, app: Celery) -> None:
        deadline = time.monotonic() + WORKER_START_TIMEOUT
        while True:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited with {self.proc.returncode} before it was ready:\n{self.log_tail()}")
            replies = app.control.ping(destination=[self.hostname], timeout=0.5)
            if any(self.hostname in r for r in replies or []):
                return
            if time.monotonic() >= deadline:
                self.kill()
                raise AssertionError(f"worker not ready after {WORKER_START_TIMEOUT} s:\n{self.log_tail()}")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def kill(self) -> None:
        """SIGKILL the whole process group (main process and pool children): a crash."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        self.proc = None

    def stop(self, *, warm: bool = True, timeout: float = 20.0) -> None:
        """Shut down: warm (SIGTERM, finish running tasks) or cold (SIGQUIT); SIGKILL what is left."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM if warm else signal.SIGQUIT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=timeout)
        self.kill()

    def log_tail(self, lines: int = 80) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "<no worker log>"


class Beat:
    """One ``celery beat`` subprocess for a stack (its own schedule file), leader of its process group."""

    def __init__(self, config: dict[str, Any], workdir: Path, name: str) -> None:
        self.config = config
        self.log_path = workdir / f"beat-{config['label']}-{name}.log"
        self.schedule = workdir / f"beat-{config['label']}-{name}.schedule"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = dict(os.environ)
        env[flows.CONFIG_ENV] = json.dumps(self.config)
        env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        env.pop("CELERY_PERSIST_KEYS", None)
        cmd = [
            sys.executable, "-m", "celery", "-A", "tests.e2e.worker_app", "beat",
            "-s", str(self.schedule), "--loglevel", "INFO", "--max-interval", "1",
        ]  # fmt: skip
        log = self.log_path.open("ab")
        try:
            self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        finally:
            log.close()
        # Ready once it logged its start-up banner and the timer entry is scheduled.
        wait_for(lambda: "beat: Starting..." in self.log(), WORKER_START_TIMEOUT, f"beat {self.log_path.name} to start")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        self.proc = None


# -- a stack: config + app + persist + worker ------------------------------------------------


class Stack:
    def __init__(self, config: dict[str, Any], workdir: Path) -> None:
        self.config = config
        self.workdir = workdir
        self.app = flows.make_app(config)
        self.persist = Persist.of(self.app)
        self.worker = Worker(config, workdir / f"worker-{config['label']}.log")
        self.beats: list[Beat] = []
        self.closed = False

    # tasks and signatures, by name: nothing here leans on current_app
    def sig(self, name: str, *args: Any, **kwargs: Any) -> Any:
        return self.app.signature(name, args=args, kwargs=kwargs)

    def await_input(self, **kwargs: Any) -> Any:
        return self.app.tasks["celery_persist.await_input"].s(**kwargs)

    def tag(self) -> str:
        return uuid.uuid4().hex[:12]

    def recorded(self, tag: str) -> list[Any]:
        return flows.recorded(self.config, tag)

    def wait_recorded(self, tag: str, count: int, timeout: float = 20.0) -> list[Any]:
        def enough() -> list[Any] | None:
            records = self.recorded(tag)
            return records if len(records) >= count else None

        result: list[Any] = wait_for(enough, timeout, f"{count} records under {tag!r}")
        return result

    def start(self) -> None:
        self.worker.start(self.app)

    def start_beat(self, name: str = "beat") -> Beat:
        beat = Beat(self.config, self.workdir, name)
        self.beats.append(beat)
        beat.start()
        return beat

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            # Cold: at teardown nothing is running that needs finishing, and a warm
            # shutdown costs seconds per worker.
            for beat in self.beats:
                beat.stop()
            self.worker.stop(warm=False)
            if self.config["broker"].startswith("amqp"):
                # A durable queue outlives the test on RabbitMQ; ours has a unique name.
                with self.app.connection_for_write() as conn:
                    conn.default_channel.queue_delete(self.config["queue"])
        finally:
            self.persist.hub.close()
            self.app.close()


def new_key() -> str:
    return "k1:" + base64.b64encode(os.urandom(32)).decode()


def store_for(kind: str, label: str, workdir: Path) -> tuple[str, dict[str, Any], Callable[[], None]]:
    if kind == "sqlite":
        return f"sqlite:///{workdir / f'persist-{label}.db'}", {}, lambda: None
    if kind == "postgresql":
        prefix = f"{SESSION_NS}_{label}_".replace("-", "_")

        def drop() -> None:
            import sqlalchemy as sa

            engine = sa.create_engine(POSTGRESQL_URL)
            try:
                with engine.begin() as conn:
                    names = conn.execute(
                        sa.text("SELECT tablename FROM pg_tables WHERE tablename LIKE :p"), {"p": prefix.replace("_", r"\_") + "%"}
                    ).scalars()
                    for name in list(names):
                        conn.execute(sa.text(f'DROP TABLE IF EXISTS "{name}"'))
            finally:
                engine.dispose()

        return POSTGRESQL_URL, {"prefix": prefix}, drop
    raise ValueError(kind)


def delete_namespace(url: str, prefix: str) -> None:
    client = redis.Redis.from_url(url)
    try:
        batch = list(client.scan_iter(match=f"{prefix}*", count=1000))
        for i in range(0, len(batch), 500):
            client.delete(*batch[i : i + 500])
    finally:
        client.close()
