"""The hub's HTTP API (FastAPI) under ``/api/v1``; bearer tokens with roles; OpenAPI at /openapi.json.

``create_app`` assembles the routers of :mod:`cloud_hub.routes` (its docstring has the route
table) behind :class:`cloud_hub.guard.Guard` (trace ids; token, role and body size checked before
a body is read; control characters in parameters refused) with the error handlers. Each request
runs in one database transaction; writes add their audit row to it, so a change and its audit
row commit together. Domain code raises :mod:`edgeglm.errors`; ``_STATUS`` is the one table that
maps them to HTTP statuses (the guard adds 411 and 413 for bodies), and every error body is
``{"error": {"type", "what", "why", "hint", "trace_id"}}``
(:class:`edgeglm.hub_api.ErrorView`): the domain's errors, a body or parameter that does not
validate (422), a path no route serves (404), a method the route does not take (405, with its
``Allow`` header), the guard's refusals and an unexpected failure (500, logged with its trace id).
A usage error that carries the command line's default hint (``--help``) gets one for HTTP callers.
:class:`cloud_hub.metrics.RequestTimer`, outside everything else, times each request by route.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy.exc import IntegrityError as DbIntegrityError
from sqlalchemy.exc import SQLAlchemyError
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import Response
from starlette.routing import Route

from cloud_hub import audit
from cloud_hub.context import HubContext
from cloud_hub.guard import Guard
from cloud_hub.metrics import RequestTimer
from cloud_hub.routes import ROUTERS
from cloud_hub.routes.pieces import PieceDesk
from edgeglm.bundle import Manifest
from edgeglm.errors import (
    AccessError,
    ConfigError,
    ConflictError,
    EdgeError,
    IntegrityError,
    NotFoundError,
    PermissionDenied,
    ProtocolError,
    UnavailableError,
    UsageError,
)
from edgeglm.hub_api import ErrorInfo, ErrorView
from edgeglm.trust_root import RootDocument

__all__ = ["HTTP_HINT", "HubContext", "create_app", "status_for"]

log = logging.getLogger(__name__)
_TRACE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")  # as cloud_hub.guard takes one

# The one table from domain errors to HTTP statuses (most specific class first).
_STATUS: tuple[tuple[type[EdgeError], int], ...] = (
    (PermissionDenied, 403),
    (AccessError, 401),
    (NotFoundError, 404),
    (ConflictError, 409),
    (IntegrityError, 422),
    (UsageError, 400),
    (ProtocolError, 400),
    (UnavailableError, 503),
    (ConfigError, 500),
    (EdgeError, 400),
)
# An HTTP status that starlette raises (HTTPException) -> the domain error it is.
_BY_STATUS: dict[int, type[EdgeError]] = {
    401: AccessError,
    403: PermissionDenied,
    404: NotFoundError,
    409: ConflictError,
    503: UnavailableError,
}
# The models of the raw bodies that routes document (openapi_extra) but read as bytes: FastAPI
# does not put them in /openapi.json's components by itself.
_RAW_BODY_MODELS: tuple[type[BaseModel], ...] = (Manifest, RootDocument)
HTTP_HINT = "See /docs or /openapi.json for this route's parameters and body."


def status_for(exc: EdgeError) -> int:
    return next(code for cls, code in _STATUS if isinstance(exc, cls))


def _error(exc: EdgeError, status: int | None = None) -> JSONResponse:
    status = status_for(exc) if status is None else status
    hint = HTTP_HINT if isinstance(exc, UsageError) and exc.hint == UsageError.default_hint else exc.hint
    info = ErrorInfo(
        type=type(exc).__name__, what=exc.what, why=exc.why, hint=hint, trace_id=audit.trace_id.get()
    )
    return JSONResponse(ErrorView(error=info).model_dump(), status_code=status)


def create_app(ctx: HubContext) -> FastAPI:
    errors: dict[int | str, dict[str, Any]] = {
        code: {"model": ErrorView} for code in (400, 401, 403, 404, 405, 409, 411, 413, 422, 500, 503)
    }
    # One schema per model, as it validates: what edgectl checks an answer against.
    app = FastAPI(
        title="EdgeGLM cloud hub", version="1", responses=errors, separate_input_output_schemas=False
    )
    app.state.ctx = ctx
    app.state.pieces = PieceDesk(ctx)  # the piece routes' per-device limiter and scope
    app.openapi = _document(app, _RAW_BODY_MODELS)  # type: ignore[method-assign]
    for router in ROUTERS:
        app.include_router(router)

    routes = [route for router in ROUTERS for route in router.routes]  # as included, no prefix added
    app.add_middleware(Guard, ctx=ctx, routes=routes, render=_error)
    # outermost: times everything, labelled with the template of the route it matches
    own = [route for route in app.router.routes if isinstance(route, Route)]  # /openapi.json, /docs
    app.add_middleware(RequestTimer, metrics=ctx.metrics, routes=[*own, *routes])
    app.add_exception_handler(HTTPException, _http_error)  # type: ignore[arg-type]
    app.add_exception_handler(EdgeError, _edge_error)  # type: ignore[arg-type]  # starlette types it loosely
    app.add_exception_handler(RequestValidationError, _invalid)  # type: ignore[arg-type]
    app.add_exception_handler(DbIntegrityError, _db_conflict)  # type: ignore[arg-type]
    app.add_exception_handler(SQLAlchemyError, _db_error)  # type: ignore[arg-type]
    app.add_exception_handler(ClientDisconnect, _gone)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, _unexpected)
    return app


def _document(app: FastAPI, models: tuple[type[BaseModel], ...]) -> Callable[[], dict[str, Any]]:
    """FastAPI's document, with ``models`` (and the models they use) among its components, and
    every error answer as the JSON ErrorView it is (FastAPI gives a text route's errors its
    text media type)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        spec = FastAPI.openapi(app)  # made once, kept as app.openapi_schema
        components = spec.setdefault("components", {}).setdefault("schemas", {})
        for model in models:
            schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
            for name, sub in {**schema.pop("$defs", {}), model.__name__: schema}.items():
                components.setdefault(name, sub)  # a model FastAPI already has stays as it is
        error = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorView"}}}
        for operations in spec.get("paths", {}).values():
            for op in operations.values():
                for status, answer in op.get("responses", {}).items():
                    if status[0] in "45":
                        answer["content"] = error
        return spec

    return openapi


