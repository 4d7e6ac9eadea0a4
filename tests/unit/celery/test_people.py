"""Typed input, approvals, resume links and history, through a real in-thread worker."""

from __future__ import annotations

import time
from typing import Any

import pydantic
import pytest
from celery import chain

from celery_persist import AlreadyResumed, ConfigurationError, InvalidInput, InvalidKey, SuspensionExpired
from celery_persist.keys import key_hash

pytestmark = pytest.mark.usefixtures("persist_worker")


class Decision(pydantic.BaseModel):
    approved: bool
    comment: str = ""
    amount: int = pydantic.Field(default=0, ge=0, le=1000)


def _flow(persist_app: Any, **kwargs: Any) -> Any:
    await_input = persist_app.tasks["celery_persist.await_input"]
    # sleep(seconds=0) passes its input on at once: the flow's result is what the resume gave.
    return chain(await_input.s(prompt="Ship order 42?", **kwargs), persist_app.signature("celery_persist.sleep", kwargs={"seconds": 0}))


def test_a_pydantic_schema_travels_as_json_schema_and_refuses_bad_input_before_any_claim(
    persist_app: Any, persist: Any, wait_suspended: Any
) -> None:
    res = _flow(persist_app, schema=Decision).apply_async()
    key = wait_suspended(res)
    assert persist.load(key).metadata["schema"]["properties"]["approved"]["type"] == "boolean"
    with pytest.raises(InvalidInput) as bad:
        persist.resume(key, {"comment": 3, "amount": 5000, "extra": True})
    locs = {tuple(e["loc"]): e["msg"] for e in bad.value.errors}
    assert locs[("approved",)] == "field required"
    assert locs[("comment",)] == "must be of type string" and locs[("amount",)] == "must be <= 1000"
    assert persist.load(key).status == "suspended"  # nothing claimed: the same key still works
    assert persist.resume(key, {"approved": True, "amount": 12}) is not None
    assert res.get(timeout=10) == {"approved": True, "amount": 12}  # the next step gets the data as JSON
    events = [h["event"] for h in persist.describe(key_hash(key)[:12])["history"]]
    assert events == ["suspended", "denied", "resumed"]


def test_a_json_schema_dict_and_unknown_fields(persist_app: Any, persist: Any, wait_suspended: Any) -> None:
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": False}
    key = wait_suspended(_flow(persist_app, schema=schema).apply_async())
    with pytest.raises(InvalidInput) as bad:
        persist.resume(key, {"ok": True, "sneaky": 1})
    assert bad.value.errors == [{"loc": ["sneaky"], "msg": "unknown field"}]
    with pytest.raises(ConfigurationError, match="not a valid JSON Schema"):
        _flow(persist_app, schema={"type": "no-such-type"})


def test_three_of_five_approvers(persist_app: Any, persist: Any, wait_suspended: Any) -> None:
    res = _flow(persist_app, approvals=3, approvers=["ann", "bob", "cy", "dee", "eve"]).apply_async()
    key = wait_suspended(res)
    assert persist.resume(key, {"ok": 1}, by="ann") is None
    with pytest.raises(AlreadyResumed, match="already approved"):
        persist.resume(key, {"ok": 2}, by="ann")
    with pytest.raises(InvalidInput, match="not one of the suspension's approvers"):
        persist.resume(key, {"ok": 3}, by="mallory")
    with pytest.raises(InvalidInput, match="by="):
        persist.resume(key, {"ok": 4})
    assert persist.resume(key, {"ok": 5}, by="cy") is None
    described = persist.describe(key_hash(key))
    assert [a["by"] for a in described["approvals"]["done"]] == ["ann", "cy"] and described["approvals"]["needed"] == 3
    assert persist.resume(key, {"ok": 6}, by="bob") is not None
    assert res.get(timeout=10) == [{"by": "ann", "input": {"ok": 1}}, {"by": "cy", "input": {"ok": 5}}, {"by": "bob", "input": {"ok": 6}}]
    with pytest.raises(AlreadyResumed):
        persist.resume(key, {"ok": 7}, by="dee")
    assert len(persist.hub.approvals(key_hash(key))) == 3


def test_bad_approvals_settings_are_refused(persist_app: Any) -> None:
    for kwargs, match in (
        ({"approvals": 0}, "positive"),
        ({"approvals": 3, "approvers": ["a", "b"]}, "never be reached"),
        ({"approvers": ["a", "a"]}, "twice"),
    ):
        res = _flow(persist_app, **kwargs).apply_async()
        with pytest.raises(ConfigurationError, match=match):
            res.get(timeout=10)


def test_resume_links_work_once_expire_and_refuse_tampering(persist_app: Any, persist: Any, wait_suspended: Any) -> None:
    res = _flow(persist_app).apply_async()
    key = wait_suspended(res)
    url = persist.resume_url(key, ttl=600, base_url="https://ops.example")
    assert url.startswith("https://ops.example/link/l1.") and key not in url
    token = url.rsplit("/", 1)[1]
    info = persist.link_info(token)
    assert info["prompt"] == "Ship order 42?" and info["fingerprint"] == key_hash(key)[:12]
    assert persist.resume_link(token, {"yes": True}) is not None
    assert res.get(timeout=10) == {"yes": True}
    with pytest.raises(AlreadyResumed):
        persist.resume_link(token, {"again": True})
    tampered = token[:-2] + ("A" if token[-2] != "A" else "B") + token[-1]
    with pytest.raises(InvalidKey):
        persist.link_info(tampered)
    other = wait_suspended(_flow(persist_app).apply_async())
    expiring = persist.resume_url(other, ttl=0.2).rsplit("/", 1)[1]
    time.sleep(0.3)  # the link's own expiry is the thing under test
    with pytest.raises(SuspensionExpired, match="link has expired"):
        persist.resume_link(expiring, 1)
    assert persist.load(other).status == "suspended"


def test_links_for_approvals_are_bound_to_one_approver(persist_app: Any, persist: Any, wait_suspended: Any) -> None:
    key = wait_suspended(_flow(persist_app, approvals=2, approvers=["ann", "bob"]).apply_async())
    with pytest.raises(ConfigurationError, match="bind each link"):
        persist.resume_url(key)
    ann = persist.resume_url(key, by="ann").rsplit("/", 1)[1]
    assert persist.link_info(ann)["by"] == "ann"
    with pytest.raises(InvalidInput, match="another approver"):
        persist.resume_link(ann, 1, by="bob")
    assert persist.resume_link(ann, {"ok": True}) is None
    with pytest.raises(AlreadyResumed):
        persist.link_info(ann)  # used: its approver has approved
    with pytest.raises(AlreadyResumed):
        persist.resume_link(ann, {"ok": True})


def test_resume_and_cancel_by_hash_and_the_inbox(persist_app: Any, persist: Any, wait_suspended: Any) -> None:
    first = _flow(persist_app).apply_async()
    key = wait_suspended(first)
    second_key = wait_suspended(_flow(persist_app, schema={"type": "integer"}).apply_async())
    items, _ = persist.inbox(text="order 42")
    assert {i["key_hash"] for i in items} >= {key_hash(key), key_hash(second_key)}
    with pytest.raises(InvalidInput):
        persist.resume_by_hash(key_hash(second_key), "not a number")
    assert persist.resume_by_hash(key_hash(key), "by hash") is not None
    assert first.get(timeout=10) == "by hash"
    persist.cancel_by_hash(key_hash(second_key))
    assert persist.describe(key_hash(second_key)[:8])["status"] == "cancelled"
    assert [h["event"] for h in persist.describe(key_hash(second_key))["history"]][-1] == "cancelled"
