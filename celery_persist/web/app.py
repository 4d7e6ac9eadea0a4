"""The ASGI app of ``celery persist serve``: the inbox, resume links and the JSON API (extra ``web``).

Routes, under the app's root (``base_path``, or where it is mounted)::

    GET  /                                  inbox: pending suspensions, filters, paging  (token)
    GET  /s/<fingerprint>                   one suspension: its form, Cancel, history    (token)
    POST /s/<fingerprint>/resume            resume it (persist.resume_by_hash)           (token + CSRF)
    GET  /s/<fingerprint>/cancel            confirm a cancel                             (token)
    POST /s/<fingerprint>/cancel            cancel it (persist.cancel_by_hash)           (token + CSRF)
    GET  /link/<token>                      a resume link's form                         (the link)
    POST /link/<token>                      answer it (persist.resume_link)              (the link + its form token)
    GET  /login, POST /login, POST /logout  the browser session
    GET  /api/suspensions                   ?status=&kind=&q=&limit=&cursor=             (token)
    GET  /api/suspensions/<fingerprint>                                                  (token)
    POST /api/resume                        {"key", "input", "by"}                       (token)
    POST /api/suspensions/<fingerprint>/cancel                                           (token)
    GET  /healthz                           {"ok": ...}, 200/503 (details with a token)
    GET  /metrics                           Prometheus text, when persist_metrics is on  (token)

"(token)" is ``Authorization: Bearer <token>`` from ``persist_web_tokens``,
or the browser session ``/login`` opens (see :mod:`celery_persist.web.auth`).
Answers: 202 resumed (or an approval recorded), 400 bad key or malformed
request, 401 no auth, 403 CSRF, 404 unknown, 409 already resumed, 410
expired/cancelled, 413 body over 64 KB (or state too large), 415 wrong
content type, 422 invalid input (``errors``), 503 store unavailable. Pages
answer with an HTML page naming the problem, the API with JSON; never a
traceback.

Every store call runs in a worker thread (the core is synchronous). No
access log line ever holds a key or a token: the middleware logs
``/link/<fingerprint of the token>`` (uvicorn's own access log stays off).
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, quote, urlencode

import jinja2
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.templating import Jinja2Templates
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import (
    AlreadyResumed,
    ConfigurationError,
    InvalidInput,
    InvalidKey,
    PersistenceError,
    StateTooLarge,
    StoreUnavailable,
    SuspensionCancelled,
    SuspensionExpired,
    SuspensionNotFound,
)
from ..hub import link_fingerprint
from ..stores.drivers import require
from .auth import SESSION_TTL, Access, Session, same
from .forms import build_form, errors_by_field, initial_values, parse_form

if TYPE_CHECKING:
    from ..persist import Persist

__all__ = ["create_app", "MAX_BODY", "SESSION_COOKIE"]

logger = logging.getLogger(__name__)
access_logger = logging.getLogger("celery_persist.web.access")

#: The largest request body accepted, in bytes (413 past it).
MAX_BODY = 64 * 1024
SESSION_COOKIE = "celery_persist_session"
_LOGIN_COOKIE = "celery_persist_login"
#: Rows per inbox page (the API takes ``limit`` up to :data:`_API_MAX_LIMIT`).
_PAGE = 50
_API_MAX_LIMIT = 200
_STATUSES = ("suspended", "claimed", "resumed", "cancelled", "expired")
_WAITS = ("input", "timer", "event")
_FINGERPRINT = re.compile(r"[0-9a-fA-F]{6,64}")
_LINK_PATH = re.compile(r"(/link/)([^/?#]+)")
_FORM_TYPES = ("application/x-www-form-urlencoded",)
_JSON_TYPES = ("application/json",)
_API_FIELDS = frozenset({"key", "input", "by"})
_HERE = Path(__file__).resolve().parent
_HEADERS = (
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),  # a link page's URL holds its token
    (b"x-frame-options", b"DENY"),
    (
        b"content-security-policy",
        b"default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    ),
)

#: Status code, page title and a public explanation per error (most specific first).
_PROBLEMS: tuple[tuple[type[PersistenceError], int, str, str], ...] = (
    (InvalidInput, 422, "The input is not valid", "Correct the fields marked below."),
    (InvalidKey, 400, "Not a valid key or link", "Check that the whole key or link was copied; it may have been altered."),
    (SuspensionNotFound, 404, "Nothing is waiting here", "No suspension is stored under this name (it may have been cleaned up)."),
    (AlreadyResumed, 409, "Already answered", "This was already resumed (or this approver already answered); each answer counts once."),
    (SuspensionExpired, 410, "Expired", "The time to answer has passed (or this link expired)."),
    (SuspensionCancelled, 410, "Cancelled", "This request was cancelled."),
    (StateTooLarge, 413, "Too large", "The answer is larger than the store accepts."),
    (StoreUnavailable, 503, "Try again in a moment", "The store cannot be reached right now."),
)


class _Problem(Exception):
    """An answer other than success, raised where it is found and rendered by the endpoint wrapper."""

    def __init__(self, status: int, title: str, message: str = "", *, errors: Sequence[Mapping[str, Any]] = ()) -> None:
        super().__init__(title)
        self.status, self.title, self.message, self.errors = status, title, message, list(errors)


def _problem_of(exc: Exception, *, detailed: bool) -> _Problem:
    """The answer for ``exc``; ``detailed`` adds the error's own message (for holders of a token)."""
    if isinstance(exc, _Problem):
        return exc
    if isinstance(exc, PersistenceError):
        errors = list(exc.errors) if isinstance(exc, InvalidInput) else []
        for cls, status, title, public in _PROBLEMS:
            if isinstance(exc, cls):
                return _Problem(status, title, str(exc) if detailed else public, errors=errors)
        logger.error("celery-persist web: %s: %s", type(exc).__name__, exc)
        return _Problem(500, "Something went wrong", f"{type(exc).__name__}: {exc}" if detailed else "The server could not do this.")
    logger.exception("celery-persist web: unexpected error")
    return _Problem(500, "Something went wrong", "The server could not do this; its log says why.")


