"""The standalone CLI against a real SQLite store (click's runner, no subprocess needed)."""

from __future__ import annotations

import base64
import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import click
import pytest
from celery import Celery, signals
from celery.exceptions import Ignore
from click.testing import CliRunner

from celery_persist import ConfigurationError, Keyring, PersistenceHub, open_store
from celery_persist import journal as journal_mod
from celery_persist.cli import MIN_PREFIX, main, persist
from celery_persist.keys import key_hash
from celery_persist.persist import Persist


def _keys(*kids: str) -> str:
    return ",".join(f"{kid}:{base64.b64encode(os.urandom(32)).decode()}" for kid in kids)


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    keys = _keys("k1")
    monkeypatch.setenv("CELERY_PERSIST_KEYS", keys)
    monkeypatch.delenv("CELERY_PERSIST_SIGNING_SECRET", raising=False)
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    monkeypatch.setenv("CELERY_PERSIST_STORE_URL", url)
    return {"url": url, "keys": keys}


def _hub(url: str, keys: str) -> PersistenceHub:
    store = open_store(url)
    store.setup()
    return PersistenceHub(store, keyring=Keyring.parse(keys))


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def test_list_empty_then_rows(env: dict[str, str]) -> None:
    assert run("list") == (0, "no suspensions\n", "")
    hub = _hub(env["url"], env["keys"])
    key = hub.suspend({"secret": "do-not-print"}, ttl=600, metadata={"prompt": "approve?", "task": "t.x", "task_id": "id1"})
    code, out, _ = run("list", "--json")
    assert code == 0
    rows = json.loads(out)
    assert [r["prompt"] for r in rows] == ["approve?"]
    assert rows[0]["status"] == "suspended" and rows[0]["task_id"] == "id1"
    assert key not in out and "do-not-print" not in out
    code, out, _ = run("list", "--status", "resumed")
    assert out == "no suspensions\n"


def test_show_hides_state_unless_revealed(env: dict[str, str]) -> None:
    hub = _hub(env["url"], env["keys"])
    key = hub.suspend({"secret": "do-not-print"}, metadata={"prompt": "p"})
    code, out, _ = run("show", key, "--json")
    doc = json.loads(out)
    assert code == 0 and doc["status"] == "suspended" and "state" not in doc
    assert "do-not-print" not in out
    code, out, _ = run("show", key, "--json", "--reveal-state")
    assert json.loads(out)["state"] == {"secret": "do-not-print"}


def test_exit_codes_for_bad_keys(env: dict[str, str]) -> None:
    hub = _hub(env["url"], env["keys"])
    key = hub.suspend(1)
    hub.resume(key)
    assert run("show", "not-a-key")[0] == os.EX_DATAERR
    assert run("show", "p1.01m8a2jeb6m1RExdmru-ydOrBduQ_QDg")[0] == os.EX_DATAERR  # unsigned, while keys sign
    assert run("show", hub.new_key())[0] == os.EX_NOINPUT  # genuine, but never stored
    code, _, err = run("cancel", key)
    assert code == 1 and "AlreadyResumed" in err and key not in err


def test_cancel_then_stats(env: dict[str, str]) -> None:
    hub = _hub(env["url"], env["keys"])
    keep = hub.suspend(1)
    drop = hub.suspend(2)
    code, out, _ = run("cancel", drop)
    assert code == 0 and "cancelled suspension" in out
    code, out, _ = run("stats", "--json")
    doc = json.loads(out)
    assert doc["suspensions"] == {"suspended": 1, "cancelled": 1}
    assert doc["health"]["ok"] is True and doc["health"]["encryption"] == "aes-256-gcm"
    assert hub.load(keep).status == "suspended"


def test_cleanup_dry_run_counts_due(env: dict[str, str]) -> None:
    hub = _hub(env["url"], env["keys"])
    hub.suspend(1, ttl=0.001)
    hub.suspend(2, ttl=3600)
    code, out, _ = run("cleanup", "--dry-run")
    assert code == 0 and out.startswith("1 record(s) due")
    code, _, err = run("cleanup")
    assert code != 0 and "celery -A proj persist cleanup" in err


