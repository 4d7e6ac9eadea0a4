"""Settings are read when the app is configured, so ``Persist(app)`` works before or after configuration."""

from __future__ import annotations

import logging
import types
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

from celery_persist import ConfigurationError, Persist
from celery_persist.persist import BEAT_ENTRY


def _new_app() -> Celery:
    return Celery("lazy", set_as_current=False)


def _config_object(tmp_path: Path, **extra: Any) -> types.SimpleNamespace:
    return types.SimpleNamespace(
        broker_url="memory://",
        result_backend="cache+memory://",
        persist_store_url=f"sqlite:///{tmp_path / 'configured.db'}",
        persist_cleanup_interval=30,
        **extra,
    )


def _count_configures(app: Celery) -> list[object]:
    fired: list[object] = []
    app.on_configure.connect(lambda sender=None, **_: fired.append(sender), weak=False)
    return fired


def test_persist_before_config_from_object_reads_the_configured_store(tmp_path: Path) -> None:
    app = _new_app()
    fired = _count_configures(app)
    app.add_defaults({"broker_transport_options": {"visibility_timeout": 99}})
    persist = Persist(app)
    assert not app.configured, "Persist(app) must not force the configuration"
    app.config_from_object(_config_object(tmp_path))
    assert persist.config.store_url == f"sqlite:///{tmp_path / 'configured.db'}"
    assert app.conf.broker_transport_options == {"visibility_timeout": 99}  # earlier add_defaults kept
    assert app.conf.beat_schedule[BEAT_ENTRY]["schedule"] == 30.0
    assert len(fired) == 1
    persist.ready()
    assert (tmp_path / "configured.db").exists()


def test_persist_after_configuration_reads_the_same(tmp_path: Path) -> None:
    app = _new_app()
    fired = _count_configures(app)
    app.config_from_object(_config_object(tmp_path))
    assert app.conf.broker_url == "memory://"  # configures the app
    persist = Persist(app)
    assert persist.config.store_url == f"sqlite:///{tmp_path / 'configured.db'}"
    assert app.conf.beat_schedule[BEAT_ENTRY]["schedule"] == 30.0
    assert len(fired) == 1


def test_a_later_reconfiguration_keeps_the_beat_entry_and_the_new_store(tmp_path: Path) -> None:
    app = _new_app()
    app.config_from_object(types.SimpleNamespace(persist_store_url=f"sqlite:///{tmp_path / 'first.db'}"))
    persist = Persist(app)
    assert app.conf.beat_schedule[BEAT_ENTRY]  # the app is configured now
    assert persist.config.store_url.endswith("first.db")
    app.config_from_object(_config_object(tmp_path))  # reloads the configuration
    assert app.conf.beat_schedule[BEAT_ENTRY]["schedule"] == 30.0
    assert persist.config.store_url == f"sqlite:///{tmp_path / 'configured.db'}"


def test_django_style_namespace_is_honoured(tmp_path: Path) -> None:
    settings = types.SimpleNamespace(
        CELERY_BROKER_URL="memory://",
        CELERY_PERSIST_STORE_URL=f"sqlite:///{tmp_path / 'django.db'}",
        CELERY_PERSIST_LEASE=7,
        DEBUG=True,
    )
    app = _new_app()
    persist = Persist(app)
    app.config_from_object(settings, namespace="CELERY")
    assert persist.config.store_url == f"sqlite:///{tmp_path / 'django.db'}"
    assert persist.config.lease == 7.0


def test_an_invalid_value_is_refused_at_persist_when_configured() -> None:
    app = _new_app()
    app.conf.persist_encryption = "of"
    with pytest.raises(ConfigurationError, match="persist_encryption.*'of'"):
        Persist(app)


def test_an_invalid_value_from_a_later_configuration_is_refused_at_first_use(tmp_path: Path) -> None:
    app = _new_app()
    persist = Persist(app)
    app.config_from_object(_config_object(tmp_path, persist_send_events="sometimes"))
    with pytest.raises(ConfigurationError, match="persist_send_events.*'sometimes'"):
        persist.config  # noqa: B018


def test_the_store_url_falls_back_to_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CELERY_PERSIST_STORE_URL", f"sqlite:///{tmp_path / 'env.db'}")
    app = _new_app()
    assert Persist(app).config.store_url == f"sqlite:///{tmp_path / 'env.db'}"
    configured = _new_app()
    configured.conf.persist_store_url = f"sqlite:///{tmp_path / 'conf.db'}"
    assert Persist(configured).config.store_url == f"sqlite:///{tmp_path / 'conf.db'}"  # a setting wins


@pytest.mark.parametrize("value", ["of", 2, "maybe"])
def test_booleans_are_strict(value: object) -> None:
    app = _new_app()
    app.conf.persist_metrics = value
    with pytest.raises(ConfigurationError, match="persist_metrics"):
        Persist(app)


def test_the_no_key_warning_is_logged_once_at_first_use_not_at_persist(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import celery_persist.hub as hub_module

    monkeypatch.setattr(hub_module, "_warned_plaintext", False)
    for name in ("CELERY_PERSIST_KEYS", "CELERY_PERSIST_KEY"):
        monkeypatch.delenv(name, raising=False)
    caplog.set_level(logging.WARNING)
    app = _new_app()
    app.conf.persist_store_url = "redis://127.0.0.1:1/0"  # a server store: it cannot keep its own key
    app.conf.persist_encryption = "auto"
    persist = Persist(app)  # what a module does at import time
    assert not [r for r in caplog.records if "no encryption key" in r.getMessage()]
    persist.hub  # noqa: B018 - first use
    Persist(_new_app(), store_url="redis://127.0.0.1:1/1", encryption="auto").hub  # noqa: B018 - a second app, same process
    warnings = [r for r in caplog.records if "no encryption key" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].name == "celery_persist.hub"
