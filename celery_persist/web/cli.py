"""``celery -A proj persist serve``: run the web app (:mod:`celery_persist.web`) under uvicorn.

:mod:`celery_persist.cli` adds :data:`serve_command` to the ``persist``
group. The ``celery`` command loads that module for every app, so this one
imports only click and the error classes at module level: the server module
(Starlette and uvicorn, from the ``web`` extra, and the Celery layer, whose
import registers the shared tasks) is loaded with importlib when the command
runs, the way the package ``__init__`` loads the Celery layer.
"""

from __future__ import annotations

import importlib
import os
import sys

import click

from ..errors import ConfigurationError, PersistenceError, StoreUnavailable

__all__ = ["serve_command"]

#: What the ``web`` extra installs; an ImportError naming another module is a real bug, not a missing extra.
_EXTRA_MODULES = frozenset({"starlette", "uvicorn", "jinja2", "multipart", "python_multipart", "anyio"})


@click.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on.")
@click.option("--port", type=int, default=8080, show_default=True, help="Port to listen on.")
@click.option("--base-path", default="", metavar="PATH", help="Serve under this path prefix (behind a proxy that keeps it).")
@click.pass_context
def serve_command(ctx: click.Context, host: str, port: int, base_path: str) -> None:
    """Serve the inbox, resume links and the JSON API (needs the `web` extra).

    The inbox (/) and the API (/api/) take `Authorization: Bearer <token>`
    with a token from persist_web_tokens, or a browser session opened at
    /login; resume links (/link/<token>, made by persist.resume_url) need none.
    """
    binding = getattr(ctx.obj, "binding", None)
    app = getattr(binding, "app", None)
    if app is None:
        raise click.UsageError("run it as `celery -A proj persist serve`")
    try:
        server = importlib.import_module("celery_persist.web.server")
    except ImportError as exc:
        if (exc.name or "").partition(".")[0] in _EXTRA_MODULES:
            raise click.ClickException(f"serve needs the web extra ({exc.name} is missing): pip install 'celery-persist[web]'") from exc
        raise
    try:
        server.serve(app, host=host, port=port, base_path=base_path)
    except PersistenceError as exc:
        click.echo(f"Error: {type(exc).__name__}: {exc}", err=True)
        sys.exit(os.EX_CONFIG if isinstance(exc, ConfigurationError) else os.EX_UNAVAILABLE if isinstance(exc, StoreUnavailable) else 1)
