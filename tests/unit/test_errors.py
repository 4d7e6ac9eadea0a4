"""The error tree: shape, constructor convention, rendering, and pickling."""

from __future__ import annotations

import pickle

import pytest

from celery_persist import errors
from celery_persist.errors import (
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

ALL = [getattr(errors, name) for name in errors.__all__]

PARENTS = {
    PersistenceError: Exception,
    ConfigurationError: PersistenceError,
    StoreUnavailable: PersistenceError,
    SerializationError: PersistenceError,
    IntegrityError: SerializationError,
    UnsupportedFormatVersion: SerializationError,
    StateTooLarge: SerializationError,
    EncryptionError: PersistenceError,
    InvalidKey: PersistenceError,
    SuspensionNotFound: PersistenceError,
    AlreadyResumed: PersistenceError,
    SuspensionExpired: PersistenceError,
    SuspensionCancelled: PersistenceError,
    AwaitTimeout: PersistenceError,
    InvalidInput: PersistenceError,
}


def test_invalid_input_keeps_its_errors_through_pickling() -> None:
    exc = InvalidInput("bad", key="abc123def456", errors=[{"loc": ["approved"], "msg": "field required"}])
    back = pickle.loads(pickle.dumps(exc))
    assert (back.errors, back.key, str(back)) == (exc.errors, "abc123def456", str(exc))


def test_tree_matches_the_documented_shape() -> None:
    assert set(ALL) == set(PARENTS)
    for cls, parent in PARENTS.items():
        assert cls.__bases__ == (parent,), cls


def test_only_storeunavailable_is_transient() -> None:
    # Retry logic catches StoreUnavailable; nothing else may inherit from it.
    assert [cls for cls in ALL if issubclass(cls, StoreUnavailable)] == [StoreUnavailable]


@pytest.mark.parametrize("cls", ALL)
def test_message_first_rest_keyword_only(cls: type[PersistenceError]) -> None:
    exc = cls("boom", key="abc123def456", store="memory://")
    assert (exc.message, exc.key, exc.store, exc.args) == ("boom", "abc123def456", "memory://", ("boom",))
    with pytest.raises(TypeError):
        cls("boom", "abc123def456")  # type: ignore[misc]
    bare = cls()
    assert (bare.message, bare.key, bare.store, str(bare)) == ("", None, None, "")


def test_str_names_fingerprint_and_store() -> None:
    assert str(SuspensionNotFound("no such suspension")) == "no such suspension"
    assert str(SuspensionNotFound("gone", key="0123456789ab")) == "gone [suspension 0123456789ab]"
    assert str(SuspensionNotFound("gone", key="0123456789ab", store="redis://h/0")) == (
        "gone [suspension 0123456789ab] [store redis://h/0]"
    )
    assert str(StoreUnavailable("down", store="redis://h/0")) == "down [store redis://h/0]"


@pytest.mark.parametrize("cls", ALL)
def test_pickle_round_trip_keeps_everything(cls: type[PersistenceError]) -> None:
    exc = cls("it broke", key="0123456789ab", store="sqlite:///x.db")
    back = pickle.loads(pickle.dumps(exc))
    assert type(back) is cls
    assert (back.message, back.key, back.store, back.args, str(back)) == (
        exc.message,
        exc.key,
        exc.store,
        exc.args,
        str(exc),
    )


@pytest.mark.parametrize("cls", ALL)
def test_celery_style_rebuild_from_args(cls: type[PersistenceError]) -> None:
    # Celery's result backend stores (type, args) and rebuilds with cls(*args).
    exc = cls("it broke", key="0123456789ab", store="s")
    rebuilt = cls(*exc.args)
    assert type(rebuilt) is cls and rebuilt.message == "it broke" and str(rebuilt) == "it broke"


def test_pickle_keeps_cause_free_and_catchable_as_base() -> None:
    try:
        raise IntegrityError("bad crc", key="k" * 12)
    except SerializationError as exc:
        caught = exc
    assert isinstance(pickle.loads(pickle.dumps(caught)), PersistenceError)
