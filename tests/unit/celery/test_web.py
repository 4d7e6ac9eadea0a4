"""``celery persist serve``: the inbox, resume links and the JSON API, against a real Persist and worker.

Starlette's TestClient drives :func:`celery_persist.web.create_app` over the
plugin's ``persist_app`` (memory store, fresh key) with its in-thread worker,
so every resume goes through the real core: schema checks, approvals, claims.
"""

from __future__ import annotations

import asyncio
import logging
import re
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from typing import Any, Literal

import httpx
import pydantic
import pytest
from celery import chain
from starlette.applications import Starlette
from starlette.exceptions import StarletteDeprecationWarning
from starlette.routing import Mount

with warnings.catch_warnings():
    # Starlette 1.x prefers the httpx2 fork for its TestClient; the test dependencies pin httpx, which it still drives.
    warnings.simplefilter("ignore", StarletteDeprecationWarning)
    from starlette.testclient import TestClient

from celery_persist import StoreUnavailable
from celery_persist.hub import link_fingerprint
from celery_persist.keys import key_hash
from celery_persist.web import create_app
from celery_persist.web.app import MAX_BODY, SESSION_COOKIE
from celery_persist.web.forms import build_form, errors_by_field, parse_form

pytestmark = pytest.mark.usefixtures("persist_worker")

TOKEN = "t0ken-for-the-web-tests-0123456789"
BEARER = {"Authorization": f"Bearer {TOKEN}"}
_CSRF = re.compile(r'name="csrf" value="([^"]*)"')


class Address(pydantic.BaseModel):
    city: str = pydantic.Field(max_length=40)


class Decision(pydantic.BaseModel):
    approved: bool
    comment: str = pydantic.Field(default="", max_length=100)
    amount: int = pydantic.Field(default=0, ge=0, le=1000)
    priority: Literal["low", "high"] = "low"
    region: Literal["eu", "us", "apac", "latam", "mea"] | None = None
    code: str = pydantic.Field(default="", pattern=r"^[A-Z]{3}$")
    address: Address | None = None


@pytest.fixture
def persist_config(persist_config: dict[str, Any]) -> dict[str, Any]:
    return {**persist_config, "persist_web_tokens": [TOKEN], "persist_web_base_url": "http://testserver"}


@pytest.fixture
def client(persist: Any) -> Iterator[TestClient]:
    with TestClient(create_app(persist), follow_redirects=False) as c:
        yield c


def _flow(persist_app: Any, prompt: str = "Ship order 42?", **kwargs: Any) -> Any:
    await_input = persist_app.tasks["celery_persist.await_input"]
    # sleep(seconds=0) passes its input on at once: the flow's result is what the resume gave.
    return chain(await_input.s(prompt=prompt, **kwargs), persist_app.signature("celery_persist.sleep", kwargs={"seconds": 0}))


def _park(persist_app: Any, wait_suspended: Any, **kwargs: Any) -> tuple[Any, str, str]:
    """``(result, key, fingerprint)`` of a flow parked in ``await_input``."""
    res = _flow(persist_app, **kwargs).apply_async()
    key = wait_suspended(res)
    return res, key, key_hash(key)[:12]


def _login(client: TestClient) -> str:
    """Sign the client in; returns the session's CSRF token."""
    page = client.get("/login")
    client.post("/login", data={"token": TOKEN, "csrf": _CSRF.search(page.text).group(1), "next": "/"})  # type: ignore[union-attr]
    home = client.get("/")
    assert home.status_code == 200
    return _CSRF.search(home.text).group(1)  # type: ignore[union-attr]


# -- access ------------------------------------------------------------------------------------------


def test_strangers_are_sent_to_login_or_refused(client: TestClient) -> None:
    page = client.get("/?status=any")
    assert page.status_code == 303 and page.headers["location"] == "/login?next=%2F%3Fstatus%3Dany"
    api = client.get("/api/suspensions")
    assert api.status_code == 401 and api.headers["www-authenticate"].startswith("Bearer")
    assert api.json()["error"] == "Unauthorized"
    assert client.get("/api/suspensions", headers={"Authorization": "Bearer wrong-token-0123456789"}).status_code == 401
    assert client.get("/api/suspensions", headers={"Authorization": f"Basic {TOKEN}"}).status_code == 401
    posted = client.post("/s/abcdef123456/resume", data={"in/approved": "on"})
    assert posted.status_code == 401 and "Sign in" in posted.text
    assert client.get("/api/suspensions", headers=BEARER).status_code == 200
    assert client.get("/", headers=BEARER).status_code == 200


