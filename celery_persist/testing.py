"""pytest plugin for testing flows built on celery-persist (entry point ``pytest11``).

Opt-in: nothing here runs until a test names one of its fixtures. With
celery-persist installed, pytest loads the plugin by itself; with plugin
autoload off (``PYTEST_DISABLE_PLUGIN_AUTOLOAD``), enable it with
``-p celery_persist`` (the entry point's name: ``-p celery_persist.testing``
would register the module a second time when autoload is on, which pytest
refuses).

Fixtures:

* ``persist_app``: a Celery app on the in-memory broker (``memory://``) and
  result backend (``cache+memory://``), bound with ``Persist(app)`` on a
  private ``memory://`` store with a fresh encryption key; the in-thread
  worker shares the process, so it sees the same store.
* ``persist``: the :class:`~celery_persist.Persist` of the app the test uses:
  ``celery_app`` when the test (or a fixture it uses, like ``celery_worker``)
  requests :mod:`celery.contrib.pytest`'s app, else ``persist_app``.
* ``persist_worker``: an in-thread worker (solo pool) for ``persist_app``.
* ``wait_suspended(result, timeout=10) -> key``: waits until a step of the
  flow is SUSPENDED (:meth:`Persist.suspension_key`).
* ``resume_and_get(key, input=None, timeout=10)``: resumes and returns the
  flow's final result (the last step of the chain, not only the next one).
* ``persist_config``: the ``persist_*`` settings given to the app under test
  where its configuration leaves them unset; override it to change them.

Example:
    >>> def test_approval(persist_app, persist_worker, wait_suspended, resume_and_get):
    ...     res = chain(review.s(7), await_input.s(prompt="ok?"), publish.s()).apply_async()
    ...     key = wait_suspended(res)
    ...     assert resume_and_get(key, {"approved": True}) == "published 7"

Why the imports look unusual: pytest imports this module in every session of
every project that has celery-persist installed, so at module level it
imports only pytest and the ``celery_persist`` package (the library layer,
which does not import Celery). The Celery layer comes through the package's
lazy ``celery_persist.Persist`` when a fixture first needs it (importing it
registers the ``celery_persist.*`` shared tasks, which no app of a session
that never asked should get), and Celery's testing helpers are imported
inside the fixtures that start apps and workers.
"""

from __future__ import annotations

import base64
import os
import uuid
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any, Protocol

import pytest

import celery_persist

if TYPE_CHECKING:
    from celery import Celery
    from celery.result import AsyncResult
    from celery.worker import WorkController

    from .persist import Persist

__all__ = ["WaitSuspended", "ResumeAndGet", "bind_for_test", "last_step_id"]

#: Seconds the in-memory transport sleeps between polls of an empty queue (kombu's default is 1 s per hop).
POLLING_INTERVAL = 0.01
#: Seconds between polls of the result backend while waiting for a result (Celery's default is 0.5 s).
POLL_INTERVAL = 0.02


class WaitSuspended(Protocol):
    """Type of the ``wait_suspended`` fixture."""

    def __call__(self, result: AsyncResult, timeout: float = 10.0) -> str:
        """Wait until some step of ``result``'s flow is SUSPENDED and return its suspension key.

        Args:
            result: The flow's AsyncResult (``chain(...).apply_async()``; its parents are searched).
            timeout: Seconds to poll before giving up.

        Returns:
            The suspension key, ready for ``persist.resume`` or ``resume_and_get``.

        Raises:
            TimeoutError: Nothing in the flow was suspended within ``timeout`` seconds.
            SuspensionNotFound: The flow finished without suspending.
        """


class ResumeAndGet(Protocol):
    """Type of the ``resume_and_get`` fixture."""

    def __call__(self, key: str, input: Any = None, timeout: float = 10.0) -> Any:
        """Resume the flow parked under ``key`` with ``input`` and return its final result.

        Args:
            key: The suspension key (from ``wait_suspended``).
            input: The resume input (what the next step receives).
            timeout: Seconds to wait for the last step of the continuation.

        Returns:
            The result of the flow's last step (or of the resumed task, for
            ``PersistentTask.await_input``).

        Raises:
            celery.exceptions.TimeoutError: The flow did not finish in time
                (also when it parked again: use ``wait_suspended`` on the
                original result for a flow with several waits).
            Exception: What the last step raised, as ``AsyncResult.get`` does.
        """


@pytest.fixture(scope="session")
def _persist_class() -> type[Persist]:
    """The Celery layer, loaded once, before any function-scoped app of the session exists.

    Loading it registers the ``celery_persist.*`` shared tasks. Loaded inside
    ``celery.contrib.pytest``'s ``celery_app`` instead, they would be lost for
    every later app: that fixture restores Celery's list of finalizers when it ends.
    """
    return celery_persist.Persist


@pytest.fixture
def persist_config() -> dict[str, Any]:
    """The ``persist_*`` settings given to the app under test where its configuration leaves them unset.

    A private ``memory://`` store, a fresh encryption key, suspension keys in
    the result backend. Override this fixture to test against another store,
    e.g. ``{**defaults, "persist_store_url": f"sqlite:///{tmp_path}/persist.db"}``.
    """
    return {
        "persist_store_url": "memory://",
        "persist_keys": "test:" + base64.b64encode(os.urandom(32)).decode("ascii"),
        "persist_key_in_result": True,
    }


