"""Piece bytes over HTTP, for devices: the same encodings the MQTT gateway sends, at content-addressed URLs.

    GET|HEAD /api/v1/pieces/{piece}?model=&version=&profile=
             the piece as the gateway sends it raw (zstd / byte planes)
    GET|HEAD /api/v1/pieces/{piece}/delta/{base}?model=&version=&profile=&have=V[,V...]
             the piece as a tensor delta against ``base`` (or raw, when that is smaller)

A device names the bundle it updates to (``model@version`` for ``profile``) and, for a delta, the
versions it holds (``have``, as a FetchRequest does); in this order, before any encoding:

    credential   cloud_hub.guard: the device's HTTP credential (401 / 403), no body read
    rate         the device's bucket (cloud_hub.fetch_limit); one piece costs 1/32 of an MQTT
                 request, which carries up to 32, and a device has at most PIECES_IN_FLIGHT (4)
                 requests in flight (the agent's HTTP window is capped to it): over either, 429
                 with ``Retry-After``
    scope        the release and profile are targeted at the device (cloud_hub.fetch_scope): 403;
                 ``have`` keeps only versions the device was given or reported (at most 8; a
                 delta is invertible, so a version it never held must not be a base): the others
                 are dropped and counted, and give no delta base
    piece        a piece of that bundle (404); for a delta, ``base`` is the piece the plan against
                 one of the ``have`` versions deltas it from (404 otherwise)

Answers are immutable (``Cache-Control: public, max-age=31536000, immutable``; ``ETag`` the piece
id, or ``piece-base``), so a reverse proxy or CDN can keep them; ``Range`` (one range: 206, or 416
past the end; several: the whole body), ``If-Range`` and ``If-None-Match`` (304) are honoured. The
encoding travels in headers, as a frame's header carries it::

    X-Edgeglm-Encoding        RAW, ZSTD, PLANES_ZSTD, XOR_ZSTD, SUB_ZSTD, SUB4_ZSTD
    X-Edgeglm-Element-Width   byte planes' element width (0 for RAW and ZSTD)
    X-Edgeglm-Piece-Size      the decoded size
    X-Edgeglm-Base            the base piece of a delta encoding (absent otherwise)

The agent trusts none of it beyond what it checks for a frame (edge_agent.fetch_http) and verifies
each piece's BLAKE3 after decoding. Devices call these routes, not API clients: they are left out
of /openapi.json (no API token opens them); docs/wire-contract.md is their contract. Plans and
encodings come from the hub's :class:`cloud_hub.encoder.PieceEncoder`, shared with the gateway.
"""

from __future__ import annotations

import logging
import re
from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import JSONResponse, Response

from cloud_hub import audit
from cloud_hub.context import HubContext
from cloud_hub.fetch_limit import FetchLimiter, FetchLimits
from cloud_hub.fetch_scope import MAX_HAVE, FetchScope
from cloud_hub.routes.deps import DeviceAuth, Hub
from edgeglm.contracts import NAME_PATTERN, PIECE_ID_PATTERN, SEMVER_PATTERN, version_problem
from edgeglm.errors import IntegrityError, NotFoundError, UsageError
from edgeglm.hub_api import API_PREFIX, PIECES_IN_FLIGHT, ErrorInfo, ErrorView
from edgeglm.planner import PieceStep
from edgeglm.tensor_delta import Encoded

__all__ = ["PIECES_PER_REQUEST", "PieceDesk", "router"]

log = logging.getLogger(__name__)

router = APIRouter(prefix=API_PREFIX, tags=["pieces"])
PIECES_PER_REQUEST = 32  # an MQTT fetch request carries up to this many: its share of a rate token
_IMMUTABLE = "public, max-age=31536000, immutable"
_RANGE = re.compile(r"^bytes=([0-9]{0,15})-([0-9]{0,15})$")
PieceId = Annotated[str, PathParam(pattern=f"^{PIECE_ID_PATTERN}$")]
ModelQ = Annotated[str, Query(pattern=f"^{NAME_PATTERN}$")]
VersionQ = Annotated[str, Query(pattern=f"^{SEMVER_PATTERN}$", max_length=64)]
ProfileQ = Annotated[str, Query(pattern=f"^{NAME_PATTERN}$")]
HaveQ = Annotated[
    str, Query(max_length=MAX_HAVE * 65, description="Versions the device holds, comma-separated.")
]


