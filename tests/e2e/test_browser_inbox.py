"""The inbox in a real browser: headless Chromium against a real ``celery persist serve`` and worker.

The stack is three processes built from :mod:`tests.e2e.inbox_app`: the
server (``celery -A tests.e2e.inbox_app persist serve`` on a free port), a
solo worker on a queue of its own, and this test process, which parks the
flows and reads their results. Broker and results are the e2e Redis databases
(under a namespace deleted afterwards), the store a SQLite file in a temp dir.

Chromium runs headless through Debian's ``chromedriver`` (the paths are passed
explicitly, so Selenium Manager never runs and nothing is downloaded). A
missing browser skips locally and fails when ``CI=true``.

Screenshots of the inbox and of a form, at laptop size (1280x800) and phone
width (390x844, whole page), go to the test's temp dir, and to
``test-artifacts/browser-inbox/`` under the repo root when
``CELERY_PERSIST_ARTIFACTS`` is set; ``inbox-small.png`` is the README's
``docs/inbox.png`` (copy it there by hand when the pages change).
"""

from __future__ import annotations

import base64
import contextlib
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pydantic
import pytest
from celery import Celery, chain
from celery.result import AsyncResult

from celery_persist import Persist
from tests.e2e import inbox_app
from tests.e2e.harness import (
    BACKEND_DB,
    BROKER_DB,
    IN_CI,
    REDIS_URL,
    REPO,
    SESSION_NS,
    delete_namespace,
    missing,
    new_key,
    redis_db,
    redis_up,
    wait_for,
)

pytestmark = [pytest.mark.e2e]

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
LAPTOP = (1280, 800)
PHONE = (390, 844)
START_TIMEOUT = 30.0
HTML_PROMPT = 'Deploy <b>x</b><script>document.title="pwned"</script> to production?'


class Address(pydantic.BaseModel):
    city: str = pydantic.Field(max_length=40)
    postcode: str = pydantic.Field(default="", max_length=10)


class Decision(pydantic.BaseModel):
    approved: bool
    priority: Literal["low", "normal", "high"] = "normal"
    amount: float = pydantic.Field(ge=1, le=1000, description="EUR, at most 1000 without a second approval")
    comment: str = pydantic.Field(default="", max_length=100)
    address: Address


SIGN_OFF = {
    "type": "object",
    "properties": {"approved": {"type": "boolean"}, "note": {"type": "string", "maxLength": 80}},
    "required": ["approved"],
}


# -- the stack ---------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers=headers or {})  # noqa: S310 - http://127.0.0.1 only
    try:
        with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310
            return int(response.status), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _post_form(url: str, form: dict[str, str]) -> int:
    data = urllib.parse.urlencode(form).encode()
    request = urllib.request.Request(url, data=data, method="POST", headers={"Content-Type": "application/x-www-form-urlencoded"})  # noqa: S310
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code


@dataclass
class Served:
    app: Celery
    persist: Persist
    base: str
    token: str
    logs: Path
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def log(self, name: str) -> str:
        try:
            return (self.logs / f"{name}.log").read_text(errors="replace")
        except OSError:
            return ""

    def flow(self, prompt: str, **kwargs: Any) -> tuple[AsyncResult, str]:
        """Park ``await_input(prompt=..., **kwargs)`` followed by a step that passes the answer on."""
        await_input = self.app.tasks["celery_persist.await_input"]
        sig = chain(await_input.s(prompt=prompt, timeout=600, **kwargs), self.app.signature("celery_persist.sleep", kwargs={"seconds": 0}))
        res = sig.apply_async()
        return res, self.persist.suspension_key(res, timeout=20)

    def outcome(self, res: AsyncResult, timeout: float = 20.0) -> Any:
        wait_for(res.ready, timeout, f"flow {res.id} to finish (worker log:\n{self.log('worker')[-3000:]})", interval=0.1)
        return res.get(timeout=1)


