"""Helpers every store shares: optional-driver import and URL masking."""

from __future__ import annotations

import importlib
import re
from collections.abc import Mapping
from types import ModuleType
from typing import Any
from urllib.parse import quote, unquote, unquote_plus

from kombu.utils.url import maybe_sanitize_url

from ..errors import ConfigurationError

__all__ = ["require", "mask_url"]


def require(module: str, *, extra: str, store: str | None = None) -> ModuleType:
    """Import an optional driver, or raise an error naming the extra that brings it.

    Example:
        >>> redis = require("redis", extra="redis")
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        what = store or extra
        raise ConfigurationError(
            f"the {what} store needs the {module!r} package: pip install 'celery-persist[{extra}]'",
            store=store,
        ) from exc


_MASK = "***"
_SCHEME = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://")
#: Where kombu's several-URL form (``sentinel://h1;sentinel://h2``) starts its next URL.
_NEXT_URL = re.compile(r";(?=[A-Za-z][A-Za-z0-9+.-]*://)")
_HOST = r"(?:\[[^\]/?#@]*\]|[^\[\]@/?#:,;]*)(?::[0-9]*)?"
#: One host or a comma-separated list (sentinels, replica sets), each with an optional port.
_HOSTS = re.compile(rf"{_HOST}(?:,{_HOST})*")
#: A query parameter whose name holds one of these (any case) has its value masked.
_SECRET_WORDS = ("pass", "pwd", "secret", "token", "key", "credential", "auth")
#: Names matching a secret word that only choose how to authenticate; kept readable.
_NOT_SECRET = frozenset({"authsource", "authmechanism"})


def mask_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """Store options safe to show: values under secret-looking names (at any depth) become ``***``."""
    out: dict[str, Any] = {}
    for name, value in options.items():
        if any(word in str(name).lower() for word in _SECRET_WORDS):
            out[name] = "***"
        elif isinstance(value, Mapping):
            out[name] = mask_options(value)
        else:
            out[name] = value
    return out


def mask_url(url: str) -> str:
    """``url`` with its password and the values of its secret query parameters replaced by ``***``.

    The userinfo ends at the *last* ``@`` before the query, so a password holding
    an unescaped ``@`` or ``/`` (``redis://:p@ss/w0rd@host:6379/0``) is masked
    whole; percent-encoded passwords are masked too. The value of every query
    parameter whose name contains ``pass``, ``pwd``, ``secret``, ``token``,
    ``key``, ``credential`` or ``auth`` is masked (``sslpassword``,
    ``sentinel_password``, ``tlsCertificateKeyFilePassword``, ``access_token``,
    but not ``authSource`` or ``authMechanism``), and so is a ``#fragment``.
    Scheme, hosts, ports, path and the other parameters stay as given. Never
    raises: a string it cannot split safely (no ``scheme://``, a non-numeric
    port left by a password holding ``?`` or ``#``) comes back as
    ``scheme://***`` or ``***``.

    Example:
        >>> mask_url("redis://:p@ss/w0rd@cache:6379/0?sentinel_password=x&ssl_cert_reqs=none")
        'redis://:***@cache:6379/0?sentinel_password=***&ssl_cert_reqs=none'
    """
    if not isinstance(url, str):
        return _MASK
    try:
        return ";".join(_mask_one(part) for part in _NEXT_URL.split(url))
    except Exception:  # noqa: BLE001 - a URL in a log line or error message must never raise
        return _MASK


def _mask_one(url: str) -> str:
    match = _SCHEME.match(url)
    if match is None:
        return _MASK
    scheme = match["scheme"]
    placeholder = f"{scheme}://{_MASK}"
    rest = url[match.end() :]
    head = re.split(r"[?#]", rest, maxsplit=1)[0]
    # RFC 3986 ends the authority at the first "/", but real-world passwords hold
    # unescaped "/" and "@" (drivers such as SQLAlchemy accept them): the last "@"
    # before the query separates the userinfo. An empty authority ("sqlite:////abs")
    # has no userinfo, whatever "@" its path holds.
    at = -1 if rest.startswith("/") else head.rfind("@")
    userinfo = rest[:at] if at >= 0 else None
    after = rest[at + 1 :]
    authority = re.split(r"[/?#]", after, maxsplit=1)[0]
    before_hash, hash_, fragment = after[len(authority) :].partition("#")
    path, qmark, query = before_hash.partition("?")
    if not _HOSTS.fullmatch(authority):
        # A non-numeric "port": part of a password holding "?" or "#" before its "@".
        return placeholder
    if userinfo is None and authority and "@" in query + fragment:
        # "redis://:12?34@host": the "?" may sit inside a password; show nothing.
        return placeholder
    masked_query = _mask_query(query)
    if masked_query is None:
        return placeholder
    prefix = f"{scheme}://"
    if userinfo is not None:
        prefix += _mask_userinfo(scheme, userinfo)
    # A store URL has no use for a fragment; an unescaped "#" in a secret value starts one.
    return f"{prefix}{authority}{path}{qmark}{masked_query}{hash_ and '#' + _MASK}"


def _mask_userinfo(scheme: str, userinfo: str) -> str:
    """``user:***@`` (or ``user@``, or ``""``) by kombu's own sanitizer, as Celery shows broker URLs.

    kombu's ``maybe_sanitize_url`` alone leaks the tail of a password holding
    ``@`` and ``/`` (``redis://:p@ss/w0rd@h`` -> ``redis://:**@ss/w0rd@h``),
    raises on one holding only ``/``, fails on host lists and drops the query.
    So it sees only the userinfo, percent-encoded, in front of a dummy host.
    """
    user, colon, password = userinfo.partition(":")
    probe = f"{scheme}://{quote(unquote(user), safe='')}"
    if colon:
        probe += ":" + quote(unquote(password), safe="")
    rendered = str(maybe_sanitize_url(f"{probe}@h", mask=_MASK))
    inner = rendered.partition("://")[2]
    if not inner.endswith("h/"):
        raise ValueError("unexpected rendering by kombu")
    return inner[: -len("h/")]


def _mask_query(query: str) -> str | None:
    """``query`` with the values of secret parameters masked; None if it hides part of a password.

    A segment without ``=`` right after a secret value is taken as the rest of
    that value (an unescaped ``&``) and masked too.
    """
    out: list[str] = []
    in_secret = False
    for segment in re.split(r"([&;])", query):
        name, eq, _ = segment.partition("=")
        if segment in ("&", ";") or not segment:
            out.append(segment)
        elif "@" in name:
            return None
        elif eq:
            key = unquote_plus(name).lower()
            in_secret = key not in _NOT_SECRET and any(word in key for word in _SECRET_WORDS)
            out.append(f"{name}={_MASK}" if in_secret else segment)
        else:
            out.append(_MASK if in_secret else segment)
    return "".join(out)
