"""The file store in a temp directory; each test gets its own subdirectory (prefix)."""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from typing import Any

from . import Backend


@functools.cache
def _root() -> str:
    path = tempfile.mkdtemp(prefix="celery-persist-file-")
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def file_url() -> str:
    return f"file://{_root()}"


def remove_dir(store: Any) -> None:
    store.drop()


BACKENDS = [Backend("file", url=file_url, teardown=remove_dir)]
