"""What a route takes from its request: the hub's context, the caller and its role, a bounded body.

    Hub                        the process's HubContext (``app.state.ctx``)
    Viewer, Operator, Admin    the bearer token's Principal, refused (403) below that role
    DeviceAuth                 a device's HTTP credential (cloud_hub.device_credentials): the piece
                               routes, which no API token opens
    raw_body(limit)            marks a route that reads raw bytes, at most ``limit`` (the guard)
    read_body(request)         that body, once the guard has checked its size
    NamePath, VersionPath      path parameters under the contracts' own patterns

:class:`cloud_hub.guard.Guard` checks the token, the route's role (read off these dependencies)
and the body's size before FastAPI reads a byte of the body, and hands the caller on in
``request.state.principal``; these dependencies take it from there and check the role again.
The bearer scheme is declared here for the OpenAPI document. Each handler opens its own
transaction (``with hub.db.session()``) so that it commits before the response leaves.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, TypeVar

from fastapi import Depends, Request, Security
from fastapi import Path as PathParam
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from cloud_hub.auth import Principal, Role, require
from cloud_hub.context import HubContext
from cloud_hub.device_credentials import DeviceCaller
from edgeglm.contracts import NAME_PATTERN, SEMVER_PATTERN
from edgeglm.errors import AccessError

__all__ = [
    "DEVICE_DEPENDENCIES",
    "JSON_LIMIT",
    "ROLE_DEPENDENCIES",
    "Admin",
    "DeviceAuth",
    "Hub",
    "Limit",
    "NamePath",
    "Operator",
    "VersionPath",
    "Viewer",
    "raw_body",
    "raw_body_limit",
    "read_body",
]

F = TypeVar("F", bound=Callable[..., Any])
Limit = int | Callable[[HubContext], int]  # bytes, or what the hub's context says (a piece's cap)

# The largest JSON body a route takes: a deploy's 32 selector labels, 20 waves and 8 gates fit
# in a few KiB. Routes without a body are held to it too (they never read one).
JSON_LIMIT = 64 * 1024

_BEARER = HTTPBearer(auto_error=False, description="An API token: 'Authorization: Bearer egh_...'.")
_DEVICE_BEARER = HTTPBearer(
    scheme_name="DeviceCredential",
    auto_error=False,
    description="A device's HTTP credential, from its desired state: 'Bearer egd1:...'.",
)
_RAW: dict[Callable[..., Any], Limit] = {}


def _hub(request: Request) -> HubContext:
    ctx: HubContext = request.app.state.ctx
    return ctx


Hub = Annotated[HubContext, Depends(_hub)]


def _principal(
    request: Request, _bearer: Annotated[HTTPAuthorizationCredentials | None, Security(_BEARER)]
) -> Principal:
    who = request.scope.get("state", {}).get("principal")
    if not isinstance(who, Principal):  # only a route outside the guard's /api/v1 could get here
        raise AccessError("API token", "missing: send 'Authorization: Bearer <token>'")
    return who


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
ROLE_DEPENDENCIES: dict[Callable[..., Any], Role] = {
    _viewer: Role.viewer,
    _operator: Role.operator,
    _admin: Role.admin,
}


def _device(
    request: Request, _bearer: Annotated[HTTPAuthorizationCredentials | None, Security(_DEVICE_BEARER)]
) -> DeviceCaller:
    who = request.scope.get("state", {}).get("device")
    if not isinstance(who, DeviceCaller):  # only a route outside the guard's /api/v1 could get here
        raise AccessError("device credential", "missing: send 'Authorization: Bearer <pieces_token>'")
    return who


DeviceAuth = Annotated[DeviceCaller, Depends(_device)]
DEVICE_DEPENDENCIES: frozenset[Callable[..., Any]] = frozenset({_device})
NamePath = Annotated[str, PathParam(pattern=f"^{NAME_PATTERN}$")]
VersionPath = Annotated[str, PathParam(pattern=f"^{SEMVER_PATTERN}$")]


def raw_body(limit: Limit) -> Callable[[F], F]:
    """Put under ``@router.<method>``: the route reads its body as raw bytes (``read_body``), at
    most ``limit`` bytes; the guard wants its Content-Length and refuses a larger one (413)."""

    def mark(endpoint: F) -> F:
        _RAW[endpoint] = limit
        return endpoint

    return mark


def raw_body_limit(endpoint: Callable[..., Any]) -> Limit | None:
    return _RAW.get(endpoint)


async def read_body(request: Request) -> bytes:
    """The body of a :func:`raw_body` route: the guard refused it already if it declared more than
    the route's limit, and stops a chunked one as it streams past the limit."""
    return await request.body()
