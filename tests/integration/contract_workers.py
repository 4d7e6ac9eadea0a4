"""Code that runs in other processes or threads during the store contract suite.

Kept out of the test module so a ``spawn`` child imports only this and
celery_persist, not pytest or the fixtures.
"""

from __future__ import annotations

import os
import threading
import traceback
from typing import Any

from celery_persist.stores import Status, open_store


def claim_all(url: str, options: dict[str, Any], keys: list[str], barrier: Any, results: Any, now: float, lease: float) -> None:
    """Open a store, wait for every racer, then try to claim each key; report the wins.

    Puts ``("ok", pid, [won keys])`` or ``("error", pid, traceback)`` on ``results``.
    """
    try:
        store = open_store(url, **options)
        try:
            # Connect before the start line, so the race measures claims, not connects.
            store.get(keys[0])
            barrier.wait(timeout=120)
            wins = [k for k in keys if store.transition(k, {Status.SUSPENDED}, Status.CLAIMED, due_at=now + lease, now=now)]
        finally:
            store.close()
        results.put(("ok", os.getpid(), wins))
    except BaseException:  # noqa: BLE001 - reported to the parent, which fails the test
        results.put(("error", os.getpid(), traceback.format_exc()))


def reseal_all(
    url: str, options: dict[str, Any], keys: list[str], barrier: Any, results: Any, now: float, lease: float, version: int
) -> None:
    """Like :func:`claim_all`, but a compare-and-set on the version alone: every racer moves each
    key from ``suspended`` to ``suspended`` (so the status check lets all of them through),
    expecting ``version`` and writing ``version + 1`` with a seal of its own.

    Puts ``("ok", pid, [[key, seal] for each won key])`` or ``("error", pid, traceback)`` on ``results``.
    """
    try:
        seal = f"{os.getpid():x}{threading.get_ident():x}"
        store = open_store(url, **options)
        try:
            store.get(keys[0])
            barrier.wait(timeout=120)
            wins = [
                [k, seal]
                for k in keys
                if store.transition(
                    k,
                    {Status.SUSPENDED},
                    Status.SUSPENDED,
                    due_at=now + lease,
                    now=now,
                    version=version + 1,
                    seal=seal,
                    expect_version=version,
                )
            ]
        finally:
            store.close()
        results.put(("ok", os.getpid(), wins))
    except BaseException:  # noqa: BLE001 - reported to the parent, which fails the test
        results.put(("error", os.getpid(), traceback.format_exc()))
