"""``python -m examples.approval``: an expense waits for a human, who answers through a resume link or the CLI.

The flow is ``chain(prepare.s(...), await_input.s(prompt=..., schema=DECISION, timeout=...), book.s())``:

1. A worker subprocess starts (``celery -A examples.approval.app worker``), and
   the inbox server, ``celery -A examples.approval.app persist serve``, on a
   free port with a bearer token made for this run (``persist_web_tokens``).
2. Expense #101 is submitted; ``await_input`` parks the flow and its key is
   read from the result backend (``persist.suspension_key``). The JSON API
   (``GET /api/suspensions`` with the token) lists it as pending.
3. ``persist.resume_url(key)`` makes a signed, single-use link. This script
   plays the approver: it opens the link's page and posts its form, as a
   browser would (``approved=on``, ``by=alice``); the server resumes the flow
   and ``book`` receives the expense and the answer. The same link posted
   again gets 409, and so does the key through ``POST /api/resume``.
4. Expense #102 is parked too and rejected from the command line, as an
   operator would, in a subprocess::

       celery -A examples.approval.app persist resume KEY --input '{"approved": false, ...}'

Exits 0 when both flows ended as expected.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from celery import chain

from celery_persist import await_input
from celery_persist.hub import link_fingerprint
from examples._embedded import REPO, Run, example_dir, main, wait_for
from examples.approval.app import DECISION, book, persist, prepare

TIMEOUT = 3600.0


def subprocess_env(**extra: str) -> dict[str, str]:
    """This process's environment (with the example directory it exported) for a ``celery`` subprocess."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])), **extra}


def submit(run: Run, expense_id: int, amount: float, submitter: str) -> tuple[Any, str]:
    flow = chain(
        prepare.s(expense_id, amount, submitter),
        await_input.s(
            prompt=f"Approve expense #{expense_id} (EUR {amount:.2f}) from {submitter}?",
            schema=DECISION,
            timeout=TIMEOUT,
            include_previous=True,
        ),
        book.s(),
    )
    result = flow.apply_async()
    key = persist.suspension_key(result, timeout=30)
    parked = persist.load(key)
    run.say(
        f"expense #{expense_id} parked: step {parked.metadata['task']} is {result.parent.state}, "
        f"suspension {parked.fingerprint}, prompt {parked.metadata['prompt']!r}, expires {parked.expires_at:%H:%M:%S} UTC"
    )
    return result, key


def http(url: str, *, form: dict[str, str] | None = None, doc: Any = None, token: str | None = None) -> tuple[int, str]:
    """``(status, body)`` of a GET, or of a POST of ``form`` (form-encoded, as a browser posts it) or ``doc`` (JSON)."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    data = None
    if form is not None:
        data, headers["Content-Type"] = urllib.parse.urlencode(form).encode(), "application/x-www-form-urlencoded"
    elif doc is not None:
        data, headers["Content-Type"] = json.dumps(doc).encode(), "application/json"
    request = urllib.request.Request(url, data=data, headers=headers)  # noqa: S310 - a fixed http:// URL on 127.0.0.1
    try:
        with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def heading(page: str) -> str:
    """The page's ``<h1>``: what a person would read first (a title like "Thank you" or "Already answered")."""
    found = re.search(r"<h1[^>]*>(.*?)</h1>", page, re.S)
    return found.group(1).strip() if found else "?"


