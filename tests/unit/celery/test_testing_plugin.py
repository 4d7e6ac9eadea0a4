"""The pytest plugin ``celery_persist.testing``: its fixtures, alone and with ``celery.contrib.pytest``.

The plugin is loaded through its ``pytest11`` entry point (the package is
installed), so the fixtures are used here directly. Runs of whole test files
(with ``celery.contrib.pytest``, or a test that names no fixture of ours) go
through ``pytester`` in a subprocess, so their plugins and Celery state stay
out of this session.
"""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from celery import Celery, chain, shared_task

from celery_persist import Persist, PersistentTask, SuspensionNotFound, await_input
from celery_persist.testing import ResumeAndGet, WaitSuspended, bind_for_test, last_step_id

pytest_plugins = ("pytester",)


@shared_task(name="plugin_test.double")
def double(n: int) -> int:
    return 2 * n


@shared_task(name="plugin_test.add")
def add(value: Any, n: int) -> Any:
    return value["x"] + n


@shared_task(base=PersistentTask, bind=True, name="plugin_test.ask_twice")
def ask_twice(self: PersistentTask, question: str) -> str:
    first = self.await_input(prompt=f"{question} (1)")
    second = self.await_input(prompt=f"{question} (2)")
    return f"{first}+{second}"


def test_the_plugin_is_registered_by_its_entry_point(pytestconfig: pytest.Config) -> None:
    plugin = pytestconfig.pluginmanager.get_plugin("celery_persist")
    assert plugin is not None and plugin.__name__ == "celery_persist.testing"