def _start(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)  # noqa: S603


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    if not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)):
        missing(f"the browser test needs Chromium and chromedriver ({CHROMIUM}, {CHROMEDRIVER}): apt-get install chromium chromium-driver")
    if reason := redis_up():
        missing(reason)
    work = tmp_path_factory.mktemp("browser-inbox")
    ns = f"{SESSION_NS}-inbox-{uuid.uuid4().hex[:6]}"
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    broker = redis_db(REDIS_URL, BROKER_DB)
    config = {
        "ns": ns,
        "broker": broker,
        "backend": redis_db(REDIS_URL, BACKEND_DB),
        "queue": f"{ns}.q",
        "store_url": f"sqlite:///{work / 'persist.db'}",
        "keys": new_key(),
        "token": f"browser-{uuid.uuid4().hex}",
        "base_url": base,
    }
    env = {**os.environ, inbox_app.CONFIG_ENV: json.dumps(config)}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env.pop("CELERY_PERSIST_KEYS", None)
    app = inbox_app.make_app(config)
    persist = Persist.of(app)
    persist.ready()  # the tables exist before two processes race to create them
    celery = [sys.executable, "-m", "celery", "-A", "tests.e2e.inbox_app"]
    s = Served(app, persist, base, config["token"], work)
    try:
        s.procs["worker"] = _start(
            [*celery, "worker", "-P", "solo", "-Q", config["queue"], "-n", f"{ns}@%h",
             "--without-gossip", "--without-mingle", "--without-heartbeat", "--loglevel", "INFO"],
            env, work / "worker.log",
        )  # fmt: skip
        s.procs["serve"] = _start([*celery, "persist", "serve", "--host", "127.0.0.1", "--port", str(port)], env, work / "serve.log")

        def up() -> bool:
            for name, proc in s.procs.items():
                if proc.poll() is not None:
                    raise AssertionError(f"{name} exited with {proc.returncode}:\n{s.log(name)[-3000:]}")
            try:
                healthy = _get(f"{base}/healthz")[0] == 200
            except OSError:
                return False
            return healthy and " ready." in s.log("worker")

        wait_for(up, START_TIMEOUT, "the server's /healthz and the worker", interval=0.1)
        yield s
    finally:
        for proc in s.procs.values():
            _stop(proc)
        persist.hub.close()
        app.close()
        delete_namespace(broker, ns)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError as exc:
        if IN_CI:
            pytest.fail(f"selenium is missing in CI: {exc}")
        pytest.skip(f"selenium is not installed: {exc}")
    profile = tempfile.mkdtemp(prefix="celery-persist-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage", f"--user-data-dir={profile}",
        f"--window-size={LAPTOP[0]},{LAPTOP[1]}", "--hide-scrollbars", "--lang=en-US",
    ):  # fmt: skip
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        driver.set_page_load_timeout(20)
        _viewport(driver, *LAPTOP)
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    out = tmp_path_factory.mktemp("browser-artifacts")
    yield out
    if os.environ.get("CELERY_PERSIST_ARTIFACTS"):
        shutil.copytree(out, REPO / "test-artifacts" / "browser-inbox", dirs_exist_ok=True)


# -- browser helpers -----------------------------------------------------------------------------


def _viewport(driver: Any, width: int, height: int) -> None:
    driver.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride", {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": width < 600}
    )


def _shoot(driver: Any, path: Path, size: tuple[int, int], *, whole: bool = True, scale: float = 1.0) -> bytes:
    """A PNG of the page at ``size`` (the whole page's height with ``whole``), saved at ``path``; the laptop size after."""
    _viewport(driver, *size)
    try:
        content = driver.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
        height = max(size[1], math.ceil(content["height"])) if whole else size[1]
        clip = {"x": 0, "y": 0, "width": size[0], "height": height, "scale": scale}
        shot = driver.execute_cdp_cmd("Page.captureScreenshot", {"format": "png", "clip": clip, "captureBeyondViewport": whole})
    finally:
        _viewport(driver, *LAPTOP)
    png = base64.b64decode(shot["data"])
    path.write_bytes(png)
    return png


def _by(kind: str) -> Any:
    from selenium.webdriver.common.by import By

    return getattr(By, kind)


def _one(driver: Any, css: str) -> Any:
    return driver.find_element(_by("CSS_SELECTOR"), css)


def _named(driver: Any, name: str, value: str | None = None) -> Any:
    css = f'[name="{name}"]' + (f'[value="{value.replace(chr(34), chr(92) + chr(34))}"]' if value is not None else "")
    return _one(driver, css)


def _click(driver: Any, find: Callable[[], Any]) -> None:
    """Click what ``find()`` returns, which loads a page, and wait until the new page has loaded.

    chromedriver now and then answers "Node with given id does not belong to the document"
    for a node of a page that is being replaced: that node is gone (stale), as for Selenium's
    own stale-element error. If it is the node to click and the page has not changed, nothing
    was clicked: it is found again and clicked (never once the page changed: a form must not
    be submitted twice).
    """
    from selenium.webdriver.support.wait import WebDriverWait

    page = _one(driver, "html")
    for tries_left in (2, 1, 0):
        try:
            find().click()
            break
        except Exception as exc:
            if not _stale_error(exc) or not tries_left or _gone(page):
                raise
    wait = WebDriverWait(driver, 15)
    wait.until(lambda d: _gone(page))
    wait.until(lambda d: d.execute_script("return document.readyState") == "complete")