def test_login_opens_a_signed_strict_session_and_posts_need_its_csrf_token(
    client: TestClient, persist_app: Any, wait_suspended: Any, persist: Any
) -> None:
    page = client.get("/login?next=/s/abc")
    csrf = _CSRF.search(page.text).group(1)  # type: ignore[union-attr]
    assert client.post("/login", data={"token": "nope", "csrf": csrf, "next": "/"}).status_code == 401
    assert client.post("/login", data={"token": TOKEN, "csrf": "forged", "next": "/"}).status_code == 403
    page = client.get("/login")
    csrf = _CSRF.search(page.text).group(1)  # type: ignore[union-attr]
    done = client.post("/login", data={"token": TOKEN, "csrf": csrf, "next": "//evil.example/"})
    assert done.status_code == 303 and done.headers["location"] == "/"  # never off-site
    cookie = next(v for k, v in done.headers.multi_items() if k == "set-cookie" and v.startswith(SESSION_COOKIE))
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie.replace("Strict", "strict") and TOKEN not in cookie
    session_csrf = _CSRF.search(client.get("/").text).group(1)  # type: ignore[union-attr]

    _res, _key, fp = _park(persist_app, wait_suspended)
    refused = client.post(f"/s/{fp}/resume", data={"in": "1"})
    assert refused.status_code == 403 and "expired" in refused.text
    assert client.post(f"/s/{fp}/cancel", data={"csrf": "x" * 32}).status_code == 403
    api = client.post("/api/suspensions/" + fp + "/cancel")
    assert api.status_code == 403  # the cookie alone does not do for the API's POSTs
    assert persist.describe(fp)["status"] == "suspended"
    ok = client.post(f"/api/suspensions/{fp}/cancel", headers={"X-CSRF-Token": session_csrf})
    assert ok.status_code == 200 and ok.json()["status"] == "cancelled"

    client.cookies.set(SESSION_COOKIE, "9999999999.abc.forged")
    assert client.get("/").status_code == 303


def test_logout_ends_the_session(client: TestClient) -> None:
    csrf = _login(client)
    out = client.post("/logout", data={"csrf": csrf})
    assert out.status_code == 303
    client.cookies.clear()  # what the browser does with the expired cookie
    assert client.get("/").status_code == 303


def test_no_tokens_means_no_inbox(persist: Any) -> None:
    with TestClient(create_app(persist, tokens=()), follow_redirects=False) as c:
        assert c.get("/api/suspensions", headers=BEARER).status_code == 401
        assert "No tokens are configured" in c.get("/login").text


# -- the inbox and the suspension page ------------------------------------------------------------------


def test_the_inbox_escapes_prompts_and_filters(client: TestClient, persist_app: Any, wait_suspended: Any) -> None:
    _park(persist_app, wait_suspended, prompt="<script>alert(1)</script>")
    _park(persist_app, wait_suspended, prompt="Refund order 7", approvals=2, approvers=["ann", "bob"])
    page = client.get("/", headers=BEARER)
    assert page.status_code == 200
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page.text and "<script>alert(1)" not in page.text
    assert "Refund order 7" in page.text and "0 of 2" in page.text and "celery_persist.await_input" in page.text
    only = client.get("/?q=refund", headers=BEARER).text
    assert "Refund order 7" in only and "alert(1)" not in only
    assert "Nothing here" in client.get("/?kind=timer", headers=BEARER).text
    persist_app.signature("celery_persist.sleep", args=[None], kwargs={"seconds": 3600}).apply_async()
    deadline = time.monotonic() + 10
    while "wakes in" not in (timers := client.get("/?kind=timer", headers=BEARER).text) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "wakes in 1 h" in timers and "Refund order 7" not in timers
    assert client.get("/?status=bogus", headers=BEARER).status_code == 400
    headers = page.headers
    assert "default-src 'none'" in headers["content-security-policy"] and headers["referrer-policy"] == "no-referrer"
    assert headers["cache-control"] == "no-store" and headers["x-content-type-options"] == "nosniff"


