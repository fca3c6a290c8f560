"""Who may see or do what on the dashboard, checked before a handler runs (and before any body is read).

A page handler is wrapped by :func:`view` (GET) and a form handler by :func:`action` (POST). In
this order, the same order the API's guard keeps:

    origin     (action) an ``Origin`` that is not the hub's public URL (``EDGEGLM_HUB_PUBLIC_URL``;
               unset: the request's ``Host``), or ``Sec-Fetch-Site: cross-site`` without one:
               403, nothing else is looked at
    session    the cookie's MAC and expiry (:mod:`cloud_hub.ui.session`), then its token row, read
               on every request (revoked: refused at once): a page redirects to sign-in, a form 401
    role       below the handler's role (viewer reads, operator acts, admin ⊇ operator): 403
    size       (action) a Content-Length over 16 KiB, or a body that is not a form: 413 / 415;
               a body without one is read only up to the limit
    CSRF       (action) the form's ``csrf`` field against the session's token: 403 before any
               other field is used

Handlers are plain functions run in the thread pool with the :class:`Ui` and the caller; they
reach the hub only through its service functions (``cloud_hub.rollouts``, ``inventory``, ...),
which audit each change with the token's name as the actor, as the API does.
"""

from __future__ import annotations

import re
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from jinja2 import Environment
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response

from cloud_hub.auth import Role, require
from cloud_hub.context import HubContext
from cloud_hub.settings import public_origin as public_origin_of
from cloud_hub.ui.render import page
from cloud_hub.ui.session import COOKIE, SessionKey, SignedIn, resolve
from edgeglm.errors import AccessError, EdgeError, PermissionDenied, UsageError

__all__ = ["FORM_LIMIT", "Form", "SignInNeeded", "Ui", "action", "same_origin", "view"]

FORM_LIMIT = 16 * 1024
Form = Mapping[str, str]
Endpoint = Callable[[Request], Awaitable[Response]]


class SignInNeeded(AccessError):
    """No valid session on a page: answered with a redirect to the sign-in form."""


class _TooLarge(UsageError):
    pass


class _NotAForm(UsageError):
    pass


@dataclass
class Ui:
    """What every dashboard handler shares: the hub's context, the session key, the templates."""

    hub: HubContext
    key: SessionKey
    env: Environment
    public_origin: str | None = None  # scheme://host[:port] of the hub's public URL, when set
    clock: Callable[[], float] = time.time  # sessions and dry runs are judged by it (tests set it)

    def render(
        self, request: Request, template: str, who: SignedIn | None, *, status: int = 200, **values: Any
    ) -> HTMLResponse:
        csrf = self.key.csrf(who.ticket) if who is not None else ""
        can_act = who is not None and who.role >= Role.operator
        return page(
            self.env, template, status, request=request, who=who, csrf=csrf, can_act=can_act, **values
        )

    def signed_in(self, request: Request) -> SignedIn:
        ticket = self.key.check(request.cookies.get(COOKIE), now=self.clock())
        with self.hub.db.session() as s:
            return resolve(s, ticket)


def same_origin(request: Request, public_origin: str | None = None) -> bool:
    """Whether a POST comes from a page of this hub. With ``public_origin`` (the hub's public URL:
    behind a proxy the Host header is the proxy's upstream name, not what the browser opened),
    its ``Origin`` must be exactly that, scheme and port included; without it, the ``Origin``'s
    host must be the request's ``Host`` (the scheme is not compared, as a TLS proxy in front
    changes it). Without an Origin, the browser's ``Sec-Fetch-Site`` must not say cross-site (a
    client that sends neither is no browser)."""
    origin = request.headers.get("origin")
    if origin is not None:
        if origin == "null":
            return False
        if public_origin is not None:
            return public_origin_of(origin) == public_origin
        return urlsplit(origin).netloc.lower() == request.headers.get("host", "").lower()
    return request.headers.get("sec-fetch-site", "same-origin") in ("same-origin", "none")


def _caller(ui: Ui, request: Request, role: Role, what: str) -> SignedIn:
    try:
        who = ui.signed_in(request)
    except AccessError as exc:
        if request.method == "GET":
            raise SignInNeeded(exc.what, exc.why, hint=exc.hint) from None
        raise
    require(who.principal, role, what)
    return who


def view(ui: Ui, role: Role, handler: Callable[[Ui, Request, SignedIn], Response]) -> Endpoint:
    """A GET page for ``role`` and above."""

    async def endpoint(request: Request) -> Response:
        who = await run_in_threadpool(_caller, ui, request, role, f"the page {request.url.path}")
        return await run_in_threadpool(handler, ui, request, who)

    return endpoint


def action(ui: Ui, role: Role, handler: Callable[[Ui, Request, SignedIn, Form], Response]) -> Endpoint:
    """A POST form for ``role`` and above, from this host, with the session's CSRF token."""

    async def endpoint(request: Request) -> Response:
        if not same_origin(request, ui.public_origin):
            raise PermissionDenied(
                f"POST {request.url.path}", "comes from another site", hint="Use the dashboard's own forms."
            )
        who = await run_in_threadpool(_caller, ui, request, role, f"POST {request.url.path}")
        form = await read_form(request)
        if not ui.key.csrf_ok(who.ticket, form.get("csrf")):
            raise PermissionDenied(
                f"POST {request.url.path}",
                "has no valid CSRF token for this session",
                hint="Reload the page and send its form again.",
            )
        return await run_in_threadpool(handler, ui, request, who, form)

    return endpoint


async def read_form(request: Request, limit: int = FORM_LIMIT) -> Form:
    """The url-encoded form of a POST, read only up to ``limit`` bytes; a field given twice, or
    another content type, is refused."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/x-www-form-urlencoded":
        raise _NotAForm("request body", f"is {kind or 'untyped'}; a dashboard form is url-encoded")
    declared = request.headers.get("content-length")
    if declared is not None and not re.fullmatch(r"[0-9]{1,18}", declared):
        raise UsageError("Content-Length", f"{declared[:20]!r} is not a number of bytes")
    if declared is not None and int(declared) > limit:
        raise _TooLarge("request body", f"is over the dashboard's {limit}-byte form limit")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise _TooLarge("request body", f"is over the dashboard's {limit}-byte form limit")
    try:
        pairs = parse_qsl(
            body.decode("utf-8"), keep_blank_values=True, strict_parsing=False, max_num_fields=64
        )
    except (UnicodeDecodeError, ValueError) as exc:
        raise UsageError("request body", f"is not a form: {exc}") from exc
    form: dict[str, str] = {}
    for name, value in pairs:
        if name in form:
            raise UsageError(f"form field {name[:40]!r}", "is given twice")
        form[name] = value
    return form


def error_status(exc: EdgeError) -> int:
    """The dashboard's status for a refusal: the API's table, and 413 / 415 for bodies."""
    from cloud_hub.api import status_for

    if isinstance(exc, _TooLarge):
        return 413
    if isinstance(exc, _NotAForm):
        return 415
    return status_for(exc)
