"""Every place that shows the store URL shows it masked: errors, logs, metrics, CLI, Celery's report.

The store is Redis on port 1 of 127.0.0.1, where nothing listens: store
operations fail at once (``retries=0``), and their errors are checked too.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from click.testing import CliRunner
from prometheus_client import CollectorRegistry, generate_latest

from celery_persist import ConfigurationError, InvalidKey, Persist, PersistenceError, StoreUnavailable
from celery_persist import registry as registry_module
from celery_persist.cli import main
from celery_persist.metrics import PrometheusMetrics
from celery_persist.stores import mask_url

pytest.importorskip("redis")

#: The password holds a raw "@" and "/"; the query holds two more secrets.
RAW_URL = "redis://:p@ss/w0rd@127.0.0.1:1/0?sentinel_password=S3NT&ssl_keyfile_password=KFP"
#: A percent-encoded password and a ``password`` query option, both of which redis-py accepts.
ENCODED_URL = "redis://:p%40ss%2Fw0rd@127.0.0.1:1/0?password=S3NT"
SECRETS = ("p@ss", "p%40ss", "w0rd", "S3NT", "KFP")
OPTIONS = {"retries": 0, "socket_connect_timeout": 1}

#: redis-py 8 hands ``sentinel_password`` / ``ssl_keyfile_password`` of a redis:// URL to the
#: connection class, which raises TypeError on the first command; RedisStore does not map it.
URLS = [pytest.param(RAW_URL, id="raw"), pytest.param(ENCODED_URL, id="encoded")]
STORE_OP_URLS = URLS
#: What a store operation on each URL raises, and the CLI's exit code for it: the raw URL names
#: options a redis:// connection does not take (sentinel_password, ssl_keyfile_password),
#: which is a configuration error naming them; the other only reaches a closed port.
EXPECTED: dict[str, tuple[type[PersistenceError], int, str]] = {
    RAW_URL: (ConfigurationError, os.EX_CONFIG, "ConfigurationError"),
    ENCODED_URL: (StoreUnavailable, os.EX_UNAVAILABLE, "StoreUnavailable"),
}


def assert_masked(*shown: object) -> None:
    for item in shown:
        text = item if isinstance(item, str) else repr(item)
        for secret in SECRETS:
            assert secret not in text, f"{secret!r} shown in {text!r}"


def failure(call: Callable[[], object]) -> BaseException:
    try:
        call()
    except Exception as exc:  # noqa: BLE001 - whatever it is, its text must not leak
        return exc
    raise AssertionError("the store operation did not fail")


def assert_exception_masked(exc: BaseException) -> None:
    chain: list[BaseException] = []
    node: BaseException | None = exc
    while node is not None and node not in chain:
        chain.append(node)
        node = node.__cause__ or node.__context__
    for err in chain:
        assert_masked(str(err), repr(err), err.args, getattr(err, "store", None))


@pytest.fixture
def metrics_registry(monkeypatch: pytest.MonkeyPatch) -> CollectorRegistry:
    """A fresh registry for the process-wide metrics that ``persist_metrics=True`` attaches to."""
    fresh = CollectorRegistry()
    monkeypatch.setattr(registry_module, "_metrics", PrometheusMetrics(fresh, gauge_ttl=0))
    return fresh


@pytest.fixture
def make_persist(app: Celery, metrics_registry: CollectorRegistry) -> Iterator[Callable[..., Persist]]:
    """Bind ``app`` to a URL, with metrics going to a fresh registry."""

    def make(url: str, **conf: Any) -> Persist:
        app.conf.persist_store_url = url
        app.conf.persist_store_options = OPTIONS
        app.conf.persist_encryption = "off"
        for name, value in conf.items():
            app.conf[name] = value
        return Persist(app)

    yield make


@pytest.mark.parametrize("url", URLS)
def test_config_repr_and_describe(make_persist: Callable[..., Persist], url: str) -> None:
    p = make_persist(url)
    assert p.config.store_url == url  # the real URL is still what the store opens
    assert mask_url(url) in repr(p.config)
    assert p.config.describe()["store_url"] == mask_url(url)
    assert_masked(repr(p.config), str(p.config), p.config.describe())


@pytest.mark.parametrize("url", URLS)
def test_persist_and_hub_reprs(make_persist: Callable[..., Persist], url: str) -> None:
    p = make_persist(url)
    assert mask_url(url) in repr(p)
    assert_masked(repr(p), repr(p.hub), p.hub.store.name, repr(p.binding.config))


@pytest.mark.parametrize("url", URLS)
def test_celery_report_and_conf(make_persist: Callable[..., Persist], app: Celery, url: str) -> None:
    make_persist(url)
    assert app.conf.persist_store_url == mask_url(url)
    assert_masked(
        app.conf.humanize(with_defaults=False, censored=True),
        app.conf.humanize(with_defaults=True, censored=True),
        app.conf.table(with_defaults=True, censored=True),
        app.bugreport(),
    )


def test_store_url_given_as_override_stays_out_of_app_conf(app: Celery) -> None:
    app.conf.persist_encryption = "off"
    p = Persist(app, store_url=ENCODED_URL, store_options=OPTIONS)
    assert p.config.store_url == ENCODED_URL
    assert_masked(app.conf.humanize(with_defaults=True, censored=True), app.bugreport(), repr(p))


@pytest.mark.parametrize("url", URLS)
def test_audit_records_and_metric_labels(
    make_persist: Callable[..., Persist], metrics_registry: CollectorRegistry, url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    p = make_persist(url, persist_metrics=True)
    with pytest.raises(InvalidKey) as info:
        p.hub.resume("forged-key")  # refused and audited before any store access
    assert_exception_masked(info.value)
    audit = [r for r in caplog.records if r.name == "celery_persist.audit"]
    assert audit and all(getattr(r, "persist_store", None) == mask_url(url) for r in audit)
    for record in caplog.records:
        assert_masked(record.getMessage(), {k: v for k, v in vars(record).items() if k != "exc_info"}, record.exc_text or "")
    text = generate_latest(metrics_registry).decode()
    assert f'store="{mask_url(url)}"' in text
    assert_masked(text)


@pytest.mark.parametrize("url", STORE_OP_URLS)
def test_store_errors_health_and_logs(make_persist: Callable[..., Persist], url: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    p = make_persist(url)
    errors = [failure(lambda: p.hub.suspend({"n": 1})), failure(p.ready)]
    for exc in errors:
        assert_exception_masked(exc)
    health = [p.hub.health(), p.health()]
    assert_masked(health)
    for record in caplog.records:
        text = logging.Formatter().formatException(record.exc_info) if record.exc_info else ""
        assert_masked(record.getMessage(), text)
    for exc in errors:
        assert isinstance(exc, EXPECTED[url][0]), repr(exc)
        assert exc.store == mask_url(url)
    assert health[0]["store"] == mask_url(url) and not health[0]["ok"]


@pytest.mark.parametrize("url", STORE_OP_URLS)
@pytest.mark.parametrize("args", [["stats"], ["stats", "--json"], ["list"]])
def test_standalone_cli(url: str, args: list[str]) -> None:
    result = CliRunner().invoke(main, ["--store", url, "--store-option", "retries=0", *args])
    assert_masked(result.stdout, result.stderr)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        assert_exception_masked(result.exception)
    _, code, name = EXPECTED[url]
    assert result.exit_code == code, result.output
    assert name in result.stderr and mask_url(url) in result.stderr


APP_MODULE = """
import os
from celery import Celery
from celery_persist import Persist

