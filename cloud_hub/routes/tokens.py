"""Who is calling (``/whoami``) and the API tokens themselves (admin only)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter
from fastapi import Path as PathParam

from cloud_hub import tokens
from cloud_hub.routes.deps import Admin, Hub, Viewer
from edgeglm.contracts import TOKEN_NAME_PATTERN
from edgeglm.hub_api import API_PREFIX, CallerView, NewTokenView, TokenBody, TokenRole, TokenView

__all__ = ["router"]

router = APIRouter(prefix=API_PREFIX, tags=["auth"])
TokenName = Annotated[str, PathParam(pattern=f"^{TOKEN_NAME_PATTERN}$")]


@router.get("/whoami")
def whoami(who: Viewer) -> CallerView:
    return CallerView(name=who.name, role=TokenRole(who.role.name))


@router.get("/tokens")
def list_tokens(who: Admin, hub: Hub) -> list[TokenView]:
    with hub.db.session() as s:
        return tokens.listing(s)


@router.post("/tokens", status_code=201)
def new_token(body: TokenBody, who: Admin, hub: Hub) -> NewTokenView:
    """The answer holds the token's secret; it is not stored and is never shown again."""
    with hub.db.session() as s:
        return tokens.create(s, body.name, body.role, who.name)


@router.delete("/tokens/{name}")
def delete_token(name: TokenName, who: Admin, hub: Hub) -> TokenView:
    with hub.db.session() as s:
        return tokens.revoke(s, name, who.name)