async def _edge_error(_request: Request, exc: EdgeError) -> JSONResponse:
    status = status_for(exc)
    if status >= 500:
        log.error("request failed: %s", exc)
    return _error(exc, status)


async def _http_error(request: Request, exc: HTTPException) -> Response:
    """The router's own refusals: a path no route serves (404), a method it does not take (405)."""
    headers = dict(exc.headers or {})
    if exc.status_code < 400:  # not an error: nothing to wrap (a 304 has no body)
        return Response(status_code=exc.status_code, headers=headers)
    where = f"{request.method[:16]} {request.url.path[:200]}"
    error: EdgeError
    if exc.status_code == 404:
        error = NotFoundError(where, "no route of this hub serves this path", hint=_ROUTES_HINT)
    elif exc.status_code == 405:
        allowed = headers.get("Allow", "")
        error = UsageError(where, f"this route takes {allowed or 'other methods'}", hint=_ROUTES_HINT)
    else:
        error = _BY_STATUS.get(exc.status_code, UsageError if exc.status_code < 500 else EdgeError)(
            where, str(exc.detail)[:300]
        )
    response = _error(error, exc.status_code)
    response.headers.update(headers)  # Allow on a 405, WWW-Authenticate on a 401
    return response


_ROUTES_HINT = "See /openapi.json (or /docs) for the routes and the methods each takes."


async def _gone(_request: Request, _exc: ClientDisconnect) -> Response:
    """The client left while its body was being read: nobody to answer, no failure to log."""
    log.debug("a client left before its request body arrived")
    return Response(status_code=400)


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    """A bug: answered 500 in the error shape, logged with the request's trace id (starlette then
    re-raises it, so the server logs its traceback too). It runs outside the guard, whose trace id
    is gone by then: a well-formed X-Trace-Id the caller sent is kept, else a fresh one is made."""
    given = request.headers.get("x-trace-id", "")
    trace = given if _TRACE.match(given) else audit.new_trace_id()
    log.error("unexpected error on %s %s (trace %s): %r", request.method, request.url.path[:200], trace, exc)
    info = ErrorInfo(
        type="EdgeError",
        what="hub",
        why="an unexpected error; see the hub log",
        hint=f"Report it with trace id {trace}.",
        trace_id=trace,
    )
    return JSONResponse(ErrorView(error=info).model_dump(), status_code=500, headers={"X-Trace-Id": trace})


async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
    first: dict[str, Any] = dict(exc.errors()[0]) if exc.errors() else {"loc": (), "msg": "invalid request"}
    if first.get("type") == "json_invalid":  # loc is ("body", character offset): say so instead
        detail = str(first.get("ctx", {}).get("error", ""))[:200]
        where, why = "request body", f"is not valid JSON ({detail} at character {first['loc'][-1]})"
    else:
        where = ".".join(str(p) for p in first.get("loc", ())) or "request"
        why = str(first.get("msg", "invalid"))[:300]
    return _error(UsageError(where, why, hint=HTTP_HINT), 422)


async def _db_conflict(_request: Request, exc: DbIntegrityError) -> JSONResponse:
    log.info("database refused a write: %s", str(exc.orig).splitlines()[0][:300])
    return _error(ConflictError("database", "a concurrent change conflicts with this one; retry"), 409)


async def _db_error(_request: Request, exc: SQLAlchemyError) -> JSONResponse:
    log.error("database error: %s", str(exc).splitlines()[0][:300])
    return _error(UnavailableError("database", "the operation failed; see the hub log"), 503)
