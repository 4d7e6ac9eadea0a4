"""open_store(): scheme table, whole-scheme lookup, entry points, did-you-mean, options."""

from __future__ import annotations

import sys
import textwrap
import types
from pathlib import Path

import pytest

import celery_persist.stores as stores
from celery_persist.errors import ConfigurationError
from celery_persist.stores import ENTRY_POINT_GROUP, STORES, open_store, store_class
from celery_persist.stores.base import Kind, Status, StoredRecord
from celery_persist.stores.drivers import describe, mask_url, require
from celery_persist.stores.memory import MemoryStore


class WholeScheme(MemoryStore):
    pass


class BeforePlus(MemoryStore):
    pass


@pytest.fixture
def fake_module(monkeypatch: pytest.MonkeyPatch) -> str:
    mod = types.ModuleType("unit_fake_stores")
    mod.WholeScheme = WholeScheme  # type: ignore[attr-defined]
    mod.BeforePlus = BeforePlus  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "unit_fake_stores", mod)
    return "unit_fake_stores"


def test_memory_and_options() -> None:
    s = open_store("memory://")
    assert type(s) is MemoryStore and s.name == "memory://"
    a = open_store("memory://unit-registry", prefix="p1")
    b = open_store("MEMORY://unit-registry", prefix="p1")
    assert store_class("Memory://") is MemoryStore
    a.put(StoredRecord("ab" * 32, Kind.SUSPENSION, Status.SUSPENDED, b"b"))
    assert b.get("ab" * 32) is not None  # options reached the store: same name and prefix share
    assert open_store("memory://unit-registry", prefix="p2").get("ab" * 32) is None


def test_bad_option_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="bogus"):
        open_store("memory://", bogus=1)
    with pytest.raises(ConfigurationError):
        open_store("memory://", prefix="a", extra_thing=True)


def test_whole_scheme_wins_over_the_part_before_plus(monkeypatch: pytest.MonkeyPatch, fake_module: str) -> None:
    monkeypatch.setitem(STORES, "mongodb+srv", f"{fake_module}:WholeScheme")
    monkeypatch.setitem(STORES, "mongodb", f"{fake_module}:BeforePlus")
    assert store_class("mongodb+srv://cluster.example/db") is WholeScheme
    assert store_class("mongodb://h/db") is BeforePlus
    assert store_class("mongodb+other://h/db") is BeforePlus  # falls back to the part before '+'
    assert type(open_store("mongodb+srv://u:p@cluster.example/db")) is WholeScheme


def test_table_entries() -> None:
    assert STORES["mongodb+srv"] == STORES["mongodb"] and STORES["neo4j+s"] == STORES["neo4j"]
    for scheme in ("sqlite", "postgresql", "mysql", "mariadb"):
        assert STORES[scheme] == "celery_persist.stores.sql:SQLStore"
    for scheme, target in STORES.items():
        module, sep, attr = target.partition(":")
        assert sep and module.startswith("celery_persist.stores.") and attr.isidentifier(), scheme
    assert stores._resolve("postgresql+psycopg") == STORES["postgresql"]


@pytest.mark.parametrize(
    ("url", "suggestion"),
    [("memroy://", "memory"), ("redi://h", "redis"), ("postgre://h/db", "postgres"), ("mongo://h", "mongodb"), ("sqlit:///x", "sqlite")],
)
def test_did_you_mean(url: str, suggestion: str) -> None:
    with pytest.raises(ConfigurationError, match=f"Did you mean '{suggestion}'"):
        open_store(url)


def test_unknown_scheme_lists_known_ones() -> None:
    with pytest.raises(ConfigurationError, match="Known: .*memory") as info:
        open_store("zzqqxx://user:hunter2@host/db")
    assert "hunter2" not in str(info.value)


@pytest.mark.parametrize("url", ["memory", "memory:", "memory:/x", "://host", "", "admin:hunter2@db.example/x", "sqlite:relative.db"])
def test_url_without_scheme(url: str) -> None:
    with pytest.raises(ConfigurationError, match="no scheme") as info:
        open_store(url)
    assert "hunter2" not in str(info.value)


def _install_dist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, entry: str) -> None:
    """A real (if tiny) installed distribution on sys.path, declaring a store entry point."""
    pkg = tmp_path / "site"
    pkg.mkdir()
    (pkg / "acme_persist_store.py").write_text(
        textwrap.dedent(
            """
            from celery_persist.stores.memory import MemoryStore

            class AcmeStore(MemoryStore):
                schemes = ("acme",)
            """
        )
    )
    dist = pkg / "acme_persist_store-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-persist-store\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\n{name} = {entry}\n")
    monkeypatch.syspath_prepend(str(pkg))
    monkeypatch.delitem(sys.modules, "acme_persist_store", raising=False)


