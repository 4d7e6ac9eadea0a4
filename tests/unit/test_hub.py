"""PersistenceHub over the memory store: lifecycle, leases, cleanup, tampering, audit."""

from __future__ import annotations

import datetime as dt
import logging
import pickle
import threading
from collections.abc import Callable
from typing import Any

import pytest

from celery_persist import hub as hub_module
from celery_persist import maintenance
from celery_persist.crypto import KEY_MAGIC, SIGN_MAGIC, Keyring
from celery_persist.errors import (
    AlreadyResumed,
    ConfigurationError,
    EncryptionError,
    IntegrityError,
    InvalidKey,
    PersistenceError,
    SerializationError,
    StateTooLarge,
    StoreUnavailable,
    SuspensionCancelled,
    SuspensionExpired,
    SuspensionNotFound,
)
from celery_persist.hub import PersistenceHub, Suspension
from celery_persist.keys import fingerprint, key_hash, new_suspension_key
from celery_persist.serializer import MAGIC, StateSerializer
from celery_persist.stores import open_store
from celery_persist.stores.base import KEEP, Kind, Status, StoredRecord

from ._helpers import FakeClock, RecordingStore
from .conftest import KEY_B, SECRET

MARK = "TOPSECRET-STATE-MARKER"
STATE = {"secret": MARK, "items": [1, 2, 3], "when": dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc)}
INPUT = {"approved": True, "note": "INPUT-MARKER"}
MakeHub = Callable[..., PersistenceHub]


def _forge(key: str) -> str:
    body, tag = key.rsplit(".", 1)
    return f"{body}.{'A' if tag[0] != 'A' else 'B'}{tag[1:]}"


def _status(store: RecordingStore, key: str) -> Status:
    rec = store.raw(key_hash(key))
    assert rec is not None
    return rec.status


# -- suspend / load --------------------------------------------------------------------------------


def test_suspend_stores_only_hash_and_ciphertext(hub: PersistenceHub, store: RecordingStore, clock: FakeClock) -> None:
    key = hub.suspend(STATE, ttl=60, metadata={"flow": "demo"})
    assert key.count(".") == 2  # signed
    [rec] = store.suspensions()
    assert rec.key_hash == key_hash(key) and rec.kind is Kind.SUSPENSION and rec.status is Status.SUSPENDED
    assert rec.blob.startswith(KEY_MAGIC)
    assert MARK.encode() not in rec.blob and key.encode() not in rec.blob
    assert key not in repr(rec.metadata) and dict(rec.metadata) == {"flow": "demo"}
    assert (rec.created_at, rec.expires_at, rec.due_at, rec.updated_at) == (clock.now, clock.now + 60, clock.now + 60, clock.now)


def test_load_is_read_only(hub: PersistenceHub, store: RecordingStore, clock: FakeClock) -> None:
    key = hub.suspend(STATE, ttl=60, metadata={"flow": "demo"})
    before = store.raw(key_hash(key))
    clock.advance(5)
    s = hub.load(key)
    assert isinstance(s, Suspension)
    assert (s.key, s.fingerprint, s.state, s.input, dict(s.metadata), s.status) == (
        key,
        fingerprint(key),
        STATE,
        None,
        {"flow": "demo"},
        "suspended",
    )
    assert s.created_at == dt.datetime.fromtimestamp(clock.now - 5, tz=dt.timezone.utc)
    assert s.expires_at == dt.datetime.fromtimestamp(clock.now + 55, tz=dt.timezone.utc)
    assert s.created_at.tzinfo is dt.timezone.utc
    assert store.raw(key_hash(key)) == before
    assert hub.load(key).state == STATE


def test_ttl_rules(make_hub: MakeHub, store: RecordingStore, clock: FakeClock) -> None:
    hub = make_hub(default_ttl=100)
    k_default = hub.suspend(1)
    k_never = hub.suspend(1, ttl=0)
    k_own = hub.suspend(1, ttl=5)
    assert store.raw(key_hash(k_default)).expires_at == clock.now + 100  # type: ignore[union-attr]
    assert store.raw(key_hash(k_never)).expires_at is None  # type: ignore[union-attr]
    assert store.raw(key_hash(k_own)).expires_at == clock.now + 5  # type: ignore[union-attr]
    assert make_hub().load(make_hub().suspend(1)).expires_at is None


def test_suspend_with_an_issued_key(hub: PersistenceHub) -> None:
    key = new_suspension_key(SECRET)
    assert hub.suspend({"a": 1}, key=key) == key
    assert hub.load(key).state == {"a": 1}
    with pytest.raises(InvalidKey):
        hub.suspend({"a": 1}, key=new_suspension_key())  # unsigned while a secret is set


# -- resume / claim ----------------------------------------------------------------------------------


def test_resume_once(hub: PersistenceHub, store: RecordingStore) -> None:
    key = hub.suspend(STATE, metadata={"m": 1})
    s = hub.resume(key, input=INPUT)
    assert (s.state, s.input, s.status, s.key, dict(s.metadata)) == (STATE, INPUT, "resumed", key, {"m": 1})
    assert _status(store, key) is Status.RESUMED
    with pytest.raises(AlreadyResumed):
        hub.resume(key)
    with pytest.raises(AlreadyResumed):
        hub.cancel(key)
    assert hub.load(key).status == "resumed"


def test_claim_release_complete(hub: PersistenceHub, store: RecordingStore, clock: FakeClock) -> None:
    key = hub.suspend(STATE, ttl=3600)
    s = hub.claim(key, INPUT, lease=30)
    assert (s.status, s.state, s.input) == ("claimed", STATE, INPUT)
    rec = store.raw(key_hash(key))
    assert rec is not None and rec.status is Status.CLAIMED and rec.due_at == clock.now + 30
    with pytest.raises(AlreadyResumed):
        hub.claim(key)
    assert s.claim_token is not None
    hub.release(key, token=s.claim_token + 1)  # not this claim's token: nothing happens
    assert _status(store, key) is Status.CLAIMED
    hub.release(key, token=s.claim_token)
    rec = store.raw(key_hash(key))
    assert rec is not None and rec.status is Status.SUSPENDED and rec.due_at == rec.expires_at
    hub.release(key, token=s.claim_token)  # not claimed: nothing happens
    assert _status(store, key) is Status.SUSPENDED
    again = hub.claim(key)
    assert again.claim_token is not None
    with pytest.raises(AlreadyResumed):
        hub.complete(key, token=s.claim_token)  # the first claim's token does not finish the second claim
    hub.complete(key, token=again.claim_token)
    rec = store.raw(key_hash(key))
    assert rec is not None and rec.status is Status.RESUMED and rec.due_at == clock.now + hub.retention
    hub.complete(key, token=again.claim_token)  # a retry whose first reply was lost: still done, no error
    with pytest.raises(AlreadyResumed):
        hub.complete(key, token=s.claim_token)


