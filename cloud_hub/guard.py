"""What the hub checks before a route reads one byte of its request's body (a pure ASGI middleware).

``create_app`` puts :class:`Guard` in front of every route. For each request, in this order:

    trace id     ``X-Trace-Id`` as given (when well-formed) or a fresh one, on every answer
    parameters   a NUL or another control character in the path or a query name or value: 400
  then, under /api/v1 only:
    token        a missing, malformed, unknown or revoked bearer token: 401
    role         below the route's role (its Viewer / Operator / Admin dependency): 403
      or, on a device route (its DeviceAuth dependency: the piece routes), instead of both:
    credential   a device's HTTP credential (cloud_hub.device_credentials): forged, expired or
                 superseded 401, revoked 403 (the device's row is read on each request), each
                 with ``X-Edgeglm-Credential: refused`` (the box stops HTTP until a new token; a
                 403 without it, out of scope, refuses one piece only); no API token opens a
                 device route, no device credential any other
    size         a Content-Length over the route's limit: 413; a raw-body route sent without one
                 (chunked): 411; a chunked body that streams past the limit: 413, reading stops

FastAPI reads and parses a JSON body before it runs a route's dependencies, so the checks cannot
be dependencies: :func:`route_rules` reads each route's role and body limit off the app itself
(the role from its dependency, the limit from :func:`cloud_hub.routes.deps.raw_body` or
:data:`~cloud_hub.routes.deps.JSON_LIMIT`; a device route takes no body: limit 0). A JSON body (a
few KiB at most) is read here, within its limit, and handed on; a raw body is counted as the route
streams it. The caller reaches the route as ``request.state.principal`` (a device as
``request.state.device``).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from urllib.parse import parse_qsl

from fastapi.routing import APIRoute
from sqlalchemy.exc import SQLAlchemyError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers, MutableHeaders
from starlette.responses import Response
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cloud_hub import audit
from cloud_hub.auth import Principal, Role, authenticate, require
from cloud_hub.context import HubContext
from cloud_hub.device_credentials import CREDENTIAL_HINT, DeviceCaller, authenticate_device
from cloud_hub.routes.deps import DEVICE_DEPENDENCIES, JSON_LIMIT, ROLE_DEPENDENCIES, Limit, raw_body_limit
from edgeglm.errors import AccessError, EdgeError, UnavailableError, UsageError
from edgeglm.hub_api import API_PREFIX

__all__ = ["CREDENTIAL_REFUSED", "Guard", "RouteRule", "route_rules"]

# on a refused device credential: the agent (edge_agent.fetch_http) stops HTTP until a new token
CREDENTIAL_REFUSED = ("X-Edgeglm-Credential", "refused")

log = logging.getLogger(__name__)

Render = Callable[[EdgeError, int | None], Response]  # the ErrorView answer; None: the usual status

_TRACE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")  # Unicode category Cc: C0, DEL and C1


@dataclass(frozen=True)
class RouteRule:
    """What a route needs before its body is read."""

    role: Role
    limit: Limit  # bytes, or a function of the hub's context (a piece: its max_piece_bytes)
    raw: bool  # reads raw bytes (Content-Length required); else a JSON body or none
    json: bool  # takes a JSON body (read here, within the limit, before FastAPI parses it)
    device: bool = False  # a device's HTTP credential, not an API token (role is then unused)


_UNKNOWN = RouteRule(Role.viewer, JSON_LIMIT, raw=False, json=False)  # 404 / 405 come from the app


def _role(route: APIRoute) -> Role | None:
    pending = list(route.dependant.dependencies)
    found: list[Role] = []
    while pending:
        dep = pending.pop()
        if dep.call in ROLE_DEPENDENCIES:
            found.append(ROLE_DEPENDENCIES[dep.call])
        pending.extend(dep.dependencies)
    return max(found, default=None)


def _device_route(route: APIRoute) -> bool:
    pending = list(route.dependant.dependencies)
    while pending:
        dep = pending.pop()
        if dep.call in DEVICE_DEPENDENCIES:
            return True
        pending.extend(dep.dependencies)
    return False


def route_rules(routes: Iterable[BaseRoute]) -> dict[tuple[str, str], RouteRule]:
    """(method, path template) -> its rule, for every route under /api/v1; a route there without a
    role or device dependency (or with both) is a bug, refused here rather than served to anyone."""
    rules: dict[tuple[str, str], RouteRule] = {}
    for route in routes:
        if not isinstance(route, APIRoute) or not route.path.startswith(API_PREFIX + "/"):
            continue
        role, device = _role(route), _device_route(route)
        if device:
            if role is not None or route.body_field is not None or raw_body_limit(route.endpoint):
                raise RuntimeError(f"device route {route.path} takes a role or a body")
            for method in route.methods or ():
                rules[(method, route.path)] = RouteRule(Role.viewer, 0, raw=False, json=False, device=True)
            continue
        if role is None:
            raise RuntimeError(f"route {route.path} has no Viewer, Operator or Admin dependency")
        raw = raw_body_limit(route.endpoint)
        rule = RouteRule(
            role, JSON_LIMIT if raw is None else raw, raw=raw is not None, json=route.body_field is not None
        )
        for method in route.methods or ():
            rules[(method, route.path)] = rule
    return rules


class _TooLarge(Exception):
    """A chunked body streamed past its route's limit (raised from ``receive``, answered 413)."""


