"""The hub's HTTP API (FastAPI) under ``/api/v1``; bearer tokens with roles; OpenAPI at /openapi.json.

    GET    /healthz                                      -      database reachable
    GET    /metrics                                      -      Prometheus text
    GET    /api/v1/whoami                                viewer
    POST   /api/v1/uploads?force=                        operator (force: admin)  body: manifest.json
    GET    /api/v1/uploads/{id}                          operator
    PUT    /api/v1/uploads/{id}/pieces/{piece}           operator body: the piece's bytes
    POST   /api/v1/uploads/{id}/commit                   operator
    GET    /api/v1/releases?model=                       viewer
    GET    /api/v1/releases/{model}/{version}            viewer
    GET    /api/v1/releases/{model}/{version}/bundles/{profile}/manifest   viewer
    GET    /api/v1/devices?selector=k=v,...&online=      viewer
    GET    /api/v1/devices/{id}                          viewer
    PUT    /api/v1/devices/{id}/pin                      operator
    DELETE /api/v1/devices/{id}/pin                      operator
    PATCH  /api/v1/devices/{id}/labels                   operator
    GET    /api/v1/audit?actor=&action=&target=&limit=   viewer
    GET    /api/v1/tokens  POST /api/v1/tokens  DELETE /api/v1/tokens/{name}   admin

Each request runs in one database transaction; writes add their audit row to it, so a change and
its audit row commit together. Domain code raises :mod:`edgeglm.errors`; ``_STATUS`` is the one
table that maps them to HTTP statuses, and every error body is
``{"error": {"type", "what", "why", "hint", "trace_id"}}``.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Header, Query, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel, ConfigDict, Field, field_validator
from sqlalchemy import select, text
from sqlalchemy.exc import IntegrityError as DbIntegrityError
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from cloud_hub import audit
from cloud_hub import rollouts as rollout_ops
from cloud_hub.auth import Principal, Role, authenticate, create_token, require, revoke_token
from cloud_hub.db import Database
from cloud_hub.inventory import Inventory, device_view, parse_selector
from cloud_hub.metrics import HubMetrics
from cloud_hub.models import ApiToken, Bundle, Release, Rollout
from cloud_hub.registry import Registry, UploadState
from cloud_hub.rollouts import DeploySpec, Publish, rollout_view
from edgeglm.contracts import (
    LABEL_VALUE_PATTERN,
    NAME_PATTERN,
    SEMVER_MAX,
    SEMVER_PATTERN,
    TOKEN_NAME_PATTERN,
    RolloutId,
    name_problem,
    version_problem,
)
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
from edgeglm.lifecycle import RolloutState
from edgeglm.piece_store import PieceStore
from edgeglm.rollout_params import RolloutParams

__all__ = ["HubContext", "create_app"]

log = logging.getLogger(__name__)

API = "/api/v1"
_TRACE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_PIECE = r"^[0-9a-f]{64}$"
_NAME = f"^{NAME_PATTERN}$"
_VERSION = f"^{SEMVER_PATTERN}$"

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


@dataclass
class HubContext:
    db: Database
    store: PieceStore
    trusted: dict[str, Any]
    metrics: HubMetrics
    max_piece_bytes: int = 64 * 1024 * 1024
    publish: Publish | None = None  # MQTT publish (topic, payload, qos, retain), when a broker is set
    gateway: Any = None  # the MQTT gateway (cloud_hub.gateway.Gateway), when a broker is set


# ------------------------------------------------------------------------------ bodies
class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PinBody(_In):
    version: str = Field(pattern=_VERSION, max_length=SEMVER_MAX)


class LabelsBody(_In):
    set: dict[str, Annotated[str, Field(pattern=f"^{LABEL_VALUE_PATTERN}$")]] = Field(
        default_factory=dict, max_length=64
    )
    remove: list[Annotated[str, Field(max_length=63)]] = Field(default_factory=list, max_length=64)


class TokenBody(_In):
    name: str = Field(pattern=f"^{TOKEN_NAME_PATTERN}$")
    role: Literal["viewer", "operator", "admin"]


class DeployBody(RolloutParams):
    """``POST /api/v1/rollouts``: the release, the rollout's parameters, and ``dry_run``."""

    release: str
    dry_run: bool = False

    @field_validator("release", mode="before")  # before any size check: the contract's own words
    @classmethod
    def _release(cls, v: Any) -> Any:
        if not isinstance(v, str):
            return v  # the str check says it
        model, _, version = v.rpartition("@")
        if (problem := name_problem(model) or version_problem(version)) is not None:
            raise ValueError(f"write it as MODEL@VERSION: {problem}")
        return v


