"""The multisig example's Celery app and its task, ``release_payment``.

``release_payment`` asks each signer in turn with ``self.await_input(...)``.
Every call has a ``timeout`` and ``on_timeout="default"`` with
:data:`NO_SIGNATURE` as the default: a signer who does not answer in time
counts as not signing, and the flow goes on instead of failing. Once the
signers were asked (or enough signed), the task decides.

Each call parks the task (its worker slot is freed); a resume re-runs it from
the top with the same id and arguments, and the n-th ``await_input`` returns
the n-th answer, so the loop below replays the earlier answers and parks at
the next signer. The code before each call must be harmless to re-run: here
it only computes.
"""

from __future__ import annotations

from typing import Any

from celery_persist import Persist, PersistentTask
from examples._embedded import make_app
from examples.multisig.signing import verify

app = make_app("multisig")
persist = Persist(app)

#: What a timed-out ``await_input`` returns (``on_timeout="default"``).
NO_SIGNATURE: dict[str, Any] = {"signature": None, "reason": "no answer before the deadline"}


@app.task(base=PersistentTask, bind=True, acks_late=True, name="examples.multisig.release_payment")
def release_payment(self: PersistentTask, payment: dict[str, Any], signers: list[str], required: int, timeout: float) -> dict[str, Any]:
    """Release ``payment`` once ``required`` of ``signers`` signed it; each has ``timeout`` seconds."""
    signed: list[str] = []
    refused: dict[str, str] = {}
    for signer in signers:
        if len(signed) >= required:
            break
        answer = self.await_input(
            prompt=f"{signer}: sign payment {payment['id']} of EUR {payment['amount']:.2f} to {payment['to']}",
            timeout=timeout,
            on_timeout="default",
            default=NO_SIGNATURE,
        )
        if verify(signer, payment, answer):
            signed.append(signer)
        else:
            refused[signer] = answer.get("reason", "invalid signature") if isinstance(answer, dict) else "invalid answer"
    released = len(signed) >= required
    return {"payment": payment["id"], "released": released, "signed_by": signed, "not_signed": refused, "required": required}
