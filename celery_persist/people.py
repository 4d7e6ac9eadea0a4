"""People in the loop: resume links, resuming by fingerprint, and what the inbox shows.

Typed input and approvals are checked where every resume passes, in the hub
(:meth:`~celery_persist.hub.PersistenceHub.claim`): a schema refuses an input
before any claim, and a suspension that waits for N approvals records one per
identity with a compare-and-set, the N-th sending the flow on. This module
adds what needs the Celery layer on top:

* **Resume links** (:func:`resume_url`, :func:`link_info`, :func:`resume_link`):
  a token that seals the key with a keyring-derived secret, expires, can be
  bound to one approver, and works once (the resume spends the suspension, or
  that approver's turn). Logs name a link by :func:`~celery_persist.hub.link_fingerprint`.
* **Resume by key hash** (:func:`resume_by_hash`): for the inbox, whose users
  hold the web bearer token but never see keys. The key is derived again from
  the suspension's park journal (as a redelivered park does), so no key is stored.
* **Descriptions** (:func:`describe`, :func:`inbox`): a suspension's prompt,
  schema, approvals so far and audit history, as plain JSON-able dicts.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from .errors import AlreadyResumed, ConfigurationError, InvalidInput, SuspensionCancelled, SuspensionExpired, SuspensionNotFound
from .flow import key_of, resume, revoke_flow
from .hub import PersistenceHub, Suspension, link_fingerprint
from .keys import key_hash
from .registry import Binding
from .stores.base import Kind

if TYPE_CHECKING:
    from celery.result import AsyncResult

__all__ = ["resume_url", "link_info", "resume_link", "resume_by_hash", "cancel_by_hash", "describe", "inbox", "resolve", "link_fingerprint"]

#: The fewest hex characters accepted as a fingerprint prefix.
MIN_PREFIX = 6


def resolve(hub: PersistenceHub, fingerprint: str) -> str:
    """The key hash of the one suspension whose hash starts with ``fingerprint`` (>= 6 hex characters).

    Raises:
        SuspensionNotFound: None does.
        ConfigurationError: Not hex, too short, or more than one matches.
    """
    prefix = fingerprint.strip().lower()
    if len(prefix) < MIN_PREFIX or len(prefix) > 64 or any(c not in "0123456789abcdef" for c in prefix):
        raise ConfigurationError(f"a fingerprint is {MIN_PREFIX} to 64 hex characters")
    if len(prefix) == 64:
        return prefix
    start = int(prefix, 16)
    cursor = None if start == 0 else format(start - 1, f"0{len(prefix)}x") + "f" * (64 - len(prefix))
    page = hub.store.scan(kind=Kind.SUSPENSION, limit=2, cursor=cursor)
    matches = [r.key_hash for r in page.items if r.key_hash.startswith(prefix)]
    if not matches:
        raise SuspensionNotFound("no suspension has this fingerprint", key=prefix[:12], store=hub.store.name)
    if len(matches) > 1:
        raise ConfigurationError(f"fingerprint {prefix} is ambiguous: give more characters")
    return str(matches[0])


def _peek(hub: PersistenceHub, kh: str) -> Suspension:
    found = hub.peek(kh)
    if found is None:
        raise SuspensionNotFound("no suspension is stored under this key hash", key=kh[:12], store=hub.store.name)
    return found


def _refuse_status(s: Suspension) -> None:
    if s.status in ("claimed", "resumed"):
        raise AlreadyResumed("this suspension was already resumed", key=s.fingerprint)
    if s.status == "cancelled":
        raise SuspensionCancelled("this suspension was cancelled", key=s.fingerprint)
    if s.status == "expired":
        raise SuspensionExpired("this suspension expired before it was resumed", key=s.fingerprint)


def resume_url(binding: Binding, key: str, *, ttl: float | None = None, base_url: str | None = None, by: str | None = None) -> str:
    """A signed, expiring, single-use link that resumes ``key`` through ``celery persist serve``.

    Raises:
        ConfigurationError: No key or secret to seal links with; or a suspension
            that waits for several approvals and a link not bound to one approver.
        InvalidKey, SuspensionNotFound: A bad or unknown key.
    """
    hub = binding.ready()
    s = _peek(hub, key_hash(hub.unwrap_key(key)))
    needs_by = s.metadata.get("approvals") not in (None, 1) or s.metadata.get("approvers") is not None
    if needs_by and not by:
        raise ConfigurationError("this suspension waits for approvals: bind each link to one approver with by=")
    approvers = s.metadata.get("approvers")
    if by and isinstance(approvers, list) and by not in approvers:
        raise ConfigurationError("by= is not one of the suspension's approvers")
    token = hub.link_token(key, ttl=binding.config.link_ttl if ttl is None else ttl, by=by)
    base = (base_url or binding.config.web_base_url).rstrip("/")
    return f"{base}/link/{quote(token, safe='')}"


def _approvals(hub: PersistenceHub, s: Suspension) -> dict[str, Any] | None:
    md = s.metadata
    if md.get("approvals") is None and md.get("approvers") is None:
        return None
    done = hub.approvals(s.key_hash) if s.key_hash else []
    return {
        "needed": md.get("approvals", 1),
        "approvers": md.get("approvers"),
        "done": [{"by": a.get("by"), "at": _iso(a.get("at"))} for a in done],
    }


def _iso(ts: Any) -> str | None:
    if isinstance(ts, datetime):
        return ts.isoformat()
    if isinstance(ts, int | float):
        return datetime.fromtimestamp(ts, tz=timezone.utc).isoformat()
    return None


def _summary(hub: PersistenceHub, s: Suspension) -> dict[str, Any]:
    md: Mapping[str, Any] = s.metadata
    return {
        "fingerprint": s.fingerprint,
        "key_hash": s.key_hash,
        "status": s.status,
        "wait": md.get("wait", "input"),
        "prompt": md.get("prompt"),
        "schema": md.get("schema"),
        "task": md.get("task"),
        "wake_at": md.get("wake_at"),
        "topic": md.get("topic"),
        "event_key": md.get("event_key"),
        "created_at": _iso(s.created_at),
        "expires_at": _iso(s.expires_at),
        "approvals": _approvals(hub, s),
    }


def describe(binding: Binding, fingerprint: str, *, history: bool = True) -> dict[str, Any]:
    """A suspension's prompt, schema, approvals so far and (with ``history``) its audit history."""
    hub = binding.ready()
    kh = resolve(hub, fingerprint)
    out = _summary(hub, _peek(hub, kh))
    if history:
        out["history"] = [
            {"at": _iso(h.get("at")), "event": h.get("event"), "by": h.get("by"), "reason": h.get("reason")} for h in hub.history_of(kh)
        ]
    return out