class RollbackBody(_In):
    model: str = Field(pattern=_NAME)
    selector: dict[str, Annotated[str, Field(max_length=63)]] = Field(default_factory=dict, max_length=32)


class ErrorInfo(BaseModel):
    type: str
    what: str
    why: str
    hint: str
    trace_id: str


class ErrorOut(BaseModel):
    error: ErrorInfo


def _upload_out(u: UploadState) -> dict[str, Any]:
    return {
        "upload_id": u.upload_id,
        "model": u.model,
        "version": u.version,
        "profile": u.profile,
        "manifest_digest": u.manifest_digest,
        "state": u.state,
        "missing": [[pid, size] for pid, size in u.missing],
        "missing_bytes": sum(size for _, size in u.missing),
        "total_pieces": u.total_pieces,
        "total_bytes": u.total_bytes,
    }


def _bundle_out(b: Bundle) -> dict[str, Any]:
    return {
        "profile": b.profile,
        "manifest_digest": b.manifest_digest,
        "key_id": b.key_id,
        "total_bytes": b.total_bytes,
        "pieces": b.pieces,
        "quality_passed": b.quality_passed,
        "forced": b.forced,
        "quality": b.quality,
        "created_at": b.created_at.isoformat(),
    }


def _release_out(r: Release, *, full: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {
        "model": r.model.name,
        "version": r.version,
        "dataset_version": r.dataset_version,
        "profiles": [b.profile for b in r.bundles],
        "created_at": r.created_at.isoformat(),
        "created_by": r.created_by,
    }
    if full:
        out["bundles"] = [_bundle_out(b) for b in r.bundles]
    return out


def _token_out(t: ApiToken) -> dict[str, Any]:
    return {
        "name": t.name,
        "role": t.role,
        "prefix": t.prefix,
        "created_at": t.created_at.isoformat(),
        "created_by": t.created_by,
        "last_used_at": t.last_used_at.isoformat() if t.last_used_at else None,
        "revoked": t.revoked_at is not None,
    }


# ------------------------------------------------------------------------ dependencies
# Each handler opens its own transaction (``with ctx.db.session()``) so that it commits before
# the response leaves; authentication runs in a short transaction of its own.
def _principal(request: Request, authorization: Annotated[str | None, Header()] = None) -> Principal:
    scheme, _, secret = (authorization or "").partition(" ")
    if scheme.lower() != "bearer":
        raise AccessError("API token", "missing: send 'Authorization: Bearer <token>'")
    ctx: HubContext = request.app.state.ctx
    with ctx.db.session() as s:
        return authenticate(s, secret.strip())


def _viewer(who: Annotated[Principal, Depends(_principal)]) -> Principal:
    return who


def _operator(who: Annotated[Principal, Depends(_principal)]) -> Principal:
    require(who, Role.operator, "this call")
    return who


def _admin(who: Annotated[Principal, Depends(_principal)]) -> Principal:
    require(who, Role.admin, "this call")
    return who


Viewer = Annotated[Principal, Depends(_viewer)]
Operator = Annotated[Principal, Depends(_operator)]
Admin = Annotated[Principal, Depends(_admin)]
UploadId = Annotated[str, PathParam(pattern=r"^[0-9a-f]{32}$")]
PieceId = Annotated[str, PathParam(pattern=_PIECE)]
Name = Annotated[str, PathParam(pattern=_NAME)]
Version = Annotated[str, PathParam(pattern=_VERSION)]
TokenName = Annotated[str, PathParam(pattern=f"^{TOKEN_NAME_PATTERN}$")]


# ---------------------------------------------------------------------------------- app
def create_app(ctx: HubContext) -> FastAPI:
    errors: dict[int | str, dict[str, Any]] = {
        code: {"model": ErrorOut} for code in (400, 401, 403, 404, 409, 422, 503)
    }
    app = FastAPI(title="EdgeGLM cloud hub", version="1", responses=errors)
    app.state.ctx = ctx

    @app.middleware("http")
    async def _trace(request: Request, call_next: Any) -> Response:
        given = request.headers.get("x-trace-id", "")
        trace = given if _TRACE.match(given) else audit.new_trace_id()
        token = audit.trace_id.set(trace)
        try:
            response: Response = await call_next(request)
        finally:
            audit.trace_id.reset(token)
        response.headers["X-Trace-Id"] = trace
        ctx.metrics.observe_request(request.method, response.status_code)
        return response

    def _error(exc: EdgeError, status: int) -> JSONResponse:
        body = {
            "type": type(exc).__name__,
            "what": exc.what,
            "why": exc.why,
            "hint": exc.hint,
            "trace_id": audit.trace_id.get(),
        }
        return JSONResponse({"error": body}, status_code=status)

    @app.exception_handler(EdgeError)
    async def _edge_error(_request: Request, exc: EdgeError) -> JSONResponse:
        status = status_for(exc)
        if status >= 500:
            log.error("request failed: %s", exc)
        return _error(exc, status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(p) for p in first.get("loc", ())) or "request"
        return _error(UsageError(where, str(first.get("msg", "invalid"))[:300]), 422)

    @app.exception_handler(DbIntegrityError)
    async def _db_conflict(_request: Request, exc: DbIntegrityError) -> JSONResponse:
        log.info("database refused a write: %s", str(exc.orig).splitlines()[0][:300])
        return _error(ConflictError("database", "a concurrent change conflicts with this one; retry"), 409)

    @app.exception_handler(SQLAlchemyError)
    async def _db_error(_request: Request, exc: SQLAlchemyError) -> JSONResponse:
        log.error("database error: %s", str(exc).splitlines()[0][:300])
        return _error(UnavailableError("database", "the operation failed; see the hub log"), 503)

    def registry(s: Session) -> Registry:
        return Registry(s, ctx.store, ctx.trusted)

    # ------------------------------------------------------------------------- routes
    @app.get("/healthz", tags=["ops"])
    def healthz() -> dict[str, Any]:
        with ctx.db.session() as s:
            s.execute(text("SELECT 1"))
        return {"status": "ok", "db": ctx.db.dialect}

    @app.get("/metrics", tags=["ops"], response_class=PlainTextResponse)
    def metrics() -> str:
        return ctx.metrics.render()

    @app.get(f"{API}/whoami", tags=["auth"])
    def whoami(who: Viewer) -> dict[str, str]:
        return {"name": who.name, "role": who.role.name}

    @app.post(f"{API}/uploads", tags=["registry"], status_code=201)
    async def begin_upload(request: Request, who: Operator, force: bool = False) -> dict[str, Any]:
        """Body: the bundle's manifest.json exactly as signed. Answers the pieces the hub lacks."""
        if force:
            require(who, Role.admin, "publishing with --force")
        raw = await _body(request, 32 << 20)

        def run() -> UploadState:
            with ctx.db.session() as s:
                return registry(s).begin(raw, who.name, force=force)

        return _upload_out(await run_in_threadpool(run))

    @app.get(f"{API}/uploads/{{upload_id}}", tags=["registry"])
    def upload_status(upload_id: UploadId, who: Operator) -> dict[str, Any]:
        with ctx.db.session() as s:
            return _upload_out(registry(s).status(upload_id))

    @app.put(f"{API}/uploads/{{upload_id}}/pieces/{{piece}}", tags=["registry"])
    async def put_piece(
        upload_id: UploadId,
        piece: PieceId,
        request: Request,
        who: Operator,
    ) -> dict[str, Any]:
        """Body: the piece's raw bytes; they must hash (BLAKE3-256) to ``piece``."""
        data = await _body(request, ctx.max_piece_bytes)

        def run() -> bool:
            with ctx.db.session() as s:
                return registry(s).put_piece(upload_id, piece, data)

        new = await run_in_threadpool(run)
        ctx.metrics.observe_piece(len(data), new)
        return {"piece": piece, "stored": new, "bytes": len(data)}

    @app.post(f"{API}/uploads/{{upload_id}}/commit", tags=["registry"])
    def commit_upload(upload_id: UploadId, who: Operator) -> dict[str, Any]:
        with ctx.db.session() as s:
            bundle = registry(s).commit(upload_id, who.name)
            return {"release": _release_out(bundle.release), "bundle": _bundle_out(bundle)}

    @app.get(f"{API}/releases", tags=["registry"])
    def list_releases(
        who: Viewer, model: Annotated[str | None, Query(pattern=_NAME)] = None
    ) -> list[dict[str, Any]]:
        with ctx.db.session() as s:
            return [_release_out(r) for r in registry(s).releases(model)]

    @app.get(f"{API}/releases/{{model}}/{{version}}", tags=["registry"])
    def show_release(model: Name, version: Version, who: Viewer) -> dict[str, Any]:
        with ctx.db.session() as s:
            return _release_out(registry(s).release(model, version), full=True)

    @app.get(f"{API}/releases/{{model}}/{{version}}/bundles/{{profile}}/manifest", tags=["registry"])
    def bundle_manifest(model: Name, version: Version, profile: Name, who: Viewer) -> Response:
        with ctx.db.session() as s:
            b = registry(s).bundle(model, version, profile)
            return Response(b.manifest_json, media_type="application/json")

    @app.get(f"{API}/devices", tags=["devices"])
    def list_devices(
        who: Viewer,
        selector: Annotated[str | None, Query(max_length=1024)] = None,
        online: bool | None = None,
    ) -> list[dict[str, Any]]:
        """``selector``: comma-separated ``key=value`` labels, all of which must match."""
        sel = parse_selector(p for p in (selector or "").split(",") if p)
        with ctx.db.session() as s:
            return [device_view(d) for d in Inventory(s).list(sel, online=online)]

    @app.get(f"{API}/devices/{{device_id}}", tags=["devices"])
    def show_device(device_id: Name, who: Viewer) -> dict[str, Any]:
        with ctx.db.session() as s:
            return device_view(Inventory(s).get(device_id))

    @app.put(f"{API}/devices/{{device_id}}/pin", tags=["devices"])
    def pin_device(device_id: Name, body: PinBody, who: Operator) -> dict[str, Any]:
        with ctx.db.session() as s:
            return device_view(Inventory(s).pin(device_id, body.version, who.name))

    @app.delete(f"{API}/devices/{{device_id}}/pin", tags=["devices"])
    def unpin_device(device_id: Name, who: Operator) -> dict[str, Any]:
        with ctx.db.session() as s:
            return device_view(Inventory(s).unpin(device_id, who.name))

    @app.patch(f"{API}/devices/{{device_id}}/labels", tags=["devices"])
    def label_device(device_id: Name, body: LabelsBody, who: Operator) -> dict[str, Any]:
        parse_selector(f"{k}={v}" for k, v in body.set.items())  # same rules as a selector
        with ctx.db.session() as s:
            return device_view(Inventory(s).label(device_id, body.set, body.remove, who.name))

    @app.get(f"{API}/audit", tags=["audit"])
    def list_audit(
        who: Viewer,
        actor: Annotated[str | None, Query(max_length=128)] = None,
        action: Annotated[str | None, Query(max_length=64)] = None,
        target: Annotated[str | None, Query(max_length=256)] = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    ) -> list[dict[str, Any]]:
        with ctx.db.session() as s:
            entries = audit.list_entries(s, actor=actor, action=action, target=target, limit=limit)
            return [
                {
                    "id": e.id,
                    "at": e.at.isoformat(),
                    "actor": e.actor,
                    "action": e.action,
                    "target": e.target,
                    "before": e.before,
                    "after": e.after,
                    "trace_id": e.trace_id,
                }
                for e in entries
            ]

    @app.get(f"{API}/tokens", tags=["auth"])
    def list_tokens(who: Admin) -> list[dict[str, Any]]:
        with ctx.db.session() as s:
            return [_token_out(t) for t in s.scalars(select(ApiToken).order_by(ApiToken.name))]

    @app.post(f"{API}/tokens", tags=["auth"], status_code=201)
    def new_token(body: TokenBody, who: Admin) -> dict[str, Any]:
        """The answer holds the token's secret; it is not stored and is never shown again."""
        with ctx.db.session() as s:
            row, secret = create_token(s, body.name, Role[body.role], who.name)
            audit.record(s, who.name, "token.create", f"token/{row.name}", after={"role": row.role})
            return {**_token_out(row), "token": secret}

    @app.delete(f"{API}/tokens/{{name}}", tags=["auth"])
    def delete_token(name: TokenName, who: Admin) -> dict[str, Any]:
        with ctx.db.session() as s:
            row = revoke_token(s, name)
            audit.record(
                s, who.name, "token.revoke", f"token/{row.name}", {"revoked": False}, {"revoked": True}
            )
            return _token_out(row)

    @app.post(f"{API}/rollouts", tags=["rollouts"], status_code=201)
    def deploy(body: DeployBody, who: Operator) -> dict[str, Any]:
        """Start a staged rollout (the controller moves it along), or only show it (``dry_run``)."""
        model, _, version = body.release.partition("@")
        params = RolloutParams.model_validate(body.model_dump(exclude={"release", "dry_run"}))
        spec = DeploySpec(model=model, version=version, params=params)
        with ctx.db.session() as s:
            if body.dry_run:
                return {"dry_run": True, **rollout_ops.dry_run(s, spec)}
            return rollout_view(s, rollout_ops.create(s, spec, who.name))

    @app.get(f"{API}/rollouts", tags=["rollouts"])
    def list_rollouts(who: Viewer, state: RolloutState | None = None) -> list[dict[str, Any]]:
        with ctx.db.session() as s:
            q = select(Rollout).order_by(Rollout.id.desc()).limit(200)
            if state:
                q = q.where(Rollout.state == state)
            return [rollout_view(s, r) for r in s.scalars(q)]

    @app.get(f"{API}/rollouts/{{rollout_id}}", tags=["rollouts"])
    def show_rollout(
        rollout_id: Annotated[RolloutId, PathParam()], who: Viewer, devices: bool = True
    ) -> dict[str, Any]:
        """``devices=false`` leaves out the per-device list (a large rollout's is long)."""
        with ctx.db.session() as s:
            r = s.get(Rollout, rollout_id)
            if r is None:
                raise NotFoundError(f"rollout {rollout_id}", "does not exist")
            view = rollout_view(s, r)
            return {**view, "deployments": rollout_ops.deployments(s, r)} if devices else view

    @app.post(f"{API}/rollouts/{{rollout_id}}/{{action}}", tags=["rollouts"])
    def control_rollout(
        rollout_id: Annotated[RolloutId, PathParam()],
        action: Literal["pause", "resume", "abort"],
        who: Operator,
    ) -> dict[str, Any]:
        op = {"pause": rollout_ops.pause, "resume": rollout_ops.resume, "abort": rollout_ops.abort}[action]
        with ctx.db.session() as s:
            return rollout_view(s, op(s, rollout_id, who.name))

    @app.post(f"{API}/rollbacks", tags=["rollouts"])
    def rollback(body: RollbackBody, who: Operator) -> dict[str, Any]:
        """The model's latest rollout: its moved devices matching ``selector`` back to their old version."""
        selector = parse_selector(f"{k}={v}" for k, v in body.selector.items())
        with ctx.db.session() as s:
            return rollout_ops.rollback(s, body.model, selector, who.name, ctx.publish)

    return app


async def _body(request: Request, limit: int) -> bytes:
    """The request body, refused past ``limit`` bytes without reading it all."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise UsageError("request body", f"is {declared} bytes, over the {limit}-byte limit")
    parts: list[bytes] = []
    size = 0
    async for part in request.stream():
        size += len(part)
        if size > limit:
            raise UsageError("request body", f"is over the {limit}-byte limit")
        parts.append(part)
    return b"".join(parts)