class _Gone(Exception):
    """The client left while its body was being read: nobody to answer."""


class Guard:
    """The checks above, in front of ``app``; ``render`` turns an error into the hub's ErrorView."""

    def __init__(self, app: ASGIApp, *, ctx: HubContext, routes: Iterable[BaseRoute], render: Render) -> None:
        self.app = app
        self.ctx = ctx
        self.render = render
        self._routes = [r for r in routes if isinstance(r, APIRoute)]
        self._rules = route_rules(self._routes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = Headers(scope=scope).get("x-trace-id", "")
        trace = given if _TRACE.match(given) else audit.new_trace_id()
        token = audit.trace_id.set(trace)
        answered: list[int] = []

        async def traced(message: Message) -> None:
            if message["type"] == "http.response.start":
                answered.append(message["status"])
                MutableHeaders(scope=message).append("X-Trace-Id", trace)
            await send(message)

        try:
            await self._guarded(scope, receive, traced, answered)
        finally:
            audit.trace_id.reset(token)
            self.ctx.metrics.observe_request(scope["method"], answered[0] if answered else 500)

    async def _guarded(self, scope: Scope, receive: Receive, send: Send, answered: list[int]) -> None:
        refuse = _Refuse(self.render, scope, receive, send)
        if (problem := _control_character(scope)) is not None:
            return await refuse(
                UsageError(problem, "holds a control character (NUL, newline, ...)", hint="Send text only."),
                400,
            )
        path: str = scope["path"]
        if not (path == API_PREFIX or path.startswith(API_PREFIX + "/")):
            return await self.app(scope, receive, send)
        template, rule = self._rule(scope)
        headers = Headers(scope=scope)
        try:
            if rule.device:
                try:
                    device = await run_in_threadpool(self._authenticate_device, headers.get("authorization"))
                except AccessError as exc:  # this credential will never open a piece: say so
                    return await refuse(exc, headers={CREDENTIAL_REFUSED[0]: CREDENTIAL_REFUSED[1]})
                scope.setdefault("state", {})["device"] = device
            else:
                who = await run_in_threadpool(self._authenticate, headers.get("authorization"))
                require(who, rule.role, f"{scope['method']} {template}")
                scope.setdefault("state", {})["principal"] = who
        except EdgeError as exc:  # AccessError 401, PermissionDenied 403, UnavailableError 503
            return await refuse(exc)

        limit = rule.limit(self.ctx) if callable(rule.limit) else rule.limit
        declared = headers.get("content-length")
        if declared is not None and not (declared.isascii() and declared.isdigit()):
            return await refuse(UsageError("Content-Length", f"{declared[:40]!r} is not a byte count"), 400)
        if declared is not None and int(declared) > limit:
            return await refuse(_too_large(limit, f"is {declared} bytes"), 413)
        if declared is None and rule.raw and "chunked" in headers.get("transfer-encoding", "").lower():
            return await refuse(
                UsageError("request body", "has no Content-Length", hint="Send the body's size with it."),
                411,
            )
        if rule.json:
            try:
                body = await _read_within(receive, limit)
            except _Gone:
                return None
            if body is None:
                return await refuse(_too_large(limit, "streams past the limit"), 413)
            receive = _replay(body, receive)
        try:
            await self.app(scope, _counted(receive, limit), send)
        except _TooLarge:
            if answered:
                raise
            await refuse(_too_large(limit, "streams past the limit"), 413)

    def _rule(self, scope: Scope) -> tuple[str, RouteRule]:
        for route in self._routes:
            match, _ = route.matches(scope)
            if match is Match.FULL:
                return route.path, self._rules[(scope["method"], route.path)]
        return scope["path"], _UNKNOWN

    def _authenticate(self, authorization: str | None) -> Principal:
        scheme, _, secret = (authorization or "").partition(" ")
        if scheme.lower() != "bearer":
            raise AccessError("API token", "missing: send 'Authorization: Bearer <token>'")
        try:
            with self.ctx.db.session() as s:
                return authenticate(s, secret.strip())
        except SQLAlchemyError as exc:
            log.error("database error while checking a token: %s", str(exc).splitlines()[0][:300])
            raise UnavailableError("database", "the operation failed; see the hub log") from exc

    def _authenticate_device(self, authorization: str | None) -> DeviceCaller:
        scheme, _, secret = (authorization or "").partition(" ")
        if scheme.lower() != "bearer":
            raise AccessError(
                "device credential",
                "missing: send 'Authorization: Bearer <pieces_token>'",
                hint=CREDENTIAL_HINT,
            )
        fleet = self.ctx.fleet
        if fleet is None:
            raise UnavailableError("device credentials", "this hub has no fleet key loaded")
        try:
            with self.ctx.db.session() as s:
                return authenticate_device(s, fleet.credentials, secret.strip(), now=time.time())
        except SQLAlchemyError as exc:
            log.error("database error while checking a device credential: %s", str(exc).splitlines()[0][:300])
            raise UnavailableError("database", "the operation failed; see the hub log") from exc


class _Refuse:
    def __init__(self, render: Render, scope: Scope, receive: Receive, send: Send) -> None:
        self.render, self.scope, self.receive, self.send = render, scope, receive, send

    def __call__(
        self, exc: EdgeError, status: int | None = None, *, headers: dict[str, str] | None = None
    ) -> Awaitable[None]:
        response = self.render(exc, status)
        response.headers["Connection"] = "close"  # the body, if any, is left unread
        response.headers.update(headers or {})
        return response(self.scope, self.receive, self.send)


def _too_large(limit: int, why: str) -> UsageError:
    return UsageError("request body", f"{why}, over this route's {limit}-byte limit")


def _control_character(scope: Scope) -> str | None:
    """The name of the first path or query parameter that holds a control character, if any."""
    if _CONTROL.search(scope["path"]):
        return "path"
    query = scope.get("query_string", b"").decode("latin-1")
    for name, value in parse_qsl(query, keep_blank_values=True):
        if _CONTROL.search(name) or _CONTROL.search(value):
            return f"query parameter {_CONTROL.sub('?', name)[:40]!r}"
    return None


async def _read_within(receive: Receive, limit: int) -> bytes | None:
    """The whole body, or None as soon as it passes ``limit`` (the rest is never read)."""
    parts: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            raise _Gone
        chunk: bytes = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        parts.append(chunk)
        if not message.get("more_body", False):
            return b"".join(parts)


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay


def _counted(receive: Receive, limit: int) -> Receive:
    size = 0

    async def counted() -> Message:
        nonlocal size
        message = await receive()
        if message["type"] == "http.request":
            size += len(message.get("body", b""))
            if size > limit:
                raise _TooLarge
        return message

    return counted
