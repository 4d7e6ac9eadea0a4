"""Helpers every store shares: optional-driver import, URL masking, and driver errors told safely."""

from __future__ import annotations

import importlib
import re
from collections.abc import Mapping
from types import ModuleType
from typing import Any
from urllib.parse import quote, unquote, unquote_plus, urlsplit

from kombu.utils.url import maybe_sanitize_url

from ..errors import ConfigurationError

__all__ = ["require", "mask_url", "describe"]


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


#: Longest driver message :func:`describe` keeps.
_DESCRIBED = 240
#: A URL inside a driver's message: up to whitespace, a quote or a bracket.
_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>()\[\]{}]+")
#: Where a server's message starts quoting the statement, its values or its context:
#: PostgreSQL's ``LINE n:`` / ``DETAIL:`` lines, MySQL's ``... near '<statement>' at line n``.
_DETAIL_LINES = re.compile(r"\n\s*(?:LINE \d+:|DETAIL:|CONTEXT:|QUERY:|PARAMETERS:)| near '")
#: ``name=value`` (libpq conninfo, query strings) or ``'name': value`` (the ``repr`` of an
#: options dict) under a secret-looking name.
_SECRET_PAIR = re.compile(
    r"(?P<q>['\"]?)(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?P=q)"
    r"(?P<eq>\s*=\s*|(?<=['\"])\s*:\s*)"
    r"(?P<value>'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"|[^\s,;&)}\]]+)"
)


def describe(exc: BaseException, *, url: str | None = None, password: str | None = None) -> str:
    """``"ClassName: the driver's message"``, short and safe to show, for store error messages.

    The driver's own words name the cause (``connection refused``, the host and
    port, ``the database system is starting up``), which a bare class name hides.
    They can also quote a DSN or a URL (psycopg on a bad conninfo, redis-py on a
    bad option), so every URL in them is shown through :func:`mask_url`, the value
    of every ``name=value`` pair whose name looks secret becomes ``***``, the
    password of ``url`` (the store's own URL) and ``password`` are cut out wherever
    they appear, and the text is cut to 240 characters on one line. Where a server
    starts quoting the statement or row values (PostgreSQL's ``LINE n:`` /
    ``DETAIL:`` / ``CONTEXT:`` / ``QUERY:`` lines, MySQL's ``near '...'``) the rest
    is dropped.

    Example:
        >>> describe(ConnectionRefusedError(111, "Connection refused"))
        'ConnectionRefusedError: [Errno 111] Connection refused'
    """
    name = type(exc).__name__
    try:
        text = str(exc)
    except Exception:  # noqa: BLE001 - a message must never fail to build
        return name
    text = _DETAIL_LINES.split(text, maxsplit=1)[0]
    # The known passwords first: masking a URL can split one (a space or quote in it ends
    # the URL's match) and leave its tail where it could no longer be recognised.
    for secret in sorted({*_passwords(url), *([password] if password else [])}, key=len, reverse=True):
        text = _cut(text, secret)
    text = " ".join(text.split())
    text = _URL_IN_TEXT.sub(lambda m: mask_url(m.group(0)), text)
    text = _SECRET_PAIR.sub(_mask_pair, text)
    if len(text) > _DESCRIBED:
        text = text[: _DESCRIBED - 3] + "..."
    return f"{name}: {text}" if text else name


def _mask_pair(match: re.Match[str]) -> str:
    key = match["name"].lower()
    if key in _NOT_SECRET or not any(word in key for word in _SECRET_WORDS) or match["value"] == _MASK:
        return match.group(0)
    return f"{match['q']}{match['name']}{match['q']}{match['eq']}{_MASK}"


def _passwords(url: str | None) -> list[str]:
    """The password of ``url`` as written and percent-decoded (none when it has none or cannot be split)."""
    if not url:
        return []
    try:
        netloc = urlsplit(url).netloc
    except ValueError:
        return []
    userinfo = netloc.rpartition("@")[0]
    password = userinfo.partition(":")[2]
    return sorted({p for p in (password, unquote(password)) if p}, key=len, reverse=True)


def _cut(text: str, secret: str) -> str:
    if len(secret) >= 4:
        return text.replace(secret, _MASK)
    # A short password would also match inside ordinary words: cut it only where it stands alone.
    return re.sub(rf"(?<![A-Za-z0-9]){re.escape(secret)}(?![A-Za-z0-9])", _MASK, text)