def bind_for_test(app: Celery, config: Mapping[str, Any], persist_class: type[Persist]) -> Persist:
    """``Persist(app)`` with ``config`` filling in the ``persist_*`` settings ``app.conf`` leaves unset.

    An app already bound keeps its binding (``Persist`` is idempotent per app).
    """
    overrides = {name: value for name, value in config.items() if app.conf.get(name) is None}
    return persist_class(app, **overrides)


@pytest.fixture
def persist_app(_persist_class: type[Persist], persist_config: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> Iterator[Celery]:
    """A Celery app on the in-memory broker and result backend, bound with ``Persist(app)``.

    Built with Celery's ``TestApp`` (JSON only, UTC, root logger left alone,
    ``celery.ping`` registered), not made current, with a queue of its own.
    ``CELERY_BROKER_URL`` and ``CELERY_RESULT_BACKEND`` are unset while it
    lives: Celery lets them win over any configuration, and this app must not
    reach a real broker. Tasks defined with ``@shared_task`` (as
    ``celery_persist.await_input`` is) run on it.
    """
    from celery.contrib.testing.app import TestApp

    for name in ("CELERY_BROKER_URL", "CELERY_RESULT_BACKEND"):
        monkeypatch.delenv(name, raising=False)
    app = TestApp(
        "celery_persist.testing",
        set_as_current=False,
        config={
            # The in-memory broker is one per process: a queue of its own keeps a message
            # another test left behind from reaching this test's worker.
            "task_default_queue": f"celery_persist.testing.{uuid.uuid4().hex}",
            "broker_transport_options": {"polling_interval": POLLING_INTERVAL},
        },
    )
    persist = bind_for_test(app, persist_config, _persist_class)
    try:
        yield app
    finally:
        persist.hub.close()
        app.close()


@pytest.fixture
def persist(request: pytest.FixtureRequest, _persist_class: type[Persist], persist_config: dict[str, Any]) -> Persist:
    """The ``Persist`` of the app under test: ``celery_app`` if the test uses it, else ``persist_app``.

    ``celery_app`` (from ``celery.contrib.pytest``) is bound here with
    ``persist_config`` filling in what its ``celery_config`` leaves unset.
    """
    if "celery_app" in request.fixturenames:
        app: Celery = request.getfixturevalue("celery_app")
        bound = bind_for_test(app, persist_config, _persist_class)
        request.addfinalizer(bound.hub.close)
        return bound
    app = request.getfixturevalue("persist_app")
    return _persist_class.of(app)


@pytest.fixture
def persist_worker(persist_app: Celery) -> Iterator[WorkController]:
    """An in-thread worker (solo pool) consuming ``persist_app``'s queue, stopped after the test.

    Like ``celery.contrib.pytest``'s ``celery_worker``, it makes the app current
    while it runs; the previous current and default apps are restored after.
    """
    from celery.contrib.testing.app import setup_default_app
    from celery.contrib.testing.worker import start_worker
    from celery.worker import state

    with setup_default_app(persist_app), start_worker(persist_app, pool="solo", perform_ping_check=False, shutdown_timeout=30.0) as worker:
        try:
            yield worker
        finally:
            # Celery's blocking loop (the memory transport has no event loop) checks the stop
            # flag between 2-second waits for a message, and waits once more after it saw
            # the flag: raise the flag start_worker raises on exit, then send two no-op
            # messages to end both waits now instead of 2-4 s later.
            state.should_terminate = 0
            for _ in range(2):
                persist_app.send_task("celery.ping", ignore_result=True)


@pytest.fixture
def wait_suspended(persist: Persist) -> WaitSuspended:
    """``wait_suspended(result, timeout=10) -> key``: the key of the step of ``result``'s flow that is SUSPENDED."""

    def wait(result: AsyncResult, timeout: float = 10.0) -> str:
        return persist.suspension_key(result, timeout=timeout)

    return wait


@pytest.fixture
def resume_and_get(persist: Persist) -> ResumeAndGet:
    """``resume_and_get(key, input=None, timeout=10)``: resume, then the flow's final result."""

    def resume_and_get(key: str, input: Any = None, timeout: float = 10.0) -> Any:
        last = last_step_id(persist.load(key).state)
        result = persist.resume(key, input)
        if result is None:
            raise AssertionError("the resume recorded an approval and more are needed: resume with the other approvers' by=")
        final = persist.app.AsyncResult(last) if last else result
        return final.get(timeout=timeout, interval=POLL_INTERVAL)

    return resume_and_get


def last_step_id(state: Any) -> str | None:
    """The frozen task id of the last step of a parked flow's chain, or None when nothing follows.

    The rest of the chain is stored as Celery carries it in ``request.chain``:
    the next step last, so the flow's last step first.
    """
    chain = state.get("chain") if isinstance(state, dict) else None
    if not chain or not isinstance(chain[0], dict):
        return None
    options = chain[0].get("options") or {}
    task_id = options.get("task_id")
    return str(task_id) if task_id else None