def _json(doc: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> Response:
    body = json.dumps(doc, default=str, ensure_ascii=False).encode("utf-8")
    return Response(body, status_code=status, media_type="application/json", headers=dict(headers or {}))


def _content_type(request: Request) -> str:
    return request.headers.get("content-type", "").partition(";")[0].strip().lower()


async def _read_body(request: Request, types: Sequence[str]) -> bytes:
    """The request body, at most :data:`MAX_BODY` bytes, of one of ``types``.

    Raises:
        _Problem: 413 (declared or streamed size over the limit), 415 (another content type), 400 (a bad Content-Length).
    """
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.strip().isdigit():
            raise _Problem(400, "Malformed request", "Content-Length is not a number.")
        if int(declared) > MAX_BODY:
            raise _Problem(413, "Too large", f"The request body is larger than {MAX_BODY // 1024} KB.")
    if _content_type(request) not in types:
        raise _Problem(415, "Unsupported content type", f"Send {' or '.join(types)}.")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY:  # a chunked body, or a Content-Length that lied
            raise _Problem(413, "Too large", f"The request body is larger than {MAX_BODY // 1024} KB.")
        chunks.append(chunk)
    return b"".join(chunks)


def _parse_form_body(body: bytes) -> dict[str, str]:
    try:
        pairs = parse_qsl(body.decode("utf-8"), keep_blank_values=True, max_num_fields=2000)
    except (UnicodeDecodeError, ValueError):
        raise _Problem(400, "Malformed request", "The form data could not be read.") from None
    return dict(pairs)


def _fingerprint(value: str) -> str:
    if not _FINGERPRINT.fullmatch(value):
        raise _Problem(404, "Nothing is waiting here", "A fingerprint is 6 to 64 hex characters.")
    return value.lower()


def _when(value: Any) -> datetime | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return datetime.fromtimestamp(value, tz=timezone.utc)
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=timezone.utc)
    if isinstance(value, str) and value:
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            return None
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)
    return None


