"""A tiny HTTP endpoint that resumes parked flows: ``POST /approve/<key>`` with a JSON body.

Standard library only (``http.server``); in a real service this is one route
of your web framework. The body becomes the resume input; the answer is JSON:

======  =======================================================
202     resumed: ``{"status": "resumed", "task_id": ...}``
400     malformed or forged key, body not a JSON object
404     no such suspension (or not this endpoint)
409     already resumed (a key resumes at most once)
410     expired or cancelled
503     the store is unavailable: try again
======  =======================================================

Whoever holds a key can resume its flow, so the key is the credential: serve
this over TLS behind your authentication, and keep keys out of access logs
(:meth:`ApprovalHandler.log_message` logs the fingerprint instead).
"""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

from celery_persist import (
    AlreadyResumed,
    InvalidKey,
    PersistenceError,
    StoreUnavailable,
    SuspensionCancelled,
    SuspensionExpired,
    SuspensionNotFound,
)
from celery_persist.keys import fingerprint

if TYPE_CHECKING:
    from collections.abc import Callable

    from celery_persist import Persist

__all__ = ["ApprovalHandler", "serve"]

_PATH = re.compile(r"/approve/([A-Za-z0-9_.-]{1,96})")
_MAX_BODY = 64 * 1024
_STATUS: tuple[tuple[type[PersistenceError], int], ...] = (
    (InvalidKey, 400),
    (SuspensionNotFound, 404),
    (AlreadyResumed, 409),
    (SuspensionExpired, 410),
    (SuspensionCancelled, 410),
    (StoreUnavailable, 503),
)


class ApprovalHandler(BaseHTTPRequestHandler):
    """Resumes ``persist``'s flows; see :func:`serve` for how it gets one."""

    persist: Persist
    log: Callable[[str], None] = print

    def do_POST(self) -> None:  # noqa: N802 - the name http.server dispatches to
        match = _PATH.fullmatch(self.path)
        if match is None:
            self._reply(404, {"error": "POST /approve/<key>"})
            return
        key = match.group(1)
        length = int(self.headers.get("Content-Length") or 0)
        if length > _MAX_BODY:
            self._reply(413, {"error": f"the body is larger than {_MAX_BODY} bytes"})
            return
        try:
            answer = json.loads(self.rfile.read(length) or b"null")
        except ValueError:
            self._reply(400, {"error": "the body is not JSON"})
            return
        if not isinstance(answer, dict):
            self._reply(400, {"error": "the body must be a JSON object"})
            return
        try:
            result = self.persist.resume(key, answer)
        except PersistenceError as exc:
            code = next((c for cls, c in _STATUS if isinstance(exc, cls)), 500)
            # The error's message names the problem, never the key or the input.
            self._reply(code, {"error": type(exc).__name__, "detail": str(exc)})
            return
        self._reply(202, {"status": "resumed", "task_id": result.id})

    def _reply(self, code: int, doc: dict[str, Any]) -> None:
        body = json.dumps(doc).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's signature
        # The default access log would print the path, and with it the key: log the fingerprint.
        line = format % args
        match = _PATH.search(line)
        if match:
            line = line.replace(match.group(1), f"<key {fingerprint(match.group(1))}>")
        self.log(f"http: {line}")


def serve(persist: Persist, *, host: str = "127.0.0.1", port: int = 0, log: Callable[[str], None] = print) -> ThreadingHTTPServer:
    """Serve :class:`ApprovalHandler` in a daemon thread; ``port=0`` picks a free port.

    Returns:
        The server: ``server.server_address`` is where it listens, ``server.shutdown()`` stops it.
    """
    handler = type("BoundApprovalHandler", (ApprovalHandler,), {"persist": persist, "log": staticmethod(log)})
    server = ThreadingHTTPServer((host, port), handler)
    threading.Thread(target=server.serve_forever, name="approval-http", daemon=True).start()
    return server
