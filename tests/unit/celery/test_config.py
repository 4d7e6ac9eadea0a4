from __future__ import annotations

import subprocess
import sys
from dataclasses import fields

import pytest
from celery import Celery

from celery_persist import ConfigurationError, Persist
from celery_persist.config import SETTINGS, PersistConfig
from celery_persist.persist import BEAT_ENTRY, CLEANUP_TASK


def test_config_fields_and_defaults_come_from_settings() -> None:
    assert [f.name for f in fields(PersistConfig)] == [s.name.removeprefix("persist_") for s in SETTINGS]
    default = PersistConfig()
    for setting in SETTINGS:
        assert getattr(default, setting.name.removeprefix("persist_")) == setting.parse(setting.default), setting.name
    assert default == PersistConfig.from_mapping({}) == PersistConfig.from_mapping(PersistConfig.defaults())
    assert PersistConfig().store_options is not default.store_options  # a fresh mapping each time


def test_secrets_come_from_the_environment_unless_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CELERY_PERSIST_KEYS", " env:" + "A" * 44 + " ")
    monkeypatch.setenv("CELERY_PERSIST_SIGNING_SECRET", "e" * 32)
    cfg = PersistConfig.from_mapping({})
    assert cfg.keys == "env:" + "A" * 44 and cfg.signing_secret == "e" * 32
    cfg = PersistConfig.from_mapping({"persist_keys": "conf:" + "B" * 44}, signing_secret="o" * 32)
    assert cfg.keys == "conf:" + "B" * 44 and cfg.signing_secret == "o" * 32


def test_overrides_win_over_app_conf(app: Celery) -> None:
    app.conf.persist_lease = 5
    p = Persist(app, lease=9, persist_retention=11)
    assert p.config.lease == 9.0
    assert p.config.retention == 11.0
    assert p.hub.lease == 9.0


def test_persist_is_idempotent_per_app(app: Celery) -> None:
    first = Persist(app)
    assert Persist(app) is first
    assert Persist.of(app) is first


def test_of_builds_from_conf_when_unbound(app: Celery) -> None:
    p = Persist.of(app)
    assert p.config.store_url == app.conf.persist_store_url


def test_unknown_override_is_refused(app: Celery) -> None:
    with pytest.raises(ConfigurationError, match="unknown celery-persist setting 'colour'"):
        Persist(app, colour="blue")


@pytest.mark.parametrize(
    ("name", "value", "fragment"),
    [("codec", "yaml", "persist_codec"), ("encryption", "maybe", "persist_encryption"), ("lease", "soon", "persist_lease")],
)
def test_bad_values_name_the_setting(name: str, value: object, fragment: str) -> None:
    with pytest.raises(ConfigurationError, match=fragment):
        PersistConfig.from_mapping({}, **{name: value})


def test_beat_entry_added_with_interval(app: Celery) -> None:
    app.conf.persist_cleanup_interval = 42
    Persist(app)
    entry = app.conf.beat_schedule[BEAT_ENTRY]
    assert entry == {"task": CLEANUP_TASK, "schedule": 42.0}


def test_no_beat_entry_when_interval_off(app: Celery) -> None:
    app.conf.persist_cleanup_interval = None
    Persist(app)
    assert BEAT_ENTRY not in (app.conf.beat_schedule or {})


def test_store_password_is_masked_in_app_conf() -> None:
    app = Celery("mask", broker="memory://", set_as_current=False)
    app.conf.persist_store_url = "redis://:s3cret@127.0.0.1:6379/2"
    app.conf.persist_encryption = "off"  # a server store without a key would refuse to start
    p = Persist(app)
    assert "s3cret" not in app.conf.persist_store_url
    assert "s3cret" not in repr(p) and "s3cret" not in str(p.config.describe())
    assert "s3cret" in p.config.store_url  # the real URL is kept where it is needed


def test_describe_hides_secrets() -> None:
    cfg = PersistConfig.from_mapping({}, keys="a:" + "A" * 44, signing_secret="x" * 32)
    described = cfg.describe()
    assert described["keys"] == "set" and described["signing_secret"] == "set"
    assert "x" * 32 not in repr(cfg)


def test_tasks_registered_with_app(app: Celery) -> None:
    Persist(app)
    for name in ("celery_persist.await_input", "celery_persist.resume", "celery_persist.cleanup"):
        assert name in app.tasks


def test_importing_the_package_has_no_side_effects() -> None:
    code = (
        "import sys, celery_persist\n"
        "assert 'celery' not in sys.modules, 'celery imported'\n"
        "assert 'celery_persist.persist' not in sys.modules\n"
        "assert 'sqlalchemy' not in sys.modules, 'a driver was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
