"""The README's first command: `celery-persist demo` runs end to end with no server."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e


def test_demo_parks_survives_a_restart_and_resumes(tmp_path: Path) -> None:
    exe = shutil.which("celery-persist", path=os.path.dirname(sys.executable))
    cmd = [exe] if exe else [sys.executable, "-c", "from celery_persist.cli import main; main()"]
    proc = subprocess.run(
        [*cmd, "demo", "--dir", str(tmp_path / "demo")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "is SUSPENDED" in out
    assert "store says suspension" in out and "'suspended'" in out
    assert "booked by alice" in out
    assert "suspension is now 'resumed'" in out
    assert "p1." not in out and "p1." not in proc.stderr  # the key itself is never printed
