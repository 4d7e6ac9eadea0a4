"""Who may use the inbox and the API: bearer tokens, the browser session, CSRF tokens.

Tokens come from ``persist_web_tokens`` (or ``create_app(tokens=...)``) and
are compared in constant time, every one of them, whichever matches. A
browser logs in once with a token at ``/login`` and gets a session cookie:
``<expiry>.<csrf>.<mac>``, HMAC-SHA256 under a secret derived from the
tokens, so every worker process of one deployment accepts it, a restart
keeps it, and changing the tokens ends every session. The cookie holds no
token. The ``csrf`` part is the session's CSRF token: every form carries it
in a hidden field (every POST checks it; an API call with the cookie sends
it as ``X-CSRF-Token``). Requests with a bearer token need none: a browser
never adds that header on its own.

With no tokens configured nothing but resume links is served (401): there
is no anonymous inbox.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["Access", "Session", "SESSION_TTL", "same"]

#: Seconds a login lasts.
SESSION_TTL = 12 * 3600
_CONTEXT = b"celery-persist/web-session/v1\0"


def same(a: str, b: str) -> bool:
    """Constant-time equality of two strings (any characters; different lengths are simply unequal)."""
    return hmac.compare_digest(a.encode("utf-8"), b.encode("utf-8"))


@dataclass(frozen=True, slots=True)
class Session:
    """A valid session cookie: its CSRF token and when it ends (POSIX seconds)."""

    csrf: str
    expires: int


class Access:
    """The token check and the session cookie of one app.

    Args:
        tokens: The bearer tokens; empty strings are ignored.
    """

    def __init__(self, tokens: Iterable[str]) -> None:
        self._tokens = tuple(t.encode("utf-8") for t in tokens if t)
        material = b"\0".join(sorted(self._tokens))
        # Without tokens there are no sessions to keep across processes: a random secret will do.
        self._secret = hmac.new(_CONTEXT, material, hashlib.sha256).digest() if self._tokens else os.urandom(32)

    @property
    def enabled(self) -> bool:
        """Whether any token is configured (else the inbox and the API refuse everyone)."""
        return bool(self._tokens)

    def token_ok(self, token: str) -> bool:
        """Whether ``token`` is one of the tokens (every one is compared, in constant time)."""
        given = token.encode("utf-8")
        ok = False
        for known in self._tokens:
            ok |= hmac.compare_digest(known, given)
        return ok

    def bearer_ok(self, header: str | None) -> bool:
        """Whether an ``Authorization`` header carries one of the tokens."""
        if not header:
            return False
        scheme, _, value = header.partition(" ")
        return scheme.lower() == "bearer" and bool(value.strip()) and self.token_ok(value.strip())

    def _mac(self, payload: str) -> str:
        digest = hmac.new(self._secret, payload.encode("ascii"), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")

    def new_session(self, now: float | None = None) -> tuple[str, Session]:
        """A new session: ``(cookie value, session)``."""
        expires = int((time.time() if now is None else now) + SESSION_TTL)
        payload = f"{expires}.{secrets.token_hex(16)}"
        session = Session(csrf=payload.partition(".")[2], expires=expires)
        return f"{payload}.{self._mac(payload)}", session

    def open_session(self, cookie: str | None, now: float | None = None) -> Session | None:
        """The session of a cookie value, or None (missing, forged, expired, or no tokens configured)."""
        if not cookie or not self._tokens:
            return None
        parts = cookie.split(".")
        if len(parts) != 3 or not parts[0].isdigit():
            return None
        payload = f"{parts[0]}.{parts[1]}"
        if not same(self._mac(payload), parts[2]):
            return None
        expires = int(parts[0])
        if expires <= (time.time() if now is None else now):
            return None
        return Session(csrf=parts[1], expires=expires)
