"""The model registry over HTTP: publishing a bundle (resumable uploads) and reading releases.

POST uploads (the signed manifest.json)  ->  PUT uploads/{id}/pieces/{piece} ...  ->  POST commit
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import Response
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from cloud_hub import trust
from cloud_hub.auth import Role, require
from cloud_hub.context import HubContext
from cloud_hub.models import Bundle, Release
from cloud_hub.registry import Registry, UploadState
from cloud_hub.routes.deps import Hub, NamePath, Operator, VersionPath, Viewer, raw_body, read_body
from edgeglm.bundle import Manifest
from edgeglm.contracts import NAME_PATTERN, PIECE_ID_PATTERN
from edgeglm.hub_api import (
    API_PREFIX,
    BundleView,
    PieceView,
    PublishedView,
    ReleaseDetail,
    ReleaseView,
    UploadStatus,
    UploadView,
)

__all__ = ["router"]

router = APIRouter(prefix=API_PREFIX, tags=["registry"])
UploadId = Annotated[str, PathParam(pattern=r"^[0-9a-f]{32}$")]
PieceId = Annotated[str, PathParam(pattern=f"^{PIECE_ID_PATTERN}$")]
_MANIFEST_LIMIT = 32 << 20
# The raw bodies, documented for /openapi.json only: FastAPI never parses them (the route reads
# the bytes, whose digest and signature matter, after the guard checked their size).
_MANIFEST_BODY = {
    "requestBody": {
        "required": True,
        "description": "The bundle's manifest.json, its bytes exactly as signed by its export.",
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Manifest"}}},
    }
}
_PIECE_BODY = {
    "requestBody": {
        "required": True,
        "description": "The piece's bytes; their BLAKE3-256 digest is the piece id in the path.",
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    }
}


def _registry(hub: HubContext, s: Session) -> Registry:
    return Registry(s, hub.store, trust.release_keys(s, hub.trusted))


def _upload_view(u: UploadState) -> UploadView:
    return UploadView(
        upload_id=u.upload_id,
        model=u.model,
        version=u.version,
        profile=u.profile,
        manifest_digest=u.manifest_digest,
        state=UploadStatus(u.state),
        missing=list(u.missing),
        missing_bytes=sum(size for _, size in u.missing),
        total_pieces=u.total_pieces,
        total_bytes=u.total_bytes,
    )


def _bundle_view(b: Bundle) -> BundleView:
    return BundleView(
        profile=b.profile,
        manifest_digest=b.manifest_digest,
        key_id=b.key_id,
        total_bytes=b.total_bytes,
        pieces=b.pieces,
        quality_passed=b.quality_passed,
        forced=b.forced,
        quality=b.quality,
        created_at=b.created_at,
    )


def _release_view(r: Release) -> ReleaseView:
    return ReleaseView(
        model=r.model.name,
        version=r.version,
        dataset_version=r.dataset_version,
        profiles=[b.profile for b in r.bundles],
        created_at=r.created_at,
        created_by=r.created_by,
    )


@router.post("/uploads", status_code=201, openapi_extra=_MANIFEST_BODY)
@raw_body(_MANIFEST_LIMIT)
async def begin_upload(request: Request, who: Operator, hub: Hub, force: bool = False) -> UploadView:
    """Body: the bundle's manifest.json exactly as signed. Answers the pieces the hub lacks."""
    if force:
        require(who, Role.admin, "publishing with --force")
    raw = await read_body(request)

    def run() -> UploadState:
        with hub.db.session() as s:
            return _registry(hub, s).begin(raw, who.name, force=force)

    return _upload_view(await run_in_threadpool(run))


@router.get("/uploads/{upload_id}")
def upload_status(upload_id: UploadId, who: Operator, hub: Hub) -> UploadView:
    with hub.db.session() as s:
        return _upload_view(_registry(hub, s).status(upload_id))


@router.put("/uploads/{upload_id}/pieces/{piece}", openapi_extra=_PIECE_BODY)
@raw_body(lambda hub: hub.max_piece_bytes)
async def put_piece(
    upload_id: UploadId, piece: PieceId, request: Request, who: Operator, hub: Hub
) -> PieceView:
    """Body: the piece's raw bytes; they must hash (BLAKE3-256) to ``piece``."""
    data = await read_body(request)

    def run() -> bool:
        with hub.db.session() as s:
            return _registry(hub, s).put_piece(upload_id, piece, data)

    new = await run_in_threadpool(run)
    hub.metrics.observe_piece(len(data), new)
    return PieceView(piece=piece, stored=new, bytes=len(data))


@router.post("/uploads/{upload_id}/commit")
def commit_upload(upload_id: UploadId, who: Operator, hub: Hub) -> PublishedView:
    with hub.db.session() as s:
        bundle = _registry(hub, s).commit(upload_id, who.name)
        return PublishedView(release=_release_view(bundle.release), bundle=_bundle_view(bundle))


@router.get("/releases")
def list_releases(
    who: Viewer, hub: Hub, model: Annotated[str | None, Query(pattern=f"^{NAME_PATTERN}$")] = None
) -> list[ReleaseView]:
    with hub.db.session() as s:
        return [_release_view(r) for r in _registry(hub, s).releases(model)]


@router.get("/releases/{model}/{version}")
def show_release(model: NamePath, version: VersionPath, who: Viewer, hub: Hub) -> ReleaseDetail:
    with hub.db.session() as s:
        r = _registry(hub, s).release(model, version)
        return ReleaseDetail(**dict(_release_view(r)), bundles=[_bundle_view(b) for b in r.bundles])


@router.get(
    "/releases/{model}/{version}/bundles/{profile}/manifest",
    responses={
        200: {
            "model": Manifest,
            "description": "The bundle's manifest.json, its bytes exactly as signed (so the"
            " signature still checks): a Manifest, sent verbatim rather than re-serialised.",
        }
    },
)
def bundle_manifest(
    model: NamePath, version: VersionPath, profile: NamePath, who: Viewer, hub: Hub
) -> Response:
    with hub.db.session() as s:
        b = _registry(hub, s).bundle(model, version, profile)
        return Response(b.manifest_json, media_type="application/json")