def _stale_error(exc: BaseException) -> bool:
    from selenium.common.exceptions import StaleElementReferenceException, WebDriverException

    return isinstance(exc, StaleElementReferenceException) or (
        isinstance(exc, WebDriverException) and "does not belong to the document" in str(exc)
    )


def _gone(element: Any) -> bool:
    """Whether ``element`` left the document (its page was replaced)."""
    try:
        element.is_enabled()
    except Exception as exc:
        if _stale_error(exc):
            return True
        raise
    return False


def _submit(driver: Any) -> None:
    _click(driver, lambda: _one(driver, "form.answer button[type=submit]"))


def _heading(driver: Any) -> str:
    return str(_one(driver, "h1").text)


def _sign_in(driver: Any, served: Served) -> None:
    driver.get(f"{served.base}/")
    if "/login" in driver.current_url:
        _named(driver, "token").send_keys(served.token)
        _click(driver, lambda: _one(driver, "form.narrow button[type=submit]"))
    assert driver.current_url == f"{served.base}/", driver.current_url
    assert _heading(driver) == "Inbox"


def _field_box(driver: Any, name: str) -> Any:
    """The ``.field`` block of the control named ``name`` (where its error is shown)."""
    return _named(driver, name).find_element(_by("XPATH"), "./ancestor::*[contains(concat(' ', @class, ' '), ' field ')][1]")


# -- the tests -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def parked(served: Served) -> dict[str, tuple[AsyncResult, str]]:
    """The flows of the inbox screenshots, parked once for the module."""
    return {
        "ship": served.flow("Ship order #42 (EUR 1,234.50) to ACME GmbH?", schema=Decision),
        "payment": served.flow(
            "Release payment PAY-7 (EUR 48,000.00) to Initech?", schema=SIGN_OFF, approvals=2, approvers=["ann", "bob", "cy"]
        ),
        "refund": served.flow("Refund order #1187 (EUR 89.90) to Jane Doe?", schema=SIGN_OFF),
    }


def test_sign_in_inbox_and_a_schema_form_with_field_errors(
    browser: Any, served: Served, parked: dict[str, tuple[AsyncResult, str]], artifacts: Path
) -> None:
    driver = browser
    driver.get(f"{served.base}/")
    assert "/login" in driver.current_url and _heading(driver) == "Sign in"
    _named(driver, "token").send_keys("not-the-token-0123456789")
    _click(driver, lambda: _one(driver, "form.narrow button[type=submit]"))
    assert "That token is not valid." in _one(driver, ".error.banner").text
    _sign_in(driver, served)

    rows = driver.find_elements(_by("CSS_SELECTOR"), "table.list tbody tr")
    prompts = {r.find_element(_by("CSS_SELECTOR"), "td a").text for r in rows}
    assert {"Ship order #42 (EUR 1,234.50) to ACME GmbH?", "Release payment PAY-7 (EUR 48,000.00) to Initech?"} <= prompts
    payment_row = next(r for r in rows if "PAY-7" in r.text)
    assert "0 of 2" in payment_row.text and "suspended" in payment_row.text
    _shoot(driver, artifacts / "inbox-laptop.png", LAPTOP, whole=False)
    _shoot(driver, artifacts / "inbox-phone.png", PHONE)
    small = _shoot(driver, artifacts / "inbox-small.png", (LAPTOP[0], 460), whole=False, scale=0.75)
    assert len(small) < 150_000, f"inbox-small.png is {len(small)} bytes"

    _click(driver, lambda: driver.find_element(_by("LINK_TEXT"), "Ship order #42 (EUR 1,234.50) to ACME GmbH?"))
    assert _heading(driver) == "Ship order #42 (EUR 1,234.50) to ACME GmbH?"
    assert _named(driver, "in/amount").get_attribute("min") == "1" and _named(driver, "in/amount").get_attribute("max") == "1000"
    assert _named(driver, "in/comment").get_attribute("maxlength") == "100"
    assert _named(driver, "in/address/city").get_attribute("maxlength") == "40"
    assert _named(driver, "in/priority", '"normal"').is_selected()  # the schema's default
    _shoot(driver, artifacts / "form-laptop.png", LAPTOP)

    # An amount over the maximum: the server refuses it, the error sits at the field, and the values stay.
    _named(driver, "in/approved").click()
    _named(driver, "in/priority", '"high"').click()
    _named(driver, "in/amount").send_keys("5000")
    _named(driver, "in/comment").send_keys("Looks fine")
    _named(driver, "in/address/city").send_keys("Lyon")
    _submit(driver)
    box = _field_box(driver, "in/amount")
    assert "invalid" in (box.get_attribute("class") or "")
    error = box.find_element(_by("CSS_SELECTOR"), "p.error")
    assert "1000" in error.text, error.text
    assert len(driver.find_elements(_by("CSS_SELECTOR"), ".field.invalid")) == 1
    assert _named(driver, "in/amount").get_attribute("value") == "5000"
    assert _named(driver, "in/comment").get_attribute("value") == "Looks fine"
    assert _named(driver, "in/address/city").get_attribute("value") == "Lyon"
    assert _named(driver, "in/approved").is_selected() and _named(driver, "in/priority", '"high"').is_selected()
    assert parked["ship"][0].state != "SUCCESS"  # nothing was claimed
    _shoot(driver, artifacts / "form-error-laptop.png", LAPTOP)
    _shoot(driver, artifacts / "form-error-phone.png", PHONE)

    _named(driver, "in/amount").clear()
    _named(driver, "in/amount").send_keys("250")
    _submit(driver)
    assert _heading(driver) == "Thank you"
    assert served.outcome(parked["ship"][0]) == {
        "approved": True,
        "priority": "high",
        "amount": 250,
        "comment": "Looks fine",
        "address": {"city": "Lyon"},
    }


