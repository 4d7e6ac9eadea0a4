"""Keyring (AES-256-GCM, rotation, env parsing) and Signer (HMAC-SHA256)."""

from __future__ import annotations

import base64
import os
from collections.abc import Callable

import pytest

from celery_persist.crypto import (
    ENCRYPTION_MODES,
    KEY_MAGIC,
    SIGN_MAGIC,
    EnvSecrets,
    Keyring,
    Sealer,
    Signer,
    choose_sealer,
    secrets_from_env,
)
from celery_persist.errors import ConfigurationError, EncryptionError

from .conftest import KEY_A, KEY_B, SECRET

AAD = b"record-1"
KEY_C = bytes(range(50, 82))


def _env(**values: str) -> dict[str, str]:
    return dict(values)


# -- from_env / parse ---------------------------------------------------------------------------


def test_from_env_keys_rotation(b64: Callable[[bytes], str]) -> None:
    old = Keyring.from_env(_env(CELERY_PERSIST_KEYS=f"2026-05:{b64(KEY_A)}"))
    assert old is not None
    old_blob = old.encrypt(b"written before rotation", AAD)

    new = Keyring.from_env(_env(CELERY_PERSIST_KEYS=f" 2026-11:{b64(KEY_B)} , 2026-05:{b64(KEY_A)} ,"))
    assert new is not None
    assert new.active_id == "2026-11" and new.key_ids == ("2026-11", "2026-05")
    assert new.decrypt(old_blob, AAD) == b"written before rotation"  # old ids still decrypt
    fresh = new.encrypt(b"after", AAD)
    assert new.key_id_of(fresh) == "2026-11" and old.key_id_of(old_blob) == "2026-05"  # new writes use the first key
    with pytest.raises(EncryptionError, match="not in the keyring"):
        old.decrypt(fresh, AAD)


def test_from_env_reads_os_environ(monkeypatch: pytest.MonkeyPatch, b64: Callable[[bytes], str]) -> None:
    assert Keyring.from_env() is None
    monkeypatch.setenv("CELERY_PERSIST_KEY", b64(KEY_A))
    ring = Keyring.from_env()
    assert ring is not None and ring.key_ids == ("default",)
    monkeypatch.setenv("CELERY_PERSIST_KEYS", f"main:{b64(KEY_B)}")
    ring = Keyring.from_env()
    assert ring is not None and ring.key_ids == ("main",)  # KEYS wins over KEY


def test_single_key_and_blank_variables(b64: Callable[[bytes], str]) -> None:
    ring = Keyring.from_env(_env(CELERY_PERSIST_KEY=f"  {b64(KEY_A)}\n"))
    assert ring is not None
    assert ring.decrypt(Keyring([("default", KEY_A)]).encrypt(b"x", AAD), AAD) == b"x"
    assert Keyring.from_env(_env(CELERY_PERSIST_KEYS="  ", CELERY_PERSIST_KEY="")) is None
    assert Keyring.from_env({}) is None


def test_urlsafe_base64_is_accepted() -> None:
    raw = b"\xfb\xff" * 16  # standard base64 of this contains '+' and '/'
    std, url = base64.b64encode(raw).decode(), base64.urlsafe_b64encode(raw).decode()
    assert "/" in std and "_" in url
    a = Keyring.parse(f"a:{std}")
    b = Keyring.parse(f"a:{url}")
    assert b.decrypt(a.encrypt(b"same key", AAD), AAD) == b"same key"


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("k1:not base64!!", "not valid base64"),
        ("k1:" + base64.b64encode(bytes(32)).decode()[:-2], "not valid base64"),  # padding cut
        ("k1:" + base64.b64encode(bytes(16)).decode(), "16 bytes"),
        ("k1:" + base64.b64encode(bytes(33)).decode(), "33 bytes"),
        ("k1:", "0 bytes"),
        ("no-colon-here", "kid:base64key"),
        (":" + base64.b64encode(bytes(32)).decode(), "key id"),
        ("bad id:" + base64.b64encode(bytes(32)).decode(), "key id"),
        ("x" * 65 + ":" + base64.b64encode(bytes(32)).decode(), "key id"),
        ("cl\u00e9:" + base64.b64encode(bytes(32)).decode(), "key id"),
        ("dup:" + base64.b64encode(KEY_A).decode() + ",dup:" + base64.b64encode(KEY_B).decode(), "twice"),
        (",,", "at least one key"),
    ],
)
def test_malformed_keys_are_configuration_errors(spec: str, match: str) -> None:
    with pytest.raises(ConfigurationError, match=match) as info:
        Keyring.from_env(_env(CELERY_PERSIST_KEYS=spec))
    secret_part = spec.partition(":")[2]
    if len(secret_part) > 8:
        assert secret_part not in str(info.value)  # never echo key material


def test_bad_single_key_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="'default'"):
        Keyring.from_env(_env(CELERY_PERSIST_KEY="%%%"))