def inbox(
    binding: Binding,
    *,
    status: str | None = "suspended",
    text: str | None = None,
    wait: str | None = None,
    limit: int = 50,
    cursor: str | None = None,
) -> tuple[list[dict[str, Any]], str | None]:
    """One page of suspensions for the inbox, filtered by status, text (prompt or task) and wait kind."""
    hub = binding.ready()
    needle = (text or "").strip().lower()
    items: list[dict[str, Any]] = []
    # Filters apply after the store's page: read pages until this one is full (bounded).
    for _ in range(50):
        page = hub.list(status=status or None, limit=max(limit, 1) * 2, cursor=cursor)
        for s in page.items:
            if wait and s.metadata.get("wait", "input") != wait:
                continue
            if needle and needle not in f"{s.metadata.get('prompt') or ''} {s.metadata.get('task') or ''}".lower():
                continue
            items.append(_summary(hub, s))
            if len(items) == limit:
                return items, s.key_hash
        cursor = page.next_cursor
        if cursor is None:
            break
    return items, cursor


def link_info(binding: Binding, token: str) -> dict[str, Any]:
    """What a resume-link page shows: the suspension's prompt, schema, approvals, and whom the link is for.

    Raises:
        InvalidKey: A tampered or foreign token. SuspensionExpired: The link or
        the suspension expired. AlreadyResumed: Used already (or that approver
        approved). SuspensionCancelled, SuspensionNotFound.
    """
    hub = binding.ready()
    key, by, expires = hub.open_link(token)
    s = _peek(hub, key_hash(key))
    _refuse_status(s)
    out = _summary(hub, s)
    approvals = out.get("approvals")
    if by and approvals and any(a.get("by") == by for a in approvals["done"]):
        raise AlreadyResumed("this link was used: its approver has approved", key=s.fingerprint)
    out.update(by=by, link=link_fingerprint(token), link_expires_at=_iso(expires))
    return out


def resume_link(binding: Binding, token: str, input: Any = None, *, by: str | None = None) -> AsyncResult | None:
    """Resume through a link: its approver (if bound) is the one who approves.

    Raises:
        InvalidInput: ``by`` given and not the link's approver, or an input the schema refuses.
        And what :func:`link_info` raises.
    """
    hub = binding.ready()
    key, bound, _ = hub.open_link(token)
    if bound and by and by != bound:
        raise InvalidInput("this link is for another approver", errors=[{"loc": ["by"], "msg": "not this link's approver"}])
    return resume(binding, key, input, by=bound or by)


def resume_by_hash(binding: Binding, kh: str, input: Any = None, *, by: str | None = None) -> AsyncResult | None:
    """Resume the suspension stored under key hash ``kh`` (for the keys' holder: the inbox server).

    Raises:
        SuspensionNotFound: No such suspension, or one parked without a journal
            (made with the hub directly). And what ``Persist.resume`` raises.
    """
    hub = binding.ready()
    s = _peek(hub, kh)
    journal_name = s.metadata.get("journal")
    _refuse_status(s)
    key = key_of(hub, journal_name, binding.config.checkpoint_ttl) if isinstance(journal_name, str) else None
    if key is None:
        raise SuspensionNotFound("this suspension cannot be resumed without its key", key=kh[:12], store=hub.store.name)
    return resume(binding, key, input, by=by)


def cancel_by_hash(binding: Binding, kh: str) -> Suspension:
    """Cancel the suspension under key hash ``kh`` and mark its flow REVOKED."""
    suspension = binding.ready().cancel_by_hash(kh)
    revoke_flow(binding, suspension)
    return suspension
