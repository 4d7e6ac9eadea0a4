"""The file store in a temp directory; each test gets its own subdirectory (prefix)."""

from __future__ import annotations

import atexit
import functools
import json
import os
import shutil
import struct
import tempfile
from typing import Any

from . import BAD_METADATA, BAD_STATUS, Backend


@functools.cache
def _root() -> str:
    path = tempfile.mkdtemp(prefix="celery-persist-file-")
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def file_url() -> str:
    return f"file://{_root()}"


def remove_dir(store: Any) -> None:
    store.drop()


def corrupt(store: Any, key_hash: str, how: str) -> None:
    """Rewrite the record file's JSON header in place (the format is ``CPR1``, length, header, blob)."""
    path = os.path.join(store.root, "records", key_hash[:2], key_hash)
    with open(path, "rb") as f:
        data = f.read()
    (size,) = struct.unpack(">I", data[4:8])
    header = json.loads(data[8 : 8 + size])
    if how == "metadata":
        header["metadata"] = BAD_METADATA
    elif how == "status":
        header["status"] = BAD_STATUS
    else:
        del header["created_at"]
    text = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(data[:4] + struct.pack(">I", len(text)) + text + data[8 + size :])


BACKENDS = [Backend("file", url=file_url, teardown=remove_dir, corrupt=corrupt)]
