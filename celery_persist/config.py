"""The ``persist_*`` settings: declared once here, read once by ``Persist(app)``.

Each setting has a name, a default, a parser and a one-line doc in
:data:`SETTINGS`; :class:`PersistConfig` takes its field defaults from there,
and ``scripts/settings-table`` generates the README's settings table from it.
``Persist(app, **overrides)`` freezes the values into a :class:`PersistConfig`
once the app is configured (see :mod:`celery_persist.registry`); no other
module reads ``app.conf``. The defaults are not registered with
``app.add_defaults``: Celery puts added defaults in front of the
configuration loaded by ``config_from_object()``, so they would shadow it.
Lookups go through ``app.conf.get``, which honours a ``namespace``
(``CELERY_PERSIST_STORE_URL`` in Django settings with ``namespace="CELERY"``).
The store URL falls back to the ``CELERY_PERSIST_STORE_URL`` environment
variable when no setting names it (the CLI and the examples read the same). Secrets come from the environment (``CELERY_PERSIST_KEYS``,
``CELERY_PERSIST_SIGNING_SECRET``, through :func:`~celery_persist.crypto.secrets_from_env`)
unless set explicitly, and are read only when the config is built.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .crypto import ENCRYPTION_MODES, Keyring, choose_sealer, local_keyring, secrets_from_env
from .errors import ConfigurationError
from .serializer import DEFAULT_MAX_STATE_SIZE
from .stores import mask_url
from .stores.drivers import mask_options

__all__ = ["Setting", "SETTINGS", "PersistConfig", "DEFAULT_STORE_URL", "STORE_URL_ENV", "embedded_key_file", "embedded_keyring"]

DEFAULT_STORE_URL = "sqlite:///celery-persist.db"
#: The environment variable naming the store when no setting does (``Persist(app)``, the CLI, the examples).
STORE_URL_ENV = "CELERY_PERSIST_STORE_URL"


def _int(v: Any) -> int:
    return int(v)


def _opt_float(v: Any) -> float | None:
    return None if v in (None, "", 0) else float(v)


def _float(v: Any) -> float:
    return float(v)


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off", "")


def _bool(v: Any) -> bool:
    if isinstance(v, bool) or v in (0, 1):
        return bool(v)
    if isinstance(v, str) and v.strip().lower() in _TRUE + _FALSE:
        return v.strip().lower() in _TRUE
    raise ConfigurationError(f"must be true or false, not {v!r}")


def _str(v: Any) -> str:
    return str(v)


def _opt_str(v: Any) -> str | None:
    return None if v in (None, "") else str(v)


def _mapping(v: Any) -> dict[str, Any]:
    if v is None:
        return {}
    if not isinstance(v, Mapping):
        raise ConfigurationError("persist_store_options must be a mapping")
    return dict(v)


def _aliases(v: Any) -> dict[str, str]:
    if v is None:
        return {}
    if not isinstance(v, Mapping) or not all(isinstance(k, str) and isinstance(n, str) and k and n for k, n in v.items()):
        raise ConfigurationError("must map old task names to new task names (strings)")
    return dict(v)


def _tokens(v: Any) -> tuple[str, ...]:
    if v in (None, ""):
        return ()
    items = v.split(",") if isinstance(v, str) else v
    if not isinstance(items, list | tuple) or not all(isinstance(t, str) for t in items):
        raise ConfigurationError("must be a list of bearer tokens (or one comma-separated string)")
    tokens = tuple(t.strip() for t in items if t.strip())
    if any(len(t) < 16 for t in tokens):
        raise ConfigurationError("bearer tokens must be at least 16 characters long (make one with: celery-persist keygen)")
    return tokens


def _choice(*allowed: str) -> Callable[[Any], str]:
    def parse(v: Any) -> str:
        if v not in allowed:
            raise ConfigurationError(f"must be one of {allowed}, not {v!r}")
        return str(v)

    return parse


@dataclass(frozen=True, slots=True)
class Setting:
    """One ``persist_*`` setting.

    Attributes:
        name: The full lowercase name, as in ``app.conf``.
        default: The raw default, used when neither ``app.conf`` nor an override names the setting.
        parse: Turns a raw value (default, ``app.conf`` or override) into the
            :class:`PersistConfig` field's value; raises ``ConfigurationError``,
            ``TypeError`` or ``ValueError`` when it cannot.
        doc: One line of Markdown: the README's settings table shows it.
    """

    name: str
    default: Any
    parse: Callable[[Any], Any]
    doc: str


SETTINGS: tuple[Setting, ...] = (
    Setting("persist_store_url", DEFAULT_STORE_URL, _str, "Where suspensions and checkpoints live (see Stores)."),
    Setting("persist_store_options", None, _mapping, "Store options, e.g. `{'prefix': 'shop'}` or `{'chunk_size': 4096}`."),
    Setting(
        "persist_codec",
        "msgpack",
        _choice("msgpack", "json", "pickle", "dill"),
        "State codec: `msgpack` (safe, fastest), `json`, `pickle`, `dill`; pickle/dill need a key or signing secret. "
        "Any codec reads every other's envelopes.",
    ),
    Setting(
        "persist_compression",
        "auto",
        _choice("auto", "zstd", "gzip", "none"),
        "`auto` = zstd when installed, else gzip; or `zstd`, `gzip`, `none`.",
    ),
    Setting("persist_compression_threshold", 1024, _int, "States smaller than this many bytes are not compressed."),
    Setting(
        "persist_max_state_size",
        DEFAULT_MAX_STATE_SIZE,
        _int,
        "Largest encoded state in bytes (enforced on write and while decompressing).",
    ),
    Setting(
        "persist_encryption",
        "required",
        _choice(*ENCRYPTION_MODES),
        "`required`: refuse to start without a key (a SQLite store makes its own key file); "
        "`auto`: encrypt when keys exist, else warn once; `off`: development only.",
    ),
    Setting("persist_keys", None, _opt_str, "`'kid:base64key,...'` (first is active); default: `CELERY_PERSIST_KEYS`."),
    Setting("persist_signing_secret", None, _opt_str, "HMAC secret for keys; default: `CELERY_PERSIST_SIGNING_SECRET`."),
    Setting("persist_default_timeout", None, _opt_float, "`await_input` timeout in seconds when none is given (None: never)."),
    Setting("persist_checkpoint_ttl", 7 * 86400, _opt_float, "Seconds a checkpoint outlives its last write (kept after failure)."),
    Setting("persist_lease", 60, _float, "Seconds a resume claim (or a cleanup applying a timeout) holds before cleanup may take it over."),
    Setting(
        "persist_store_retry",
        60,
        _float,
        "Seconds a park, a checkpoint or a resume's completion keeps retrying while the store is unavailable.",
    ),
    Setting("persist_retention", 7 * 86400, _float, "Seconds finished suspensions stay, so late callers get `AlreadyResumed`."),
    Setting("persist_cleanup_interval", 300, _opt_float, "Beat runs `celery_persist.cleanup` this often (None/0: no entry)."),
    Setting(
        "persist_timer_interval",
        1,
        _opt_float,
        "Beat fires due timers (`sleep`) and timeouts this often, in seconds (None/0: no entry; then `cleanup` does it).",
    ),
    Setting("persist_key_in_result", True, _bool, "Put the suspension key in the result backend's info dict."),
    Setting("persist_send_events", True, _bool, "Send `task-suspended` / `task-resumed` events (Flower shows SUSPENDED)."),
    Setting(
        "persist_history",
        True,
        _bool,
        "Keep each suspension's audit history (suspended, denied, approved, resumed...) beside it, for the inbox and `show --history`.",
    ),
    Setting("persist_web_tokens", None, _tokens, "Bearer tokens of `celery persist serve`'s inbox and API (list, or comma-separated)."),
    Setting(
        "persist_web_base_url",
        "http://127.0.0.1:8080",
        _str,
        "Where `celery persist serve` is reached: the start of `resume_url` links.",
    ),
    Setting(
        "persist_link_ttl",
        7 * 86400,
        _opt_float,
        "Seconds a `resume_url` link works when no `ttl` is given (None: as long as the flow).",
    ),
    Setting("persist_metrics", False, _bool, "Count suspends, resumes and expiries in Prometheus metrics (extra `metrics`)."),
    Setting(
        "persist_task_aliases",
        None,
        _aliases,
        "`{'old.name': 'new.name'}`: task renames applied to a parked flow's continuation when it is sent.",
    ),
)

_BY_NAME = {s.name: s for s in SETTINGS}


def _default(name: str) -> Any:
    """The parsed default of ``persist_<name>``: what :class:`PersistConfig` holds when nothing is set."""
    setting = _BY_NAME[f"persist_{name}"]
    return setting.parse(setting.default)


@dataclass(frozen=True, slots=True)
class PersistConfig:
    """The frozen ``persist_*`` settings of one app (secrets resolved).

    One field per entry of :data:`SETTINGS`, named without the ``persist_``
    prefix; the defaults are the table's, parsed.
    """

    store_url: str = _default("store_url")
    store_options: Mapping[str, Any] = field(default_factory=lambda: _default("store_options"))
    codec: str = _default("codec")
    compression: str = _default("compression")
    compression_threshold: int = _default("compression_threshold")
    max_state_size: int = _default("max_state_size")
    encryption: str = _default("encryption")
    keys: str | None = field(default=_default("keys"), repr=False)
    signing_secret: str | None = field(default=_default("signing_secret"), repr=False)
    default_timeout: float | None = _default("default_timeout")
    checkpoint_ttl: float | None = _default("checkpoint_ttl")
    lease: float = _default("lease")
    store_retry: float = _default("store_retry")
    retention: float = _default("retention")
    cleanup_interval: float | None = _default("cleanup_interval")
    timer_interval: float | None = _default("timer_interval")
    key_in_result: bool = _default("key_in_result")
    send_events: bool = _default("send_events")
    history: bool = _default("history")
    web_tokens: tuple[str, ...] = field(default=_default("web_tokens"), repr=False)
    web_base_url: str = _default("web_base_url")
    link_ttl: float | None = _default("link_ttl")
    metrics: bool = _default("metrics")
    task_aliases: Mapping[str, str] = field(default_factory=lambda: _default("task_aliases"))

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """``{setting name: raw default}``."""
        return {s.name: s.default for s in SETTINGS}

    @classmethod
    def from_mapping(cls, conf: Mapping[str, Any], **overrides: Any) -> PersistConfig:
        """Build from app.conf-like mapping; ``overrides`` use short or full names."""
        values: dict[str, Any] = {}
        for setting in SETTINGS:
            values[setting.name] = conf.get(setting.name, setting.default)
        if conf.get("persist_store_url") is None:
            values["persist_store_url"] = os.environ.get(STORE_URL_ENV) or DEFAULT_STORE_URL
        for name, raw in overrides.items():
            full = name if name.startswith("persist_") else f"persist_{name}"
            if full not in _BY_NAME:
                raise ConfigurationError(f"unknown celery-persist setting {name!r}")
            values[full] = raw
        kwargs: dict[str, Any] = {}
        for full, raw in values.items():
            setting = _BY_NAME[full]
            try:
                kwargs[full.removeprefix("persist_")] = setting.parse(raw)
            except (TypeError, ValueError, ConfigurationError) as exc:
                raise ConfigurationError(f"{full}: {exc}") from None
        env = secrets_from_env()
        if kwargs["keys"] is None:
            kwargs["keys"] = env.keys or (f"default:{env.key}" if env.key else None)
        if kwargs["signing_secret"] is None:
            kwargs["signing_secret"] = env.signing_secret
        return cls(**kwargs)

    @classmethod
    def from_app(cls, app: Any, **overrides: Any) -> PersistConfig:
        return cls.from_mapping(app.conf, **overrides)

    def keyring(self) -> Keyring | None:
        """The keys states are encrypted with: configured ones, else the embedded SQLite store's own.

        Returns None with ``encryption="off"``, or when no key exists for a
        server store (the hub then refuses to start unless encryption is ``auto``).
        """
        if self.encryption == "off":
            return None
        if self.keys:
            return Keyring.parse(self.keys)
        return embedded_keyring(self.store_url, create=True)

    def check_keys(self) -> None:
        """Fail now, without touching a store or a file, where the hub would refuse to start for want of a key.

        Raises:
            ConfigurationError: ``encryption="required"``, no key configured
                (setting or environment), and a store that cannot keep its own key.
        """
        if self.encryption != "required" or self.keys:
            return
        if embedded_key_file(self.store_url) is not None or self.store_url.startswith("memory:"):
            return
        if self.store_url in ("sqlite://", "sqlite:///:memory:"):
            return
        choose_sealer(self.encryption, None, self.signing_secret, environ={})  # raises, naming `celery-persist keygen`

    def __repr__(self) -> str:
        # The dataclass repr, but with the store URL masked: it may hold a password.
        shown = {"store_url": mask_url(self.store_url), "store_options": mask_options(self.store_options)}
        items = ((f.name, shown.get(f.name, getattr(self, f.name))) for f in fields(self) if f.repr)
        return f"{type(self).__name__}({', '.join(f'{name}={value!r}' for name, value in items)})"

    def describe(self) -> dict[str, Any]:
        """Settings safe to show (no secrets, masked URL)."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("keys", "signing_secret", "web_tokens")}
        out["web_tokens"] = f"{len(self.web_tokens)} set" if self.web_tokens else None
        out["store_url"] = mask_url(self.store_url)
        out["store_options"] = mask_options(self.store_options)
        out["keys"] = "set" if self.keys else None
        out["signing_secret"] = "set" if self.signing_secret else None
        return out


def embedded_key_file(store_url: str) -> str | None:
    """Where the embedded SQLite store keeps its own key: ``<database>.key``.

    None for any other store, and for an in-memory SQLite database.
    """
    if not store_url.startswith("sqlite:///"):
        return None
    database = store_url.removeprefix("sqlite:///").partition("?")[0]
    if not database or database == ":memory:":
        return None
    return database + ".key"


def embedded_keyring(store_url: str, *, create: bool) -> Keyring | None:
    """The embedded store's own keyring, or None for a server store.

    A SQLite database keeps its key in :func:`embedded_key_file` (made, mode
    0600, when ``create``). An in-process store (``memory://``, in-memory
    SQLite) gets a random key that lives as long as its data.
    """
    if store_url.startswith("memory:") or store_url in ("sqlite://", "sqlite:///:memory:"):
        return Keyring([("ephemeral", os.urandom(32))])
    path = embedded_key_file(store_url)
    if path is None or not (create or Path(path).exists()):
        return None
    return local_keyring(path)
