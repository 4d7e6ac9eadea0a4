"""Suspension keys: who holds one may resume a flow, so they are treated as secrets.

A key looks like ``p1.<ts><rand>`` or, with a signing secret, ``p1.<ts><rand>.<tag>``:

* ``p1`` names the format;
* ``<ts>`` is 10 characters of milliseconds since the epoch in an ASCII-ordered
  base32 alphabet, so keys sort by creation time;
* ``<rand>`` is 16 random bytes (128 bits) from :mod:`secrets`, base64url;
* ``<tag>`` is HMAC-SHA256(secret, ``p1.<ts><rand>``) cut to 128 bits, base64url.

Stores never see a key: they index records by :func:`key_hash`, so read access to
the store does not grant the power to resume. Logs and errors use
:func:`fingerprint`, the first 12 hex characters of that hash.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
import time

from .errors import InvalidKey

__all__ = ["new_suspension_key", "validate_key", "key_hash", "fingerprint", "MAX_KEY_LENGTH"]

MAX_KEY_LENGTH = 96
_VERSION = "p1"
_B32 = "0123456789abcdefghjkmnpqrstvwxyz"  # ASCII-ordered, so prefixes sort by time
_TS_CHARS = 10
_RAND_BYTES = 16
_TAG_BYTES = 16
_KEY_RE = re.compile(r"\Ap1\.(?P<body>[0-9a-hjkmnp-tv-z]{10}[A-Za-z0-9_-]{22})(?:\.(?P<tag>[A-Za-z0-9_-]{22}))?\Z")
_TAG_CONTEXT = b"celery-persist/key-tag/v1\0"


def _encode_ts(ms: int) -> str:
    out = []
    for _ in range(_TS_CHARS):
        out.append(_B32[ms & 31])
        ms >>= 5
    return "".join(reversed(out))


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _secret_bytes(secret: str | bytes) -> bytes:
    return secret.encode("utf-8") if isinstance(secret, str) else secret


def _tag(body: str, secret: str | bytes) -> str:
    mac = hmac.new(_secret_bytes(secret), _TAG_CONTEXT + body.encode("ascii"), hashlib.sha256)
    return _b64(mac.digest()[:_TAG_BYTES])


def new_suspension_key(secret: str | bytes | None = None) -> str:
    """Return a fresh suspension key.

    Args:
        secret: Signing secret; when given the key carries an HMAC tag that
            :func:`validate_key` checks before any store access.

    Returns:
        A URL-safe string of at most 96 characters with 128 random bits,
        whose prefix orders keys by creation time.
    """
    body = f"{_VERSION}.{_encode_ts(time.time_ns() // 1_000_000)}{_b64(secrets.token_bytes(_RAND_BYTES))}"
    if secret:
        return f"{body}.{_tag(body, secret)}"
    return body


def validate_key(key: object, secret: str | bytes | None = None) -> None:
    """Check that ``key`` is well formed and, with a secret, genuine.

    Args:
        key: The candidate key, as received from a caller.
        secret: The signing secret. With one, an unsigned or forged key is
            refused; the tag is compared in constant time.

    Raises:
        InvalidKey: The key is malformed, unsigned while a secret is set, or forged.
    """
    if not isinstance(key, str) or len(key) > MAX_KEY_LENGTH:
        raise InvalidKey("suspension key is malformed: expected a string of at most 96 characters")
    match = _KEY_RE.match(key)
    if match is None:
        raise InvalidKey("suspension key is malformed: not a celery-persist key")
    if not secret:
        return
    tag = match.group("tag")
    if tag is None:
        raise InvalidKey("suspension key is not signed, but a signing secret is configured")
    expected = _tag(f"{_VERSION}.{match.group('body')}", secret)
    if not hmac.compare_digest(tag.encode("ascii"), expected.encode("ascii")):
        raise InvalidKey("suspension key signature does not verify (forged, or signed with another secret)")


def key_hash(key: str) -> str:
    """The store index of a key: SHA-256 hex of the key (the key itself is never stored)."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def fingerprint(key: str) -> str:
    """A short, non-secret name for a key in logs, errors and listings (12 hex chars of its hash)."""
    return key_hash(key)[:12]


def created_ms(key: str) -> int:
    """Milliseconds since the epoch encoded in a (validated) key's prefix."""
    ms = 0
    for ch in key[3 : 3 + _TS_CHARS]:
        ms = ms * 32 + _B32.index(ch)
    return ms
