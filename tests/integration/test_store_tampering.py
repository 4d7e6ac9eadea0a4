"""A store writer without the keys, on every real store: what it edits is refused, nothing changes.

The writer uses the store's own API (exactly what anyone with write access to the
database can do: change a status, a time, a blob), never the hub's secrets. Each
edit below went through unnoticed on 0.1: a resumed suspension revived and
resumed a second time, an expired one re-opened, an expiry extended, a
checkpoint rolled back to an older blob.
"""

from __future__ import annotations

import os
import time
from typing import Any

import pytest

from celery_persist import IntegrityError, Keyring, PersistenceHub
from celery_persist.errors import AlreadyResumed, EncryptionError
from celery_persist.keys import key_hash
from celery_persist.stores import BaseStore
from celery_persist.stores.base import Kind, Status

pytestmark = pytest.mark.integration


@pytest.fixture
def hub(store: BaseStore) -> PersistenceHub:
    return PersistenceHub(store, keyring=Keyring([("k", os.urandom(32))]))


def _edit(store: BaseStore, kh: str, **changes: Any) -> None:
    rec = store.get(kh)
    assert rec is not None
    store.put(rec.replace(**changes))


def test_a_revived_resumed_suspension_is_refused(hub: PersistenceHub, store: BaseStore) -> None:
    key = hub.suspend({"order": 1}, ttl=600)
    hub.resume(key, "first")
    kh = key_hash(key)
    assert store.transition(kh, {Status.RESUMED}, Status.SUSPENDED, due_at=time.time() + 600, now=time.time())
    before = store.get(kh)
    with pytest.raises(IntegrityError):
        hub.resume(key, "second")
    assert store.get(kh) == before  # refused, and nothing changed


def test_a_reopened_expired_suspension_is_refused(hub: PersistenceHub, store: BaseStore) -> None:
    key = hub.suspend({"order": 2}, ttl=600)
    kh = key_hash(key)
    assert hub.cleanup(now=time.time() + 601) == 1
    assert store.get(kh).status is Status.EXPIRED  # type: ignore[union-attr]
    _edit(store, kh, status=Status.SUSPENDED, expires_at=time.time() + 86400, due_at=time.time() + 86400)
    with pytest.raises(IntegrityError):
        hub.resume(key)


def test_an_extended_expiry_is_refused(hub: PersistenceHub, store: BaseStore) -> None:
    key = hub.suspend({"order": 3}, ttl=60)
    _edit(store, key_hash(key), expires_at=time.time() + 10**7, due_at=time.time() + 10**7)
    with pytest.raises(IntegrityError):
        hub.load(key)
    with pytest.raises(IntegrityError):
        hub.resume(key)


def test_a_checkpoint_rolled_back_to_an_older_blob_is_refused(hub: PersistenceHub, store: BaseStore) -> None:
    hub.save_checkpoint("job-1", {"done": 1})
    kh = hub.checkpoint_hash("job-1")
    older = store.get(kh)
    assert older is not None
    hub.save_checkpoint("job-1", {"done": 2})
    _edit(store, kh, blob=older.blob)  # the older blob opens (same record), but is not this record's
    with pytest.raises(IntegrityError):
        hub.load_checkpoint("job-1")


def test_cleanup_skips_a_tampered_record_and_handles_the_rest(hub: PersistenceHub, store: BaseStore) -> None:
    good = hub.suspend({"ok": True}, ttl=60)
    bad = hub.suspend({"ok": False}, ttl=60)
    _edit(store, key_hash(bad), status=Status.RESUMED)  # would make cleanup delete a live flow
    assert hub.cleanup(now=time.time() + 61) == 2  # one expired, one quarantined
    assert store.get(key_hash(good)).status is Status.EXPIRED  # type: ignore[union-attr]
    kept = store.get(key_hash(bad))
    assert kept is not None and kept.status is Status.RESUMED and kept.due_at is None  # not deleted: set aside
    assert hub.cleanup(now=time.time() + 10**6) == 1  # later runs see only the good record (now past retention)


def test_cancel_acts_only_on_authenticated_state(hub: PersistenceHub, store: BaseStore) -> None:
    key = hub.suspend({"task_id": "mine", "chain": []}, metadata={"task_id": "mine", "chain_ids": ["mine-next"]})
    _edit(store, key_hash(key), metadata={"task_id": "someone-elses", "chain_ids": ["victim"]})
    before = store.get(key_hash(key))
    with pytest.raises(EncryptionError):
        hub.cancel(key)
    assert store.get(key_hash(key)) == before


def test_only_the_claim_holder_completes(hub: PersistenceHub, store: BaseStore) -> None:
    key = hub.suspend({"x": 1}, ttl=600)
    first = hub.claim(key, lease=5)
    assert first.claim_token is not None
    assert hub.cleanup(now=time.time() + 6) == 1  # as cleanup would, once the lease lapsed: re-open it
    second = hub.claim(key)
    with pytest.raises(AlreadyResumed):
        hub.complete(key, token=first.claim_token)
    hub.release(key, token=first.claim_token)  # a stale release leaves the new claim alone
    assert store.get(key_hash(key)).status is Status.CLAIMED  # type: ignore[union-attr]
    assert second.claim_token is not None
    hub.complete(key, token=second.claim_token)
    assert store.get(key_hash(key)).status is Status.RESUMED  # type: ignore[union-attr]


def test_untouched_records_still_work_everywhere(hub: PersistenceHub, store: BaseStore) -> None:
    key = hub.suspend({"x": 1}, ttl=600)
    with hub.claiming(key, "in") as s:
        assert s.state == {"x": 1}
    assert store.get(key_hash(key)).kind is Kind.SUSPENSION  # type: ignore[union-attr]
    assert hub.load(key).status == "resumed"