def test_approvals_in_the_inbox_then_a_single_use_resume_link(
    browser: Any, served: Served, parked: dict[str, tuple[AsyncResult, str]], artifacts: Path
) -> None:
    driver = browser
    res, key = parked["payment"]
    _sign_in(driver, served)
    _click(driver, lambda: driver.find_element(_by("PARTIAL_LINK_TEXT"), "Release payment PAY-7"))
    _named(driver, "in/approved").click()
    _submit(driver)  # no approver chosen: refused at the field
    assert _field_box(driver, "by").find_element(_by("CSS_SELECTOR"), "p.error").text
    assert _named(driver, "in/approved").is_selected()
    from selenium.webdriver.support.select import Select

    Select(_named(driver, "by")).select_by_visible_text("ann")
    _submit(driver)
    assert _heading(driver) == "Approval recorded"
    assert "1 more is needed" in _one(driver, "main").text

    url = served.persist.resume_url(key, ttl=600, by="bob")
    assert url.startswith(f"{served.base}/link/")
    driver.get(url)
    assert _heading(driver) == "Release payment PAY-7 (EUR 48,000.00) to Initech?"
    assert "Answering as bob" in _one(driver, "form.answer").text
    form_token = _named(driver, "csrf").get_attribute("value")
    _shoot(driver, artifacts / "link-phone.png", PHONE)
    _named(driver, "in/approved").click()
    _named(driver, "in/note").send_keys("ok by me")
    _submit(driver)
    assert _heading(driver) == "Thank you"
    assert "Back to the inbox" not in _one(driver, "main").text  # a link page shows nothing of the inbox
    assert served.outcome(res) == [
        {"by": "ann", "input": {"approved": True}},
        {"by": "bob", "input": {"approved": True, "note": "ok by me"}},
    ]

    # Used: opening it again, or posting its form again, is refused with 409.
    driver.get(url)
    assert _heading(driver) == "Already answered"
    assert _one(driver, "p.code").text == "409"
    assert _post_form(url, {"csrf": form_token, "in/approved": "on"}) == 409
    _shoot(driver, artifacts / "link-used-laptop.png", LAPTOP, whole=False)


def test_an_expired_link_is_refused_and_html_in_a_prompt_is_text(browser: Any, served: Served, artifacts: Path) -> None:
    driver = browser
    res, key = served.flow(HTML_PROMPT)
    expired = served.persist.resume_url(key, ttl=0.2)
    time.sleep(0.3)
    driver.get(expired)
    assert _heading(driver) == "Expired" and _one(driver, "p.code").text == "410"
    assert _get(expired)[0] == 410
    _shoot(driver, artifacts / "link-expired-phone.png", PHONE)

    _sign_in(driver, served)
    cell = driver.find_element(_by("PARTIAL_LINK_TEXT"), "Deploy <b>x</b>")
    assert cell.text == HTML_PROMPT
    assert not driver.find_elements(_by("CSS_SELECTOR"), "main b, script")
    assert "&lt;script&gt;" in driver.page_source
    _click(driver, lambda: driver.find_element(_by("PARTIAL_LINK_TEXT"), "Deploy <b>x</b>"))
    assert _heading(driver) == HTML_PROMPT
    assert driver.title != "pwned" and not driver.find_elements(_by("CSS_SELECTOR"), "main b, script")
    _shoot(driver, artifacts / "form-json-phone.png", PHONE)
    # No schema: one JSON field; the flow goes on with what it parses to.
    _named(driver, "in").send_keys('{"deploy": true}')
    _submit(driver)
    assert _heading(driver) == "Thank you"
    assert served.outcome(res) == {"deploy": True}