def test_the_inbox_pages_with_a_cursor(client: TestClient, persist: Any) -> None:
    hub = persist.ready()
    for i in range(55):
        hub.suspend({"n": i}, metadata={"prompt": f"bulk {i}", "task": "bulk.task", "wait": "input"})
    first = client.get("/?q=bulk", headers=BEARER)
    assert first.text.count("bulk.task") == 50
    next_url = re.search(r'href="(/\?[^"]*cursor=[^"]+)"', first.text).group(1).replace("&amp;", "&")  # type: ignore[union-attr]
    second = client.get(next_url, headers=BEARER)
    assert second.text.count("bulk.task") == 5 and "First page" in second.text and "Next" not in second.text
    api = client.get("/api/suspensions?limit=20&q=bulk", headers=BEARER).json()
    assert len(api["items"]) == 20 and api["next_cursor"]
    assert client.get("/api/suspensions?limit=0", headers=BEARER).status_code == 400
    assert client.get("/api/suspensions?status=nope", headers=BEARER).status_code == 400


def test_the_form_follows_the_schema(client: TestClient, persist_app: Any, wait_suspended: Any) -> None:
    _res, _key, fp = _park(persist_app, wait_suspended, schema=Decision)
    page = client.get(f"/s/{fp}", headers=BEARER)
    html = page.text
    assert page.status_code == 200
    assert 'type="checkbox" name="in/approved"' in html
    assert re.search(r'<input name="in/amount"[^>]* type="number" step="1" min="0" max="1000"', html)
    assert 'type="radio" name="in/priority" value="&#34;low&#34;" checked' in html  # the default is chosen
    assert '<select name="in/region"' in html and html.count("<option") >= 6
    assert re.search(r'<input name="in/code"[^>]* pattern="\.\*\(\?:\^\[A-Z\]\{3\}\$\)\.\*"', html)
    assert re.search(r'name="in/comment"[^>]* maxlength="100"', html)
    assert "<legend>Address</legend>" in html and 'name="in/address/city"' in html
    assert 'title="required">*</span>' in html  # approved and address/city are required
    assert "History" in html and "suspended" in html


def test_invalid_input_re_renders_with_errors_and_the_values_kept(
    client: TestClient, persist_app: Any, persist: Any, wait_suspended: Any
) -> None:
    res, _key, fp = _park(persist_app, wait_suspended, schema=Decision)
    csrf = _login(client)
    form = {"csrf": csrf, "in/amount": "5000", "in/comment": "<b>kept</b>", "in/priority": '"high"', "in/code": "abc"}
    bad = client.post(f"/s/{fp}/resume", data=form)
    assert bad.status_code == 422
    assert '<p class="error" id="err-in/amount">must be &lt;= 1000</p>' in bad.text
    assert 'value="&lt;b&gt;kept&lt;/b&gt;"' in bad.text and "<b>kept</b>" not in bad.text
    assert 'value="&#34;high&#34;" checked' in bad.text and 'name="in/approved" id="f-in/approved">' in bad.text  # unchecked
    assert re.search(r'id="err-in/amount"', bad.text) and re.search(r'id="err-in/code"', bad.text)
    unparsable = client.post(f"/s/{fp}/resume", data={**form, "in/amount": "lots"})
    assert unparsable.status_code == 422 and "enter a whole number" in unparsable.text
    assert persist.describe(fp)["status"] == "suspended"

    good = client.post(f"/s/{fp}/resume", data={"csrf": csrf, "in/approved": "on", "in/amount": "12", "in/priority": '"low"'})
    assert good.status_code == 202 and "accepted" in good.text
    assert res.get(timeout=10) == {"approved": True, "amount": 12, "priority": "low"}
    history = client.get(f"/s/{fp}").text
    assert ">denied<" in history and ">resumed<" in history
    assert client.post(f"/s/{fp}/resume", data={"csrf": csrf, "in/approved": "on"}).status_code == 409