def test_default_lease(make_hub: MakeHub, store: RecordingStore, clock: FakeClock) -> None:
    hub = make_hub(lease=12.5)
    key = hub.suspend(1)
    hub.claim(key)
    assert store.raw(key_hash(key)).due_at == clock.now + 12.5  # type: ignore[union-attr]


def test_claiming_releases_on_error_and_completes_on_success(hub: PersistenceHub, store: RecordingStore) -> None:
    key = hub.suspend(STATE)
    with pytest.raises(RuntimeError, match="dispatch failed"):
        with hub.claiming(key, INPUT) as s:
            assert s.state == STATE and _status(store, key) is Status.CLAIMED
            raise RuntimeError("dispatch failed")
    assert _status(store, key) is Status.SUSPENDED
    with pytest.raises(KeyboardInterrupt):
        with hub.claiming(key):
            raise KeyboardInterrupt
    assert _status(store, key) is Status.SUSPENDED
    with hub.claiming(key, INPUT) as s:
        assert s.input == INPUT
    assert _status(store, key) is Status.RESUMED


def test_lease_lapse_reopens_and_resumes(hub: PersistenceHub, store: RecordingStore, clock: FakeClock) -> None:
    key = hub.suspend(STATE, ttl=3600)
    dead = hub.claim(key, lease=30)  # ...and the claimer dies here
    clock.advance(29)
    assert hub.cleanup() == 0
    assert _status(store, key) is Status.CLAIMED
    with pytest.raises(AlreadyResumed):
        hub.resume(key)
    clock.advance(2)
    assert hub.cleanup() == 1
    rec = store.raw(key_hash(key))
    assert rec is not None and rec.status is Status.SUSPENDED and rec.due_at == rec.expires_at
    with pytest.raises(AlreadyResumed, match="no longer held"):
        hub.complete(key, token=dead.claim_token or 0)  # the dead claimer's late completion must not count
    assert hub.resume(key, INPUT).state == STATE


def test_lapsed_lease_of_an_expired_suspension(hub: PersistenceHub, store: RecordingStore, clock: FakeClock) -> None:
    key = hub.suspend(STATE, ttl=10)
    hub.claim(key, lease=60)
    clock.advance(61)
    # One run re-opens the lease and, since expires_at has passed too, expires it.
    assert hub.cleanup() == 2
    assert _status(store, key) is Status.EXPIRED
    with pytest.raises(SuspensionExpired):
        hub.resume(key)
    assert hub.cleanup() == 0


def test_racing_resumes_exactly_one_wins(hub: PersistenceHub) -> None:
    key = hub.suspend(STATE)
    barrier = threading.Barrier(8)
    results: list[Any] = []

    def worker() -> None:
        barrier.wait()
        try:
            results.append(hub.resume(key, INPUT))
        except AlreadyResumed as exc:
            results.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert len(results) == 8
    assert sum(isinstance(r, Suspension) for r in results) == 1
    assert sum(isinstance(r, AlreadyResumed) for r in results) == 7


# -- terminal states -------------------------------------------------------------------------------


def test_unknown_key(hub: PersistenceHub) -> None:
    key = new_suspension_key(SECRET)
    for call in (hub.load, hub.resume, hub.claim, hub.cancel):
        with pytest.raises(SuspensionNotFound):
            call(key)


def test_checkpoint_is_not_a_suspension(hub: PersistenceHub, store: RecordingStore) -> None:
    key = hub.suspend(STATE)
    rec = store.raw(key_hash(key))
    assert rec is not None
    store.raw_put(rec.replace(kind=Kind.CHECKPOINT))
    with pytest.raises(SuspensionNotFound):
        hub.load(key)


def test_expired(hub: PersistenceHub, store: RecordingStore, clock: FakeClock) -> None:
    key = hub.suspend(STATE, ttl=10)
    clock.advance(10)
    assert hub.load(key).status == "expired"  # due, not yet cleaned up
    with pytest.raises(SuspensionExpired):
        hub.resume(key)
    with pytest.raises(SuspensionExpired):
        hub.cancel(key)
    assert _status(store, key) is Status.SUSPENDED
    assert hub.cleanup() == 1
    assert _status(store, key) is Status.EXPIRED
    with pytest.raises(SuspensionExpired):
        hub.resume(key)
    clock.advance(hub.retention)
    assert hub.cleanup() == 1  # retention over: deleted
    with pytest.raises(SuspensionNotFound):
        hub.resume(key)


def test_cancelled(hub: PersistenceHub, store: RecordingStore, clock: FakeClock) -> None:
    key = hub.suspend(STATE, metadata={"m": 1})
    s = hub.cancel(key)
    assert (s.status, s.state, dict(s.metadata), s.key) == ("cancelled", STATE, {"m": 1}, key)  # authenticated state comes back
    rec = store.raw(key_hash(key))
    assert rec is not None and rec.status is Status.CANCELLED and rec.due_at == clock.now + hub.retention
    assert hub.cancel(key).status == "cancelled"  # twice: no-op
    with pytest.raises(SuspensionCancelled):
        hub.resume(key)
    with pytest.raises(SuspensionCancelled):
        hub.claim(key)


def test_cancel_by_key_hash(hub: PersistenceHub, store: RecordingStore) -> None:
    key = hub.suspend(STATE, metadata={"m": 1})
    s = hub.cancel_by_hash(key_hash(key))
    assert (s.status, s.state, s.key) == ("cancelled", STATE, None)  # the state authenticated; no key handed out
    assert hub.cancel_by_hash(key_hash(key)).status == "cancelled"  # twice: no-op
    with pytest.raises(SuspensionCancelled):
        hub.resume(key)
    with pytest.raises(SuspensionNotFound):
        hub.cancel_by_hash("0" * 64)
    claimed = hub.suspend(STATE)
    hub.claim(claimed)
    with pytest.raises(AlreadyResumed):
        hub.cancel_by_hash(key_hash(claimed))


def test_cancel_while_claimed(hub: PersistenceHub) -> None:
    key = hub.suspend(STATE)
    hub.claim(key)
    with pytest.raises(AlreadyResumed):
        hub.cancel(key)


# -- keys are checked before the store is touched ----------------------------------------------------


def _bad_keys() -> list[Any]:
    genuine = new_suspension_key(SECRET)
    return [_forge(genuine), new_suspension_key("other-secret-0123456789"), new_suspension_key(), "garbage", "", None, 42, b"p1."]


