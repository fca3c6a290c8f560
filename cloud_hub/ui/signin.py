"""Signing in to the dashboard with an API token, and signing out.

    GET  /ui/login     the form; sets a short-lived random cookie its CSRF token is bound to
    POST /ui/login     from this host, with that CSRF token: the token is checked as the API
                       checks it; a valid one gets a session cookie (never the token itself)
                       and the sign-in is audited (``ui.sign_in``, target ``token/NAME``)
    POST /ui/logout    from this host; with a valid session its CSRF token (audited ``ui.sign_out``);
                       the cookie is cleared, also when the session is no longer valid

A session cannot outlive its token: the token row is read on every request
(:func:`cloud_hub.ui.session.resolve`), so ``edgectl hub token revoke`` ends its sessions at once.
"""

from __future__ import annotations

import ipaddress
import logging
from urllib.parse import urlsplit

from sqlalchemy import select
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from cloud_hub import audit
from cloud_hub.auth import authenticate, hash_token
from cloud_hub.models import ApiToken
from cloud_hub.ui.access import Ui, read_form, same_origin
from cloud_hub.ui.session import COOKIE, LOGIN_COOKIE, LOGIN_S, SignedIn, cookie_header
from edgeglm.errors import AccessError, PermissionDenied

__all__ = ["cookie_dropped", "login_form", "login_submit", "logout", "safe_next"]

log = logging.getLogger(__name__)


def safe_next(value: str | None) -> str:
    """Where to go after sign-in: a path of the dashboard only (never another site)."""
    if value and value.startswith("/ui/") and not value.startswith("//") and "\\" not in value:
        return value
    return "/ui/"


def cookie_dropped(request: Request, public_origin: str | None) -> bool:
    """Whether the browser will drop the Secure session cookie: the page came over plain HTTP
    (the public URL says so, else the request's scheme and a proxy's ``X-Forwarded-Proto``) from a
    host that is not loopback (browsers keep Secure cookies of ``localhost`` / ``127.0.0.1``)."""
    if public_origin is not None:
        parts = urlsplit(public_origin)
    else:
        forwarded = request.headers.get("x-forwarded-proto", "").split(",")[0].strip().lower()
        scheme = forwarded or request.url.scheme
        parts = urlsplit(f"{scheme}://{request.headers.get('host', '')}")
    if parts.scheme != "http":
        return False
    try:
        host = (parts.hostname or "").strip("[]")
    except ValueError:
        return True
    if host == "localhost" or host.endswith(".localhost"):
        return False
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:
        return True


def _form(ui: Ui, request: Request, *, error: str = "", status: int = 200) -> Response:
    nonce = ui.key.login_nonce(request.cookies.get(LOGIN_COOKIE))
    response = ui.render(
        request,
        "login.html",
        None,
        status=status,
        login_csrf=ui.key.login_csrf(nonce),
        next=safe_next(request.query_params.get("next")),
        error=error,
        insecure=cookie_dropped(request, ui.public_origin),
    )
    response.headers.append("Set-Cookie", cookie_header(LOGIN_COOKIE, nonce, LOGIN_S))
    return response


async def login_form(ui: Ui, request: Request) -> Response:
    return _form(ui, request)


async def login_submit(ui: Ui, request: Request) -> Response:
    if not same_origin(request, ui.public_origin):
        raise PermissionDenied("POST /ui/login", "comes from another site", hint="Use the dashboard's form.")
    form = await read_form(request)
    if not ui.key.login_csrf_ok(request.cookies.get(LOGIN_COOKIE), form.get("csrf")):
        raise PermissionDenied(
            "POST /ui/login", "has no valid CSRF token", hint="Open the sign-in page again and send its form."
        )
    try:
        cookie = _sign_in(ui, form.get("token", "").strip())
    except AccessError:
        return _form(ui, request, error="That token is not valid (or it was revoked).", status=401)
    response = RedirectResponse(safe_next(form.get("next")), status_code=303)
    response.headers.append("Set-Cookie", cookie_header(COOKIE, cookie, ui.key.lifetime_s))
    response.headers.append("Set-Cookie", cookie_header(LOGIN_COOKIE, "", 0))
    return response


def _sign_in(ui: Ui, secret: str) -> str:
    with ui.hub.db.session() as s:
        who = authenticate(s, secret)  # AccessError: missing, malformed, unknown or revoked
        row = s.scalar(select(ApiToken).where(ApiToken.token_hash == hash_token(secret)))
        assert row is not None  # authenticate found it
        audit.record(s, who.name, "ui.sign_in", f"token/{who.name}", after={"role": who.role.name})
        log.info("dashboard sign-in by token %s (%s)", who.name, who.role.name)
        return ui.key.issue(row, now=ui.clock())


async def logout(ui: Ui, request: Request) -> Response:
    """Clears the session cookie. With a valid session, only with its CSRF token, and audited;
    with none (expired, revoked, altered) the cookie is cleared all the same: there is nobody to
    sign out, and a stale cookie must not leave the browser stuck (the Origin is checked first
    either way)."""
    if not same_origin(request, ui.public_origin):
        raise PermissionDenied("POST /ui/logout", "comes from another site", hint="Use the dashboard's form.")
    try:
        who: SignedIn | None = await run_in_threadpool(ui.signed_in, request)
    except AccessError:
        who = None
    if who is not None:
        form = await read_form(request)
        if not ui.key.csrf_ok(who.ticket, form.get("csrf")):
            raise PermissionDenied(
                "POST /ui/logout",
                "has no valid CSRF token for this session",
                hint="Reload the page and sign out again.",
            )
        await run_in_threadpool(_audit_sign_out, ui, who)
    response = RedirectResponse("/ui/login", status_code=303)
    response.headers.append("Set-Cookie", cookie_header(COOKIE, "", 0))
    return response


def _audit_sign_out(ui: Ui, who: SignedIn) -> None:
    with ui.hub.db.session() as s:
        audit.record(s, who.name, "ui.sign_out", f"token/{who.name}")
