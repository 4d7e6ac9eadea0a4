"""Suspension keys: format, randomness, ordering, signatures, constant-time checks."""

from __future__ import annotations

import base64
import hashlib
import hmac
import random
import re
import time
from typing import Any

import pytest

from celery_persist import keys
from celery_persist.errors import InvalidKey
from celery_persist.keys import MAX_KEY_LENGTH, created_ms, fingerprint, key_hash, new_suspension_key, validate_key

SECRET = "keys-test-secret-0123456789"
URL_SAFE = re.compile(r"\A[A-Za-z0-9_.-]+\Z")
UNSIGNED = re.compile(r"\Ap1\.[0-9a-z]{10}[A-Za-z0-9_-]{22}\Z")
SIGNED = re.compile(r"\Ap1\.[0-9a-z]{10}[A-Za-z0-9_-]{22}\.[A-Za-z0-9_-]{22}\Z")


def _random_part(key: str) -> bytes:
    return base64.urlsafe_b64decode(key[13:35] + "==")


@pytest.mark.parametrize("secret", [None, SECRET, b"\x00\xff" * 64, "s"])
def test_format_length_and_charset(secret: Any) -> None:
    for _ in range(200):
        key = new_suspension_key(secret)
        assert len(key) <= MAX_KEY_LENGTH == 96
        assert URL_SAFE.match(key), key
        assert (SIGNED if secret else UNSIGNED).match(key), key
        validate_key(key, secret)
        validate_key(key)  # without a secret only the form is checked


def test_keys_are_unique_with_128_random_bits(monkeypatch: pytest.MonkeyPatch) -> None:
    # Freeze the clock: uniqueness must come from the random part alone.
    monkeypatch.setattr(time, "time_ns", lambda: 1_700_000_000_000_000_000)
    many = [new_suspension_key() for _ in range(20_000)]
    assert len(set(many)) == len(many)
    assert len({k[:13] for k in many}) == 1  # same prefix: the randomness is all in the rest
    parts = [int.from_bytes(_random_part(k), "big") for k in many[:2000]]
    assert all(len(_random_part(k)) == 16 for k in many[:100])
    # Every one of the 128 bits takes both values (a stuck bit would halve the key space).
    ones, zeros = 0, 0
    for p in parts:
        ones |= p
        zeros |= ~p
    assert ones == zeros & (2**128 - 1) == 2**128 - 1


def test_keys_made_later_sort_later(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(7)
    stamps = sorted({rng.randrange(0, 2**45) for _ in range(500)} | {0, 31, 32, 1023, 1024, 2**40, 4_102_444_800_000})
    now = iter(stamps)
    current = {"ms": 0}

    def fake_time_ns() -> int:
        current["ms"] = next(now)
        return current["ms"] * 1_000_000 + 999_999  # sub-millisecond part is dropped

    monkeypatch.setattr(time, "time_ns", fake_time_ns)
    made = []
    for _ in stamps:
        key = new_suspension_key(SECRET)
        assert created_ms(key) == current["ms"]
        made.append(key)
    assert sorted(made) == made
    assert len(set(made)) == len(made)


def test_key_hash_and_fingerprint() -> None:
    key = new_suspension_key()
    assert key_hash(key) == hashlib.sha256(key.encode()).hexdigest()
    assert fingerprint(key) == key_hash(key)[:12]
    assert re.fullmatch(r"[0-9a-f]{12}", fingerprint(key))
    assert key not in key_hash(key) and key not in fingerprint(key)


def test_str_and_bytes_secret_are_the_same_secret() -> None:
    validate_key(new_suspension_key(SECRET), SECRET.encode())
    validate_key(new_suspension_key(SECRET.encode()), SECRET)


def test_empty_secret_means_unsigned() -> None:
    key = new_suspension_key("")
    assert UNSIGNED.match(key)
    validate_key(key, "")
    validate_key(key, None)


def test_unsigned_key_is_refused_when_a_secret_is_set() -> None:
    with pytest.raises(InvalidKey, match="not signed"):
        validate_key(new_suspension_key(), SECRET)


def test_tag_from_another_secret_is_refused() -> None:
    key = new_suspension_key("another-secret-0123456789")
    with pytest.raises(InvalidKey, match="does not verify"):
        validate_key(key, SECRET)


def test_forged_tags_are_refused() -> None:
    key = new_suspension_key(SECRET)
    body, tag = key.rsplit(".", 1)
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    forged = {body + "." + "A" * 22, body + "." + base64.urlsafe_b64encode(bytes(16)).decode().rstrip("=")}
    for i in range(len(tag)):  # every single-character change of the tag
        c = alphabet[(alphabet.index(tag[i]) + 1) % 64]
        forged.add(f"{body}.{tag[:i]}{c}{tag[i + 1 :]}")
    # A genuine tag moved onto another body.
    other_body = new_suspension_key(SECRET).rsplit(".", 1)[0]
    forged.add(f"{other_body}.{tag}")
    # A body changed under a genuine tag.
    forged.add(f"{body[:-1]}{'A' if body[-1] != 'A' else 'B'}.{tag}")
    forged.discard(key)
    for candidate in forged:
        with pytest.raises(InvalidKey):
            validate_key(candidate, SECRET)


def test_tag_comparison_is_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[Any, Any]] = []
    real = hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(keys.hmac, "compare_digest", spy)
    key = new_suspension_key(SECRET)
    validate_key(key, SECRET)
    assert len(calls) == 1 and calls[0][0] == key.rsplit(".", 1)[1].encode()
    with pytest.raises(InvalidKey):
        validate_key(key[:-1] + ("A" if key[-1] != "A" else "B"), SECRET)
    assert len(calls) == 2  # the forged tag went through compare_digest too


def _invalid_forms() -> list[Any]:
    unsigned = new_suspension_key()
    signed = new_suspension_key(SECRET)
    forms: list[Any] = [unsigned[:n] for n in range(len(unsigned))]
    forms += [signed[:n] for n in range(len(unsigned) + 1, len(signed))]
    forms += [
        unsigned + "x",
        unsigned + ".",
        signed + "A",
        signed + ".AAAA",
        unsigned + "\n",
        " " + unsigned,
        unsigned.upper(),
        "p2" + unsigned[2:],
        "P1" + unsigned[2:],
        unsigned.replace(".", "-", 1),
        unsigned[:3] + "i" + unsigned[4:],  # i, l, o, u are not in the time alphabet
        unsigned[:3] + "u" + unsigned[4:],
        unsigned[:20] + "+" + unsigned[21:],  # not base64url
        unsigned[:20] + "=" + unsigned[21:],
        unsigned[:20] + "\u00e9" + unsigned[21:],
        "",
        "garbage",
        "p1.",
        "x" * 10_000,
        signed + "." + "A" * 22,
    ]
    forms += [None, 42, 4.2, unsigned.encode(), [unsigned], {"key": unsigned}, object()]
    return forms


@pytest.mark.parametrize("secret", [None, SECRET])
def test_malformed_keys_are_refused(secret: str | None) -> None:
    for bad in _invalid_forms():
        with pytest.raises(InvalidKey) as info:
            validate_key(bad, secret)
        if isinstance(bad, str) and len(bad) > 20:
            assert bad not in str(info.value)  # a rejected key is not echoed back


def test_unsigned_prefix_of_a_signed_key_passes_only_without_a_secret() -> None:
    signed = new_suspension_key(SECRET)
    body = signed.rsplit(".", 1)[0]
    validate_key(body)
    with pytest.raises(InvalidKey):
        validate_key(body, SECRET)