def test_no_schema_means_a_json_textarea(client: TestClient, persist_app: Any, wait_suspended: Any) -> None:
    res, _key, fp = _park(persist_app, wait_suspended)
    csrf = _login(client)
    assert '<textarea name="in"' in client.get(f"/s/{fp}").text
    broken = client.post(f"/s/{fp}/resume", data={"csrf": csrf, "in": '{"a": '})
    assert broken.status_code == 422 and "not valid JSON" in broken.text and "{&#34;a&#34;: </textarea>" in broken.text
    assert client.post(f"/s/{fp}/resume", data={"csrf": csrf, "in": '{"a": [1, "<x>"]}'}).status_code == 202
    assert res.get(timeout=10) == {"a": [1, "<x>"]}


def test_approvals_ask_who_approves(client: TestClient, persist_app: Any, wait_suspended: Any) -> None:
    res, _key, fp = _park(persist_app, wait_suspended, approvals=2, approvers=["ann", "bob"])
    csrf = _login(client)
    page = client.get(f"/s/{fp}").text
    assert '<select name="by"' in page and '<option value="ann">' in page
    missing = client.post(f"/s/{fp}/resume", data={"csrf": csrf, "in": "1"})
    assert missing.status_code == 422
    first = client.post(f"/s/{fp}/resume", data={"csrf": csrf, "in": "1", "by": "ann"})
    assert first.status_code == 202 and "Approval recorded" in first.text and "1 more is" in first.text
    page = client.get(f"/s/{fp}").text
    assert "1 of 2 (ann)" in page and '<option value="ann">' not in page
    assert client.post(f"/s/{fp}/resume", data={"csrf": csrf, "in": "1", "by": "ann"}).status_code == 409
    assert client.post(f"/s/{fp}/resume", data={"csrf": csrf, "in": "2", "by": "bob"}).status_code == 202
    assert res.get(timeout=10) == [{"by": "ann", "input": 1}, {"by": "bob", "input": 2}]


def test_cancel_asks_first(client: TestClient, persist_app: Any, persist: Any, wait_suspended: Any) -> None:
    res, key, fp = _park(persist_app, wait_suspended)
    csrf = _login(client)
    confirm = client.get(f"/s/{fp}/cancel")
    assert confirm.status_code == 200 and "Yes, cancel it" in confirm.text
    assert persist.describe(fp)["status"] == "suspended"  # asking changed nothing
    done = client.post(f"/s/{fp}/cancel", data={"csrf": csrf})
    assert done.status_code == 200 and "cancelled" in done.text
    assert persist.describe(fp)["status"] == "cancelled"
    gone = client.post("/api/resume", json={"key": key, "input": 1}, headers=BEARER)
    assert gone.status_code == 410
    assert client.post(f"/s/{fp}/cancel", data={"csrf": csrf}).status_code in (200, 410)


# -- resume links ---------------------------------------------------------------------------------------


def test_a_resume_link_needs_no_token_and_works_once(
    client: TestClient, persist_app: Any, persist: Any, wait_suspended: Any, caplog: pytest.LogCaptureFixture
) -> None:
    res, key, fp = _park(persist_app, wait_suspended, schema=Decision, prompt="Pay <invoice> 9?")
    url = persist.resume_url(key, ttl=600)
    token = url.rsplit("/", 1)[1]
    path = "/link/" + token
    with caplog.at_level(logging.INFO, logger="celery_persist.web.access"):
        page = client.get(path)
    assert page.status_code == 200 and "Pay &lt;invoice&gt; 9?" in page.text
    assert "Sign out" not in page.text and "inbox" not in page.text  # no inbox chrome
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert f"/link/{link_fingerprint(token)}" in logged and token not in logged and key not in logged

    link_csrf = _CSRF.search(page.text).group(1)  # type: ignore[union-attr]
    assert client.post(path, data={"csrf": "nope", "in/approved": "on"}).status_code == 403
    bad = client.post(path, data={"csrf": link_csrf, "in/amount": "-1"})
    assert bad.status_code == 422 and 'value="-1"' in bad.text
    ok = client.post(path, data={"csrf": link_csrf, "in/approved": "on"})
    assert ok.status_code == 202 and "Thank you" in ok.text
    assert res.get(timeout=10) == {"approved": True}
    again = client.post(path, data={"csrf": link_csrf, "in/approved": "on"})
    assert again.status_code == 409 and "Already answered" in again.text and "Traceback" not in again.text
    assert client.get(path).status_code == 409
    tampered = token[:-2] + ("A" if token[-2] != "A" else "B") + token[-1]
    assert client.get("/link/" + tampered).status_code == 400
    assert fp not in client.get("/link/" + tampered).text  # a public page says nothing about the store


