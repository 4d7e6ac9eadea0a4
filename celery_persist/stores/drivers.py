"""Helpers every store shares: optional-driver import and URL masking."""

from __future__ import annotations

import importlib
import re
from types import ModuleType

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


_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^:@/]*):[^@/]*@")
_QUERY_SECRET = re.compile(r"(?i)([?&](?:password|passwd|pass|secret|token|key)=)[^&]*")


def mask_url(url: str) -> str:
    """``url`` with any password (userinfo or query parameter) replaced by ``***``."""
    masked = _USERINFO.sub(r"\g<scheme>\g<user>:***@", url)
    return _QUERY_SECRET.sub(r"\1***", masked)