class PieceDesk:
    """What the piece routes share in one hub process: the per-device limiter and the scope."""

    def __init__(self, ctx: HubContext) -> None:
        lim = ctx.fetch_limits or FetchLimits()
        self.limiter = FetchLimiter(
            FetchLimits(
                requests_per_s=lim.requests_per_s * PIECES_PER_REQUEST,
                burst=lim.burst * PIECES_PER_REQUEST,
                pending=min(lim.pending, PIECES_IN_FLIGHT),
                bytes_per_s=lim.bytes_per_s,
                max_devices=lim.max_devices,
            )
        )
        self.scope = FetchScope(ctx.db)


def _desk(request: Request) -> PieceDesk:
    desk: PieceDesk = request.app.state.pieces
    return desk


@router.api_route("/pieces/{piece}", methods=["GET", "HEAD"], include_in_schema=False)
def raw_piece(
    piece: PieceId,
    model: ModelQ,
    version: VersionQ,
    profile: ProfileQ,
    request: Request,
    device: DeviceAuth,
    hub: Hub,
) -> Response:
    """The piece, raw-encoded, as the gateway sends it: for a device the release is targeted at."""
    return _serve(request, hub, device.device_id, (model, version, profile), piece, None, ())


@router.api_route("/pieces/{piece}/delta/{base}", methods=["GET", "HEAD"], include_in_schema=False)
def delta_piece(
    piece: PieceId,
    base: PieceId,
    model: ModelQ,
    version: VersionQ,
    profile: ProfileQ,
    have: HaveQ,
    request: Request,
    device: DeviceAuth,
    hub: Hub,
) -> Response:
    """The piece as a tensor delta against ``base`` (raw when that is smaller), where the plan
    against one of the ``have`` versions deltas it from ``base``."""
    held = tuple(v for v in have.split(",") if v)
    for v in held:
        if (problem := version_problem(v)) is not None:
            raise UsageError("have", problem)
    if not held or len(held) > MAX_HAVE:
        raise UsageError("have", f"name 1 to {MAX_HAVE} versions the device holds, comma-separated")
    return _serve(request, hub, device.device_id, (model, version, profile), piece, base, held)


def _serve(
    request: Request,
    hub: HubContext,
    device_id: str,
    release: tuple[str, str, str],
    piece: str,
    base: str | None,
    have: tuple[str, ...],
) -> Response:
    desk = _desk(request)
    refusal = desk.limiter.admit(device_id)
    if refusal is not None:
        hub.metrics.inc("edgeglm_hub_device_messages_dropped_total", reason="rate_limited")
        return _rate_limited(refusal.why, refusal.wait_s)
    sent = 0
    try:
        desk.scope.check(device_id, *release)
        if have:
            have, dropped = desk.scope.held(device_id, release[0], have)
            if dropped:
                hub.metrics.inc("edgeglm_hub_have_dropped_total", float(dropped), transport="http")
                log.warning("%s named %d version(s) it was never given in have: dropped", device_id, dropped)
        step = _step(hub, release, piece, base, have)
        try:
            encoded = hub.piece_encoder().encoded(step)
        except IntegrityError as exc:  # our own store rotted: the operator must act
            hub.metrics.inc("edgeglm_hub_store_corrupt_total")
            log.error("piece for %s over HTTP: %s; publish the release again to repair it", device_id, exc)
            raise
        response = _answer(request, step, encoded, base)
        if request.method == "GET" and response.status_code in (200, 206):
            sent = len(response.body)
            hub.metrics.inc("edgeglm_hub_pieces_served_total", transport="http")
            hub.metrics.inc("edgeglm_hub_piece_bytes_served_total", float(sent), transport="http")
        return response
    finally:
        desk.limiter.finished(device_id, sent)


