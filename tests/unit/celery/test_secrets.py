"""Trust I: keys never at rest, never in what Celery shows, and secure defaults.

Each test here failed on 0.1: the park journal held the raw key, notify and the
README's resume sent it as plain task arguments, encryption was off unless
configured, and nothing signed keys without an explicit secret.
"""

from __future__ import annotations

import logging
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery, signals
from celery.exceptions import Ignore
from click.testing import CliRunner

from celery_persist import ConfigurationError, InvalidKey, Keyring, Persist, PersistentTask, SuspensionCancelled
from celery_persist.cli import main
from celery_persist.config import embedded_key_file
from celery_persist.handlers import redact_handlers
from celery_persist.keys import KeyRedactingFilter, fingerprint, masked_key

REQUEST = {
    "task": "celery_persist.await_input",
    "root_id": "root",
    "parent_id": "root",
    "group": None,
    "chain": None,
    "callbacks": None,
    "errbacks": None,
    "delivery_info": {},
    "hostname": "w@t",
    "called_directly": False,
    "is_eager": False,
}


def _park(app: Celery, task_id: str, **options: Any) -> str:
    """Run the await_input body as a worker would, once; returns the key it announced."""
    persist = Persist.of(app)
    task = app.tasks["celery_persist.await_input"]
    task.push_request(id=task_id, **REQUEST)
    try:
        with pytest.raises(Ignore):
            task.run(1, prompt="approve?", timeout=600, **options)
    finally:
        task.pop_request()
    return persist.hub.unwrap_key(app.backend.get_task_meta(task_id)["result"]["suspension_key"])


def _raw_sqlite(url: str) -> bytes:
    """Every byte the SQLite store keeps: database, journal and WAL files."""
    path = Path(url.removeprefix("sqlite:///"))
    return b"".join(p.read_bytes() for p in path.parent.glob(path.name + "*") if not p.name.endswith(".key"))


@pytest.fixture(params=["embedded-key", "encryption-off"])
def any_posture(request: pytest.FixtureRequest, app: Celery) -> Celery:
    if request.param == "encryption-off":
        app.conf.persist_encryption = "off"
    return app


def test_the_raw_key_never_reaches_the_store(any_posture: Celery) -> None:
    app = any_posture
    task_id = f"t-{os.urandom(4).hex()}"
    key = _park(app, task_id)
    again = _park(app, task_id)  # a redelivered park message announces the flow again
    persist = Persist.of(app)
    assert persist.load(again).status == "suspended"
    raw = _raw_sqlite(app.conf.persist_store_url)
    for k in {key, again}:
        assert k.encode() not in raw
        body = k.split(".")[1].encode()
        assert body not in raw  # not even the random part of it


def test_a_redelivered_park_reannounces_without_a_stored_key(app: Celery) -> None:
    # With a key (the default posture) the key is derived again: the same one.
    task_id = f"t-{os.urandom(4).hex()}"
    assert _park(app, task_id) == _park(app, task_id)
    assert len(Persist.of(app).hub.list(status="suspended").items) == 1


def test_without_any_secret_a_redelivered_park_moves_the_flow_to_a_new_key(app: Celery) -> None:
    app.conf.persist_encryption = "off"
    persist = Persist(app)
    task_id = f"t-{os.urandom(4).hex()}"
    first = _park(app, task_id)
    second = _park(app, task_id)
    assert first != second
    with pytest.raises(SuspensionCancelled):
        persist.hub.claim(first)  # the old key was retired, so one flow has one live key
    assert persist.load(second).status == "suspended"


def test_notify_gets_the_key_but_events_and_logs_see_it_masked(app: Celery) -> None:
    seen: list[dict[str, Any]] = []

    def record(sender: Any = None, body: Any = None, headers: Any = None, **_: Any) -> None:
        seen.append({"args": body[0], "argsrepr": headers.get("argsrepr"), "task": headers["task"]})

    signals.before_task_publish.connect(record, weak=False)
    try:
        key = _park(app, f"t-{os.urandom(4).hex()}", notify=app.signature("shop.notify"))
    finally:
        signals.before_task_publish.disconnect(record)
    (message,) = [m for m in seen if m["task"] == "shop.notify"]
    assert message["args"][0] == key  # the notify task needs the key itself
    assert key not in message["argsrepr"]  # what events, Flower and worker logs show
    assert masked_key(fingerprint(key)) in message["argsrepr"]


def test_the_result_backend_holds_only_a_wrapped_key(app: Celery) -> None:
    task_id = f"t-{os.urandom(4).hex()}"
    key = _park(app, task_id)
    meta = app.backend.get_task_meta(task_id)
    assert key not in repr(meta) and key.split(".")[1] not in repr(meta)
    wrapped = meta["result"]["suspension_key"]
    with pytest.raises(InvalidKey, match="wrapped"):
        app.tasks["celery_persist.resume"].run(wrapped, "yes")  # a result-backend reader cannot resume
    other = Persist(Celery("other", broker="memory://", set_as_current=False), store_url=app.conf.persist_store_url + "2")
    with pytest.raises(InvalidKey):
        other.hub.unwrap_key(wrapped)  # nor can anyone without this app's keys


