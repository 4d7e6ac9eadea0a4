"""Flower shows parked tasks as SUSPENDED and resumed ones as SUCCESS.

A real deployment in miniature, self-contained (its own fixtures, nothing
from the e2e conftest): Redis db 7 as broker and result backend, a SQLite
store in a temp dir, two ``celery worker -E`` subprocesses (the approval
example's app for chains, the multisig example's app for a
``PersistentTask``), each on a queue unique to this run, and a real
``celery flower`` subprocess (``FLOWER_UNAUTHENTICATED_API=true``, which
Flower 2.x requires for ``/api/*`` without auth).

Flower builds task states from events with Celery's ``events.State``: an
event type it does not know, ``task-suspended``, becomes the state
``SUSPENDED``, and ``task-resumed`` becomes ``RESUMED``. Both rank with
Celery's custom states, above RECEIVED/STARTED, so a late ``task-started``
does not hide a SUSPENDED; ``task-succeeded`` then wins over both.

Isolation: unique queues and worker names; teardown deletes only the keys
this module created (its queues' bindings and its tasks' results), never the
database.
"""

from __future__ import annotations

import base64
import contextlib
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
import redis
from celery import Celery, chain
from celery.result import AsyncResult

from celery_persist import Persist, await_input
from examples.multisig.signing import sign

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
REDIS_URL = os.environ.get("CELERY_PERSIST_TEST_REDIS_URL", "redis://127.0.0.1:6379").rstrip("/")
REDIS_DB = 7
IN_CI = os.environ.get("CI", "").lower() == "true"
START_TIMEOUT = 60.0
# Variables of the developer's shell that would point the subprocesses elsewhere.
_SCRUB = ("CELERY_BROKER_URL", "CELERY_RESULT_BACKEND", "CELERY_PERSIST_STORE_URL", "CELERY_PERSIST_STORE_OPTIONS",
          "CELERY_PERSIST_KEYS", "CELERY_PERSIST_KEY", "CELERY_PERSIST_SIGNING_SECRET", "CELERY_PERSIST_EXAMPLE_DIR",
          "CELERY_PERSIST_EXAMPLE_QUEUE")  # fmt: skip


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def _db_url() -> str:
    parts = urlsplit(REDIS_URL)
    return urlunsplit((parts.scheme, parts.netloc, f"/{REDIS_DB}", parts.query, ""))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Proc:
    """A subprocess leading its own process group, with its output in a file."""

    name: str
    log_path: Path
    proc: subprocess.Popen[bytes]

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "<no log>"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(15)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)


@dataclass
class Deployment:
    ns: str
    env: dict[str, str]
    flower_url: str
    queues: dict[str, str]
    client: Celery
    persist: Persist
    procs: list[Proc] = field(default_factory=list)
    task_ids: set[str] = field(default_factory=set)

    def api(self, path: str) -> Any:
        with urllib.request.urlopen(f"{self.flower_url}{path}", timeout=10) as response:  # noqa: S310 - local Flower
            return json.loads(response.read())

    def flower_task(self, task_id: str) -> dict[str, Any] | None:
        """The task as ``/api/tasks`` lists it, or None."""
        tasks = self.api("/api/tasks?limit=1000")
        task: dict[str, Any] | None = tasks.get(task_id)
        return task

    def wait_flower_state(self, task_id: str, state: str, name: str, timeout: float = 30.0, after: float = 0.0) -> dict[str, Any]:
        """Poll ``/api/tasks`` until ``task_id`` is in ``state`` (timestamp > ``after``) and named ``name``.

        The name comes with ``task-received``, which the worker buffers and may
        publish after ``task-suspended`` (sent at once from the task): Flower
        then shows SUSPENDED first and merges the name in when it arrives.
        """
        last: list[Any] = [None]

        def check() -> dict[str, Any] | None:
            task = self.flower_task(task_id)
            last[0] = task and (task.get("state"), task.get("timestamp"), task.get("name"))
            if task and task.get("state") == state and (task.get("timestamp") or 0) > after and task.get("name") == name:
                return task
            return None

        try:
            result: dict[str, Any] = wait_for(check, timeout, f"Flower to show task {task_id} as {state}")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; Flower last showed (state, timestamp, name) {last[0]}\n{self.logs()}") from None
        return result

    def track(self, *results: AsyncResult | None) -> None:
        for r in results:
            while r is not None:
                self.task_ids.add(r.id)
                r = r.parent

    def logs(self) -> str:
        return "\n".join(f"--- {p.name} ---\n{p.log(30)}" for p in self.procs)


