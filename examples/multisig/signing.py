"""The signers' side of the multisig example: keys and signatures (no Celery, no app).

For the example the keys sit here; in real life each signer keeps a private
key on their device and the task verifies public-key signatures.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any

__all__ = ["SIGNER_KEYS", "sign", "verify"]

SIGNER_KEYS = {"alice": b"alice-example-key", "bob": b"bob-example-key", "carol": b"carol-example-key"}


def _digest(payment: dict[str, Any]) -> bytes:
    return json.dumps(payment, sort_keys=True, separators=(",", ":")).encode()


def sign(signer: str, payment: dict[str, Any]) -> str:
    """What a signer's device computes for ``payment``."""
    return hmac.new(SIGNER_KEYS[signer], _digest(payment), hashlib.sha256).hexdigest()


def verify(signer: str, payment: dict[str, Any], answer: Any) -> bool:
    """Whether ``answer`` (a resume input) carries ``signer``'s signature of ``payment``."""
    if signer not in SIGNER_KEYS or not isinstance(answer, dict) or not isinstance(answer.get("signature"), str):
        return False
    return hmac.compare_digest(answer["signature"], sign(signer, payment))
