"""Every error celery-persist raises, in one tree.

::

    PersistenceError                 .key (a fingerprint, never the key) and .store
      ConfigurationError             bad setting, unknown scheme, missing driver
      StoreUnavailable               transient; the only class retry logic catches
      SerializationError
        IntegrityError               checksum mismatch, truncation, tampering
        UnsupportedFormatVersion     a blob written by a newer release
        StateTooLarge                over ``persist_max_state_size``
      EncryptionError                no usable key, unknown key id, AEAD tag mismatch
      InvalidKey                     malformed or forged key, raised before any store read
      SuspensionNotFound
      AlreadyResumed
      SuspensionExpired
      SuspensionCancelled
      AwaitTimeout                   stored as the awaiting task's failure
      InvalidInput                   a resume input its schema refuses, a bad approver; ``.errors``

Constructors take the message first and everything else keyword-only, because
Celery's result backend rebuilds a stored exception as ``cls(*args)``.

``.key`` holds the suspension key's *fingerprint* (see
:func:`celery_persist.keys.fingerprint`), never the key itself: errors travel
into logs and result backends, and a full key there would hand out the power to
resume. Messages name the problem and the fix, never state, inputs or keys.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "PersistenceError",
    "ConfigurationError",
    "StoreUnavailable",
    "SerializationError",
    "IntegrityError",
    "UnsupportedFormatVersion",
    "StateTooLarge",
    "EncryptionError",
    "InvalidKey",
    "SuspensionNotFound",
    "AlreadyResumed",
    "SuspensionExpired",
    "SuspensionCancelled",
    "AwaitTimeout",
    "InvalidInput",
]


class PersistenceError(Exception):
    """Base class of every celery-persist error.

    Args:
        message: What went wrong and, where there is one, the fix.
        key: Fingerprint of the suspension involved, if any.
        store: Masked URL or name of the store involved, if any.
    """

    def __init__(self, message: str = "", *, key: str | None = None, store: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.key = key
        self.store = store

    def __str__(self) -> str:
        parts = [self.message]
        if self.key:
            parts.append(f"[suspension {self.key}]")
        if self.store:
            parts.append(f"[store {self.store}]")
        return " ".join(p for p in parts if p)

    def __reduce__(self) -> tuple[object, ...]:
        # Keep key/store across pickling (multiprocessing, Celery's pickle serializer).
        return (_rebuild, (type(self), self.message, self.key, self.store))


def _rebuild(cls: type[PersistenceError], message: str, key: str | None, store: str | None) -> PersistenceError:
    return cls(message, key=key, store=store)


class ConfigurationError(PersistenceError):
    """A setting is wrong, a store scheme is unknown, or a driver is missing."""


class StoreUnavailable(PersistenceError):
    """The store could not be reached; transient, safe to retry."""


class SerializationError(PersistenceError):
    """A state could not be encoded or decoded."""


class IntegrityError(SerializationError):
    """Stored bytes were changed, truncated, or belong to another record."""


class UnsupportedFormatVersion(SerializationError):
    """A blob was written by a newer format version than this release reads."""


class StateTooLarge(SerializationError):
    """A state exceeds ``persist_max_state_size`` (on write or while decompressing)."""


class EncryptionError(PersistenceError):
    """No usable key, an unknown key id, or ciphertext that does not authenticate."""


class InvalidKey(PersistenceError):
    """A suspension key is malformed or its signature does not verify."""


class SuspensionNotFound(PersistenceError):
    """No suspension is stored under this key."""


class AlreadyResumed(PersistenceError):
    """The suspension was already resumed (or a resume of it is in flight)."""


class SuspensionExpired(PersistenceError):
    """The suspension passed its ``expires_at`` before it was resumed."""


class SuspensionCancelled(PersistenceError):
    """The suspension was cancelled."""


class AwaitTimeout(PersistenceError):
    """An ``await_input`` step timed out; stored as the awaiting task's failure."""


class InvalidInput(PersistenceError):
    """A resume input that the suspension's schema refuses, or an approver it does not accept.

    Raised before any claim: the flow stays suspended and the same key can be
    resumed again with good input.

    Attributes:
        errors: One ``{"loc": [path parts], "msg": str}`` per problem, in the
            order found (``loc`` is empty for the input as a whole). Messages
            name fields and constraints, never the values given.
    """

    def __init__(
        self, message: str = "", *, key: str | None = None, store: str | None = None, errors: list[dict[str, Any]] | None = None
    ) -> None:
        super().__init__(message, key=key, store=store)
        self.errors = list(errors or [])

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild_invalid_input, (self.message, self.key, self.store, self.errors))


def _rebuild_invalid_input(message: str, key: str | None, store: str | None, errors: list[dict[str, Any]]) -> InvalidInput:
    return InvalidInput(message, key=key, store=store, errors=errors)
