"""Suspension keys: who holds one may resume a flow, so they are treated as secrets.

A key looks like ``p1.<ts><rand>`` or, with a signing secret, ``p1.<ts><rand>.<tag>``:

* ``p1`` names the format;
* ``<ts>`` is 10 characters of milliseconds since the epoch in an ASCII-ordered
  base32 alphabet, so keys sort by creation time;
* ``<rand>`` is 16 random bytes (128 bits) from :mod:`secrets`, base64url;
* ``<tag>`` is HMAC-SHA256(secret, ``p1.<ts><rand>``) cut to 128 bits, base64url.

With a secret, ``<rand>`` may instead be *derived*: HMAC-SHA256(seed secret,
context, ts) cut to 128 bits (:func:`derive_suspension_key`). The same context
(e.g. "the await of task X") and time then give the same key again, so a
parked step that is delivered twice can announce its key a second time
without the key ever being written anywhere. Without the seed secret the
derived part is as unpredictable as a random one.

Stores never see a key: they index records by :func:`key_hash`, so read access to
the store does not grant the power to resume. Logs and errors use
:func:`fingerprint`, the first 12 hex characters of that hash.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import re
import secrets
import time

from .errors import InvalidKey

__all__ = [
    "new_suspension_key",
    "derive_suspension_key",
    "validate_key",
    "key_hash",
    "fingerprint",
    "masked_key",
    "redact_keys",
    "KeyRedactingFilter",
    "now_ms",
    "MAX_KEY_LENGTH",
]

#: One secret, or several (active first: a key tagged with any of them is genuine).
Secrets = str | bytes | tuple[bytes, ...] | None

MAX_KEY_LENGTH = 96
_VERSION = "p1"
_B32 = "0123456789abcdefghjkmnpqrstvwxyz"  # ASCII-ordered, so prefixes sort by time
_TS_CHARS = 10
_RAND_BYTES = 16
_TAG_BYTES = 16
_KEY_RE = re.compile(r"\Ap1\.(?P<body>[0-9a-hjkmnp-tv-z]{10}[A-Za-z0-9_-]{22})(?:\.(?P<tag>[A-Za-z0-9_-]{22}))?\Z")
_TAG_CONTEXT = b"celery-persist/key-tag/v1\0"
_SEED_CONTEXT = b"celery-persist/key-seed/v1\0"


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


def _tag(body: str, secret: bytes) -> str:
    mac = hmac.new(secret, _TAG_CONTEXT + body.encode("ascii"), hashlib.sha256)
    return _b64(mac.digest()[:_TAG_BYTES])


def _signing(secret: Secrets) -> tuple[bytes, ...]:
    if not secret:
        return ()
    return secret if isinstance(secret, tuple) else (_secret_bytes(secret),)


def now_ms() -> int:
    """Milliseconds since the epoch, as a key's time prefix holds them."""
    return time.time_ns() // 1_000_000


def _finish(body: str, secret: Secrets) -> str:
    signing = _signing(secret)
    return f"{body}.{_tag(body, signing[0])}" if signing else body


def new_suspension_key(secret: Secrets = None) -> str:
    """Return a fresh suspension key.

    Args:
        secret: Signing secret (or secrets, active first); when given the key
            carries an HMAC tag that :func:`validate_key` checks before any store access.

    Returns:
        A URL-safe string of at most 96 characters with 128 random bits,
        whose prefix orders keys by creation time.
    """
    return _finish(f"{_VERSION}.{_encode_ts(now_ms())}{_b64(secrets.token_bytes(_RAND_BYTES))}", secret)


def derive_suspension_key(seed: bytes, context: bytes, ms: int, secret: Secrets = None) -> str:
    """The key for ``context`` at ``ms``: the same inputs always give the same key.

    Args:
        seed: A secret of at least 16 bytes; whoever lacks it cannot compute the key.
        context: What the key is for, unique per suspension (e.g. a task id and await index).
        ms: The creation time (milliseconds since the epoch) the key's prefix carries.
        secret: Signing secret(s) for the tag, as for :func:`new_suspension_key`.
    """
    if len(seed) < 16:
        raise ValueError("a key seed needs at least 16 bytes")
    ts = _encode_ts(ms)
    rand = hmac.new(seed, _SEED_CONTEXT + ts.encode("ascii") + b"\0" + context, hashlib.sha256).digest()[:_RAND_BYTES]
    return _finish(f"{_VERSION}.{ts}{_b64(rand)}", secret)


def validate_key(key: object, secret: Secrets = None) -> None:
    """Check that ``key`` is well formed and, with a secret, genuine.

    Args:
        key: The candidate key, as received from a caller.
        secret: The signing secret, or several (active first, e.g. one per key
            of a rotated keyring). With one, an unsigned or forged key is
            refused; tags are compared in constant time.

    Raises:
        InvalidKey: The key is malformed, unsigned while a secret is set, or forged.
    """
    if not isinstance(key, str) or len(key) > MAX_KEY_LENGTH:
        raise InvalidKey("suspension key is malformed: expected a string of at most 96 characters")
    match = _KEY_RE.match(key)
    if match is None:
        raise InvalidKey("suspension key is malformed: not a celery-persist key")
    signing = _signing(secret)
    if not signing:
        return
    tag = match.group("tag")
    if tag is None:
        raise InvalidKey("suspension key is not signed, but a signing secret is configured")
    body = f"{_VERSION}.{match.group('body')}"
    genuine = False
    for candidate in signing:  # every candidate is checked, so the time does not say which one matched
        genuine |= hmac.compare_digest(tag.encode("ascii"), _tag(body, candidate).encode("ascii"))
    if not genuine:
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


def masked_key(fp: str) -> str:
    """What stands for a key wherever one would be shown: ``<suspension-key:FINGERPRINT>``."""
    return f"<suspension-key:{fp}>"


# Keys inside any text, e.g. a message body that a DEBUG log line prints whole.
_KEY_IN_TEXT = re.compile(r"p1\.[0-9a-hjkmnp-tv-z]{10}[A-Za-z0-9_-]{22}(?:\.[A-Za-z0-9_-]{22})?")


def redact_keys(text: str) -> str:
    """``text`` with every suspension key in it replaced by :func:`masked_key`."""
    if "p1." not in text:
        return text
    return _KEY_IN_TEXT.sub(lambda m: masked_key(fingerprint(m.group(0))), text)


class KeyRedactingFilter(logging.Filter):
    """A logging filter that masks suspension keys in every record it passes.

    celery-persist never logs a key itself, but Celery's worker logs message
    bodies at DEBUG level, and the ``notify`` and ``celery_persist.resume``
    tasks carry a key in theirs. Installed on the worker's log handlers.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message.startswith("Received unregistered task") and "persist_delivery" in message:
            # Celery prints the whole message body of an unknown task, and a parked flow's
            # continuation carries the resume input in its arguments: print its name only.
            record.msg, record.args = message.split("\n", 1)[0] + " (a celery-persist continuation; body not logged)", None
            record.exc_info = record.exc_text = None
            return True
        redacted = redact_keys(message)
        if redacted != message:
            record.msg, record.args = redacted, None
        if record.exc_text:
            record.exc_text = redact_keys(record.exc_text)
        return True