def _span(seconds: float) -> str:
    """``seconds`` for people: "45 s", "1.5 min", "1 h", "12 d"."""
    seconds = abs(seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= 0.95 * size:
            value = seconds / size
            text = f"{value:.0f}" if value >= 10 else f"{value:.1f}".removesuffix(".0")
            return f"{text} {unit}"
    return f"{seconds:.0f} s"


def _age(value: Any) -> str:
    when = _when(value)
    return "-" if when is None else _span(time.time() - when.timestamp())


def _until(value: Any) -> str:
    when = _when(value)
    if when is None:
        return "never"
    left = when.timestamp() - time.time()
    return f"in {_span(left)}" if left > 0 else f"{_span(left)} ago"


def _utc(value: Any, seconds: bool = False) -> str:
    when = _when(value)
    return "-" if when is None else when.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC" if seconds else "%Y-%m-%d %H:%M UTC")


def _approvals(value: Any) -> dict[str, Any]:
    """``describe()["approvals"]`` with its defaults filled in (a flow without approvals needs one resume)."""
    doc = value if isinstance(value, Mapping) else {}
    done = [d for d in doc.get("done") or [] if isinstance(d, Mapping)]
    approvers = doc.get("approvers")
    return {
        "asked": bool(doc),
        "needed": int(doc.get("needed") or 1),
        "approvers": [str(a) for a in approvers] if isinstance(approvers, list) else None,
        "done": done,
    }


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(_HERE / "templates")),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(age=_age, until=_until, utc=_utc)
    return env