@pytest.mark.parametrize(
    "pairs",
    [
        [],
        [("k", bytes(31))],
        [("k", "x" * 32)],  # a str is not key bytes
        [("", KEY_A)],
        [("k/1", KEY_A)],
        [("k\u00e9", KEY_A)],
        [("k", KEY_A), ("k", KEY_B)],
    ],
)
def test_constructor_validates(pairs: list[tuple[str, object]]) -> None:
    with pytest.raises(ConfigurationError):
        Keyring(pairs)  # type: ignore[arg-type]


def test_repr_shows_ids_not_keys(b64: Callable[[bytes], str]) -> None:
    ring = Keyring([("k1", KEY_A), ("k0", KEY_B)])
    text = repr(ring)
    assert "k1" in text and "2" in text
    for raw in (KEY_A, KEY_B):
        assert b64(raw) not in text and raw.hex() not in text and repr(raw) not in text


# -- encrypt / decrypt ----------------------------------------------------------------------------


@pytest.fixture
def ring() -> Keyring:
    return Keyring([("k1", KEY_A), ("k0", KEY_B)])


@pytest.mark.parametrize("plaintext", [b"", b"x", b"state" * 1000, os.urandom(70_000)])
def test_round_trip(ring: Keyring, plaintext: bytes) -> None:
    blob = ring.encrypt(plaintext, AAD)
    assert blob.startswith(KEY_MAGIC + b"\x02k1")
    assert len(blob) == 3 + 1 + 2 + 12 + len(plaintext) + 16
    assert ring.decrypt(blob, AAD) == plaintext
    assert ring.seal(plaintext, AAD) != blob  # fresh nonce
    assert ring.open(blob, AAD) == plaintext
    assert ring.decrypt(bytearray(blob), AAD) == plaintext
    if len(plaintext) > 8:
        assert plaintext[:64] not in blob


def test_nonces_are_random(ring: Keyring) -> None:
    nonces = {ring.encrypt(b"same", AAD)[6:18] for _ in range(200)}
    assert len(nonces) == 200


def test_wrong_associated_data(ring: Keyring) -> None:
    blob = ring.encrypt(b"bound", AAD)
    for other in (b"", b"record-2", AAD + b"\x00", AAD[:-1]):
        with pytest.raises(EncryptionError, match="does not authenticate"):
            ring.decrypt(blob, other)


def _regions(blob: bytes, kid_len: int) -> dict[str, range]:
    header = 3 + 1 + kid_len
    return {
        "magic": range(0, 3),
        "kid length": range(3, 4),
        "kid": range(4, header),
        "nonce": range(header, header + 12),
        "ciphertext": range(header + 12, len(blob) - 16),
        "tag": range(len(blob) - 16, len(blob)),
    }


def test_every_flipped_byte_in_every_region(ring: Keyring) -> None:
    blob = ring.encrypt(b"ten bytes!", AAD)
    regions = _regions(blob, 2)
    assert sum(len(r) for r in regions.values()) == len(blob) and all(regions.values())
    for name, positions in regions.items():
        for i in positions:
            for mask in (0x01, 0x80, 0xFF):
                bad = bytearray(blob)
                bad[i] ^= mask
                with pytest.raises(EncryptionError):
                    ring.decrypt(bytes(bad), AAD)
                    pytest.fail(f"flip {mask:#x} at {i} ({name}) went unnoticed")


def test_flipped_kid_onto_another_known_id_fails(ring: Keyring) -> None:
    # "k1" -> "k0": the other key exists, but the header is authenticated too.
    blob = ring.encrypt(b"x", AAD)
    swapped = blob[:5] + b"0" + blob[6:]
    assert ring.key_id_of(swapped) == "k0"
    with pytest.raises(EncryptionError, match="does not authenticate"):
        ring.decrypt(swapped, AAD)


def test_every_truncation_and_extension(ring: Keyring) -> None:
    blob = ring.encrypt(b"some state", AAD)
    for n in range(len(blob)):
        with pytest.raises(EncryptionError):
            ring.decrypt(blob[:n], AAD)
    for tail in (b"\x00", b"junk", blob):
        with pytest.raises(EncryptionError):
            ring.decrypt(blob + tail, AAD)


def test_unknown_key_id_and_foreign_blobs(ring: Keyring) -> None:
    other = Keyring([("elsewhere", KEY_C)])
    with pytest.raises(EncryptionError, match="'elsewhere'"):
        ring.decrypt(other.encrypt(b"x", AAD), AAD)
    same_id_other_key = Keyring([("k1", KEY_C)])
    with pytest.raises(EncryptionError, match="does not authenticate"):
        ring.decrypt(same_id_other_key.encrypt(b"x", AAD), AAD)
    for foreign in (b"", b"\xa7K", b"plain text", SIGN_MAGIC + b"x" * 40, KEY_MAGIC + b"\x00" + b"x" * 40, KEY_MAGIC + b"\x05ab"):
        with pytest.raises(EncryptionError):
            ring.decrypt(foreign, AAD)
    with pytest.raises(EncryptionError, match="corrupt"):
        ring.key_id_of(KEY_MAGIC + b"\x02\xff\xfe" + bytes(40))


