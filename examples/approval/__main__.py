"""``python -m examples.approval``: an expense waits for a human, who answers over HTTP or the CLI.

The flow is ``chain(prepare.s(...), await_input.s(prompt=..., timeout=...), book.s())``:

1. A worker subprocess starts (``celery -A examples.approval.app worker``).
2. Expense #101 is submitted; ``await_input`` parks the flow and its key is
   read from the result backend (``persist.suspension_key``). In production
   you would deliver it with ``await_input.s(..., notify=send_mail.s())``.
3. This script plays the approver: it POSTs ``{"approved": true, ...}`` to
   the tiny HTTP endpoint of :mod:`examples.approval.webhook`
   (``POST /approve/<key>``), which calls ``persist.resume(key, body)``; the
   chain goes on and ``book`` receives the expense and the answer. A second
   POST with the same key gets 409: a key resumes at most once.
4. Expense #102 is parked too and rejected from the command line, as an
   operator would, in a subprocess::

       celery -A examples.approval.app persist resume KEY --input '{"approved": false, ...}'

Exits 0 when both flows ended as expected.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import urllib.error
import urllib.request
from typing import Any

from celery import chain

from celery_persist import await_input
from examples._embedded import REPO, Run, main
from examples.approval import webhook
from examples.approval.app import book, persist, prepare

TIMEOUT = 3600.0


def submit(run: Run, expense_id: int, amount: float, submitter: str) -> tuple[Any, str]:
    flow = chain(
        prepare.s(expense_id, amount, submitter),
        await_input.s(prompt=f"Approve expense #{expense_id} (EUR {amount:.2f}) from {submitter}?", timeout=TIMEOUT, include_previous=True),
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


def post(url: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(  # noqa: S310 - a fixed http:// URL on 127.0.0.1
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def body(run: Run) -> None:
    run.worker()

    # -- 1. approved over HTTP -------------------------------------------------------------------
    server = webhook.serve(persist, log=lambda line: run.say(f"  {line}"))
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        run.say(f"approval endpoint listening on {base}/approve/<key>")
        first, key = submit(run, 101, 1234.5, "carol")
        answer = {"approved": True, "by": "alice"}
        run.say(f"approver POSTs {json.dumps(answer)} to /approve/<key>")
        status, doc = post(f"{base}/approve/{key}", answer)
        if status != 202:
            raise RuntimeError(f"the endpoint answered {status}: {doc}")
        run.say(f"HTTP {status}: continuation task {doc['task_id']}")
        value = first.get(timeout=30)
        run.say(f"result: {value}")
        if "booked, approved by alice" not in value:
            raise RuntimeError(f"unexpected result {value!r}")
        status, doc = post(f"{base}/approve/{key}", {"approved": False, "by": "mallory"})
        run.say(f"the same key POSTed again: HTTP {status} {doc['error']} (a key resumes at most once)")
        if status != 409:
            raise RuntimeError(f"a second resume answered {status}, not 409")
    finally:
        server.shutdown()
        server.server_close()

    # -- 2. rejected from the command line -------------------------------------------------------
    second, key = submit(run, 102, 99.0, "dave")
    answer = {"approved": False, "by": "bob", "reason": "no receipt"}
    shown = f"celery -A examples.approval.app persist resume {key} --input {shlex.quote(json.dumps(answer))}"
    run.say(f"operator runs: {shown}")
    cli = subprocess.run(  # noqa: S603 - our own interpreter and arguments
        [sys.executable, "-m", "celery", "-A", "examples.approval.app", "persist", "resume", key, "--input", json.dumps(answer)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))},
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
