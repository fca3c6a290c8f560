"""What a route takes from its request: the hub's context, the caller and its role, a bounded body.

    Hub                        the process's HubContext (``app.state.ctx``)
    Viewer, Operator, Admin    the bearer token's Principal, refused (403) below that role
    read_body(request, limit)  the body, refused past ``limit`` bytes before it is all read
    NamePath, VersionPath      path parameters under the contracts' own patterns

Authentication runs in a short transaction of its own; each handler then opens its own
(``with hub.db.session()``) so that it commits before the response leaves.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Header, Request
from fastapi import Path as PathParam

from cloud_hub.auth import Principal, Role, authenticate, require
from cloud_hub.context import HubContext
from edgeglm.contracts import NAME_PATTERN, SEMVER_PATTERN
from edgeglm.errors import AccessError, UsageError

__all__ = ["Admin", "Hub", "NamePath", "Operator", "VersionPath", "Viewer", "read_body"]


def _hub(request: Request) -> HubContext:
    ctx: HubContext = request.app.state.ctx
    return ctx


Hub = Annotated[HubContext, Depends(_hub)]


def _principal(hub: Hub, authorization: Annotated[str | None, Header()] = None) -> Principal:
    scheme, _, secret = (authorization or "").partition(" ")
    if scheme.lower() != "bearer":
        raise AccessError("API token", "missing: send 'Authorization: Bearer <token>'")
    with hub.db.session() as s:
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
NamePath = Annotated[str, PathParam(pattern=f"^{NAME_PATTERN}$")]
VersionPath = Annotated[str, PathParam(pattern=f"^{SEMVER_PATTERN}$")]


async def read_body(request: Request, limit: int) -> bytes:
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