@pytest.mark.parametrize("method", ["load", "resume", "claim", "cancel", "complete", "release"])
def test_forged_or_malformed_key_never_reaches_the_store(hub: PersistenceHub, store: RecordingStore, method: str) -> None:
    for bad in _bad_keys():
        store.calls.clear()
        call = getattr(hub, method)
        with pytest.raises(InvalidKey) as info:
            call(bad, token=1) if method in ("complete", "release") else call(bad)
        assert store.calls == [], f"{method}({bad!r}) touched the store"
        assert info.value.store == store.name
        assert info.value.key == (fingerprint(bad) if isinstance(bad, str) else None)
    store.calls.clear()
    with pytest.raises(InvalidKey):
        hub.claiming(_forge(new_suspension_key(SECRET))).__enter__()
    with pytest.raises(InvalidKey):
        hub.suspend(1, key=_forge(new_suspension_key(SECRET)))
    assert store.calls == []


def test_without_a_secret_only_the_form_is_checked(make_hub: MakeHub, store: RecordingStore) -> None:
    hub = make_hub(encryption="off")
    key = hub.suspend(STATE)
    assert key.count(".") == 1
    assert hub.load(key).state == STATE
    store.calls.clear()
    with pytest.raises(InvalidKey):
        hub.load("not-a-key")
    assert store.calls == []


# -- tampering -------------------------------------------------------------------------------------


@pytest.fixture(params=["aes-gcm", "hmac"])
def sealed_hub(request: pytest.FixtureRequest, make_hub: MakeHub) -> PersistenceHub:
    if request.param == "aes-gcm":
        return make_hub(signing_secret=SECRET)
    return make_hub(encryption="off", signing_secret=SECRET)


def test_blob_copied_from_another_record(sealed_hub: PersistenceHub, store: RecordingStore) -> None:
    a = sealed_hub.suspend({"who": "a"})
    b = sealed_hub.suspend({"who": "b"})
    rec_a, rec_b = store.raw(key_hash(a)), store.raw(key_hash(b))
    assert rec_a is not None and rec_b is not None
    planted = rec_b.replace(blob=rec_a.blob)
    store.raw_put(planted)
    for call in (sealed_hub.load, sealed_hub.resume, sealed_hub.claim):
        with pytest.raises((EncryptionError, IntegrityError)) as info:  # the seal names the blob too
            call(b)
        assert info.value.key == fingerprint(b) and info.value.store == store.name
    assert store.raw(key_hash(b)) == planted  # the claim was not used up
    assert sealed_hub.resume(a).state == {"who": "a"}


def test_record_moved_to_another_key_hash(sealed_hub: PersistenceHub, store: RecordingStore) -> None:
    a = sealed_hub.suspend({"who": "a"})
    other = new_suspension_key(SECRET)
    rec = store.raw(key_hash(a))
    assert rec is not None
    store.raw_put(rec.replace(key_hash=key_hash(other)))
    with pytest.raises((EncryptionError, IntegrityError)):
        sealed_hub.load(other)


def test_metadata_edited_in_the_store(sealed_hub: PersistenceHub, store: RecordingStore) -> None:
    key = sealed_hub.suspend(STATE, metadata={"task": "publish", "n": 1})
    rec = store.raw(key_hash(key))
    assert rec is not None
    for edited in ({"task": "delete_everything", "n": 1}, {"task": "publish"}, {"task": "publish", "n": 1, "x": 0}, {}):
        store.raw_put(rec.replace(metadata=edited))
        with pytest.raises(EncryptionError):
            sealed_hub.load(key)
        with pytest.raises(EncryptionError):
            sealed_hub.resume(key)
        assert _status(store, key) is Status.SUSPENDED
    store.raw_put(rec.replace(metadata={"n": 1, "task": "publish"}))  # key order is not content
    assert sealed_hub.load(key).state == STATE


def test_callers_mutating_metadata_do_not_break_the_record(sealed_hub: PersistenceHub) -> None:
    md: dict[str, Any] = {"tags": ["a"], "inner": {"n": 1}}
    key = sealed_hub.suspend(STATE, metadata=md)
    md["tags"].append("changed after suspend")
    md["inner"]["n"] = 2
    s = sealed_hub.load(key)
    assert dict(s.metadata) == {"tags": ["a"], "inner": {"n": 1}}
    s.metadata["tags"].append("changed by a reader")
    assert sealed_hub.resume(key).state == STATE


def test_every_flipped_blob_byte_is_refused(sealed_hub: PersistenceHub, store: RecordingStore) -> None:
    key = sealed_hub.suspend({"k": "v"})
    rec = store.raw(key_hash(key))
    assert rec is not None
    for i in range(len(rec.blob)):
        bad = bytearray(rec.blob)
        bad[i] ^= 0x40
        store.raw_put(rec.replace(blob=bytes(bad)))
        with pytest.raises((EncryptionError, IntegrityError)):
            sealed_hub.load(key)
    store.raw_put(rec)
    assert sealed_hub.resume(key).state == {"k": "v"}


def test_signed_mode_round_trip(make_hub: MakeHub, store: RecordingStore) -> None:
    hub = make_hub(encryption="off", signing_secret=SECRET)
    key = hub.suspend(STATE)
    rec = store.raw(key_hash(key))
    assert rec is not None and rec.blob.startswith(SIGN_MAGIC)
    assert hub.health()["encryption"] == "hmac-sha256"
    assert hub.resume(key, INPUT).state == STATE


def test_mixed_sealing_is_refused(make_hub: MakeHub, store: RecordingStore, keyring: Keyring) -> None:
    plain = make_hub(encryption="off")
    signed = make_hub(encryption="off", signing_secret=SECRET)
    encrypted = make_hub(signing_secret=SECRET)
    other_keys = make_hub(keyring=Keyring([("other", KEY_B)]), signing_secret=SECRET)
    k_plain, k_signed, k_enc = plain.suspend(1), signed.suspend(2), encrypted.suspend(3)
    assert store.raw(key_hash(k_plain)).blob.startswith(MAGIC)  # type: ignore[union-attr]
    k_plain_signed = signed.suspend(4, key=new_suspension_key(SECRET))
    cases = [
        (encrypted, k_signed, "not encrypted"),  # unencrypted record while encryption on
        (other_keys, k_enc, "not in the keyring"),
        (signed, k_enc, "no encryption key"),
        (plain, k_enc, "no encryption key"),
    ]
    # A hub with other secrets cannot verify the record's seal (IntegrityError); with the
    # same ones, the blob's own check refuses (EncryptionError). Either way: refused.
    for hub, key, _why in cases:
        with pytest.raises((EncryptionError, IntegrityError)):
            hub.load(key)
    # A plain envelope planted where a signed one belongs.
    rec = store.raw(key_hash(k_plain_signed))
    assert rec is not None
    store.raw_put(rec.replace(blob=store.raw(key_hash(k_plain)).blob))  # type: ignore[union-attr]
    with pytest.raises((EncryptionError, IntegrityError)):
        signed.load(k_plain_signed)
    with pytest.raises((EncryptionError, IntegrityError)):
        encrypted.load(k_plain_signed)
    # A signed record read by a hub without any secret.
    with pytest.raises((EncryptionError, IntegrityError)):
        plain.load(_unsigned_copy(store, k_signed))
    assert plain.load(k_plain).state == 1 and signed.load(k_signed).state == 2 and encrypted.load(k_enc).state == 3