def _step(
    hub: HubContext, release: tuple[str, str, str], piece: str, base: str | None, have: tuple[str, ...]
) -> PieceStep:
    """The plan's step for ``piece`` (for a delta: against the version of ``have`` it names)."""
    encoder = hub.piece_encoder()
    model, version, profile = release
    manifest = encoder.bundle(model, version, profile)[1]
    step = encoder.steps(manifest, ()).get(piece)
    if step is None:
        raise NotFoundError(f"piece {piece[:16]}", f"is not in {model}@{version} for {profile}")
    if base is None:
        return step
    for held in have:
        candidate = encoder.steps(manifest, (held,)).get(piece)
        if candidate is not None and candidate.action == "delta" and candidate.base_id == base:
            return candidate
    raise NotFoundError(
        f"delta of piece {piece[:16]} from {base[:16]}",
        f"no version of {', '.join(have)} holds that base for it",
        hint="Ask for the piece itself (the URL without /delta/...).",
    )


def _answer(request: Request, step: PieceStep, encoded: Encoded, base: str | None) -> Response:
    body = encoded.payload
    etag = f'"{step.piece_id}-{base}"' if base else f'"{step.piece_id}"'
    headers = {
        "ETag": etag,
        "Cache-Control": _IMMUTABLE,
        "Accept-Ranges": "bytes",
        "X-Edgeglm-Encoding": encoded.encoding.name,
        "X-Edgeglm-Element-Width": str(encoded.width),
        "X-Edgeglm-Piece-Size": str(step.size),
    }
    if encoded.is_delta and step.base_id is not None:
        headers["X-Edgeglm-Base"] = step.base_id
    if _matches(request.headers.get("if-none-match"), etag):
        return Response(status_code=304, headers=headers)
    status, part = 200, body
    wanted = request.headers.get("range")
    if_range = request.headers.get("if-range")
    if wanted is not None and (if_range is None or if_range.strip() == etag):
        span = _span(wanted, len(body))
        if isinstance(span, str):  # unsatisfiable
            headers["Content-Range"] = f"bytes */{len(body)}"
            return Response(status_code=416, headers=headers)
        if span is not None:
            start, end = span
            status, part = 206, body[start : end + 1]
            headers["Content-Range"] = f"bytes {start}-{end}/{len(body)}"
    headers["Content-Length"] = str(len(part))
    content = part if request.method == "GET" else b""
    return Response(content, status_code=status, headers=headers, media_type="application/octet-stream")


def _matches(header: str | None, etag: str) -> bool:
    if header is None:
        return False
    tags = [t.strip().removeprefix("W/") for t in header.split(",")]
    return "*" in tags or etag in tags


def _span(header: str, size: int) -> tuple[int, int] | Literal["unsatisfiable"] | None:
    """(first, last) byte of one range, "unsatisfiable", or None: send the whole body (several
    ranges, or a header that does not parse, which RFC 9110 lets a server ignore)."""
    found = _RANGE.match(header.strip())
    if found is None or (not found[1] and not found[2]):
        return None
    if not found[1]:  # the last N bytes
        n = int(found[2])
        return "unsatisfiable" if n == 0 or size == 0 else (max(0, size - n), size - 1)
    start = int(found[1])
    if start >= size:
        return "unsatisfiable"
    end = int(found[2]) if found[2] else size - 1
    return None if end < start else (start, min(end, size - 1))


def _rate_limited(why: str, wait_s: float) -> Response:
    info = ErrorInfo(
        type="UnavailableError",
        what="device fetch rate",
        why=f"rate limited ({why}): retry after {wait_s:.1f} s",
        hint="Wait as Retry-After says; the box keeps its pieces in flight to the hub's limits.",
        trace_id=audit.trace_id.get(),
    )
    seconds = str(max(1, round(wait_s + 0.49)))
    return JSONResponse(ErrorView(error=info).model_dump(), status_code=429, headers={"Retry-After": seconds})