class _Frame:
    """Outermost middleware: security headers on every answer, and the access log line.

    The line names the path with a resume link's token replaced by its
    fingerprint, never the query string (filters are the user's text), and
    never a header.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_with_headers(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                headers = list(message.get("headers", []))
                present = {name.lower() for name, _ in headers}
                headers.extend(h for h in _HEADERS if h[0] not in present)
                if b"cache-control" not in present:
                    headers.append((b"cache-control", b"no-store"))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        finally:
            client = scope.get("client")
            path = _LINK_PATH.sub(lambda m: m.group(1) + link_fingerprint(m.group(2)), str(scope.get("path", "")))
            access_logger.info(
                '%s "%s %s" %d %.1fms',
                f"{client[0]}:{client[1]}" if client else "-",
                scope.get("method", "-"),
                path,
                status,
                (time.perf_counter() - started) * 1000,
            )


Endpoint = Callable[[Request], Awaitable[Response]]


class _Web:
    """The endpoints, over one Persist."""

    def __init__(self, persist: Persist, access: Access) -> None:
        self.persist = persist
        self.access = access
        self.templates = Jinja2Templates(env=_environment())
        self.css = (_HERE / "static" / "style.css").read_bytes()

    # -- plumbing ------------------------------------------------------------------------------

    @staticmethod
    def _root(request: Request) -> str:
        """Where this app sits: the server's root path, the mount point and ``base_path``."""
        return str(request.scope.get("root_path", "")).rstrip("/")

    def _who(self, request: Request) -> tuple[str, Session | None] | None:
        """``("bearer", None)``, ``("session", session)``, or None for a stranger."""
        if self.access.bearer_ok(request.headers.get("authorization")):
            return "bearer", None
        session = self.access.open_session(request.cookies.get(SESSION_COOKIE))
        return ("session", session) if session is not None else None

    def _page(self, request: Request, name: str, context: Mapping[str, Any], status: int = 200, *, public: bool = False) -> Response:
        """Render ``name``; a public page (a resume link's) shows none of the inbox's chrome."""
        who = None if public else self._who(request)
        base = {
            "root": self._root(request),
            "public": public,
            "signed_in": who is not None and who[0] == "session",
            "csrf": who[1].csrf if who is not None and who[1] is not None else "",
        }
        return self.templates.TemplateResponse(request, name, {**base, **context}, status_code=status)

    def _error_page(self, request: Request, problem: _Problem, *, public: bool) -> Response:
        response = self._page(request, "error.html", {"problem": problem}, problem.status, public=public)
        if problem.status == 401:
            response.headers["www-authenticate"] = 'Bearer realm="celery-persist"'
        return response

    def _to_login(self, request: Request) -> Response:
        root = self._root(request)
        here = request.url.path[len(root) :] if request.url.path.startswith(root) else "/"
        if request.url.query:
            here += "?" + request.url.query
        return RedirectResponse(f"{root}/login?{urlencode({'next': here})}", status_code=303)

    def html(self, handler: Callable[[Request], Awaitable[Response]], *, public: bool = False) -> Endpoint:
        """An HTML endpoint: a stranger is sent to /login (GET) or refused (POST); failures become error pages."""

        async def endpoint(request: Request) -> Response:
            try:
                if not public and self._who(request) is None:
                    if request.method == "GET":
                        return self._to_login(request)
                    raise _Problem(401, "Sign in first", "Open the inbox and sign in with a token.")
                return await handler(request)
            except Exception as exc:  # noqa: BLE001 - every failure becomes a page naming it, never a traceback
                return self._error_page(request, _problem_of(exc, detailed=not public), public=public)

        return endpoint

    def api(self, handler: Callable[[Request], Awaitable[Response]]) -> Endpoint:
        """A JSON endpoint: 401 without a token, CSRF header for a cookie's POST, JSON errors."""

        async def endpoint(request: Request) -> Response:
            try:
                who = self._who(request)
                if who is None:
                    return _json(
                        {"error": "Unauthorized", "message": "send Authorization: Bearer <token> (persist_web_tokens)"},
                        401,
                        {"www-authenticate": 'Bearer realm="celery-persist"'},
                    )
                if request.method == "POST" and who[1] is not None and not same(who[1].csrf, request.headers.get("x-csrf-token", "")):
                    raise _Problem(403, "Forbidden", "a request with the session cookie needs its X-CSRF-Token header")
                return await handler(request)
            except Exception as exc:  # noqa: BLE001 - every failure becomes a JSON answer, never a traceback
                problem = _problem_of(exc, detailed=True)
                doc: dict[str, Any] = {"error": problem.title, "message": problem.message}
                if problem.errors:
                    doc["errors"] = problem.errors
                return _json(doc, problem.status)

        return endpoint

    def _check_csrf(self, request: Request, form: Mapping[str, str]) -> None:
        who = self._who(request)
        if who is not None and who[1] is not None and not same(who[1].csrf, form.get("csrf", "")):
            raise _Problem(403, "The form has expired", "Reload the page and submit it again.")

    def _link_form_token(self, token: str) -> str:
        # Keyed with the deployment's secret (the hub's), so every worker process agrees on it.
        return self.persist.hub.index_prefix("web-link-form", token)

    async def _describe(self, fingerprint: str) -> dict[str, Any]:
        try:
            return await run_in_threadpool(self.persist.describe, _fingerprint(fingerprint))
        except ConfigurationError as exc:  # an ambiguous prefix
            raise _Problem(400, "Ambiguous fingerprint", str(exc)) from None

    # -- the form (suspension page and link page) ----------------------------------------------

    def _form_page(
        self,
        request: Request,
        name: str,
        item: Mapping[str, Any],
        *,
        action: str,
        csrf: str,
        values: Mapping[str, str] | None = None,
        errors: Sequence[Mapping[str, Any]] = (),
        status: int = 200,
        public: bool = False,
    ) -> Response:
        fields = build_form(item.get("schema"))
        approvals = _approvals(item.get("approvals"))
        bound_by = item.get("by") if isinstance(item.get("by"), str) else None
        done_by = {str(d.get("by")) for d in approvals["done"]}
        asks_by = bound_by is None and (approvals["needed"] > 1 or approvals["approvers"] is not None)
        by_choices = [a for a in approvals["approvers"] or [] if a not in done_by]
        # A submitted form is shown as it was sent (an unchecked box is absent from it), else the schema's defaults.
        shown = dict(values) if values is not None else initial_values(fields)
        context = {
            "item": item,
            "fields": fields,
            "values": shown,
            "errors": errors_by_field(fields, errors, extra=("by",)),
            "approvals": approvals,
            "asks_by": asks_by,
            "by_choices": by_choices,
            "bound_by": bound_by,
            "action": action,
            "form_csrf": csrf,
            "answerable": item.get("status", "suspended") == "suspended" and item.get("wait", "input") == "input",
        }
        return self._page(request, name, context, status, public=public)

    @staticmethod
    def _form_input(item: Mapping[str, Any], form: Mapping[str, str]) -> tuple[Any, list[dict[str, Any]], str | None]:
        """``(input, parse errors, by)`` from a submitted form for ``item``'s schema."""
        value, errors = parse_form(build_form(item.get("schema")), form)
        return value, errors, form.get("by", "").strip() or None

    # -- pages ---------------------------------------------------------------------------------

    async def inbox(self, request: Request) -> Response:
        q = request.query_params
        status = q.get("status") or "suspended"
        wait = q.get("kind") or ""
        text = (q.get("q") or "").strip()[:200]
        cursor = q.get("cursor") or None
        if status not in (*_STATUSES, "any"):
            raise _Problem(400, "Unknown status", f"Choose one of {', '.join(_STATUSES)} or any.")
        if wait and wait not in _WAITS:
            raise _Problem(400, "Unknown kind", f"Choose one of {', '.join(_WAITS)}.")
        items, next_cursor = await run_in_threadpool(
            self.persist.inbox,
            status=None if status == "any" else status,
            text=text or None,
            wait=wait or None,
            limit=_PAGE,
            cursor=cursor,
        )
        filters = {"status": status, "kind": wait, "q": text}
        query = {k: v for k, v in filters.items() if v}
        context = {
            "items": [{**item, "approvals": _approvals(item.get("approvals"))} for item in items],
            "filters": filters,
            "statuses": _STATUSES,
            "waits": _WAITS,
            "first_url": "?" + urlencode(query),
            "next_url": "?" + urlencode({**query, "cursor": next_cursor}) if next_cursor else None,
            "paged": bool(cursor),
        }
        return self._page(request, "inbox.html", context)

    async def suspension(self, request: Request) -> Response:
        item = await self._describe(request.path_params["fingerprint"])
        return self._suspension_page(request, item)

    def _suspension_page(
        self,
        request: Request,
        item: Mapping[str, Any],
        values: Mapping[str, str] | None = None,
        errors: Sequence[Any] = (),
        status: int = 200,
    ) -> Response:
        who = self._who(request)
        csrf = who[1].csrf if who is not None and who[1] is not None else ""
        action = f"{self._root(request)}/s/{item['fingerprint']}/resume"
        return self._form_page(request, "suspension.html", item, action=action, csrf=csrf, values=values, errors=errors, status=status)

    async def resume(self, request: Request) -> Response:
        form = _parse_form_body(await _read_body(request, _FORM_TYPES))
        self._check_csrf(request, form)
        item = await self._describe(request.path_params["fingerprint"])
        value, errors, by = self._form_input(item, form)
        if not errors:
            try:
                result = await run_in_threadpool(self.persist.resume_by_hash, item["key_hash"], value, by=by)
            except InvalidInput as exc:
                errors = list(exc.errors) or [{"loc": [], "msg": str(exc.message)}]
            else:
                return self._done(request, item, resumed=result is not None, public=False)
        return self._suspension_page(request, item, values=form, errors=errors, status=422)

    def _done(self, request: Request, item: Mapping[str, Any], *, resumed: bool, public: bool, cancelled: bool = False) -> Response:
        context = {"item": item, "resumed": resumed, "cancelled": cancelled}
        return self._page(request, "done.html", context, 200 if cancelled else 202, public=public)

    async def cancel_confirm(self, request: Request) -> Response:
        item = await self._describe(request.path_params["fingerprint"])
        return self._page(request, "cancel.html", {"item": item})

    async def cancel(self, request: Request) -> Response:
        form = _parse_form_body(await _read_body(request, _FORM_TYPES))
        self._check_csrf(request, form)
        item = await self._describe(request.path_params["fingerprint"])
        await run_in_threadpool(self.persist.cancel_by_hash, item["key_hash"])
        return self._done(request, item, resumed=False, public=False, cancelled=True)

    # -- resume links (no token: the link is the capability) -----------------------------------

    async def link(self, request: Request) -> Response:
        token = request.path_params["token"]
        info = await run_in_threadpool(self.persist.link_info, token)
        return self._link_page(request, token, info)

    def _link_page(
        self, request: Request, token: str, info: Mapping[str, Any], values: Mapping[str, str] | None = None, errors: Sequence[Any] = ()
    ) -> Response:
        action = f"{self._root(request)}/link/{quote(token, safe='')}"
        return self._form_page(
            request,
            "link.html",
            info,
            action=action,
            csrf=self._link_form_token(token),
            values=values,
            errors=errors,
            status=422 if errors else 200,
            public=True,
        )

    async def link_resume(self, request: Request) -> Response:
        token = request.path_params["token"]
        form = _parse_form_body(await _read_body(request, _FORM_TYPES))
        if not same(self._link_form_token(token), form.get("csrf", "")):
            raise _Problem(403, "The form has expired", "Open the link again and submit the form from there.")
        info = await run_in_threadpool(self.persist.link_info, token)
        value, errors, by = self._form_input(info, form)
        if not errors:
            try:
                result = await run_in_threadpool(self.persist.resume_link, token, value, by=by)
            except InvalidInput as exc:
                errors = list(exc.errors) or [{"loc": [], "msg": str(exc.message)}]
            else:
                return self._done(request, info, resumed=result is not None, public=True)
        return self._link_page(request, token, info, values=form, errors=errors)

    # -- the browser session -------------------------------------------------------------------

    def _cookie_path(self, request: Request) -> str:
        return self._root(request) + "/"

    @staticmethod
    def _next(value: str | None) -> str:
        """A safe place to go after login: a path inside this app, never another site."""
        if not value or not value.startswith("/") or value.startswith("//") or "\\" in value or "\n" in value or "\r" in value:
            return "/"
        return value

    async def login_form(self, request: Request) -> Response:
        return self._login_page(request, self._next(request.query_params.get("next")))

    def _login_page(self, request: Request, next_path: str, error: str = "", status: int = 200) -> Response:
        nonce = secrets.token_urlsafe(24)  # double-submit: the form's copy must match the cookie's
        response = self._page(
            request, "login.html", {"next": next_path, "error": error, "login_csrf": nonce, "configured": self.access.enabled}, status
        )
        response.set_cookie(
            _LOGIN_COOKIE,
            nonce,
            max_age=3600,
            path=self._cookie_path(request),
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
        )
        return response

    async def login(self, request: Request) -> Response:
        form = _parse_form_body(await _read_body(request, _FORM_TYPES))
        next_path = self._next(form.get("next"))
        cookie = request.cookies.get(_LOGIN_COOKIE, "")
        if not cookie or not same(cookie, form.get("csrf", "")):
            raise _Problem(403, "The form has expired", "Reload the sign-in page (cookies must be on) and try again.")
        if not self.access.token_ok(form.get("token", "")):
            return self._login_page(request, next_path, "That token is not valid.", 401)
        value, _session = self.access.new_session()
        response = RedirectResponse(self._root(request) + next_path, status_code=303)
        response.set_cookie(
            SESSION_COOKIE,
            value,
            max_age=SESSION_TTL,
            path=self._cookie_path(request),
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
        )
        response.delete_cookie(_LOGIN_COOKIE, path=self._cookie_path(request))
        return response

    async def logout(self, request: Request) -> Response:
        form = _parse_form_body(await _read_body(request, _FORM_TYPES))
        self._check_csrf(request, form)
        response = RedirectResponse(self._root(request) + "/login", status_code=303)
        response.delete_cookie(SESSION_COOKIE, path=self._cookie_path(request), httponly=True, samesite="strict")
        return response

    # -- the JSON API --------------------------------------------------------------------------

    async def api_list(self, request: Request) -> Response:
        q = request.query_params
        status = q.get("status") or "suspended"
        wait = q.get("kind") or q.get("wait") or None
        if status not in (*_STATUSES, "any"):
            raise _Problem(400, "Bad Request", f"status is one of {', '.join(_STATUSES)} or any")
        if wait is not None and wait not in _WAITS:
            raise _Problem(400, "Bad Request", f"kind is one of {', '.join(_WAITS)}")
        raw_limit = q.get("limit") or str(_PAGE)
        if not raw_limit.isdigit() or not 1 <= int(raw_limit) <= _API_MAX_LIMIT:
            raise _Problem(400, "Bad Request", f"limit is a whole number from 1 to {_API_MAX_LIMIT}")
        items, next_cursor = await run_in_threadpool(
            self.persist.inbox,
            status=None if status == "any" else status,
            text=(q.get("q") or q.get("text") or None),
            wait=wait,
            limit=int(raw_limit),
            cursor=q.get("cursor") or None,
        )
        return _json({"items": items, "next_cursor": next_cursor})

    async def api_show(self, request: Request) -> Response:
        return _json(await self._describe(request.path_params["fingerprint"]))

    async def api_resume(self, request: Request) -> Response:
        body = await _read_body(request, _JSON_TYPES)
        try:
            doc = json.loads(body)
        except ValueError:
            raise _Problem(400, "Bad Request", "the body is not JSON") from None
        if not isinstance(doc, dict):
            raise _Problem(400, "Bad Request", 'the body must be a JSON object: {"key": ..., "input": ..., "by": ...}')
        unknown = sorted(set(doc) - _API_FIELDS)
        if unknown:
            raise _Problem(400, "Bad Request", f"unknown field(s) {', '.join(unknown)}; the body has key, input and by")
        key, by = doc.get("key"), doc.get("by")
        if not isinstance(key, str) or not key:
            raise _Problem(400, "Bad Request", "key must be the suspension key (a string)")
        if by is not None and not isinstance(by, str):
            raise _Problem(400, "Bad Request", "by must be a string or null")
        result = await run_in_threadpool(self.persist.resume, key, doc.get("input"), by=by)
        return _json({"resumed": result is not None, "task_id": None if result is None else result.id}, 202)

    async def api_cancel(self, request: Request) -> Response:
        item = await self._describe(request.path_params["fingerprint"])
        cancelled = await run_in_threadpool(self.persist.cancel_by_hash, item["key_hash"])
        return _json({"fingerprint": cancelled.fingerprint, "status": cancelled.status})

    # -- operations ----------------------------------------------------------------------------

    async def healthz(self, request: Request) -> Response:
        try:
            doc = await run_in_threadpool(self.persist.health)
        except Exception as exc:  # noqa: BLE001 - health answers, whatever happens
            doc = {"ok": False, "error": type(exc).__name__}
        ok = bool(doc.get("ok"))
        # The details (store name, key ids) are for holders of a token; a load balancer needs only ok.
        return _json(doc if self._who(request) is not None else {"ok": ok}, 200 if ok else 503)

    async def metrics(self, request: Request) -> Response:
        if not self.persist.config.metrics:
            raise _Problem(404, "Not Found", "metrics are off (persist_metrics)")
        pc = require("prometheus_client", extra="metrics", store="metrics")
        body = await run_in_threadpool(pc.generate_latest)
        return Response(body, media_type=str(pc.CONTENT_TYPE_LATEST))

    async def style(self, request: Request) -> Response:
        return Response(self.css, media_type="text/css", headers={"cache-control": "public, max-age=3600"})

    async def not_found(self, request: Request, exc: Exception) -> Response:
        status = exc.status_code if isinstance(exc, HTTPException) else 500
        title = {404: "Not Found", 405: "Method Not Allowed"}.get(status, "Error")
        root = self._root(request)
        if request.url.path.startswith(root + "/api/"):
            return _json({"error": title, "message": f"{request.method} {request.url.path[len(root) :]} is not served here"}, status)
        return self._error_page(request, _Problem(status, title, "There is no such page here."), public=True)


