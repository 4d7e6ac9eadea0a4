"""``examples/pytest_plugin`` passes when run as a user runs it: ``pytest examples/pytest_plugin``.

In a subprocess from the repository root (so the project's pytest settings,
``filterwarnings = error`` included, apply), once with the plugin loaded by
its entry point and once with plugin autoload off and the plugin named with
``-p celery_persist``. No service is needed: broker, results and store are in memory.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "pytest_plugin"
#: What the example must not see from the developer's shell.
_SCRUB = ("CELERY_BROKER_URL", "CELERY_RESULT_BACKEND", "CELERY_PERSIST_KEYS", "CELERY_PERSIST_KEY", "CELERY_PERSIST_SIGNING_SECRET")


def run_example(*args: str, autoload: bool = True) -> str:
    env = {k: v for k, v in os.environ.items() if k not in _SCRUB and k != "PYTEST_ADDOPTS"}
    if not autoload:
        env["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"
    cmd = [sys.executable, "-m", "pytest", str(EXAMPLE.relative_to(REPO)), "-q", "-p", "no:cacheprovider", *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(cmd)} exited with {proc.returncode}:\n{output}"
    return output


def passed(output: str) -> int:
    match = re.search(r"(\d+) passed", output)
    assert match, output
    return int(match.group(1))


def count_tests() -> int:
    return len(re.findall(r"^def test_", (EXAMPLE / "test_approval_flow.py").read_text(), re.M))


def test_example_passes_with_the_plugin_autoloaded() -> None:
    output = run_example()
    assert passed(output) == count_tests() >= 4, output
    assert not re.search(r"\d+ (failed|error|skipped)", output), output


def test_example_passes_with_the_plugin_named_on_the_command_line() -> None:
    # Without autoload no other plugin loads either: name pytest-timeout, which the project's settings use.
    output = run_example("-p", "celery_persist", "-p", "pytest_timeout", autoload=False)
    assert passed(output) == count_tests(), output


def test_readme_shows_the_example_as_it_runs() -> None:
    readme = (EXAMPLE / "README.md").read_text()
    block = re.search(r"```python\n(.*?)```", readme, re.S)
    assert block, "examples/pytest_plugin/README.md has no python block"
    source = set((EXAMPLE / "test_approval_flow.py").read_text().splitlines())
    stale = [line for line in block.group(1).splitlines() if line.strip() and line not in source]
    assert stale == [], f"README lines not in test_approval_flow.py: {stale}"
