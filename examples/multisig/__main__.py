"""``python -m examples.multisig``: 2-of-3 signatures; one arrives, one times out, one arrives.

1. ``release_payment`` (:mod:`examples.multisig.app`) asks alice, parks.
2. alice signs: this script resumes her key with her signature. The task
   re-runs, replays her answer and parks again, asking bob.
3. bob never answers. His await has a 4-second timeout with
   ``on_timeout="default"``; once it passed, ``persist.cleanup()`` (what the
   beat entry ``celery-persist-cleanup`` runs every ``persist_cleanup_interval``
   seconds) expires it and resumes the task with the default,
   ``NO_SIGNATURE``. A late answer from bob is refused (``SuspensionExpired``).
4. carol signs; the task has 2 of 3 and releases the payment.

A suspension key is read from the result backend each time the task parks
(``persist_key_in_result``); a real deployment would send each signer their
key with ``await_input(..., notify=...)``.
"""

from __future__ import annotations

from typing import Any

from celery_persist import SuspensionExpired
from examples._embedded import Run, main, next_suspension, wait_for
from examples.multisig.app import NO_SIGNATURE, persist, release_payment
from examples.multisig.signing import sign

PAYMENT = {"id": "PAY-7", "amount": 25000.0, "to": "ACME Corp", "iban": "DE89 3704 0044 0532 0130 00"}
SIGNERS = ["alice", "bob", "carol"]
TIMEOUT = 4.0


def parked(result: Any, seen: set[str]) -> tuple[str, dict[str, Any]]:
    found = next_suspension(result, seen)
    if found is None:
        raise RuntimeError("the task finished before every signer was asked")
    return found


def body(run: Run) -> None:
    run.worker()
    result = release_payment.delay(PAYMENT, SIGNERS, 2, TIMEOUT)
    run.say(f"payment {PAYMENT['id']} needs 2 of {SIGNERS}; each signer has {TIMEOUT:.0f} s (task {result.id})")
    seen: set[str] = set()

    key, info = parked(result, seen)
    run.say(f"parked: {info['prompt']!r}")
    persist.resume(key, {"signer": "alice", "signature": sign("alice", PAYMENT)})
    run.say("alice signs")

    key, info = parked(result, seen)
    bob = persist.load(key)
    run.say(f"parked: {info['prompt']!r}; expires {bob.expires_at:%H:%M:%S} UTC")
    run.say("bob does not answer; waiting for his deadline, then running persist.cleanup()")

    def expired() -> int | None:
        applied = persist.cleanup()
        return applied if persist.load(key).status == "expired" else None

    wait_for(expired, TIMEOUT + 30, "bob's await to expire", interval=0.25)
    run.say(f"cleanup expired bob's suspension {bob.fingerprint}: his await_input returns the default {NO_SIGNATURE}")
    try:
        persist.resume(key, {"signer": "bob", "signature": sign("bob", PAYMENT)})
    except SuspensionExpired:
        run.say("bob's late signature is refused: SuspensionExpired")
    else:
        raise RuntimeError("a resume after expiry should raise SuspensionExpired")

    key, info = parked(result, seen)
    run.say(f"parked: {info['prompt']!r}")
    persist.resume(key, {"signer": "carol", "signature": sign("carol", PAYMENT)})
    run.say("carol signs")

    outcome: dict[str, Any] = result.get(timeout=30)
    run.say(f"result: {outcome}")
    if not outcome["released"] or outcome["signed_by"] != ["alice", "carol"] or "bob" not in outcome["not_signed"]:
        raise RuntimeError(f"unexpected decision {outcome}")
    run.say(f"payment {outcome['payment']} released with signatures of {' and '.join(outcome['signed_by'])} (bob timed out)")


if __name__ == "__main__":
    main("multisig", persist, body)
