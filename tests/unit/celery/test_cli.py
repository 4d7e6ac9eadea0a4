"""The standalone CLI against a real SQLite store (click's runner, no subprocess needed)."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from celery_persist import Keyring, PersistenceHub, open_store
from celery_persist.cli import main


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
