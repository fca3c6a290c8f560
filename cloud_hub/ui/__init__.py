"""The hub's dashboard at ``/ui``: server-rendered pages over the same tokens, roles, services and
audit log as the API (PRODUCT.md section 11, issue 27).

    signin          GET  /ui/login, POST /ui/login, POST /ui/logout              -
    fleet           GET  /ui/?selector=&online=&after=&limit=                    viewer
                    GET  /ui/devices/{id}                                        viewer
    releases        GET  /ui/releases                                            viewer
    rollout_pages   GET  /ui/rollouts, /ui/rollouts/{id}, /ui/rollouts/{id}/live viewer
                    GET  /ui/rollouts/{id}/waves/{n}?after=&limit=&state=        viewer
                    GET  /ui/rollouts/{id}/pause|resume|abort|rollback           operator  (confirm)
                    POST /ui/rollouts/{id}/pause|resume|abort|rollback           operator  + CSRF
    deploy          GET  /ui/deploy, POST /ui/deploy/plan, POST /ui/deploy/start operator  + CSRF
    audit_log       GET  /ui/audit?actor=&action=&subject=&since=&until=&before= viewer
    static          GET  /ui/static/...                                          -         JS, CSS, uPlot

:mod:`~cloud_hub.ui.session` holds the session cookie and the CSRF tokens, :mod:`~cloud_hub.ui.access`
the checks every handler runs behind (origin, session, role, body size, CSRF, in that order),
:mod:`~cloud_hub.ui.render` the templates and the security headers (CSP, no framing). A refusal is
an HTML page with the API's status for the same error; a page without a session redirects to
the sign-in form.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlencode

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from cloud_hub.auth import Role
from cloud_hub.context import HubContext
from cloud_hub.settings import public_origin
from cloud_hub.ui import audit_log, deploy, fleet, releases, rollout_pages, signin
from cloud_hub.ui.access import SignInNeeded, Ui, action, error_status, view
from cloud_hub.ui.render import SecurityHeaders, environment
from cloud_hub.ui.session import SESSION_S, SessionKey
from edgeglm.errors import ConfigError, EdgeError, UnavailableError

__all__ = ["create_ui"]

log = logging.getLogger(__name__)
_STATIC = Path(__file__).parent / "static"


def create_ui(
    ctx: HubContext,
    *,
    session_s: int = SESSION_S,
    public_url: str | None = None,
    clock: Callable[[], float] = time.time,
) -> Starlette:
    """The dashboard app, to be mounted at ``/ui`` (``cloud_hub.server.load_app`` does).

    ``public_url``: where browsers reach the hub (``HubSettings.public_url``); forms are taken
    only from pages of it. None: from pages of the request's Host. ``clock``: the time sessions
    and dry runs are judged by."""
    if ctx.fleet is None:
        return _unavailable()
    origin = None
    if public_url is not None and (origin := public_origin(public_url)) is None:
        raise ConfigError("public URL", f"{public_url[:80]!r} is not http(s)://HOST[:PORT]")
    ui = Ui(ctx, SessionKey(ctx.fleet.private, lifetime_s=session_s), environment(), origin, clock)

    async def login_form(request: Request) -> Response:
        return await signin.login_form(ui, request)

    async def login_submit(request: Request) -> Response:
        return await signin.login_submit(ui, request)

    async def logout(request: Request) -> Response:
        return await signin.logout(ui, request)

    viewer, operator = Role.viewer, Role.operator
    routes = [
        Route("/login", login_form, methods=["GET"]),
        Route("/login", login_submit, methods=["POST"]),
        Route("/logout", logout, methods=["POST"]),
        Route("/", view(ui, viewer, fleet.fleet_page), methods=["GET"]),
        Route("/devices/{device_id}", view(ui, viewer, fleet.device_page), methods=["GET"]),
        Route("/releases", view(ui, viewer, releases.releases_page), methods=["GET"]),
        Route("/rollouts", view(ui, viewer, rollout_pages.rollouts_page), methods=["GET"]),
        Route("/rollouts/{rollout_id}", view(ui, viewer, rollout_pages.rollout_page), methods=["GET"]),
        Route("/rollouts/{rollout_id}/live", view(ui, viewer, rollout_pages.live_fragment), methods=["GET"]),
        Route(
            "/rollouts/{rollout_id}/waves/{wave}", view(ui, viewer, rollout_pages.wave_page), methods=["GET"]
        ),
        Route(
            "/rollouts/{rollout_id}/{action}",
            view(ui, operator, rollout_pages.confirm_page),
            methods=["GET"],
        ),
        Route(
            "/rollouts/{rollout_id}/{action}",
            action(ui, operator, rollout_pages.control),
            methods=["POST"],
        ),
        Route("/deploy", view(ui, operator, deploy.deploy_form), methods=["GET"]),
        Route("/deploy/plan", action(ui, operator, deploy.deploy_plan), methods=["POST"]),
        Route("/deploy/start", action(ui, operator, deploy.deploy_start), methods=["POST"]),
        Route("/audit", view(ui, viewer, audit_log.audit_page), methods=["GET"]),
        Mount("/static", StaticFiles(directory=_STATIC), name="static"),
    ]

    async def refused(request: Request, exc: Exception) -> Response:
        if isinstance(exc, SignInNeeded):
            here = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            return RedirectResponse(f"/ui/login?{urlencode({'next': here})}", status_code=303)
        assert isinstance(exc, EdgeError)
        status = error_status(exc)
        if status >= 500:
            log.error("dashboard request failed: %s", exc)
        return ui.render(request, "error.html", None, status=status, error=exc)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        what = {404: "no page of the dashboard is here", 405: "this page does not take that method"}
        error = EdgeError(
            f"{request.method[:16]} {request.url.path[:200]}", what.get(exc.status_code, str(exc.detail))
        )
        response = ui.render(request, "error.html", None, status=exc.status_code, error=error)
        response.headers.update(dict(exc.headers or {}))
        return response

    app = Starlette(routes=routes, exception_handlers={EdgeError: refused, HTTPException: http_error})
    app.add_middleware(SecurityHeaders)
    return app


def _unavailable() -> Starlette:
    """A hub without a fleet key has no key to sign sessions with: every page says so (503)."""

    async def unavailable(_request: Request) -> Response:
        error = UnavailableError("dashboard", "this hub has no fleet key loaded to sign sessions with")
        return Response(f"{error.what}: {error.why}\n", status_code=503, media_type="text/plain")

    app = Starlette(routes=[Route("/{path:path}", unavailable)])
    app.add_middleware(SecurityHeaders)
    return app