def test_an_expired_link_is_gone(client: TestClient, persist_app: Any, persist: Any, wait_suspended: Any) -> None:
    _res, key, _fp = _park(persist_app, wait_suspended)
    token = persist.resume_url(key, ttl=0.001).rsplit("/", 1)[1]
    page = client.get("/link/" + token)
    assert page.status_code == 410 and "Expired" in page.text


def test_a_link_bound_to_an_approver_says_so(client: TestClient, persist_app: Any, persist: Any, wait_suspended: Any) -> None:
    _res, key, fp = _park(persist_app, wait_suspended, approvals=2, approvers=["ann", "bob"])
    path = "/link/" + persist.resume_url(key, by="bob").rsplit("/", 1)[1]
    page = client.get(path)
    assert "Answering as <strong>bob</strong>" in page.text and 'name="by"' not in page.text
    csrf = _CSRF.search(page.text).group(1)  # type: ignore[union-attr]
    assert client.post(path, data={"csrf": csrf, "in": "true"}).status_code == 202
    assert [a["by"] for a in persist.describe(fp)["approvals"]["done"]] == ["bob"]
    assert client.get(path).status_code == 409


# -- the JSON API ---------------------------------------------------------------------------------------


def test_the_api_answers_with_the_documented_codes(client: TestClient, persist_app: Any, persist: Any, wait_suspended: Any) -> None:
    res, key, fp = _park(persist_app, wait_suspended, schema=Decision)
    listed = client.get("/api/suspensions", headers=BEARER).json()
    assert [i["fingerprint"] for i in listed["items"]] == [fp] and listed["next_cursor"] is None
    shown = client.get(f"/api/suspensions/{fp}", headers=BEARER).json()
    assert shown["prompt"] == "Ship order 42?" and shown["history"][0]["event"] == "suspended"
    assert client.get("/api/suspensions/0123456789ab", headers=BEARER).status_code == 404
    assert client.get("/api/suspensions/not-hex", headers=BEARER).status_code == 404

    def post(body: Any, **kwargs: Any) -> httpx.Response:
        return client.post("/api/resume", headers={**BEARER, **kwargs.pop("headers", {})}, json=body, **kwargs)

    invalid = post({"key": key, "input": {"amount": 5000}})
    assert invalid.status_code == 422 and {tuple(e["loc"]) for e in invalid.json()["errors"]} >= {("approved",), ("amount",)}
    assert post({"key": "p1.forged", "input": 1}).status_code == 400
    assert post([key]).status_code == 400
    assert post({"key": key, "inputs": 1}).status_code == 400
    assert post({"key": key, "by": 3}).status_code == 400
    assert client.post("/api/resume", headers={**BEARER, "Content-Type": "application/json"}, content=b"{nope").status_code == 400
    assert client.post("/api/resume", headers=BEARER, data={"key": key}).status_code == 415
    assert client.post("/api/resume", headers={**BEARER, "Content-Type": "text/plain"}, content=b"{}").status_code == 415
    big = b'{"key": "' + b"x" * MAX_BODY + b'"}'
    too_big = client.post("/api/resume", headers={**BEARER, "Content-Type": "application/json"}, content=big)
    assert too_big.status_code == 413 and too_big.json()["error"] == "Too large"

    def chunks() -> Iterator[bytes]:  # no Content-Length: the streamed size counts
        yield b'{"key": "'
        for _ in range(20):
            yield b"y" * 4096
        yield b'"}'

    streamed = client.post("/api/resume", headers={**BEARER, "Content-Type": "application/json"}, content=chunks())
    assert streamed.status_code == 413

    ok = post({"key": key, "input": {"approved": False}})
    assert ok.status_code == 202 and ok.json()["resumed"] is True and ok.json()["task_id"]
    assert res.get(timeout=10) == {"approved": False}
    assert post({"key": key, "input": {"approved": True}}).status_code == 409

    _res2, key2, fp2 = _park(persist_app, wait_suspended)
    cancelled = client.post(f"/api/suspensions/{fp2}/cancel", headers=BEARER)
    assert cancelled.status_code == 200 and cancelled.json() == {"fingerprint": fp2, "status": "cancelled"}
    assert post({"key": key2, "input": 1}).status_code == 410
    assert client.post("/api/suspensions/0123456789ab/cancel", headers=BEARER).status_code == 404
    missing = client.get("/api/nothing", headers=BEARER)
    assert missing.status_code == 404 and missing.json()["error"] == "Not Found"
    assert client.get("/nothing").status_code == 404 and "<h1>Not Found</h1>" in client.get("/nothing").text