app = Celery("leakcheck", broker="memory://", backend="cache+memory://")
app.conf.persist_store_url = os.environ["LEAKCHECK_STORE_URL"]
app.conf.persist_store_options = {"retries": 0, "socket_connect_timeout": 1}
app.conf.persist_encryption = "off"
persist = Persist(app)
"""


def celery(tmp_path: Path, url: str, *args: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "leakcheck_app.py").write_text(APP_MODULE, encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CELERY_PERSIST_")}
    env.update(PYTHONPATH=str(tmp_path), LEAKCHECK_STORE_URL=url)
    cmd = [sys.executable, "-m", "celery", "-A", "leakcheck_app", *args]
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.parametrize("url", URLS)
def test_celery_report_command(tmp_path: Path, url: str) -> None:
    proc = celery(tmp_path, url, "report")
    assert proc.returncode == 0, proc.stderr
    assert "persist_store_url" in proc.stdout and mask_url(url) in proc.stdout
    assert_masked(proc.stdout, proc.stderr)


@pytest.mark.parametrize("url", STORE_OP_URLS)
def test_celery_persist_command(tmp_path: Path, url: str) -> None:
    proc = celery(tmp_path, url, "persist", "stats")
    assert_masked(proc.stdout, proc.stderr)
    assert proc.returncode == EXPECTED[url][1], proc.stderr
    assert mask_url(url) in proc.stderr