def test_key_redacting_filter_masks_keys_in_log_records(app: Celery, caplog: pytest.LogCaptureFixture) -> None:
    key = Persist(app).hub.new_key()
    record = logging.LogRecord("celery.pool", logging.DEBUG, __file__, 1, "TaskPool: Apply (args:%r)", (f"body [{key!r}, 1]",), None)
    assert KeyRedactingFilter().filter(record)
    assert key not in record.getMessage() and masked_key(fingerprint(key)) in record.getMessage()
    handler = logging.StreamHandler()
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        redact_handlers()
        assert any(isinstance(f, KeyRedactingFilter) for f in handler.filters)
    finally:
        root.removeHandler(handler)


# -- secure defaults ------------------------------------------------------------------------------


def test_encryption_is_required_by_default_for_a_server_store() -> None:
    app = Celery("strict", broker="memory://", set_as_current=False)
    app.conf.persist_store_url = "redis://127.0.0.1:1/0"
    persist = Persist(app)  # not configured yet: the settings are read at first use
    with pytest.raises(ConfigurationError, match="celery-persist keygen"):
        persist.ready()
    app.close()
    configured = Celery("strict", broker="memory://", set_as_current=False)
    configured.conf.persist_store_url = "redis://127.0.0.1:1/0"
    assert configured.conf.broker_url  # configures the app
    with pytest.raises(ConfigurationError, match="celery-persist keygen"):
        Persist(configured)  # configured: refused at once, before any store is opened
    configured.close()


def test_the_embedded_sqlite_store_makes_its_own_private_key(app: Celery, tmp_path: Path) -> None:
    hub = Persist(app).ready()
    assert hub.keyring is not None and hub.health()["encryption"] == "aes-256-gcm"
    key_file = Path(embedded_key_file(app.conf.persist_store_url) or "")
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(key_file.parent.stat().st_mode) & 0o077 == 0 or key_file.parent == tmp_path
    key = hub.suspend({"secret": "s3cr3t-state"})
    assert key.count(".") == 2  # signed with a secret derived from that key: nothing else to set
    assert b"s3cr3t-state" not in _raw_sqlite(app.conf.persist_store_url)


def test_a_key_file_others_can_read_is_refused(tmp_path: Path) -> None:
    from celery_persist.crypto import local_keyring

    path = tmp_path / "db.key"
    local_keyring(path)
    path.chmod(0o644)
    with pytest.raises(ConfigurationError, match="chmod 600"):
        local_keyring(path)


def test_sqlite_store_files_are_private(app: Celery) -> None:
    Persist(app).ready().suspend(1)
    path = Path(app.conf.persist_store_url.removeprefix("sqlite:///"))
    for file in path.parent.glob(path.name + "*"):
        assert stat.S_IMODE(file.stat().st_mode) == 0o600, file


def test_keygen_prints_a_ready_to_export_line() -> None:
    result = CliRunner().invoke(main, ["keygen"])
    assert result.exit_code == 0
    line = result.stdout.strip()
    assert line.startswith("export CELERY_PERSIST_KEYS=k")
    ring = Keyring.parse(line.partition("=")[2])
    assert ring.active_id.startswith("k2")
    assert CliRunner().invoke(main, ["keygen"]).stdout != result.stdout


def test_keygen_output_works_as_the_environment() -> None:
    line = CliRunner().invoke(main, ["keygen", "--id", "prod1"]).stdout.strip()
    env = {**os.environ, "CELERY_PERSIST_KEYS": line.partition("=")[2]}
    code = "from celery_persist import Keyring; print(Keyring.from_env().active_id)"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "prod1"


@pytest.fixture
def persistent(app: Celery) -> Iterator[Any]:
    @app.task(base=PersistentTask, bind=True, shared=False, name="t.wait")
    def wait(self: PersistentTask) -> Any:
        return self.await_input(prompt="?")

    yield wait


def test_persistent_task_await_keeps_no_key_in_its_journal(app: Celery, persistent: Any) -> None:
    task_id = f"t-{os.urandom(4).hex()}"
    persistent.push_request(id=task_id, task="t.wait", args=[], kwargs={}, called_directly=False, is_eager=False, delivery_info={})
    try:
        with pytest.raises(Ignore):
            persistent.run()
    finally:
        persistent.pop_request()
    persist = Persist.of(app)
    key = persist.hub.unwrap_key(app.backend.get_task_meta(task_id)["result"]["suspension_key"])
    assert key.encode() not in _raw_sqlite(app.conf.persist_store_url)
    journal = persist.hub.load_checkpoint(f"await:{task_id}:0")
    assert key not in repr(journal) and set(journal) == {"hash", "ms"}
