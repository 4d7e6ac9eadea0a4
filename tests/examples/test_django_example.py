"""The Django example project passes its own tests: ``python manage.py test approvals``.

Its tests use Django's test client against a real worker (in the test
process) on Redis db 7, with a queue unique to this run (deleted afterwards),
results in files and a SQLite store in a temp dir.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e]

REPO = Path(__file__).resolve().parents[2]
PROJECT = REPO / "examples" / "django_app"
REDIS_URL = os.environ.get("CELERY_PERSIST_TEST_REDIS_URL", "redis://127.0.0.1:6379").rstrip("/") + "/7"
IN_CI = os.environ.get("CI", "").lower() == "true"


def test_the_django_example_passes_its_tests(tmp_path: Path) -> None:
    pytest.importorskip("django")
    import redis

    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2)
    try:
        client.ping()
    except redis.RedisError as exc:
        if IN_CI:
            pytest.fail(f"required service unavailable in CI: Redis at {REDIS_URL}: {exc}")
        pytest.skip(f"Redis at {REDIS_URL} unavailable: {exc}")
    queue = f"django-example-{uuid.uuid4().hex[:10]}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CELERY_", "DJANGO_"))}
    env.update(
        PYTHONPATH=os.pathsep.join([str(REPO), str(PROJECT)]),
        CELERY_BROKER_URL=REDIS_URL,
        CELERY_RESULT_BACKEND=f"file://{tmp_path / 'results'}",
        CELERY_PERSIST_STORE_URL=f"sqlite:///{tmp_path / 'persist.db'}",
        CELERY_PERSIST_EXAMPLE_QUEUE=queue,
    )
    (tmp_path / "results").mkdir()
    try:
        proc = subprocess.run(
            [sys.executable, "manage.py", "test", "approvals", "-v", "2"],
            cwd=PROJECT,
            env=env,
            capture_output=True,
            text=True,
            timeout=240,
        )
    finally:
        client.delete(queue, f"_kombu.binding.{queue}")
        client.close()
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert "test_a_person_approves_through_the_view" in output and "Ran 2 tests" in output, output
    assert (tmp_path / "persist.db").exists(), "the store named by CELERY_PERSIST_STORE_URL was not used"
    assert not (PROJECT / "persist.db").exists(), "the settings' default store was used instead"
