"""The fleet's root of trust (``cloud_hub.trust``): read it (viewer), add the next version (admin)."""

from __future__ import annotations

import json

from fastapi import APIRouter, Request

from cloud_hub import trust
from cloud_hub.routes.deps import Admin, Hub, Viewer, raw_body, read_body
from edgeglm.errors import NotFoundError
from edgeglm.hub_api import API_PREFIX, RootChainView, RootView
from edgeglm.trust_root import MAX_ROOT_BYTES

__all__ = ["router"]

router = APIRouter(prefix=API_PREFIX, tags=["trust"])
# Documented for /openapi.json only: the route reads the bytes (their signatures cover them).
_ROOT_BODY = {
    "requestBody": {
        "required": True,
        "description": "The next root version, signed offline (edgectl keys root sign), as its bytes.",
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/RootDocument"}}},
    }
}


@router.get("/trust/root")
def latest(who: Viewer, hub: Hub) -> RootView:
    with hub.db.session() as s:
        root = trust.latest_root(s)
        if root is None:
            raise NotFoundError(
                "root of trust", "none was added", hint="Add one with 'edgectl keys root push'."
            )
        return RootView.model_validate(trust.summary(root))


@router.get("/trust/roots")
def roots(who: Viewer, hub: Hub) -> RootChainView:
    with hub.db.session() as s:
        return RootChainView(roots=[json.loads(raw) for raw in trust.chain(s)])


@router.post("/trust/roots", status_code=201, openapi_extra=_ROOT_BODY)
@raw_body(MAX_ROOT_BYTES)
async def add(request: Request, who: Admin, hub: Hub) -> RootView:
    """Body: the next root version, signed offline (``edgectl keys root sign``). The hub then
    publishes the whole chain, retained, to every box."""
    raw = await read_body(request)
    fleet = hub.fleet.key_id if hub.fleet is not None else None
    with hub.db.session() as s:
        root = trust.add_root(s, raw, who.name, fleet_key_id=fleet)
        s.flush()
        trust.publish_chain(s, hub.publish)
        return RootView.model_validate(trust.summary(root))