def _unsigned_copy(store: RecordingStore, signed_key: str) -> str:
    """Copy a signed record's blob under a fresh unsigned key, rebinding nothing."""
    fresh = new_suspension_key()
    rec = store.raw(key_hash(signed_key))
    assert rec is not None
    store.raw_put(rec.replace(key_hash=key_hash(fresh)))
    return fresh


def test_plaintext_mode_is_readable_but_unauthenticated(make_hub: MakeHub, store: RecordingStore) -> None:
    hub = make_hub(encryption="off")
    key = hub.suspend(STATE)
    rec = store.raw(key_hash(key))
    assert rec is not None and rec.blob.startswith(MAGIC)
    assert hub.health()["encryption"] == "none"
    assert hub.resume(key).state == STATE


# -- configuration ---------------------------------------------------------------------------------


@pytest.mark.parametrize("codec", ["pickle", "dill"])
def test_unsafe_codec_needs_a_key_or_secret(make_hub: MakeHub, codec: str) -> None:
    with pytest.raises(ConfigurationError, match=f"the {codec} codec needs"):
        make_hub(encryption="off", serializer=StateSerializer(codec))
    with pytest.raises(ConfigurationError):
        make_hub(keyring=None, serializer=StateSerializer(codec))
    hub = make_hub(serializer=StateSerializer(codec))  # keyring
    assert hub.resume(hub.suspend({"x": {1, 2}})).state == {"x": {1, 2}}
    hub = make_hub(encryption="off", signing_secret=SECRET, serializer=StateSerializer(codec))
    assert hub.resume(hub.suspend({"x": (1,)})).state == {"x": (1,)}


def test_encryption_modes(make_hub: MakeHub, monkeypatch: pytest.MonkeyPatch, b64: Callable[[bytes], str]) -> None:
    with pytest.raises(ConfigurationError, match="celery-persist keygen"):
        make_hub(encryption="required", keyring=None)
    with pytest.raises(ConfigurationError, match="persist_encryption"):
        make_hub(encryption="sometimes")
    monkeypatch.setenv("CELERY_PERSIST_KEYS", f"env-key:{b64(KEY_B)}")
    hub = make_hub(encryption="required", keyring=None)
    assert hub.keyring is not None and hub.keyring.active_id == "env-key"
    off = make_hub(encryption="off", keyring=Keyring([("k", KEY_B)]))
    assert off.keyring is None and off.health()["key_ids"] == []