def test_approvals_through_the_api(client: TestClient, persist_app: Any, wait_suspended: Any) -> None:
    _res, key, _fp = _park(persist_app, wait_suspended, approvals=2)
    first = client.post("/api/resume", headers=BEARER, json={"key": key, "input": 1, "by": "ann"})
    assert first.status_code == 202 and first.json() == {"resumed": False, "task_id": None}
    assert client.post("/api/resume", headers=BEARER, json={"key": key, "input": 1}).status_code == 422


def test_a_double_submit_resumes_once(persist: Any, persist_app: Any, wait_suspended: Any) -> None:
    app = create_app(persist)
    _res, key, _fp = _park(persist_app, wait_suspended)
    _res2, key2, _fp2 = _park(persist_app, wait_suspended)
    token = persist.resume_url(key2).rsplit("/", 1)[1]

    async def race() -> tuple[list[int], list[int]]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver") as c:
            api = await asyncio.gather(*(c.post("/api/resume", headers=BEARER, json={"key": key, "input": n}) for n in range(2)))
            page = await c.get(f"/link/{token}")
            csrf = _CSRF.search(page.text).group(1)  # type: ignore[union-attr]
            form = await asyncio.gather(*(c.post(f"/link/{token}", data={"csrf": csrf, "in": str(n)}) for n in range(2)))
        return sorted(r.status_code for r in api), sorted(r.status_code for r in form)

    assert asyncio.run(race()) == ([202, 409], [202, 409])