def _missing(reason: str) -> None:
    if IN_CI:
        pytest.fail(f"required service unavailable in CI: {reason}")
    pytest.skip(reason)


def _spawn(name: str, cmd: list[str], env: dict[str, str], workdir: Path) -> Proc:
    log_path = workdir / f"{name}.log"
    with log_path.open("ab") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return Proc(name, log_path, proc)


def _start_worker(name: str, app_module: str, queue: str, ns: str, env: dict[str, str], workdir: Path, client: Celery) -> Proc:
    hostname = f"{ns}-{name}@{socket.gethostname()}"
    worker = _spawn(
        name,
        [sys.executable, "-m", "celery", "-A", app_module, "worker", "-E", "--pool", "solo", "-Q", queue, "-n", hostname,
         "--without-gossip", "--without-mingle", "--without-heartbeat", "--loglevel", "INFO"],
        {**env, "CELERY_PERSIST_EXAMPLE_QUEUE": queue},
        workdir,
    )  # fmt: skip

    def ready() -> bool:
        if not worker.alive():
            raise AssertionError(f"{name} exited with {worker.proc.returncode}:\n{worker.log()}")
        replies = client.control.ping(destination=[hostname], timeout=0.5)
        return any(hostname in r for r in replies or [])

    wait_for(ready, START_TIMEOUT, f"{name} to answer ping")
    return worker


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    url = _db_url()
    try:
        r = redis.Redis.from_url(url, socket_connect_timeout=2)
        r.ping()
    except Exception as exc:  # noqa: BLE001 - any failure means "not usable here"
        _missing(f"Redis at {url} unavailable: {exc}")
    if importlib.util.find_spec("flower") is None:
        _missing("flower is not installed (pip install 'celery-persist[test]')")

    workdir = tmp_path_factory.mktemp("flower")
    ns = f"flower-{uuid.uuid4().hex[:10]}"
    queues = {"approval": f"{ns}.approval", "multisig": f"{ns}.multisig"}
    keys = f"k1:{base64.b64encode(os.urandom(32)).decode()}"
    store_url = f"sqlite:///{workdir / 'persist.db'}"
    env = {k: v for k, v in os.environ.items() if k not in _SCRUB}
    env.update(
        CELERY_BROKER_URL=url,
        CELERY_RESULT_BACKEND=url,
        CELERY_PERSIST_STORE_URL=store_url,
        CELERY_PERSIST_KEYS=keys,
        CELERY_PERSIST_EXAMPLE_DIR=str(workdir),
        CELERY_PERSIST_EXAMPLE_QUEUE=queues["approval"],
        FLOWER_UNAUTHENTICATED_API="true",
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    )

    # The test process's client: same broker, backend, store and key as the workers; it routes
    # the multisig task to the multisig worker (resumes re-send through this router too).
    client = Celery(f"{ns}-client", broker=url, backend=url)
    client.conf.update(
        task_default_queue=queues["approval"],
        task_routes={"examples.multisig.*": {"queue": queues["multisig"]}},
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        persist_store_url=store_url,
        persist_keys=keys,
        persist_encryption="required",
        persist_cleanup_interval=None,
    )
    persist = Persist(client)

    port = _free_port()
    dep = Deployment(ns=ns, env=env, flower_url=f"http://127.0.0.1:{port}", queues=queues, client=client, persist=persist)
    try:
        flower_proc = _spawn(
            "flower",
            [sys.executable, "-m", "celery", "-A", "examples.approval.app", "flower", f"--port={port}", "--address=127.0.0.1"],
            env,
            workdir,
        )
        dep.procs.append(flower_proc)

        def flower_up() -> bool:
            if not flower_proc.alive():
                raise AssertionError(f"flower exited with {flower_proc.proc.returncode}:\n{flower_proc.log()}")
            try:
                with urllib.request.urlopen(f"{dep.flower_url}/healthcheck", timeout=2) as response:  # noqa: S310
                    return bool(response.read() == b"OK")
            except OSError:
                return False

        wait_for(flower_up, START_TIMEOUT, "Flower to answer /healthcheck")
        dep.procs.append(_start_worker("approval-worker", "examples.approval.app", queues["approval"], ns, env, workdir, client))
        dep.procs.append(_start_worker("multisig-worker", "examples.multisig.app", queues["multisig"], ns, env, workdir, client))

        # Flower subscribes to events asynchronously; a probe task seen SUCCESS proves the pipeline is live.
        def probe_seen() -> bool:
            probe = client.send_task("examples.approval.prepare", args=[0, 1.0, "probe"])
            dep.track(probe)
            probe.get(timeout=20)
            try:
                dep.wait_flower_state(probe.id, "SUCCESS", "examples.approval.prepare", timeout=3)
            except AssertionError:
                return False
            return True

        wait_for(probe_seen, START_TIMEOUT, f"Flower to see task events:\n{dep.logs()}", interval=0)
        yield dep
    finally:
        for proc in reversed(dep.procs):
            proc.stop()
        _delete_own_keys(url, dep)
        persist.hub.close()