def test_importing_the_plugin_imports_neither_celery_nor_the_celery_layer() -> None:
    code = (
        "import sys, celery_persist.testing\n"
        "assert 'celery' not in sys.modules, 'celery imported'\n"
        "assert 'celery_persist.persist' not in sys.modules, 'the Celery layer imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_persist_app_is_bound_on_a_memory_store(persist_app: Celery, persist: Persist) -> None:
    assert persist is Persist.of(persist_app)
    assert persist.app is persist_app
    assert persist.config.store_url == "memory://"
    assert persist.config.key_in_result is True
    assert persist.hub.store.name == "memory://"
    assert persist_app.conf.broker_url == "memory://"
    assert persist_app.conf.task_default_queue.startswith("celery_persist.testing.")
    assert "celery_persist.await_input" in persist_app.tasks


class TestPersistConfigOverride:
    @pytest.fixture
    def persist_config(self, persist_config: dict[str, Any], tmp_path: Path) -> dict[str, Any]:
        return {**persist_config, "persist_store_url": f"sqlite:///{tmp_path / 'persist.db'}"}

    def test_an_overridden_persist_config_is_used(self, persist: Persist, tmp_path: Path) -> None:
        assert persist.config.store_url == f"sqlite:///{tmp_path / 'persist.db'}"


class TestBrokerFromTheEnvironment:
    @pytest.fixture(autouse=True)
    def broker_env(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("CELERY_BROKER_URL", "redis://127.0.0.1:1/0")
        monkeypatch.setenv("CELERY_RESULT_BACKEND", "redis://127.0.0.1:1/1")

    def test_persist_app_stays_in_memory(self, persist_app: Celery) -> None:
        assert persist_app.conf.broker_url == "memory://"
        assert persist_app.conf.result_backend == "cache+memory://"


def test_settings_of_the_app_win_over_persist_config(persist_app: Celery, persist_config: dict[str, Any]) -> None:
    app = Celery("own", set_as_current=False)
    app.conf.persist_key_in_result = False
    try:
        bound = bind_for_test(app, persist_config, Persist)
        assert bound.config.key_in_result is False
        assert bound.config.store_url == "memory://"
        bound.hub.close()
    finally:
        app.close()


def test_chain_parks_and_resumes_to_the_last_step(
    persist_worker: object, wait_suspended: WaitSuspended, resume_and_get: ResumeAndGet
) -> None:
    result = chain(double.s(21), await_input.s(prompt="x?"), add.s(1), double.s()).apply_async()
    key = wait_suspended(result)
    assert result.parent.parent.state == "SUSPENDED"
    # Not the next step's result (x + 1) but the flow's last one.
    assert resume_and_get(key, {"x": 4}) == 10
    assert result.get(timeout=10) == 10


def test_a_flow_that_never_parks(persist_worker: object, wait_suspended: WaitSuspended) -> None:
    with pytest.raises(SuspensionNotFound):
        wait_suspended(double.delay(1), timeout=10)


def test_waiting_has_a_deadline(persist_app: Celery, wait_suspended: WaitSuspended) -> None:
    # No worker: the task stays PENDING.
    result = persist_app.send_task("plugin_test.double", args=[1])
    with pytest.raises(TimeoutError, match="within 0.2 s"):
        wait_suspended(result, timeout=0.2)


def test_persistent_task_resumes_with_the_same_id(
    persist_worker: object, persist: Persist, wait_suspended: WaitSuspended, resume_and_get: ResumeAndGet
) -> None:
    result = persist.app.send_task("plugin_test.ask_twice", args=["go?"])
    first = wait_suspended(result)
    persist.resume(first, "a")
    second = wait_suspended(result)
    assert second != first
    assert resume_and_get(second, "b") == "a+b"


def test_last_step_id() -> None:
    assert last_step_id({"kind": "chain", "chain": []}) is None
    assert last_step_id({"kind": "task", "chain": None}) is None
    assert last_step_id({"chain": [{"task": "c", "options": {"task_id": "id-c"}}, {"task": "b", "options": {}}]}) == "id-c"
    assert last_step_id({"chain": [{"task": "c"}]}) is None
    assert last_step_id(None) is None


# -- whole test files, in a pytester subprocess ----------------------------------------------


def _celery_pytest_args() -> list[str]:
    """``-p celery.contrib.pytest`` unless an installed plugin (pytest-celery) loads it already."""
    loaded = {ep.value.partition(":")[0] for ep in importlib.metadata.entry_points(group="pytest11")}
    return [] if loaded & {"celery.contrib.pytest", "pytest_celery.plugin"} else ["-p", "celery.contrib.pytest"]


def _run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest_subprocess("-p", "no:cacheprovider", "-W", "error", "-q", *args, timeout=120)


COMBINED = """
import pytest
from celery import chain

from celery_persist import Persist, await_input


@pytest.fixture(scope="session")
def celery_config(tmp_path_factory):
    # Settings here win over the plugin's persist_config: this app's store is a SQLite file.
    db = tmp_path_factory.mktemp("persist") / "persist.db"
    return {"persist_store_url": f"sqlite:///{db}", "broker_transport_options": {"polling_interval": 0.01}}


@pytest.fixture
def celery_includes():
    return ["combined_tasks"]


def test_persist_binds_celery_app(celery_app, celery_worker, persist, wait_suspended, resume_and_get):
    from combined_tasks import shout

    assert persist is Persist.of(celery_app)
    assert persist.config.store_url.startswith("sqlite:///")
    result = chain(shout.s("hi"), await_input.s(prompt="go?"), shout.s()).apply_async()
    key = wait_suspended(result)
    assert resume_and_get(key, "done") == "DONE"
    assert result.get(timeout=10) == "DONE"
"""

TASKS = """
from celery import shared_task


@shared_task(name="combined.shout")
def shout(text):
    return text.upper()
"""


def test_combined_with_celery_contrib_pytest(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(combined_tasks=TASKS, test_combined=COMBINED)
    result = _run(pytester, *_celery_pytest_args())
    result.assert_outcomes(passed=1)


def test_fixtures_do_nothing_until_named(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_plain="""
        import sys

        def test_plain(request):
            assert "celery_persist.persist" not in sys.modules
            assert "persist_app" not in request.fixturenames
        """
    )
    _run(pytester).assert_outcomes(passed=1)


def test_enabled_by_name_when_autoload_is_off(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")
    pytester.makepyfile(test_named="def test_named(persist):\n    assert persist.config.store_url == 'memory://'\n")
    _run(pytester, "-p", "celery_persist").assert_outcomes(passed=1)
