"""celery-persist: durable, suspendable Celery work.

Three things a Celery user writes:

* ``Persist(app)`` binds the ``persist_*`` settings, the store, the tasks and the beat entry;
* ``await_input`` parks a chain until ``persist.resume(key, input)``;
* ``PersistentTask`` checkpoints long tasks (``self.checkpoint(state)``) and
  suspends mid-task (``self.await_input(...)``).

The library layer (``PersistenceHub``, ``open_store``, ``StateSerializer``,
``Keyring``, keys) works without Celery. The Celery layer is imported lazily,
so ``import celery_persist`` stays cheap and has no side effects.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .crypto import Keyring
from .errors import (
    AlreadyResumed,
    AwaitTimeout,
    ConfigurationError,
    EncryptionError,
    IntegrityError,
    InvalidInput,
    InvalidKey,
    PersistenceError,
    SerializationError,
    StateTooLarge,
    StoreUnavailable,
    SuspensionCancelled,
    SuspensionExpired,
    SuspensionNotFound,
    UnsupportedFormatVersion,
)
from .hub import PersistenceHub, Suspension
from .keys import new_suspension_key, validate_key
from .serializer import StateSerializer
from .stores import open_store

if TYPE_CHECKING:
    from .persist import Persist
    from .task import PersistentTask
    from .tasks import await_event, await_input, sleep

__version__ = "0.1.0"

__all__ = [
    "Persist",
    "PersistentTask",
    "await_input",
    "sleep",
    "await_event",
    "PersistenceHub",
    "Suspension",
    "open_store",
    "StateSerializer",
    "Keyring",
    "new_suspension_key",
    "validate_key",
    "PersistenceError",
    "ConfigurationError",
    "SerializationError",
    "IntegrityError",
    "UnsupportedFormatVersion",
    "EncryptionError",
    "InvalidKey",
    "SuspensionNotFound",
    "AlreadyResumed",
    "SuspensionExpired",
    "SuspensionCancelled",
    "StoreUnavailable",
    "StateTooLarge",
    "AwaitTimeout",
    "InvalidInput",
]

_LAZY = {"Persist": "persist", "PersistentTask": "task", "await_input": "tasks", "sleep": "tasks", "await_event": "tasks"}


def __getattr__(name: str) -> Any:
    # The Celery layer imports celery; keep it out of library-only imports.
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'celery_persist' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value