def _delete_own_keys(url: str, dep: Deployment) -> None:
    with contextlib.suppress(Exception):
        r = redis.Redis.from_url(url)
        names = [f"celery-task-meta-{tid}" for tid in dep.task_ids]
        for queue in dep.queues.values():
            names += [queue, f"_kombu.binding.{queue}", f"_kombu.binding_permanent.{queue}"]
        if names:
            r.delete(*names)


def test_parked_chain_step_shows_suspended_then_success(deployment: Deployment) -> None:
    dep = deployment
    flow = chain(
        dep.client.signature("examples.approval.prepare", args=(7, 250.0, "erin")),
        await_input.s(prompt="approve expense #7?", timeout=600, include_previous=True),
        dep.client.signature("examples.approval.book"),
    )
    res = flow.apply_async()
    dep.track(res)
    key = dep.persist.suspension_key(res, timeout=30)
    awaiting = res.parent
    assert awaiting is not None

    parked = dep.wait_flower_state(awaiting.id, "SUSPENDED", "celery_persist.await_input")
    assert awaiting.state == "SUSPENDED", "the result backend agrees with Flower"
    assert awaiting.id in dep.api("/api/tasks?state=SUSPENDED"), "Flower filters on the custom state"

    dep.persist.resume(key, {"approved": True, "by": "frank"})
    assert res.get(timeout=30) == "expense #7 (EUR 250.00, by erin) booked, approved by frank"

    done = dep.wait_flower_state(awaiting.id, "SUCCESS", "celery_persist.await_input")
    assert done["timestamp"] >= parked["timestamp"]
    dep.wait_flower_state(res.id, "SUCCESS", "examples.approval.book")


def test_persistent_task_shows_suspended_at_each_wait_then_success(deployment: Deployment) -> None:
    dep = deployment
    payment = {"id": f"PAY-{dep.ns}", "amount": 10.0, "to": "ACME"}
    res = dep.client.send_task("examples.multisig.release_payment", args=[payment, ["alice", "bob"], 2, 600])
    dep.track(res)
    after = 0.0
    seen: set[str] = set()
    for signer in ("alice", "bob"):

        def new_key() -> str | None:
            info = res.info
            key = info.get("suspension_key") if res.state == "SUSPENDED" and isinstance(info, dict) else None
            return key if key and key not in seen else None

        key = wait_for(new_key, 30, f"the task to park for {signer}")
        seen.add(key)
        # Each park is a new SUSPENDED state in Flower, later than the previous one.
        parked = dep.wait_flower_state(res.id, "SUSPENDED", "examples.multisig.release_payment", after=after)
        after = parked["timestamp"]
        dep.persist.resume(key, {"signature": sign(signer, payment)})

    outcome = res.get(timeout=30)
    assert outcome["released"] is True and outcome["signed_by"] == ["alice", "bob"]
    done = dep.wait_flower_state(res.id, "SUCCESS", "examples.multisig.release_payment")
    assert done["timestamp"] > after
