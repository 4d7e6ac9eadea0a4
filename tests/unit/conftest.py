"""Library-layer fixtures: a clean environment, a fake clock, keys, stores, hubs."""

from __future__ import annotations

import base64
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from celery_persist import hub as hub_module
from celery_persist.crypto import Keyring
from celery_persist.hub import PersistenceHub

from ._helpers import FakeClock, RecordingStore

ENV_VARS = ("CELERY_PERSIST_KEYS", "CELERY_PERSIST_KEY", "CELERY_PERSIST_SIGNING_SECRET")

#: Fixed test key material (never used outside tests).
KEY_A = bytes(range(32))
KEY_B = bytes(range(100, 132))
SECRET = "unit-test-signing-secret-0123456789"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No test may see the developer's keys, and the plaintext warning starts silent."""
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(hub_module, "_warned_plaintext", True)
    yield


@pytest.fixture
def data_dir() -> Path:
    return Path(__file__).resolve().parent.parent / "data"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def keyring() -> Keyring:
    return Keyring([("k1", KEY_A)])


@pytest.fixture
def b64() -> Callable[[bytes], str]:
    return lambda raw: base64.b64encode(raw).decode("ascii")


@pytest.fixture
def store() -> RecordingStore:
    return RecordingStore()


@pytest.fixture
def make_hub(store: RecordingStore, clock: FakeClock, keyring: Keyring) -> Callable[..., PersistenceHub]:
    """Build a hub over the shared ``store`` and ``clock``; encrypted unless told otherwise."""

    def make(**kwargs: Any) -> PersistenceHub:
        kwargs.setdefault("store", store)
        kwargs.setdefault("clock", clock)
        if kwargs.get("encryption", "auto") != "off":
            kwargs.setdefault("keyring", keyring)
        return PersistenceHub(kwargs.pop("store"), **kwargs)

    return make


@pytest.fixture
def hub(make_hub: Callable[..., PersistenceHub]) -> PersistenceHub:
    """Encrypted hub with signed keys over a recording memory store."""
    return make_hub(signing_secret=SECRET)