def test_entry_point_group(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _install_dist(tmp_path, monkeypatch, "acmestore", "acme_persist_store:AcmeStore")
    s = open_store("acmestore://anything", prefix="x")
    assert type(s).__name__ == "AcmeStore" and type(s).__module__ == "acme_persist_store"
    with pytest.raises(ConfigurationError, match="Did you mean 'acmestore'"):
        open_store("acmestor://x")  # entry points take part in the suggestion


def test_table_wins_over_entry_points(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _install_dist(tmp_path, monkeypatch, "memory", "acme_persist_store:AcmeStore")
    assert store_class("memory://") is MemoryStore


def test_mask_url() -> None:
    assert mask_url("redis://:s3cret@h:6379/0") == "redis://:***@h:6379/0"
    assert mask_url("postgresql://bob:pa:ss@db/x") == "postgresql://bob:***@db/x"
    assert mask_url("mongodb+srv://u:p@c.example/db?authSource=admin") == "mongodb+srv://u:***@c.example/db?authSource=admin"
    assert mask_url("redis://h/0?password=abc&db=1") == "redis://h/0?password=***&db=1"
    assert mask_url("sqlite:///tmp/x.db") == "sqlite:///tmp/x.db"


def test_require() -> None:
    assert require("json", extra="none") is sys.modules["json"]
    with pytest.raises(ConfigurationError, match=r"pip install 'celery-persist\[nosuch\]'") as info:
        require("no_such_driver_module_xyz", extra="nosuch", store="acme")
    assert info.value.store == "acme"


# -- describe(): a driver's error, told safely --------------------------------------------------


@pytest.mark.parametrize(
    ("error", "kwargs", "expected"),
    [
        (ConnectionRefusedError(111, "Connection refused"), {}, "ConnectionRefusedError: [Errno 111] Connection refused"),
        (
            RuntimeError('missing "=" after "postgresql://app:Pa55word@db:5432/x" in connection info string'),
            {},
            'RuntimeError: missing "=" after "postgresql://app:***@db:5432/x" in connection info string',
        ),
        (RuntimeError("invalid dsn: host=db password=Pa55word sslpassword='k e y' authSource=admin"), {}, None),
        (RuntimeError("options {'password': 'Pa55word', 'db': 0}"), {}, "RuntimeError: options {'password': ***, 'db': 0}"),
        (
            RuntimeError("relation \"t\" does not exist\nLINE 1: SELECT * FROM t WHERE k = 'Pa55word'"),
            {},
            'RuntimeError: relation "t" does not exist',
        ),
        (RuntimeError("Key (k)=(x)\nDETAIL: Key (key_hash)=(Pa55word) already exists."), {}, "RuntimeError: Key (k)=(x)"),
        (RuntimeError("You have an error in your SQL syntax near 'Pa55word' at line 1"), {}, None),
        (RuntimeError("auth failed for Pa55word"), {"url": "redis://:Pa55word@h:6379/0"}, "RuntimeError: auth failed for ***"),
        (RuntimeError("auth failed for Pa%2F55"), {"url": "redis://:Pa%2F55@h/0"}, "RuntimeError: auth failed for ***"),
        (RuntimeError("pw is shown where pw stands alone, not in pwd"), {"password": "pw"}, None),
        (RuntimeError(""), {}, "RuntimeError"),
        (RuntimeError("x" * 1000), {}, None),
    ],
)
def test_describe_names_the_cause_and_never_a_secret(error: BaseException, kwargs: dict[str, str], expected: str | None) -> None:
    text = describe(error, **kwargs)
    if expected is not None:
        assert text == expected
    assert text.startswith(type(error).__name__)
    assert "Pa55word" not in text and "Pa%2F55" not in text and "k e y" not in text
    assert "\n" not in text and len(text) <= len(type(error).__name__) + 2 + 240
    if kwargs.get("password") == "pw":
        assert text == "RuntimeError: *** is shown where *** stands alone, not in pwd"


def test_describe_survives_an_exception_whose_str_raises() -> None:
    class Odd(Exception):
        def __str__(self) -> str:
            raise ValueError("no")

    assert describe(Odd()) == "Odd"


@pytest.mark.parametrize("url", ["postgresql://app:S3CRET@db:notaport/x", "postgresql://app:S3 CRET@db:x/x"])
def test_an_unparsable_sql_url_is_a_configuration_error_without_its_password(url: str) -> None:
    with pytest.raises(ConfigurationError, match="cannot parse SQL store URL") as info:
        open_store(url)
    assert "S3" not in str(info.value) and "CRET" not in str(info.value)
