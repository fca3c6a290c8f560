"""The hub's HTTP API (FastAPI) under ``/api/v1``; bearer tokens with roles; OpenAPI at /openapi.json.

``create_app`` assembles the routers of :mod:`cloud_hub.routes` (its docstring has the route
table) behind :class:`cloud_hub.guard.Guard` (trace ids; token, role and body size checked before
a body is read; control characters in parameters refused) with the error handlers. Each request
runs in one database transaction; writes add their audit row to it, so a change and its audit
row commit together. Domain code raises :mod:`edgeglm.errors`; ``_STATUS`` is the one table that
maps them to HTTP statuses (the guard adds 411 and 413 for bodies), and every error body is
``{"error": {"type", "what", "why", "hint", "trace_id"}}``
(:class:`edgeglm.hub_api.ErrorView`).
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import IntegrityError as DbIntegrityError
from sqlalchemy.exc import SQLAlchemyError

from cloud_hub import audit
from cloud_hub.context import HubContext
from cloud_hub.guard import Guard
from cloud_hub.routes import ROUTERS
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

__all__ = ["HubContext", "create_app", "status_for"]

log = logging.getLogger(__name__)

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


def status_for(exc: EdgeError) -> int:
    return next(code for cls, code in _STATUS if isinstance(exc, cls))


def _error(exc: EdgeError, status: int | None = None) -> JSONResponse:
    status = status_for(exc) if status is None else status
    info = ErrorInfo(
        type=type(exc).__name__, what=exc.what, why=exc.why, hint=exc.hint, trace_id=audit.trace_id.get()
    )
    return JSONResponse(ErrorView(error=info).model_dump(), status_code=status)


def create_app(ctx: HubContext) -> FastAPI:
    errors: dict[int | str, dict[str, Any]] = {
        code: {"model": ErrorView} for code in (400, 401, 403, 404, 409, 411, 413, 422, 503)
    }
    # One schema per model, as it validates: what edgectl checks an answer against.
    app = FastAPI(
        title="EdgeGLM cloud hub", version="1", responses=errors, separate_input_output_schemas=False
    )
    app.state.ctx = ctx
    for router in ROUTERS:
        app.include_router(router)

    routes = [route for router in ROUTERS for route in router.routes]  # as included, no prefix added
    app.add_middleware(Guard, ctx=ctx, routes=routes, render=_error)
    app.add_exception_handler(EdgeError, _edge_error)  # type: ignore[arg-type]  # starlette types it loosely
    app.add_exception_handler(RequestValidationError, _invalid)  # type: ignore[arg-type]
    app.add_exception_handler(DbIntegrityError, _db_conflict)  # type: ignore[arg-type]
    app.add_exception_handler(SQLAlchemyError, _db_error)  # type: ignore[arg-type]
    return app


async def _edge_error(_request: Request, exc: EdgeError) -> JSONResponse:
    status = status_for(exc)
    if status >= 500:
        log.error("request failed: %s", exc)
    return _error(exc, status)


async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
    where = ".".join(str(p) for p in first.get("loc", ())) or "request"
    return _error(UsageError(where, str(first.get("msg", "invalid"))[:300]), 422)


async def _db_conflict(_request: Request, exc: DbIntegrityError) -> JSONResponse:
    log.info("database refused a write: %s", str(exc.orig).splitlines()[0][:300])
    return _error(ConflictError("database", "a concurrent change conflicts with this one; retry"), 409)


async def _db_error(_request: Request, exc: SQLAlchemyError) -> JSONResponse:
    log.error("database error: %s", str(exc).splitlines()[0][:300])
    return _error(UnavailableError("database", "the operation failed; see the hub log"), 503)
