"""Every example runs with one command and says what it showed.

Each test runs ``python -m examples.<name>`` in a subprocess with a deadline
and checks the exit status and the key lines of its output. ``embedded``
runs use no server at all (filesystem broker, file results, SQLite store),
with the developer's ``CELERY_*`` variables removed. ``redis`` runs point
the broker and the store at Redis db 7 (results stay in files, so every key
this module writes is known and deleted afterwards: the queue's keys and the
store's unique prefix; never the database).

A missing Redis skips the ``redis`` runs locally and fails them when ``CI=true``.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
REDIS_URL = os.environ.get("CELERY_PERSIST_TEST_REDIS_URL", "redis://127.0.0.1:6379")
REDIS_DB = 7
IN_CI = os.environ.get("CI", "").lower() == "true"
DEADLINE = 120.0  # seconds; each example takes 5-30 s, the rest is headroom for a loaded machine
_SCRUB = ("CELERY_BROKER_URL", "CELERY_RESULT_BACKEND", "CELERY_PERSIST_STORE_URL", "CELERY_PERSIST_STORE_OPTIONS",
          "CELERY_PERSIST_KEYS", "CELERY_PERSIST_KEY", "CELERY_PERSIST_SIGNING_SECRET", "CELERY_PERSIST_EXAMPLE_DIR",
          "CELERY_PERSIST_EXAMPLE_QUEUE")  # fmt: skip

EXPECTED: dict[str, list[str]] = {
    "approval": [
        r"inbox server started \(pid \d+\): celery -A examples\.approval\.app persist serve --port \d+",
        r"expense #101 parked: step celery_persist\.await_input is SUSPENDED",
        r"GET /api/suspensions with the bearer token: HTTP 200, 1 pending: [0-9a-f]{12} 'Approve expense #101",
        r"approver opens it: HTTP 200, .* a form with in/approved, in/by, in/reason",
        r"HTTP 202: 'Thank you'",
        r"server log: 127\.0\.0\.1:\d+ \"POST /link/[0-9a-f]{12}\" 202",
        r"result: expense #101 \(EUR 1234\.50, by carol\) booked, approved by alice",
        r"the same link POSTed again: HTTP 409 'Already answered'",
        r"POST /api/resume with the key: HTTP 409 'Already answered'",
        r"operator runs: celery -A examples\.approval\.app persist resume \S+ --input",
        r"resumed; continuation task id [0-9a-f-]{36}",
        r"result: expense #102 \(EUR 99\.00, by dave\) rejected by bob: no receipt",
    ],
    "etl": [
        r"kill -9 \d+ \(worker-1's pool process, mid-run\)",
        r"requeued the message: queue \S+ holds 1 message",
        r"'started_at_batch': \d+",
        r"batches 0-\d+ were checkpointed before the kill and not redone \(each loaded once\)",
        r"warehouse: 1000 orders, EUR 525359\.41 \(expected 525359\.41\); every batch loaded",
        r"the task succeeded, so its checkpoint was deleted",
    ],
    "multisig": [
        r"parked: 'alice: sign payment PAY-7",
        r"alice signs",
        r"cleanup expired bob's suspension [0-9a-f]{12}: his await_input returns the default",
        r"bob's late signature is refused: SuspensionExpired",
        r"carol signs",
        r"payment PAY-7 released with signatures of alice and carol \(bob timed out\)",
    ],
    "agent": [
        r"step 1: agent parked \([0-9a-f]{12}\) asking weather",
        r"step 2: agent parked \([0-9a-f]{12}\) asking calculator",
        r"step 3: agent parked \([0-9a-f]{12}\) asking find_parks",
        r"answer: Saturday in Paris: sunny spells, 72\.5 F, 10% chance of rain: go ahead with the picnic at Parc des Buttes-Chaumont\.",
        r"3 tool calls, 4 executions of the task, 4 policy calls",
    ],
    "orders": [
        r"beat started \(pid \d+\): celery-persist-timers every 0\.5 s",
        r"order A-1 parked: await_event is SUSPENDED, wait 'event', topic 'payment\.settled', key 'A-1', suspension [0-9a-f]{12}",
        r"operator runs: celery -A examples\.orders\.app persist list --kind event",
        r"[0-9a-f]{12}  suspended  event .* celery_persist\.await_event +topic=payment\.settled key=A-1",
        r"persist\.signal\('payment\.settled', 'A-1', \.\.\.\) woke 1 flow\(s\)",
        r"order A-1 paid, now asleep: sleep is SUSPENDED, wait 'timer', wake_at \d{4}-\d\d-\d\dT[\d:.]+\+00:00",
        r"order B-2 unpaid: await_event failed with AwaitTimeout",
        r"the rest of its chain failed with it \(remind: FAILURE\)",
        r"a late payment for B-2 woke 0 flow\(s\)",
        r"result: reminder sent for order A-1 \(EUR 42\.00, psp_7731\)",
        r"reminder ran at [\d:.]+ UTC, \d+\.\d\d s after wake_at",
        r"beat stopped; queue \S+ is empty and the worker idle",
    ],
}


def _redis_db_url() -> str:
    parts = urlsplit(REDIS_URL)
    return urlunsplit((parts.scheme, parts.netloc, f"/{REDIS_DB}", parts.query, ""))


@pytest.fixture
def redis_env() -> Iterator[dict[str, str]]:
    """Broker and store on Redis db 7 under names unique to this test; deleted afterwards."""
    import redis

    url = _redis_db_url()
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=2)
        client.ping()
    except Exception as exc:  # noqa: BLE001 - any failure means "not usable here"
        if IN_CI:
            pytest.fail(f"required service unavailable in CI: Redis at {url}: {exc}")
        pytest.skip(f"Redis at {url} unavailable: {exc}")
    ns = f"examples-test-{uuid.uuid4().hex[:10]}"
    try:
        yield {
            "CELERY_BROKER_URL": url,
            "CELERY_PERSIST_STORE_URL": url,
            "CELERY_PERSIST_STORE_OPTIONS": f'{{"prefix": "{ns}"}}',
            "CELERY_PERSIST_EXAMPLE_QUEUE": ns,
        }
    finally:
        names = [ns, f"_kombu.binding.{ns}", f"_kombu.binding_permanent.{ns}"]
        names += client.scan_iter(match=f"{{{ns}}}:*", count=1000)
        client.delete(*names)
        client.close()


def run_example(name: str, tmp_path: Path, extra_env: dict[str, str] | None = None) -> str:
    env = {k: v for k, v in os.environ.items() if k not in _SCRUB}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env["CELERY_PERSIST_EXAMPLE_DIR"] = str(tmp_path / name)
    env.update(extra_env or {})
    started = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", f"examples.{name}"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        output, _ = proc.communicate(timeout=DEADLINE)
    except subprocess.TimeoutExpired:
        # SIGTERM lets the example stop its workers (they live in their own sessions).
        proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            output, _ = proc.communicate(timeout=40)
        proc.kill()
        output, _ = proc.communicate()
        pytest.fail(f"examples.{name} did not finish within {DEADLINE:.0f} s:\n{output}")
    elapsed = time.monotonic() - started
    assert proc.returncode == 0, f"examples.{name} exited with {proc.returncode}:\n{output}"
    print(f"examples.{name}: {elapsed:.1f} s")
    return output


def check_output(name: str, output: str) -> None:
    for pattern in EXPECTED[name]:
        assert re.search(pattern, output), f"examples.{name}: no line matches {pattern!r} in:\n{output}"
    assert re.search(rf"^\[{name} +[\d.]+s\] done in [\d.]+ s$", output, re.M), output
    assert "Traceback" not in output, output


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_example_embedded(name: str, tmp_path: Path) -> None:
    output = run_example(name, tmp_path)
    check_output(name, output)
    assert "broker: filesystem transport, results: files" in output
    assert not any((tmp_path / name / "queue").glob("*.msg")), "the example left messages in its broker"


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_example_on_redis(name: str, tmp_path: Path, redis_env: dict[str, str]) -> None:
    output = run_example(name, tmp_path, redis_env)
    check_output(name, output)
    assert re.search(r"store redis://\S+, broker: CELERY_BROKER_URL, results: files", output), output