def test_rotate_keys_reencrypts_everything(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    # With a signing secret, keys are signed independently of the encryption keys,
    # so retiring the old encryption key after the rotation leaves issued keys valid.
    monkeypatch.setenv("CELERY_PERSIST_SIGNING_SECRET", "s" * 32)
    old = _hub(env["url"], env["keys"])
    keys = [old.suspend({"n": i}) for i in range(5)]
    rotated = _keys("k2") + "," + env["keys"]
    monkeypatch.setenv("CELERY_PERSIST_KEYS", rotated)
    code, out, _ = run("rotate-keys", "--batch", "2")
    assert code == 0 and "rotated=5" in out and "pending=0" in out
    new_only = _hub(env["url"], rotated.split(",")[0])  # the old key is gone
    assert [new_only.load(k).state for k in keys] == [{"n": i} for i in range(5)]
    code, out, _ = run("rotate-keys")
    assert "rotated=0" in out and "current=5" in out


def test_store_down_is_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CELERY_PERSIST_STORE_URL", "postgresql://127.0.0.1:1/nothing")
    code, _, err = run("stats")
    assert code == os.EX_UNAVAILABLE and "StoreUnavailable" in err


def test_missing_store_is_a_usage_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CELERY_PERSIST_STORE_URL", raising=False)
    result = CliRunner().invoke(main, ["list"])
    assert result.exit_code == 2 and "--store URL" in result.output


# -- `celery persist` against a real app (memory broker, SQLite store in a temp dir) ----------------


@pytest.fixture
def sent() -> Iterator[list[dict[str, Any]]]:
    """Every task message published while the test runs: ``{"task", "id", "args"}``."""
    messages: list[dict[str, Any]] = []

    def record(sender: Any = None, body: Any = None, headers: Any = None, **_: Any) -> None:
        messages.append({"task": headers["task"], "id": headers["id"], "args": list(body[0])})

    signals.before_task_publish.connect(record, weak=False)
    yield messages
    signals.before_task_publish.disconnect(record)


def _park(app: Celery) -> tuple[Persist, str, dict[str, str]]:
    """Park the ``await_input`` step of ``a | await_input | t.b`` as a worker would; returns its key and task ids."""
    persist_ = Persist(app)
    ids = {name: f"{name}-{uuid.uuid4().hex[:8]}" for name in ("parked", "b")}
    task = app.tasks["celery_persist.await_input"]
    task.push_request(
        id=ids["parked"],
        task="celery_persist.await_input",
        root_id=ids["parked"],
        parent_id=None,
        group=None,
        chain=[dict(app.signature("t.b", options={"task_id": ids["b"]}))],
        callbacks=None,
        errbacks=None,
        delivery_info={},
        hostname="worker@test",
        called_directly=False,
        is_eager=False,
    )
    try:
        with pytest.raises(Ignore):
            task.run(7, prompt="approve?", timeout=600)
    finally:
        task.pop_request()
    wrapped = app.backend.get_task_meta(ids["parked"])["result"]["suspension_key"]
    return persist_, persist_.hub.unwrap_key(wrapped), ids


def app_run(app: Celery, *args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(persist, list(args), obj=SimpleNamespace(app=app), catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def test_resume_needs_an_input_or_null(app: Celery, sent: list[dict[str, Any]]) -> None:
    persist_, key, ids = _park(app)
    code, _, err = app_run(app, "resume", key)
    assert code == 2 and "--input JSON" in err and "--null" in err
    assert app_run(app, "resume", key, "--input", "1", "--null")[0] == 2
    assert app_run(app, "resume", key, "--input-file", "-", "--null")[0] == 2
    assert app_run(app, "resume", key_hash(key)[:12], "--null")[0] == 2  # a fingerprint never resumes
    assert persist_.load(key).status == "suspended" and sent == []
    code, out, _ = app_run(app, "resume", key, "--null")
    assert code == 0 and "resumed" in out
    assert [(m["task"], m["args"]) for m in sent] == [("t.b", [None])]


def test_cancel_by_fingerprint_revokes_the_parked_flow(app: Celery) -> None:
    persist_, key, ids = _park(app)
    fp = key_hash(key)[:12]
    code, out, _ = app_run(app, "cancel", fp[:MIN_PREFIX])
    assert code == 0 and f"cancelled suspension {fp}" in out
    assert persist_.load(key).status == "cancelled"
    for task_id in ids.values():
        assert app.backend.get_task_meta(task_id)["status"] == "REVOKED", task_id


def test_stats_counts_task_checkpoints_not_park_or_dispatch_journals(app: Celery) -> None:
    persist_, key, _ = _park(app)  # a suspension and its park journal
    assert app_run(app, "resume", key, "--input", "true")[0] == 0  # ... and a dispatch record
    journal_mod.save_state(persist_.binding, "job-1", {"state": None, "has_state": False, "inputs": []}, {"n": 1}, {"task": "t.job"})
    code, out, _ = app_run(app, "stats", "--json")
    doc = json.loads(out)
    assert code == 0 and doc["suspensions"] == {"resumed": 1}
    # History is read from the record itself: nothing more is stored for a plain resume.
    assert [h["event"] for h in persist_.hub.history_of(key_hash(key))] == ["suspended", "resumed"]
    assert doc["checkpoints"] == 1 and doc["internal"] == 2
    code, out, _ = app_run(app, "stats")
    assert "checkpoints:   1\n" in out


def test_resumer_without_the_keys_is_a_configuration_error(app: Celery, tmp_path: Path) -> None:
    url = f"file://{tmp_path / 'records'}"  # a server-like store: no key file of its own
    key = _hub(url, _keys("k1")).suspend({"secret": 1})
    Persist(app, store_url=url, encryption="auto")  # no key anywhere: starts, warns once
    code, _, err = app_run(app, "resume", key, "--input", "1")
    assert code == os.EX_CONFIG and "no encryption key is configured" in err and "CELERY_PERSIST_KEYS" in err


def _park_step(app: Celery, task_name: str, *args: Any, **kwargs: Any) -> str:
    """Park the step ``task_name`` of ``... | step | t.b`` as a worker would; returns its task id."""
    task_id = f"parked-{uuid.uuid4().hex[:8]}"
    task = app.tasks[task_name]
    task.push_request(
        id=task_id,
        task=task_name,
        root_id=task_id,
        parent_id=None,
        group=None,
        chain=[dict(app.signature("t.b"))],
        callbacks=None,
        errbacks=None,
        delivery_info={},
        hostname="worker@test",
        called_directly=False,
        is_eager=False,
    )
    try:
        with pytest.raises(Ignore):
            task.run(*args, **kwargs)
    finally:
        task.pop_request()
    return task_id


def test_list_kind_filters_real_timer_event_and_input_waits(app: Celery) -> None:
    persist_, _, _ = _park(app)  # await_input
    timer_id = _park_step(app, "celery_persist.sleep", 7, seconds=600)
    event_id = _park_step(app, "celery_persist.await_event", 7, "payment.settled", key="order-42", timeout=600)
    wake_at = app.backend.get_task_meta(timer_id)["result"]["wake_at"]
    code, out, _ = app_run(app, "list", "--json")
    assert code == 0 and sorted(r["wait"] for r in json.loads(out)) == ["event", "input", "timer"]
    rows = {kind: json.loads(app_run(app, "list", "--kind", kind, "--json")[1]) for kind in ("input", "timer", "event")}
    assert [(r["task_id"], r["prompt"], r["wake_at"], r["topic"], r["event_key"]) for r in rows["input"]] == [
        (r["task_id"], "approve?", None, None, None) for r in rows["input"]
    ]
    assert len(rows["input"]) == 1
    assert [(r["task_id"], r["wait"], r["wake_at"], r["topic"]) for r in rows["timer"]] == [(timer_id, "timer", wake_at, None)]
    assert [(r["task_id"], r["wait"], r["topic"], r["event_key"], r["wake_at"]) for r in rows["event"]] == [
        (event_id, "event", "payment.settled", "order-42", None)
    ]
    code, out, _ = app_run(app, "list", "--kind", "timer")
    assert code == 0 and len(out.splitlines()) == 2 and "WAIT" in out.splitlines()[0]
    assert " timer " in out and f"wake_at={wake_at}" in out and "payment.settled" not in out
    code, out, _ = app_run(app, "list", "--kind", "event")
    assert " event " in out and "topic=payment.settled key=order-42" in out and "wake_at" not in out
    code, out, _ = app_run(app, "show", rows["event"][0]["fingerprint"])
    assert code == 0 and "wait:" in out and "topic:" in out and "order-42" in out and "wake_at:" not in out
    doc = json.loads(app_run(app, "show", rows["timer"][0]["fingerprint"], "--json")[1])
    assert (doc["wait"], doc["wake_at"], doc["topic"]) == ("timer", wake_at, None)
    assert persist_.hub.stats()["suspensions"] == {"suspended": 3}


# -- the standalone command ---------------------------------------------------------------------------


def test_show_and_cancel_take_a_fingerprint_or_its_prefix(env: dict[str, str]) -> None:
    hub = _hub(env["url"], env["keys"])
    key = hub.suspend({"secret": "do-not-print"}, metadata={"prompt": "p"})
    other = hub.suspend(2)
    fp = next(r["fingerprint"] for r in json.loads(run("list", "--json")[1]) if r["prompt"] == "p")
    assert fp == key_hash(key)[:12]
    for ref in (fp, fp[:MIN_PREFIX], fp.upper(), key_hash(key)):
        code, out, _ = run("show", ref, "--json")
        assert code == 0 and json.loads(out)["fingerprint"] == fp and json.loads(out)["prompt"] == "p", ref
        assert "do-not-print" not in out
    assert run("show", fp, "--reveal-state")[0] == 2  # the state needs the key
    code, _, err = run("show", fp[: MIN_PREFIX - 1])
    assert code == 2 and f"{MIN_PREFIX} to 64 hex characters" in err
    unknown = next(p for p in ("000000", "ffffff", "123456") if not key_hash(key).startswith(p) and not key_hash(other).startswith(p))
    assert run("show", unknown)[0] == os.EX_NOINPUT
    assert run("cancel", unknown)[0] == os.EX_NOINPUT
    code, out, _ = run("cancel", fp[:8])
    assert code == 0 and f"cancelled suspension {fp}" in out
    assert hub.load(key).status == "cancelled" and hub.load(other).status == "suspended"
    assert run("cancel", fp)[0] == 0  # cancelling twice is a no-op, as by key


def test_an_ambiguous_fingerprint_lists_the_matches(env: dict[str, str]) -> None:
    hub = _hub(env["url"], env["keys"])
    seen: dict[str, str] = {}
    while True:  # two keys whose hashes share the shortest accepted prefix (~5000 tries: a birthday collision)
        candidate = hub.new_key()
        prefix = key_hash(candidate)[:MIN_PREFIX]
        if prefix in seen:
            break
        seen[prefix] = candidate
    first, second = seen[prefix], candidate
    hub.suspend(1, key=first)
    hub.suspend(2, key=second)
    for command in ("show", "cancel"):
        code, _, err = run(command, prefix)
        assert code == 2 and "ambiguous" in err, command
        assert key_hash(first)[:12] in err and key_hash(second)[:12] in err
    assert hub.load(first).status == hub.load(second).status == "suspended"
    assert run("cancel", key_hash(first)[:12])[0] == 0  # a longer prefix tells them apart
    assert hub.load(first).status == "cancelled" and hub.load(second).status == "suspended"


def test_every_option_has_a_help_text() -> None:
    missing = []
    for group in (main, persist):
        assert isinstance(group, click.Group)
        for name, command in group.commands.items():
            for param in command.params:
                if isinstance(param, click.Option) and not param.help:
                    missing.append(f"{group.name} {name} {param.opts[0]}")
    assert missing == []


def test_missing_keys_are_a_configuration_error(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    key = _hub(env["url"], env["keys"]).suspend({"secret": 1})
    monkeypatch.delenv("CELERY_PERSIST_KEYS")
    for args in (("show", key), ("cancel", key), ("cancel", key_hash(key)[:12]), ("rotate-keys",)):
        code, _, err = run(*args)
        assert code == os.EX_CONFIG and "EncryptionError" in err and "hint: set CELERY_PERSIST_KEYS" in err, args


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("CELERY_PERSIST_KEY", '"{b64}"'),
        ("CELERY_PERSIST_KEY", "'{b64}'"),
        ("CELERY_PERSIST_KEYS", '"k1:{b64}"'),
        ("CELERY_PERSIST_KEYS", "k1:'{b64}'"),
        ("CELERY_PERSIST_KEYS", "'k1':{b64}"),
    ],
)
def test_a_quoted_key_says_it_is_quoted(env: dict[str, str], monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    b64 = base64.b64encode(os.urandom(32)).decode()
    monkeypatch.delenv("CELERY_PERSIST_KEYS")
    monkeypatch.setenv(name, value.format(b64=b64))
    code, _, err = run("stats")
    assert code == os.EX_CONFIG and "is quoted" in err and b64 not in err
    with pytest.raises(ConfigurationError, match="is quoted"):
        Keyring.from_env()
    monkeypatch.setenv(name, value.format(b64=b64).replace('"', "").replace("'", ""))
    assert Keyring.from_env() is not None  # the same value unquoted is a good key


def test_standalone_list_and_show_say_what_each_flow_waits_for(env: dict[str, str]) -> None:
    hub = _hub(env["url"], env["keys"])
    legacy = hub.suspend(1, ttl=600, metadata={"prompt": "approve?", "task": "celery_persist.await_input"})  # no `wait`: input
    wake_at = "2031-05-06T07:08:09.123456+00:00"
    timer = hub.suspend(2, ttl=600, metadata={"task": "celery_persist.sleep", "wait": "timer", "wake_at": wake_at})
    event = hub.suspend(
        3, ttl=600, metadata={"task": "celery_persist.await_event", "wait": "event", "topic": "payment.settled", "event_key": "A-1"}
    )
    fps = {name: key_hash(k)[:12] for name, k in (("input", legacy), ("timer", timer), ("event", event))}
    for kind, fp in fps.items():
        code, out, _ = run("list", "--kind", kind, "--json")
        assert code == 0 and [(r["fingerprint"], r["wait"]) for r in json.loads(out)] == [(fp, kind)], kind
    by_fp = {r["fingerprint"]: r for r in json.loads(run("list", "--json")[1])}
    assert by_fp[fps["input"]]["prompt"] == "approve?" and by_fp[fps["input"]]["wake_at"] is None
    assert by_fp[fps["timer"]]["wake_at"] == wake_at and by_fp[fps["timer"]]["topic"] is None
    assert (by_fp[fps["event"]]["topic"], by_fp[fps["event"]]["event_key"]) == ("payment.settled", "A-1")
    code, out, _ = run("list")
    lines = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert lines[fps["input"]].split()[2] == "input" and lines[fps["input"]].endswith("approve?")
    assert lines[fps["timer"]].split()[2] == "timer" and lines[fps["timer"]].endswith(f"wake_at={wake_at}")
    assert lines[fps["event"]].split()[2] == "event" and lines[fps["event"]].endswith("topic=payment.settled key=A-1")
    assert run("list", "--kind", "event", "--status", "resumed") == (0, "no suspensions\n", "")
    code, _, err = run("list", "--kind", "nap")
    assert code == 2 and "input" in err and "timer" in err and "event" in err
    code, out, _ = run("show", fps["timer"])
    assert code == 0 and "wait:                timer" in out and f"wake_at:             {wake_at}" in out and "topic:" not in out
    doc = json.loads(run("show", fps["event"], "--json")[1])
    assert (doc["wait"], doc["topic"], doc["event_key"], doc["wake_at"]) == ("event", "payment.settled", "A-1", None)
    assert json.loads(run("show", legacy, "--json")[1])["wait"] == "input"