def _routes(web: _Web) -> list[BaseRoute]:
    return [
        Route("/", web.html(web.inbox), methods=["GET"], name="inbox"),
        Route("/s/{fingerprint}", web.html(web.suspension), methods=["GET"], name="suspension"),
        Route("/s/{fingerprint}/resume", web.html(web.resume), methods=["POST"], name="resume"),
        Route("/s/{fingerprint}/cancel", web.html(web.cancel_confirm), methods=["GET"], name="cancel_confirm"),
        Route("/s/{fingerprint}/cancel", web.html(web.cancel), methods=["POST"], name="cancel"),
        Route("/link/{token}", web.html(web.link, public=True), methods=["GET"], name="link"),
        Route("/link/{token}", web.html(web.link_resume, public=True), methods=["POST"], name="link_resume"),
        Route("/login", web.html(web.login_form, public=True), methods=["GET"], name="login_form"),
        Route("/login", web.html(web.login, public=True), methods=["POST"], name="login"),
        Route("/logout", web.html(web.logout), methods=["POST"], name="logout"),
        Route("/api/suspensions", web.api(web.api_list), methods=["GET"], name="api_list"),
        Route("/api/suspensions/{fingerprint}", web.api(web.api_show), methods=["GET"], name="api_show"),
        Route("/api/resume", web.api(web.api_resume), methods=["POST"], name="api_resume"),
        Route("/api/suspensions/{fingerprint}/cancel", web.api(web.api_cancel), methods=["POST"], name="api_cancel"),
        Route("/healthz", web.healthz, methods=["GET"], name="healthz"),
        Route("/metrics", web.api(web.metrics), methods=["GET"], name="metrics"),
        Route("/static/style.css", web.style, methods=["GET"], name="style"),
    ]


def create_app(persist: Persist, *, tokens: Sequence[str] | None = None, base_path: str = "") -> Starlette:
    """The inbox, resume links and the JSON API for ``persist``, as an ASGI app.

    Args:
        persist: The app's :class:`~celery_persist.Persist`.
        tokens: The bearer tokens of the inbox and the API; default
            ``persist_web_tokens``. Without any, only resume links are served.
        base_path: A path prefix the app serves under by itself (``/persist``),
            for a server that passes full paths (a Django ASGI dispatcher);
            not needed when mounted (Starlette/FastAPI ``Mount`` sets the root path).

    Returns:
        A Starlette app: run it with any ASGI server, or mount it.

    Example:
        >>> app = FastAPI()
        >>> app.mount("/persist", create_app(persist))
    """
    path = "/" + base_path.strip("/") if base_path.strip("/") else ""
    access = Access(persist.config.web_tokens if tokens is None else tokens)
    web = _Web(persist, access)
    routes = _routes(web)
    return Starlette(
        routes=[Mount(path, routes=routes)] if path else routes,
        middleware=[Middleware(_Frame)],
        exception_handlers={HTTPException: web.not_found},
    )