# -- Signer -----------------------------------------------------------------------------------------


def test_signer_round_trip_and_layout() -> None:
    signer = Signer(SECRET)
    blob = signer.seal(b"readable state", AAD)
    assert blob.startswith(SIGN_MAGIC) and b"readable state" in blob and len(blob) == 3 + 14 + 32
    assert signer.open(blob, AAD) == b"readable state"
    assert Signer(SECRET.encode()).open(blob, AAD) == b"readable state"
    assert Signer(SECRET).open(signer.seal(b"", AAD), AAD) == b""
    assert signer.confidential is False and Keyring.confidential is True
    assert SECRET not in repr(signer)


def test_signer_refuses_tampering_truncation_and_other_secrets() -> None:
    signer = Signer(SECRET)
    blob = signer.seal(b"state!", AAD)
    for i in range(len(blob)):
        bad = bytearray(blob)
        bad[i] ^= 0x01
        with pytest.raises(EncryptionError):
            signer.open(bytes(bad), AAD)
    for n in range(len(blob)):
        with pytest.raises(EncryptionError):
            signer.open(blob[:n], AAD)
    with pytest.raises(EncryptionError):
        signer.open(blob + b"x", AAD)
    with pytest.raises(EncryptionError):
        signer.open(blob, b"record-2")
    with pytest.raises(EncryptionError):
        Signer("another-secret-of-enough-length").open(blob, AAD)


def test_signer_binds_the_aad_boundary() -> None:
    # Moving bytes between associated data and body must not verify (length prefix).
    signer = Signer(SECRET)
    blob = signer.seal(b"Xdata", b"ab")
    moved = SIGN_MAGIC + b"data" + blob[-32:]
    with pytest.raises(EncryptionError):
        signer.open(moved, b"abX")


def test_signer_key_is_derived_not_the_secret() -> None:
    import hashlib
    import hmac

    blob = Signer(SECRET).seal(b"x", AAD)
    naive = hmac.new(SECRET.encode(), blob[:-32], hashlib.sha256).digest()
    assert blob[-32:] != naive


def test_signer_needs_a_real_secret() -> None:
    with pytest.raises(ConfigurationError, match="16 bytes"):
        Signer("short")


def test_both_are_sealers(ring: Keyring) -> None:
    sealers: list[Sealer] = [ring, Signer(SECRET)]
    for sealer in sealers:
        assert sealer.open(sealer.seal(b"p", AAD), AAD) == b"p"


# -- secrets_from_env / choose_sealer ---------------------------------------------------------------


def test_secrets_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    assert secrets_from_env() == EnvSecrets(None, None, None)
    assert secrets_from_env(_env(CELERY_PERSIST_KEYS=" ", CELERY_PERSIST_KEY="", CELERY_PERSIST_SIGNING_SECRET="")) == EnvSecrets()
    found = secrets_from_env(
        _env(CELERY_PERSIST_KEYS=" a:AAAA \n", CELERY_PERSIST_KEY=" BBBB", CELERY_PERSIST_SIGNING_SECRET=f" {SECRET} ")
    )
    assert found == EnvSecrets(keys="a:AAAA", key="BBBB", signing_secret=f" {SECRET} ")  # a secret is taken verbatim
    assert SECRET not in repr(found) and "AAAA" not in repr(found)
    monkeypatch.setenv("CELERY_PERSIST_SIGNING_SECRET", SECRET)
    assert secrets_from_env().signing_secret == SECRET


def test_choose_sealer(ring: Keyring, b64: Callable[[bytes], str]) -> None:
    assert ENCRYPTION_MODES == ("auto", "required", "off")
    with pytest.raises(ConfigurationError, match="persist_encryption must be one of"):
        choose_sealer("sometimes", ring, None)
    assert choose_sealer("auto", ring, SECRET) is ring  # a keyring wins over a secret
    assert choose_sealer("required", ring, None) is ring
    assert isinstance(choose_sealer("off", ring, SECRET), Signer)  # off drops the keyring, still signs
    assert choose_sealer("off", ring, None) is None
    assert choose_sealer("auto", None, None, environ={}) is None
    assert isinstance(choose_sealer("auto", None, SECRET, environ={}), Signer)
    from_env = choose_sealer("required", None, None, environ=_env(CELERY_PERSIST_KEY=b64(KEY_B)))
    assert isinstance(from_env, Keyring) and from_env.key_ids == ("default",)
    assert choose_sealer("off", None, None, environ=_env(CELERY_PERSIST_KEY=b64(KEY_B))) is None
    with pytest.raises(ConfigurationError, match="celery-persist keygen"):
        choose_sealer("required", None, SECRET, environ={})
    with pytest.raises(ConfigurationError, match="at least 16 bytes"):
        choose_sealer("auto", ring, "short")