def test_store_trouble_is_503_never_a_traceback(client: TestClient, persist: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    persist.ready()

    def down(*_args: Any, **_kwargs: Any) -> Any:
        raise StoreUnavailable("connection refused", store="memory://")

    monkeypatch.setattr(persist.hub.store, "scan", down)
    api = client.get("/api/suspensions", headers=BEARER)
    assert api.status_code == 503 and api.json()["error"] == "Try again in a moment"
    page = client.get("/", headers=BEARER)
    assert page.status_code == 503 and "Try again in a moment" in page.text and "Traceback" not in page.text
    monkeypatch.setattr(persist.hub.store, "health", lambda: {"ok": False, "store": "memory://", "error": "down"})
    assert client.get("/healthz").status_code == 503 and client.get("/healthz").json() == {"ok": False}


# -- operations -----------------------------------------------------------------------------------------


def test_healthz_and_metrics(client: TestClient) -> None:
    public = client.get("/healthz")
    assert public.status_code == 200 and public.json() == {"ok": True}
    assert client.get("/healthz", headers=BEARER).json()["store"] == "memory://"
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", headers=BEARER).status_code == 404  # persist_metrics is off
    assert client.get("/static/style.css").headers["content-type"].startswith("text/css")


class TestMetricsOn:
    @pytest.fixture
    def persist_config(self, persist_config: dict[str, Any]) -> dict[str, Any]:
        pytest.importorskip("prometheus_client")
        return {**persist_config, "persist_metrics": True}

    def test_metrics_are_served(self, client: TestClient, persist_app: Any, wait_suspended: Any) -> None:
        _park(persist_app, wait_suspended)
        scraped = client.get("/metrics", headers=BEARER)
        assert scraped.status_code == 200 and "celery_persist_suspended_total" in scraped.text


def test_mounted_under_a_prefix(persist: Any, persist_app: Any, wait_suspended: Any) -> None:
    _res, _key, fp = _park(persist_app, wait_suspended)
    host = Starlette(routes=[Mount("/ops/persist", app=create_app(persist))])
    with TestClient(host, follow_redirects=False) as c:
        assert c.get("/ops/persist/").headers["location"] == "/ops/persist/login?next=%2F"
        page = c.get("/ops/persist/", headers=BEARER)
        assert f'href="/ops/persist/s/{fp}"' in page.text and 'href="/ops/persist/static/style.css"' in page.text
        login = c.get("/ops/persist/login")
        csrf = _CSRF.search(login.text).group(1)  # type: ignore[union-attr]
        done = c.post("/ops/persist/login", data={"token": TOKEN, "csrf": csrf, "next": f"/s/{fp}"})
        assert done.headers["location"] == f"/ops/persist/s/{fp}" and "Path=/ops/persist/" in done.headers["set-cookie"]
        assert c.get(f"/ops/persist/s/{fp}").status_code == 200
    with TestClient(create_app(persist, base_path="/persist/"), follow_redirects=False) as c:
        assert c.get(f"/persist/s/{fp}", headers=BEARER).status_code == 200
        assert c.get(f"/s/{fp}", headers=BEARER).status_code == 404


def test_the_command_module_imports_neither_starlette_nor_the_celery_layer() -> None:
    code = (
        "import sys, celery_persist.web.cli as c\n"
        "assert c.serve_command.name == 'serve'\n"
        "bad = [m for m in ('starlette', 'uvicorn', 'jinja2', 'celery', 'celery_persist.persist') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_serve_runs_uvicorn_without_its_access_log(persist_app: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import uvicorn
    from click.testing import CliRunner

    from celery_persist.web.cli import serve_command

    seen: dict[str, Any] = {}
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets=None: seen.update(config=self.config))

    class Obj:
        binding = type("B", (), {"app": persist_app})()

    result = CliRunner().invoke(serve_command, ["--port", "8099"], obj=Obj())
    assert result.exit_code == 0, result.output
    config = seen["config"]
    assert config.port == 8099 and config.host == "127.0.0.1" and config.access_log is False
    assert CliRunner().invoke(serve_command, [], obj=None).exit_code == 2


# -- the form builder alone ----------------------------------------------------------------------------


def test_forms_parse_back_to_the_schema_shapes() -> None:
    fields = build_form(Decision.model_json_schema())
    value, errors = parse_form(fields, {"in/approved": "on", "in/amount": " 7 ", "in/region": '"eu"', "in/address/city": "Lyon"})
    assert errors == []
    assert value == {"approved": True, "amount": 7, "region": "eu", "address": {"city": "Lyon"}}
    value, errors = parse_form(fields, {"in/amount": "1.5", "in/region": '"mars"'})
    assert value == {"approved": False} and [e["loc"] for e in errors] == [["amount"], ["region"]]
    number = build_form({"type": "number", "minimum": 0})
    assert parse_form(number, {"in": "2.5"}) == (2.5, []) and parse_form(number, {"in": "nan"})[1][0]["msg"] == "enter a number"
    by_field = errors_by_field(
        fields, [{"loc": ["address", "city"], "msg": "too long"}, {"loc": [], "msg": "whole"}, {"loc": ["by"], "msg": "who?"}], ["by"]
    )
    assert by_field == {"in/address/city": ["too long"], "": ["whole"], "by": ["who?"]}
    ordered = build_form(
        {"type": "object", "x-order": ["b", "a"], "properties": {"a": {"type": "string"}, "b": {"type": "string"}, "c": {}}}
    )
    assert [f.name for f in ordered] == ["in/b", "in/a", "in/c"]  # stores may sort metadata keys: x-order keeps the model's order
