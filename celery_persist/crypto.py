"""Keyring and the two ways a blob is authenticated before it is trusted.

* :class:`Keyring` seals with AES-256-GCM: confidentiality and integrity.
  Blob layout ``b"\\xa7K1" | len(kid) | kid | nonce(12) | ciphertext+tag(16)``;
  the header is part of the associated data, so a changed key id fails too.
  Nonces are random 96-bit values: with at most ~2^32 writes per key the
  collision risk stays below 2^-32; rotate keys long before that.
* :class:`Signer` seals with HMAC-SHA256 only (no secrecy) for deployments that
  have a signing secret but no encryption key. Layout ``b"\\xa7S1" | data | tag(32)``.

Both implement the :class:`Sealer` protocol the hub uses, and both bind each
blob to caller-supplied associated data (the hub passes the record's identity),
so a blob copied onto another record does not open. :func:`choose_sealer` picks
one of them for a ``persist_encryption`` mode.

Secrets come from the environment in one place, :func:`secrets_from_env`
(``CELERY_PERSIST_KEYS``, ``CELERY_PERSIST_KEY``, ``CELERY_PERSIST_SIGNING_SECRET``):
the config, the hub and :meth:`Keyring.from_env` all call it when they are
built, never at import.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import struct
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .errors import ConfigurationError, EncryptionError

__all__ = [
    "Keyring",
    "Signer",
    "Sealer",
    "KEY_MAGIC",
    "SIGN_MAGIC",
    "ENCRYPTION_MODES",
    "EnvSecrets",
    "secrets_from_env",
    "choose_sealer",
    "derive",
    "new_key_line",
    "local_keyring",
]

KEY_MAGIC = b"\xa7K1"
SIGN_MAGIC = b"\xa7S1"
_NONCE = 12
_TAG = 16
_MAX_KID = 64

#: Values of ``persist_encryption`` (see :func:`choose_sealer`).
ENCRYPTION_MODES = ("auto", "required", "off")


class Sealer(Protocol):
    """What the hub needs from a cipher or signer."""

    #: True when sealed bytes are unreadable without a key.
    confidential: bool

    def seal(self, plaintext: bytes, associated_data: bytes) -> bytes: ...

    def open(self, blob: bytes, associated_data: bytes) -> bytes: ...


def derive(secret: str | bytes, purpose: bytes) -> bytes:
    """A 32-byte secret for one ``purpose``, derived from ``secret`` with HKDF-SHA256.

    One configured key serves several ends (encrypting blobs, tagging
    suspension keys, seeding derived keys, authenticating record fields) and
    no two of them ever use the same bytes.
    """
    raw = secret.encode("utf-8") if isinstance(secret, str) else secret
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"celery-persist/" + purpose).derive(raw)


def _refuse_quoted(text: str) -> None:
    """Refuse key material holding quote characters: no key id or base64 key has one, so the value was quoted."""
    if "'" in text or '"' in text:
        raise ConfigurationError(
            "the encryption key value is quoted: it holds quote characters, which no key id or base64 key has. "
            "Set CELERY_PERSIST_KEYS / CELERY_PERSIST_KEY / persist_keys without quotes "
            "(an env file read by `docker run --env-file` keeps quotes as part of the value)"
        )


def _decode_key(kid: str, text: str) -> bytes:
    try:
        raw = base64.b64decode(text.strip(), altchars=b"-_" if ("-" in text or "_" in text) else None, validate=True)
    except (binascii.Error, ValueError):
        raise ConfigurationError(f"encryption key {kid!r} is not valid base64") from None
    if len(raw) != 32:
        raise ConfigurationError(
            f"encryption key {kid!r} decodes to {len(raw)} bytes; AES-256 needs 32 "
            "(make one with: python -c 'import os,base64;print(base64.b64encode(os.urandom(32)).decode())')"
        )
    return raw


class Keyring:
    """AES-256-GCM keys by id; the first one encrypts, all of them decrypt.

    Args:
        keys: ``(key_id, 32-byte key)`` pairs, active key first. Key ids are
            short ASCII names (``[A-Za-z0-9_.-]``, at most 64 characters).

    Example:
        >>> ring = Keyring([("2026-11", os.urandom(32)), ("2026-05", old_key)])
        >>> blob = ring.encrypt(b"state", b"record-id")
        >>> ring.decrypt(blob, b"record-id")
        b'state'
    """

    confidential = True

    def __init__(self, keys: Iterable[tuple[str, bytes]]) -> None:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        self._ciphers: dict[bytes, AESGCM] = {}
        self._roots: list[bytes] = []
        order: list[bytes] = []
        for kid, key in keys:
            # utf-8, not ascii: a non-ASCII id must fail the charset check below, not raise UnicodeEncodeError.
            bkid = kid.encode("utf-8") if isinstance(kid, str) else kid
            if not bkid or len(bkid) > _MAX_KID or not all(c in _KID_CHARS for c in bkid):
                raise ConfigurationError(f"key id {kid!r} must be 1-64 characters of [A-Za-z0-9_.-]")
            if not isinstance(key, bytes | bytearray) or len(key) != 32:
                raise ConfigurationError(f"encryption key {kid!r} must be 32 bytes for AES-256")
            if bkid in self._ciphers:
                raise ConfigurationError(f"key id {kid!r} appears twice in the keyring")
            self._ciphers[bkid] = AESGCM(key)
            self._roots.append(bytes(key))
            order.append(bkid)
        if not order:
            raise ConfigurationError("a keyring needs at least one key")
        self._active = order[0]
        self._ids = tuple(k.decode("ascii") for k in order)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Keyring | None:
        """Build the keyring from ``CELERY_PERSIST_KEYS`` or ``CELERY_PERSIST_KEY``.

        ``CELERY_PERSIST_KEYS`` is ``kid1:base64key,kid2:base64key`` (first is
        active); ``CELERY_PERSIST_KEY`` is one base64 key with id ``default``.

        Returns:
            The keyring, or None when neither variable is set.

        Raises:
            ConfigurationError: A variable is set but malformed.
        """
        secrets = secrets_from_env(environ)
        if secrets.keys:
            return cls.parse(secrets.keys)
        if secrets.key:
            _refuse_quoted(secrets.key)
            return cls([("default", _decode_key("default", secrets.key))])
        return None

    @classmethod
    def parse(cls, spec: str) -> Keyring:
        """Parse ``kid1:base64key,kid2:base64key`` (the ``CELERY_PERSIST_KEYS`` form)."""
        _refuse_quoted(spec)
        pairs = []
        for item in spec.split(","):
            item = item.strip()
            if not item:
                continue
            kid, sep, text = item.partition(":")
            if not sep:
                raise ConfigurationError("CELERY_PERSIST_KEYS entries must look like 'kid:base64key'")
            pairs.append((kid.strip(), _decode_key(kid.strip(), text)))
        return cls(pairs)

    def derive(self, purpose: bytes) -> tuple[bytes, ...]:
        """A secret for ``purpose`` per key, active key first (see :func:`derive`)."""
        return tuple(derive(root, purpose) for root in self._roots)

    @property
    def active_id(self) -> str:
        """Id of the key that encrypts new writes."""
        return self._active.decode("ascii")

    @property
    def key_ids(self) -> tuple[str, ...]:
        """All key ids, active first."""
        return self._ids

    def encrypt(self, plaintext: bytes, associated_data: bytes) -> bytes:
        """Encrypt and authenticate ``plaintext``, bound to ``associated_data``."""
        header = KEY_MAGIC + bytes((len(self._active),)) + self._active
        nonce = os.urandom(_NONCE)
        return header + nonce + self._ciphers[self._active].encrypt(nonce, plaintext, header + associated_data)

    def decrypt(self, blob: bytes, associated_data: bytes) -> bytes:
        """Return the plaintext of ``blob``.

        Raises:
            EncryptionError: Not a keyring blob, unknown key id, or the tag does
                not verify (wrong key, changed bytes, or other associated data).
        """
        from cryptography.exceptions import InvalidTag

        kid = self.key_id_of(blob)
        cipher = self._ciphers.get(kid.encode("ascii"))
        if cipher is None:
            raise EncryptionError(f"blob was encrypted with key id {kid!r}, which is not in the keyring")
        split = len(KEY_MAGIC) + 1 + len(kid)
        if len(blob) < split + _NONCE + _TAG:
            raise EncryptionError("encrypted blob is truncated")
        view = memoryview(blob)
        try:
            return cipher.decrypt(bytes(view[split : split + _NONCE]), view[split + _NONCE :], bytes(view[:split]) + associated_data)
        except InvalidTag:
            raise EncryptionError(
                "encrypted blob does not authenticate: changed bytes, a blob from another record, or the wrong key"
            ) from None

    def key_id_of(self, blob: bytes) -> str:
        """Key id a blob was encrypted with (no decryption)."""
        if blob[:3] != KEY_MAGIC or len(blob) < 5:
            raise EncryptionError("blob is not encrypted with a celery-persist keyring")
        n = blob[3]
        kid = bytes(blob[4 : 4 + n])
        if len(kid) != n or not n:
            raise EncryptionError("encrypted blob header is truncated")
        try:
            return kid.decode("ascii")
        except UnicodeDecodeError:
            raise EncryptionError("encrypted blob header is corrupt") from None

    seal = encrypt
    open = decrypt

    def __repr__(self) -> str:
        return f"<Keyring active={self.active_id!r} keys={len(self._ids)}>"


_KID_CHARS = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-")


class Signer:
    """HMAC-SHA256 authentication without encryption (signing secret only)."""

    confidential = False

    def __init__(self, secret: str | bytes) -> None:
        raw = secret.encode("utf-8") if isinstance(secret, str) else secret
        if len(raw) < 16:
            raise ConfigurationError("the signing secret must be at least 16 bytes long")
        # Derive a blob-signing key so the same secret never tags keys and blobs alike.
        self._key = hmac.new(raw, b"celery-persist/blob-signing/v1", hashlib.sha256).digest()

    def seal(self, plaintext: bytes, associated_data: bytes) -> bytes:
        mac = hmac.new(self._key, SIGN_MAGIC, hashlib.sha256)
        mac.update(struct.pack(">Q", len(associated_data)))
        mac.update(associated_data)
        mac.update(plaintext)
        return SIGN_MAGIC + plaintext + mac.digest()

    def open(self, blob: bytes, associated_data: bytes) -> bytes:
        if blob[:3] != SIGN_MAGIC or len(blob) < 3 + 32:
            raise EncryptionError("blob is not signed by celery-persist (or is truncated)")
        view = memoryview(blob)
        body = view[3:-32]
        mac = hmac.new(self._key, SIGN_MAGIC, hashlib.sha256)
        mac.update(struct.pack(">Q", len(associated_data)))
        mac.update(associated_data)
        mac.update(body)
        if not hmac.compare_digest(mac.digest(), bytes(view[-32:])):
            raise EncryptionError("signed blob does not verify: changed bytes, a blob from another record, or another secret")
        return bytes(body)

    def __repr__(self) -> str:
        return "<Signer hmac-sha256>"


@dataclass(frozen=True, slots=True)
class EnvSecrets:
    """The secrets the environment holds; each is None when its variable is unset or blank."""

    #: ``CELERY_PERSIST_KEYS``: ``kid1:base64key,kid2:base64key``, active first (stripped).
    keys: str | None = field(default=None, repr=False)
    #: ``CELERY_PERSIST_KEY``: one base64 key, id ``default`` (stripped).
    key: str | None = field(default=None, repr=False)
    #: ``CELERY_PERSIST_SIGNING_SECRET``, exactly as set: it is key material, so even
    #: surrounding whitespace is part of it.
    signing_secret: str | None = field(default=None, repr=False)


def secrets_from_env(environ: Mapping[str, str] | None = None) -> EnvSecrets:
    """Read celery-persist's secrets from the environment (the only code that does).

    Args:
        environ: The variables to read; default ``os.environ``.

    Returns:
        The keys spec, the single key and the signing secret found there.
    """
    env = os.environ if environ is None else environ
    return EnvSecrets(
        keys=env.get("CELERY_PERSIST_KEYS", "").strip() or None,
        key=env.get("CELERY_PERSIST_KEY", "").strip() or None,
        signing_secret=env.get("CELERY_PERSIST_SIGNING_SECRET") or None,
    )


def choose_sealer(
    encryption: str,
    keyring: Keyring | None,
    signing_secret: str | bytes | None,
    *,
    environ: Mapping[str, str] | None = None,
) -> Sealer | None:
    """Pick how blobs are sealed: the keyring (AES-GCM), a :class:`Signer` (HMAC), or nothing.

    A keyring wins over a signing secret; ``encryption="off"`` drops the keyring
    but still signs when a secret is given.

    Args:
        encryption: ``auto`` (encrypt when a key exists), ``required`` (refuse
            without a key) or ``off``.
        keyring: The encryption keys; left out (and encryption not ``off``),
            read with :meth:`Keyring.from_env`.
        signing_secret: The HMAC secret, already resolved (this function does
            not read it from the environment: the caller also tags keys with it).
        environ: The variables :meth:`Keyring.from_env` reads; default ``os.environ``.

    Returns:
        The keyring, a signer, or None (blobs stored in clear and unauthenticated).

    Raises:
        ConfigurationError: An unknown mode, ``required`` without a key, a
            malformed key in the environment, or a signing secret under 16 bytes.
    """
    if encryption not in ENCRYPTION_MODES:
        raise ConfigurationError(f"persist_encryption must be one of {ENCRYPTION_MODES}, not {encryption!r}")
    if encryption == "off":
        keyring = None
    elif keyring is None:
        keyring = Keyring.from_env(environ)
    if encryption == "required" and keyring is None:
        raise ConfigurationError(
            "no encryption key is configured, and states are stored encrypted by default: "
            "run `celery-persist keygen` and export the CELERY_PERSIST_KEYS line it prints "
            "(or set persist_encryption='off' for development only)"
        )
    signer = Signer(signing_secret) if signing_secret else None  # also checks the secret's length
    return keyring or signer


def new_key_line(kid: str | None = None) -> str:
    """A fresh AES-256 key as the ``CELERY_PERSIST_KEYS`` value ``kid:base64key``.

    The default key id is the UTC date (``k20261128``), so a rotation prepends
    a key with a newer id.
    """
    kid = kid or "k" + time.strftime("%Y%m%d", time.gmtime())
    Keyring([(kid, b"\0" * 32)])  # checks the id
    return f"{kid}:{base64.b64encode(os.urandom(32)).decode('ascii')}"


def local_keyring(path: str | os.PathLike[str]) -> Keyring:
    """The keyring kept in the key file ``path``, made (mode 0600, key id ``local``) if missing.

    For the embedded SQLite store, whose states are then encrypted with no
    setting at all. The file holds one ``CELERY_PERSIST_KEYS`` line; whoever can
    read it can read the states, exactly as for the database beside it.
    Several processes may race to make it: the key is written to a private
    temporary file and linked into place, so every process reads one whole key.
    """
    target = os.fspath(path)
    if not os.path.exists(target):
        directory = os.path.dirname(os.path.abspath(target))
        os.makedirs(directory, mode=0o700, exist_ok=True)
        tmp = f"{target}.{os.getpid()}.{os.urandom(4).hex()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            with os.fdopen(fd, "w", encoding="ascii") as fh:
                fh.write(new_key_line("local") + "\n")
                fh.flush()
                os.fsync(fh.fileno())
            try:
                os.link(tmp, target)
            except FileExistsError:
                pass  # another process made it first; use theirs
        finally:
            os.unlink(tmp)
    flags = os.O_RDONLY | os.O_NOFOLLOW
    with os.fdopen(os.open(target, flags), encoding="ascii") as fh:
        if os.fstat(fh.fileno()).st_mode & 0o077:
            raise ConfigurationError(f"the key file {target} can be read by others; chmod 600 it")
        return Keyring.parse(fh.read().strip())