class Server:
    """``celery -A examples.approval.app persist serve`` in a subprocess, leader of its own process group."""

    def __init__(self, run: Run) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.base = f"http://127.0.0.1:{self.port}"
        self.token = secrets.token_urlsafe(32)
        self.log_path = example_dir("approval") / "serve.log"
        env = subprocess_env(CELERY_PERSIST_WEB_TOKENS=self.token, CELERY_PERSIST_WEB_BASE_URL=self.base)
        cmd = [sys.executable, "-m", "celery", "-A", "examples.approval.app", "persist", "serve"]
        cmd += ["--host", "127.0.0.1", "--port", str(self.port)]
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)  # noqa: S603
        wait_for(self.healthy, 60, f"the inbox server at {self.base} (log: {self.log_path})", interval=0.1)
        run.say(f"inbox server started (pid {self.proc.pid}): celery -A examples.approval.app persist serve --port {self.port}")

    def healthy(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"the inbox server exited with {self.proc.returncode}; log:\n{self.log()}")
        with contextlib.suppress(OSError):
            return http(f"{self.base}/healthz")[0] == 200
        return False

    def log(self) -> str:
        return Path(self.log_path).read_text(errors="replace") if self.log_path.exists() else ""

    def access_line(self, method: str, path: str) -> str:
        """The server's access log line for ``method path`` (it is written just after the answer)."""
        needle = f'"{method} {path}"'
        return wait_for(lambda: next((ln for ln in self.log().splitlines() if needle in ln), None), 10, f"the log line of {needle}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)


def body(run: Run) -> None:
    run.worker()
    server = Server(run)
    try:
        # -- 1. approved through a resume link ---------------------------------------------------
        first, key = submit(run, 101, 1234.5, "carol")
        status, listing = http(f"{server.base}/api/suspensions?status=suspended", token=server.token)
        items = json.loads(listing)["items"] if status == 200 else []
        shown = ", ".join(f"{i['fingerprint']} {i['prompt']!r}" for i in items)
        run.say(f"GET /api/suspensions with the bearer token: HTTP {status}, {len(items)} pending: {shown}")
        if status != 200 or len(items) != 1:
            raise RuntimeError(f"the inbox API answered {status}: {listing}")

        url = persist.resume_url(key, ttl=3600, base_url=server.base)
        token = url.rsplit("/", 1)[1]
        run.say(f"resume link for the approver: {server.base}/link/<token {link_fingerprint(token)}> (signed, works once, for 1 h)")
        status, page = http(url)
        fields = sorted(set(re.findall(r'name="(in/[^"]+)"', page)))
        run.say(f"approver opens it: HTTP {status}, {heading(page)!r}, a form with {', '.join(fields)}")
        csrf = re.search(r'name="csrf" value="([^"]*)"', page)
        if status != 200 or csrf is None:
            raise RuntimeError(f"the link page answered {status}")
        answer = {"csrf": csrf.group(1), "in/approved": "on", "in/by": "alice"}
        run.say("approver submits the form: approved=on, by=alice")
        status, page = http(url, form=answer)
        run.say(f"HTTP {status}: {heading(page)!r}")
        if status != 202:
            raise RuntimeError(f"the link answered {status}: {heading(page)}")
        line = server.access_line("POST", f"/link/{link_fingerprint(token)}")
        run.say(f"  server log: {line.removeprefix('INFO:').strip()}")
        value = first.get(timeout=30)
        run.say(f"result: {value}")
        if "booked, approved by alice" not in value:
            raise RuntimeError(f"unexpected result {value!r}")

        status, page = http(url, form={**answer, "in/by": "mallory"})
        run.say(f"the same link POSTed again: HTTP {status} {heading(page)!r} (a link works once)")
        if status != 409:
            raise RuntimeError(f"a second use of the link answered {status}, not 409")
        status, reply = http(
            f"{server.base}/api/resume", doc={"key": key, "input": {"approved": False, "by": "mallory"}}, token=server.token
        )
        run.say(f"POST /api/resume with the key: HTTP {status} {json.loads(reply).get('error')!r} (a key resumes at most once)")
        if status != 409:
            raise RuntimeError(f"a second resume answered {status}, not 409")
    except BaseException:
        print(f"--- inbox server log ({server.log_path}) ---\n{server.log()[-4000:]}", file=sys.stderr)
        raise
    finally:
        server.stop()

    # -- 2. rejected from the command line -------------------------------------------------------
    second, key = submit(run, 102, 99.0, "dave")
    answer = {"approved": False, "by": "bob", "reason": "no receipt"}
    shown = f"celery -A examples.approval.app persist resume {key} --input {shlex.quote(json.dumps(answer))}"
    run.say(f"operator runs: {shown}")
    cli = subprocess.run(  # noqa: S603 - our own interpreter and arguments
        [sys.executable, "-m", "celery", "-A", "examples.approval.app", "persist", "resume", key, "--input", json.dumps(answer)],
        cwd=REPO,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    if cli.returncode != 0:
        raise RuntimeError(f"the CLI exited with {cli.returncode}: {cli.stderr.strip()}")
    run.say(f"  {cli.stdout.strip()}")
    value = second.get(timeout=30)
    run.say(f"result: {value}")
    if "rejected by bob: no receipt" not in value:
        raise RuntimeError(f"unexpected result {value!r}")
    run.say(
        f"suspension {persist.load(key).fingerprint} is now {persist.load(key).status!r}; "
        "see them all with `celery -A examples.approval.app persist list`"
    )


if __name__ == "__main__":
    main("approval", persist, body)