def test_auto_without_keys_warns_once(make_hub: MakeHub, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hub_module, "_warned_plaintext", False)
    caplog.set_level(logging.WARNING, logger="celery_persist.hub")
    make_hub(keyring=None)
    make_hub(keyring=None)
    make_hub(keyring=None, signing_secret=SECRET)
    warnings = [r for r in caplog.records if r.name == "celery_persist.hub" and r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "no encryption key" in warnings[0].getMessage()


def test_auto_with_keys_does_not_warn(make_hub: MakeHub, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hub_module, "_warned_plaintext", False)
    caplog.set_level(logging.WARNING, logger="celery_persist.hub")
    make_hub()
    make_hub(encryption="off")
    assert not [r for r in caplog.records if r.name == "celery_persist.hub"]


def test_secrets_from_the_environment(make_hub: MakeHub, monkeypatch: pytest.MonkeyPatch, b64: Callable[[bytes], str]) -> None:
    monkeypatch.setenv("CELERY_PERSIST_SIGNING_SECRET", SECRET)
    monkeypatch.setenv("CELERY_PERSIST_KEY", b64(KEY_B))
    hub = make_hub(keyring=None)
    key = hub.suspend(1)
    assert key.count(".") == 2 and hub.health()["signed_keys"] is True
    assert hub.keyring is not None and hub.keyring.key_ids == ("default",)


def test_max_state_size(make_hub: MakeHub, store: RecordingStore) -> None:
    hub = make_hub(max_state_size=200)
    store.calls.clear()
    with pytest.raises(StateTooLarge) as info:
        hub.suspend({"blob": MARK * 50})
    assert store.calls == [] and store.suspensions() == []
    assert info.value.store == store.name and info.value.key is not None and MARK not in str(info.value)
    custom = make_hub(serializer=StateSerializer("json", "gzip"), max_state_size=300)
    assert custom.serializer.max_size == 300 and custom.serializer.compression == "gzip"
    with pytest.raises(StateTooLarge):
        custom.suspend("x" * 400)


def test_bad_metadata_is_refused_before_writing(hub: PersistenceHub, store: RecordingStore) -> None:
    store.calls.clear()
    for md in ({"obj": object()}, {1: "a", "b": 2}):
        with pytest.raises(SerializationError, match="metadata") as info:
            hub.suspend(STATE, metadata=md)
        assert info.value.store == store.name
    with pytest.raises(SerializationError):
        hub.suspend({"x": object()})
    assert store.calls == []


def test_store_outage_propagates_and_changes_nothing(hub: PersistenceHub, store: RecordingStore, monkeypatch: pytest.MonkeyPatch) -> None:
    key = hub.suspend(STATE)

    def down(*args: Any, **kwargs: Any) -> Any:
        raise StoreUnavailable("connection refused", store=store.name)

    monkeypatch.setattr(store, "transition", down)
    with pytest.raises(StoreUnavailable) as info:
        hub.resume(key)
    assert info.value.store == store.name and MARK not in str(info.value)
    monkeypatch.setattr(store, "put", down)
    with pytest.raises(StoreUnavailable):
        hub.suspend(STATE)
    monkeypatch.undo()
    assert _status(store, key) is Status.SUSPENDED and len(store.suspensions()) == 1
    assert hub.resume(key).state == STATE


# -- list ------------------------------------------------------------------------------------------


def test_list_pages(hub: PersistenceHub, store: RecordingStore) -> None:
    keys = [hub.suspend({"i": i}, metadata={"i": i}) for i in range(7)]
    hub.save_checkpoint("task-1", {"c": 1})
    hub.cancel(keys[0])
    seen: list[Suspension] = []
    cursor = None
    pages = 0
    while True:
        page = hub.list(limit=3, cursor=cursor)
        pages += 1
        assert len(page.items) <= 3
        seen.extend(page.items)
        cursor = page.next_cursor
        if cursor is None:
            break
        assert pages < 10
    assert pages == 3
    assert sorted(s.fingerprint for s in seen) == sorted(fingerprint(k) for k in keys)
    assert [s.fingerprint for s in seen] == sorted(s.fingerprint for s in seen)  # key-hash order
    assert all(s.key is None and s.state is None for s in seen)
    assert {s.metadata["i"] for s in seen} == set(range(7))
    cancelled = hub.list(status="cancelled").items
    assert [s.fingerprint for s in cancelled] == [fingerprint(keys[0])] and cancelled[0].status == "cancelled"
    assert len(hub.list(status="suspended").items) == 6
    assert hub.list(status="claimed").items == []
    for s in seen:
        assert MARK not in repr(s)


# -- cleanup ---------------------------------------------------------------------------------------


def test_cleanup_only_walks_due_records(hub: PersistenceHub, store: RecordingStore, clock: FakeClock) -> None:
    keep = [hub.suspend(i, ttl=1000) for i in range(5)]
    gone = [hub.suspend(i, ttl=10) for i in range(7)]
    clock.advance(11)
    store.calls.clear()
    assert hub.cleanup(batch=3) == 7
    assert "scan" not in store.calls and store.calls.count("get") == 0
    assert all(_status(store, k) is Status.EXPIRED for k in gone)
    assert all(_status(store, k) is Status.SUSPENDED for k in keep)
    assert hub.cleanup() == 0


def test_cleanup_explicit_now(hub: PersistenceHub, store: RecordingStore, clock: FakeClock) -> None:
    key = hub.suspend(1, ttl=10)
    assert hub.cleanup(now=clock.now + 5) == 0
    assert hub.cleanup(now=clock.now + 10) == 1
    assert _status(store, key) is Status.EXPIRED


def test_on_expired_handler(hub: PersistenceHub, store: RecordingStore, clock: FakeClock) -> None:
    key = hub.suspend(STATE, ttl=10, metadata={"policy": "fail"})
    got: list[Suspension] = []
    clock.advance(10)
    assert hub.cleanup(on_expired=got.append) == 1
    [s] = got
    assert (s.key, s.state, s.status, dict(s.metadata), s.fingerprint) == (None, STATE, "expired", {"policy": "fail"}, fingerprint(key))
    assert _status(store, key) is Status.EXPIRED


def test_failing_on_expired_handler_is_retried_later(
    hub: PersistenceHub, store: RecordingStore, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    key = hub.suspend(STATE, ttl=10)
    calls: list[float] = []

    def broken(s: Suspension) -> None:
        calls.append(clock.now)
        raise RuntimeError("handler down")

    clock.advance(10)
    caplog.set_level(logging.WARNING, logger="celery_persist.hub")
    assert hub.cleanup(on_expired=broken, retry_after=30) == 1
    rec = store.raw(key_hash(key))
    assert rec is not None and rec.status is Status.SUSPENDED and rec.due_at == clock.now + 30
    assert any("timeout handler failed" in r.getMessage() for r in caplog.records)
    with pytest.raises(SuspensionExpired):
        hub.resume(key)  # still past expires_at
    clock.advance(29)
    assert hub.cleanup(on_expired=broken, retry_after=30) == 0
    clock.advance(1)
    ok: list[Suspension] = []
    assert hub.cleanup(on_expired=ok.append) == 1
    assert len(calls) == 1 and len(ok) == 1 and ok[0].state == STATE
    assert _status(store, key) is Status.EXPIRED


def test_tampered_expiring_record_is_skipped_and_kept(hub: PersistenceHub, store: RecordingStore, clock: FakeClock) -> None:
    key = hub.suspend(STATE, ttl=10)
    rec = store.raw(key_hash(key))
    assert rec is not None
    store.raw_put(rec.replace(blob=rec.blob[:-1] + b"\x00"))
    called: list[Suspension] = []
    clock.advance(10)
    assert hub.cleanup(on_expired=called.append) == 1  # its seal fails: set aside, not acted on
    kept = store.raw(key_hash(key))
    assert called == [] and kept is not None and kept.status is Status.SUSPENDED and kept.due_at is None
    assert hub.cleanup(on_expired=called.append) == 0  # and never looked at again


def test_cleanup_deletes_old_checkpoints_and_finished_records(hub: PersistenceHub, store: RecordingStore, clock: FakeClock) -> None:
    hub.save_checkpoint("short", {"c": 1}, ttl=10)
    hub.save_checkpoint("forever", {"c": 2})
    done = hub.suspend(1)
    hub.resume(done)
    clock.advance(10)
    assert hub.cleanup() == 1
    assert hub.load_checkpoint("short") is None and hub.load_checkpoint("forever") == {"c": 2}
    clock.advance(hub.retention)
    assert hub.cleanup() == 1
    with pytest.raises(SuspensionNotFound):
        hub.load(done)


# -- races (a competitor acts between our read and our compare-and-set) ------------------------------


class RacingStore(RecordingStore):
    """A competitor acts (as another hub would, seals included) just before our compare-and-set."""

    def __init__(self) -> None:
        super().__init__()
        self.competitor: Callable[[RacingStore, str], Any] | None = None
        self.hub: PersistenceHub | None = None

    def transition(self, key_hash: str, expect: Any, to: Status, *, due_at: Any = KEEP, now: float, **fields: Any) -> bool:
        competitor, self.competitor = self.competitor, None
        if competitor is not None:
            if competitor(self, key_hash) == "fail":
                return False
        return super().transition(key_hash, expect, to, due_at=due_at, now=now, **fields)


def _as_hub(s: RacingStore, kh: str, to: Status, due: Any = KEEP) -> None:
    rec = RecordingStore.get(s, kh)
    assert rec is not None and s.hub is not None
    assert s.hub._move(rec, to, due=due, now=0) is not None


def _claim_it(s: RacingStore, kh: str) -> None:
    _as_hub(s, kh, Status.CLAIMED, due=100.0)


def _cancel_it(s: RacingStore, kh: str) -> None:
    _as_hub(s, kh, Status.CANCELLED)


def _delete_it(s: RacingStore, kh: str) -> None:
    s.delete(kh)


def _spurious(s: RacingStore, kh: str) -> str:
    return "fail"


@pytest.mark.parametrize(
    ("competitor", "error"),
    [(_claim_it, AlreadyResumed), (_cancel_it, SuspensionCancelled), (_delete_it, SuspensionNotFound), (_spurious, AlreadyResumed)],
)
def test_claim_loses_a_race(competitor: Any, error: type[PersistenceError], clock: FakeClock, keyring: Keyring) -> None:
    store = RacingStore()
    hub = store.hub = PersistenceHub(store, keyring=keyring, clock=clock)
    key = hub.suspend(STATE)
    store.competitor = competitor
    with pytest.raises(error) as info:
        hub.resume(key)
    assert info.value.key == fingerprint(key)


@pytest.mark.parametrize(("competitor", "error"), [(_claim_it, AlreadyResumed), (_cancel_it, None), (_delete_it, SuspensionNotFound)])
def test_cancel_loses_a_race(competitor: Any, error: type[PersistenceError] | None, clock: FakeClock, keyring: Keyring) -> None:
    store = RacingStore()
    hub = store.hub = PersistenceHub(store, keyring=keyring, clock=clock)
    key = hub.suspend(STATE)
    store.competitor = competitor
    if error is None:
        assert hub.cancel(key).status == "cancelled"  # two cancels: both fine
    else:
        with pytest.raises(error):
            hub.cancel(key)


def test_cleanup_loses_the_expiry_race(clock: FakeClock, keyring: Keyring) -> None:
    store = RacingStore()
    hub = store.hub = PersistenceHub(store, keyring=keyring, clock=clock)
    expiring = hub.suspend(STATE, ttl=10)
    clock.advance(10)
    store.competitor = _cancel_it  # cancelled just before cleanup's compare-and-set
    assert hub.cleanup() == 0
    assert store.raw(key_hash(expiring)).status is Status.CANCELLED  # type: ignore[union-attr]


def test_cleanup_loses_the_reopen_race(clock: FakeClock, keyring: Keyring) -> None:
    store = RacingStore()
    hub = store.hub = PersistenceHub(store, keyring=keyring, clock=clock)
    leased = hub.suspend(STATE, ttl=1000)
    hub.claim(leased, lease=5)
    clock.advance(6)
    # The claimer completes just before cleanup would re-open its lapsed lease.
    store.competitor = lambda s, kh: _as_hub(s, kh, Status.RESUMED, due=None)
    assert hub.cleanup() == 0
    assert store.raw(key_hash(leased)).status is Status.RESUMED  # type: ignore[union-attr]


# -- checkpoints -----------------------------------------------------------------------------------


def test_checkpoints(hub: PersistenceHub, store: RecordingStore) -> None:
    assert hub.load_checkpoint("task-1") is None
    assert hub.load_checkpoint("task-1", default={"fresh": True}) == {"fresh": True}
    hub.save_checkpoint("task-1", {"done": 1}, metadata={"task": "crunch"})
    hub.save_checkpoint("task-1", {"done": 2})
    assert hub.load_checkpoint("task-1") == {"done": 2}
    rec = hub.checkpoint_record("task-1")
    assert rec is not None and rec.kind is Kind.CHECKPOINT and rec.status is Status.ACTIVE and MARK.encode() not in rec.blob
    assert rec.key_hash == PersistenceHub.checkpoint_hash("task-1") != key_hash("task-1")
    assert hub.list().items == []  # checkpoints are not suspensions
    assert hub.delete_checkpoint("task-1") is True and hub.delete_checkpoint("task-1") is False
    assert hub.checkpoint_record("task-1") is None


def test_checkpoint_tampering(hub: PersistenceHub, store: RecordingStore) -> None:
    hub.save_checkpoint("a", {"who": "a"})
    hub.save_checkpoint("b", {"who": "b"})
    a, b = hub.checkpoint_record("a"), hub.checkpoint_record("b")
    assert a is not None and b is not None
    store.raw_put(b.replace(blob=a.blob))
    with pytest.raises((EncryptionError, IntegrityError)):
        hub.load_checkpoint("b")
    # A suspension record under a checkpoint's hash is not a checkpoint.
    store.raw_put(a.replace(kind=Kind.SUSPENSION))
    assert hub.checkpoint_record("a") is None


# -- audit and secrecy -----------------------------------------------------------------------------


def _everything(hub: PersistenceHub, clock: FakeClock) -> tuple[list[str], list[PersistenceError]]:
    """Drive every hub path, successful and failing; return the keys and errors seen."""
    errors: list[PersistenceError] = []

    def expect(fn: Callable[[], Any]) -> None:
        try:
            fn()
        except PersistenceError as exc:
            errors.append(exc)
        else:
            raise AssertionError("expected an error")

    k1 = hub.suspend(STATE, ttl=100, metadata={"flow": "f"})
    hub.load(k1)
    hub.resume(k1, INPUT)
    expect(lambda: hub.resume(k1, INPUT))
    k2 = hub.suspend(STATE)
    hub.cancel(k2)
    expect(lambda: hub.resume(k2))
    k3 = hub.suspend(STATE, ttl=5)
    k4 = hub.suspend(STATE, ttl=1000)
    hub.claim(k4, INPUT, lease=1)
    k5 = hub.suspend(STATE, ttl=5)
    clock.advance(6)
    expect(lambda: hub.resume(k3))

    def broken(s: Suspension) -> None:
        raise RuntimeError("handler down")

    hub.cleanup(on_expired=broken)
    expect(lambda: hub.load(new_suspension_key(SECRET)))
    expect(lambda: hub.load(_forge(k5)))
    store = hub.store
    rec = store.get(key_hash(k5))
    assert rec is not None
    store.put(rec.replace(metadata={"flow": "edited"}))
    expect(lambda: hub.resume(k5))
    expect(lambda: hub.suspend({"x": object(), "s": MARK}))
    expect(lambda: hub.suspend(STATE, metadata={"o": object()}))
    return [k1, k2, k3, k4, k5], errors


def test_audit_records(hub: PersistenceHub, clock: FakeClock, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="celery_persist.audit")
    keys, _ = _everything(hub, clock)
    audit = [r for r in caplog.records if r.name == "celery_persist.audit"]
    trail = [(r.persist_action, r.persist_key, r.persist_outcome) for r in audit]  # type: ignore[attr-defined]
    fp = [fingerprint(k) for k in keys]
    for entry in [
        ("suspend", fp[0], "ok"),
        ("claim", fp[0], "granted"),
        ("resume", fp[0], "ok"),
        ("resume", fp[0], "denied:AlreadyResumed"),
        ("cancel", fp[1], "ok"),
        ("resume", fp[1], "denied:SuspensionCancelled"),
        ("resume", fp[2], "denied:SuspensionExpired"),
        ("expire", fp[2], "handler-failed"),
        ("reopen", fp[3], "lease-lapsed"),
    ]:
        assert entry in trail, entry
    assert all(getattr(r, "persist_store") == hub.store.name for r in audit)
    routine = {"ok", "granted"}
    assert all(r.levelno == (logging.DEBUG if r.persist_outcome in routine else logging.INFO) for r in audit)  # type: ignore[attr-defined]


def _log_text(record: logging.LogRecord) -> str:
    return logging.Formatter("%(message)s").format(record) + repr(vars(record))


def test_logs_never_hold_keys_or_state(hub: PersistenceHub, clock: FakeClock, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    keys, _ = _everything(hub, clock)
    assert caplog.records
    for record in caplog.records:
        text = _log_text(record)
        for key in keys:
            assert key not in text and key.split(".")[1] not in text, record.getMessage()
        assert MARK not in text and "INPUT-MARKER" not in text


def test_errors_never_hold_keys_or_state_and_carry_fingerprint_and_store(hub: PersistenceHub, clock: FakeClock) -> None:
    keys, errors = _everything(hub, clock)
    assert len(errors) >= 7
    for exc in errors:
        rendered = f"{exc} {exc!r} {exc.args} {exc.key} {exc.store}"
        for key in keys:
            assert key not in rendered and key.split(".")[1] not in rendered
        assert MARK not in rendered and "INPUT-MARKER" not in rendered
        assert exc.store == hub.store.name, exc
        assert exc.key is not None and len(exc.key) == 12, exc
        back = pickle.loads(pickle.dumps(exc))
        assert (type(back), back.key, back.store, str(back)) == (type(exc), exc.key, exc.store, str(exc))
        rebuilt = type(exc)(*exc.args)
        assert type(rebuilt) is type(exc) and rebuilt.message == exc.message


# -- health / misc ---------------------------------------------------------------------------------


def test_health(hub: PersistenceHub, store: RecordingStore, keyring: Keyring, b64: Callable[[bytes], str]) -> None:
    info = hub.health()
    assert info["ok"] is True and info["store"] == store.name
    assert info["encryption"] == "aes-256-gcm" and info["key_ids"] == ["k1"] and info["signed_keys"] is True
    assert (info["codec"], info["compression"]) == ("msgpack", "zstd")
    assert SECRET not in repr(info)


def test_health_of_a_broken_store(clock: FakeClock) -> None:
    class Broken(RecordingStore):
        def scan(self, **kwargs: Any) -> Any:
            raise ConnectionError("down")

    info = PersistenceHub(Broken(), encryption="off", clock=clock).health()
    assert info["ok"] is False and info["error"] == "ConnectionError"


def test_close_and_repr(hub: PersistenceHub, store: RecordingStore) -> None:
    closed: list[bool] = []
    store.close = lambda: closed.append(True)  # type: ignore[method-assign]
    hub.close()
    assert closed == [True]
    assert repr(hub) == f"<PersistenceHub store={store.name} encryption=on>"


def test_suspension_is_frozen() -> None:
    s = Suspension(key=None, fingerprint="0" * 12)
    with pytest.raises(AttributeError):
        s.state = 1  # type: ignore[misc]
    assert s.status == "suspended" and dict(s.metadata) == {}


def test_stored_record_has_no_trace_of_the_key(hub: PersistenceHub, store: RecordingStore) -> None:
    key = hub.suspend(STATE, metadata={"flow": "x"})
    rec = store.raw(key_hash(key))
    assert rec is not None
    dump = repr(StoredRecord(rec.key_hash, rec.kind, rec.status, b"", rec.metadata, rec.created_at)) + rec.blob.hex()
    assert key not in dump and key.split(".")[1] not in dump


# -- observer, key rotation, stats -----------------------------------------------------------------


def test_observer_sees_every_audit_record(make_hub: MakeHub) -> None:
    seen: list[tuple[str, str, dict[str, Any]]] = []
    hub = make_hub(observer=lambda action, outcome, extra: seen.append((action, outcome, extra)))
    key = hub.suspend(STATE)
    hub.resume(key)
    with pytest.raises(AlreadyResumed):
        hub.resume(key)
    actions = [(a, o) for a, o, _ in seen]
    assert actions == [("suspend", "ok"), ("claim", "granted"), ("resume", "ok"), ("resume", "denied:AlreadyResumed")]
    suspend_extra = seen[0][2]
    assert suspend_extra["size"] > 0 and suspend_extra["seconds"] >= 0
    for _, _, extra in seen:
        assert MARK not in repr(extra) and key not in repr(extra)


def test_a_failing_observer_never_breaks_the_hub(make_hub: MakeHub, caplog: pytest.LogCaptureFixture) -> None:
    def broken(action: str, outcome: str, extra: dict[str, Any]) -> None:
        raise RuntimeError("metrics backend down")

    hub = make_hub(observer=broken)
    caplog.set_level(logging.WARNING, logger="celery_persist.hub")
    key = hub.suspend(STATE)
    assert hub.resume(key).state == STATE
    assert any("observer failed" in r.getMessage() for r in caplog.records)


def test_rotate_keys(store: RecordingStore, clock: FakeClock) -> None:
    # A signing secret signs keys independently of the encryption keys being rotated.
    old = PersistenceHub(store, keyring=Keyring([("old", bytes(range(32)))]), signing_secret=SECRET, clock=clock)
    keys = [old.suspend({"i": i}, metadata={"i": i}) for i in range(5)]
    old.save_checkpoint("task-1", {"c": 1})
    ring = Keyring([("new", KEY_B), ("old", bytes(range(32)))])
    hub = PersistenceHub(store, keyring=ring, signing_secret=SECRET, clock=clock)
    outcomes: list[str] = []
    counts = hub.rotate_keys(batch=2, on_record=outcomes.append)
    assert counts == {"rotated": 6, "current": 0, "raced": 0, "plaintext": 0, "unreadable": 0, "pending": 0}
    assert outcomes == ["rotated"] * 6
    only_new = PersistenceHub(store, keyring=Keyring([("new", KEY_B)]), signing_secret=SECRET, clock=clock)
    assert [only_new.load(k).state for k in keys] == [{"i": i} for i in range(5)]
    assert only_new.load_checkpoint("task-1") == {"c": 1}
    assert hub.rotate_keys()["current"] == 6


def test_rotate_keys_reports_what_it_cannot_rotate(store: RecordingStore, clock: FakeClock) -> None:
    ring = Keyring([("new", KEY_B), ("old", bytes(range(32)))])
    old = PersistenceHub(store, keyring=Keyring([("old", bytes(range(32)))]), clock=clock)
    gone = PersistenceHub(store, keyring=Keyring([("gone", bytes(32))]), clock=clock)
    plain = PersistenceHub(store, encryption="off", clock=clock)
    tampered = old.suspend(1)
    rec = store.raw(key_hash(tampered))
    assert rec is not None
    store.raw_put(rec.replace(metadata={"edited": True}))
    gone.suspend(2)
    plain.suspend(3)
    old.suspend(4)
    counts = PersistenceHub(store, keyring=ring, clock=clock).rotate_keys()
    assert counts == {"rotated": 1, "current": 0, "raced": 0, "plaintext": 1, "unreadable": 2, "pending": 3}
    with pytest.raises(EncryptionError, match="keyring"):
        plain.rotate_keys()


def test_rotate_keys_leaves_a_record_changed_meanwhile(clock: FakeClock) -> None:
    class Busy(RecordingStore):
        def replace_blob(self, key_hash: str, old_blob: bytes, new_blob: bytes, *, now: float, **fields: Any) -> bool:
            return False  # a worker rewrote the record between scan and swap

    store = Busy()
    PersistenceHub(store, keyring=Keyring([("old", bytes(range(32)))]), clock=clock).suspend(1)
    counts = PersistenceHub(store, keyring=Keyring([("new", KEY_B), ("old", bytes(range(32)))]), clock=clock).rotate_keys()
    assert counts["raced"] == 1 and counts["pending"] == 1 and counts["rotated"] == 0


def test_stats(hub: PersistenceHub, clock: FakeClock) -> None:
    first = hub.suspend(1, ttl=100)
    clock.advance(10)
    hub.suspend(2, ttl=5)
    claimed = hub.suspend(3)
    cancelled = hub.suspend(4)
    hub.claim(claimed)
    hub.cancel(cancelled)
    hub.save_checkpoint("c", 1)
    clock.advance(6)
    stats = hub.stats(batch=2)
    assert stats == {
        "suspensions": {"suspended": 1, "expired": 1, "claimed": 1, "cancelled": 1},
        "checkpoints": 1,
        "unreadable": 0,
        "oldest_suspended_age": 16.0,
    }
    assert first
    empty = PersistenceHub(RecordingStore(), encryption="off", clock=clock).stats()
    assert empty == {"suspensions": {}, "checkpoints": 0, "unreadable": 0, "oldest_suspended_age": None}


def test_maintenance_works_on_a_hub(hub: PersistenceHub, store: RecordingStore, clock: FakeClock) -> None:
    """The hub's cleanup / rotate_keys / stats are thin: maintenance does the work with the hub's pieces."""
    hub.suspend(1, ttl=5)
    hub.save_checkpoint("c", 1, ttl=5)
    assert (
        maintenance.stats(hub)
        == hub.stats()
        == {"suspensions": {"suspended": 1}, "checkpoints": 1, "unreadable": 0, "oldest_suspended_age": 0.0}
    )
    assert maintenance.rotate_keys(hub)["current"] == 2
    clock.advance(6)
    got: list[Suspension] = []
    assert maintenance.cleanup(hub, on_expired=got.append) == 2  # one expired, one checkpoint deleted
    assert [s.state for s in got] == [1] and store.suspensions()[0].status is Status.EXPIRED
    assert hub.cleanup() == 0


def test_keys_are_signed_with_the_keyring_when_no_secret_is_set(store: RecordingStore, clock: FakeClock) -> None:
    old_ring = Keyring([("old", bytes(range(32)))])
    hub = PersistenceHub(store, keyring=old_ring, clock=clock)
    key = hub.suspend(1)
    assert key.count(".") == 2  # p1.<body>.<tag>: signed with a secret derived from the keyring
    with pytest.raises(InvalidKey):
        hub.load(key.rsplit(".", 1)[0])  # the unsigned form is refused before any store read
    rotated = PersistenceHub(store, keyring=Keyring([("new", KEY_B), ("old", bytes(range(32)))]), clock=clock)
    assert rotated.load(key).state == 1  # keys issued under a key still in the ring verify
    retired = PersistenceHub(store, keyring=Keyring([("new", KEY_B)]), clock=clock)
    with pytest.raises(InvalidKey):
        retired.load(key)  # ... and no longer once that key is retired (README: rotation)


def test_derived_keys_come_back_only_with_the_secret(store: RecordingStore, clock: FakeClock) -> None:
    ring = Keyring([("k", bytes(range(32)))])
    hub = PersistenceHub(store, keyring=ring, clock=clock)
    key = hub.new_key(b"await:task-1", 1_700_000_000_000)
    assert hub.derived_key(b"await:task-1", 1_700_000_000_000) == key
    assert hub.new_key(b"await:task-2", 1_700_000_000_000) != key
    other = PersistenceHub(store, keyring=Keyring([("k", KEY_B)]), clock=clock)
    assert other.derived_key(b"await:task-1", 1_700_000_000_000) != key
    assert PersistenceHub(store, encryption="off", clock=clock).derived_key(b"await:task-1", 1) is None


def test_reissue_moves_a_suspension_to_a_new_key(store: RecordingStore, clock: FakeClock) -> None:
    hub = PersistenceHub(store, encryption="off", clock=clock)
    old = hub.suspend({"x": 1}, ttl=60, metadata={"m": 1})
    new = hub.reissue(key_hash(old))
    assert new != old
    with pytest.raises(SuspensionCancelled):
        hub.resume(old)
    resumed = hub.resume(new)
    assert resumed.state == {"x": 1} and resumed.metadata == {"m": 1}
    with pytest.raises(AlreadyResumed):
        hub.reissue(key_hash(new))  # nothing new is written for a finished suspension


@pytest.mark.parametrize("ttl", [float("inf"), float("nan"), 1e300, -1, "soon"])
def test_an_impossible_ttl_is_refused_before_anything_is_written(hub: PersistenceHub, store: RecordingStore, ttl: Any) -> None:
    store.calls.clear()
    with pytest.raises(ConfigurationError, match="ttl"):
        hub.suspend(STATE, ttl=ttl)
    with pytest.raises(ConfigurationError, match="ttl"):
        hub.save_checkpoint("c", STATE, ttl=ttl)
    assert store.calls == []
    assert hub.list().items == []


def test_complete_after_a_claim_in_this_process_needs_no_read(keyring: Keyring) -> None:
    store = open_store("memory://")
    hub = PersistenceHub(store, keyring=keyring)
    key = hub.suspend(STATE)
    reads: list[str] = []
    original = store.get
    store.get = lambda kh: reads.append(kh) or original(kh)  # type: ignore[method-assign]
    claimed = hub.claim(key, 1)
    assert claimed.claim_token is not None
    hub.complete(key, token=claimed.claim_token)
    assert len(reads) == 1  # the claim's read only: complete is one compare-and-set
    assert hub.load(key).status == "resumed"
    hub.complete(key, token=claimed.claim_token)  # a retried complete still succeeds (it reads then)
    other = hub.suspend(STATE)
    stale = hub.claim(other, 1)
    hub.release(other, token=stale.claim_token or 0)
    hub.claim(other, 2)  # claimed again elsewhere: the old token no longer completes
    with pytest.raises(AlreadyResumed):
        hub.complete(other, token=stale.claim_token or 0)
