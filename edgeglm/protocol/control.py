"""The control plane: a device's status and heartbeats, what the hub wants it to run, its update
reports, and its requests for manifests and pieces.
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal, Self

from pydantic import Field, Strict, StrictBool, StringConstraints, model_validator

from edgeglm.contracts import Digest, Name, PiecesUrl, RolloutId, SemVer, Signature
from edgeglm.protocol.message import DEFAULT_MAX_MESSAGE_BYTES, Message, _Body, _Count, _NonNeg, _Reason

__all__ = [
    "UPDATE_FAILED",
    "UPDATE_SUCCEEDED",
    "Desired",
    "FetchRequest",
    "Health",
    "Heartbeat",
    "Progress",
    "Report",
    "Status",
]

_PieceHex = Annotated[str, StringConstraints(strict=True, pattern=r"^[0-9a-f]{64}$")]
_Step = Annotated[str, StringConstraints(strict=True, pattern=r"^[a-z][a-z0-9_]{0,31}$")]
_Short = Annotated[str, StringConstraints(strict=True, max_length=64)]
_Ratio = Annotated[float, Strict(), Field(ge=0, le=1, allow_inf_nan=False)]
# a device's HTTP credential, opaque to the box (the hub's cloud_hub.device_credentials makes it)
_Credential = Annotated[str, StringConstraints(strict=True, pattern=r"^[A-Za-z0-9._:~-]{16,256}$")]


class Status(Message):
    """Who a device is and what it runs; retained, and the last will (``state="offline"``)."""

    MAX_BYTES = 2048
    device_id: Name
    state: Literal["online", "offline"]
    profile: Name
    model: Name | None = None
    version: SemVer | None = None
    slot: Literal["a", "b"] | None = None
    agent_version: _Short
    ts: _NonNeg


class Health(_Body):
    """Serving health over the last heartbeat window."""

    latency_p50_ms: _NonNeg
    latency_p95_ms: _NonNeg
    tokens_per_s: _NonNeg
    error_rate: _Ratio
    queue_depth: _Count
    rss_mb: _NonNeg
    requests: _Count
    errors: _Count
    smoke_agreement: _Ratio | None = None


class Heartbeat(Message):
    device_id: Name
    ts: _NonNeg
    model: Name | None = None
    version: SemVer | None = None
    health: Health
    seq: _Count


class Desired(Message):
    """What the hub wants a device to run (retained on the device's desired topic).

    Signed by the hub's fleet key (:mod:`edgeglm.desired_signing`): it names its ``device_id``,
    carries that device's ``sequence`` (counted by the hub, never reused) and ``expires_at``; an
    agent acts on none that lacks them or whose signature does not verify.

    ``pieces_url`` and ``pieces_token`` (both or neither) offer the bytes over HTTP: the box may
    GET pieces and deltas under ``pieces_url`` with ``Authorization: Bearer <pieces_token>``
    (docs/wire-contract.md) and takes over MQTT whatever HTTP does not deliver intact.
    """

    MAX_BYTES = 2048
    model: Name
    version: SemVer
    manifest_digest: Digest
    rollout_id: RolloutId | None = None
    profile: Name
    issued_at: _NonNeg
    device_id: Name | None = None
    sequence: Annotated[int, Strict(), Field(ge=1, le=2**63 - 1)] | None = None
    expires_at: _NonNeg | None = None
    pieces_url: PiecesUrl | None = None
    pieces_token: _Credential | None = None
    signature: Signature | None = None

    @model_validator(mode="after")
    def _offer_whole(self) -> Self:
        if (self.pieces_url is None) != (self.pieces_token is None):
            raise ValueError("pieces_url and pieces_token come together or not at all")
        return self


class Progress(_Body):
    bytes_done: _Count
    bytes_total: _Count
    pieces_done: _Count
    pieces_total: _Count

    @model_validator(mode="after")
    def _done_within_total(self) -> Self:
        if self.bytes_done > self.bytes_total or self.pieces_done > self.pieces_total:
            raise ValueError("done exceeds total")
        return self


UPDATE_SUCCEEDED = "committed"  # the step a device reports (ok) when the new version serves
UPDATE_FAILED = frozenset({"failed", "rolled_back"})  # terminal steps of an update that did not take


class Report(Message):
    """One update event. ``step`` is the update state machine's stable step name.

    ``step == UPDATE_SUCCEEDED`` with ``ok`` ends an update well; a step in ``UPDATE_FAILED``, or
    any report with ``ok`` false, ends it as a failure (``reason`` says why).

    Delivery is at least once: the hub makes reports idempotent by ``(rollout_id, step)``;
    ``seq`` orders the events of one device.
    """

    MAX_BYTES = 8192
    device_id: Name
    rollout_id: RolloutId | None = None
    step: _Step
    seq: _Count
    ok: StrictBool
    reason: _Reason | None = None
    progress: Progress | None = None
    version: SemVer
    ts: _NonNeg


class FetchRequest(Message):
    """Ask the hub for a manifest, or for pieces by a *recipe* of piece ids (hex BLAKE3-256).

    The hub answers with :class:`Frame` s on the device's data topic, correlated by
    ``request_id``; a device with more pieces to fetch sends several requests, ``window`` at a time.
    """

    MAX_BYTES = DEFAULT_MAX_MESSAGE_BYTES
    MAX_PIECES: ClassVar[int] = 1024  # 1024 ids keep a request well inside one 128 KiB message
    device_id: Name
    request_id: Name
    kind: Literal["manifest", "pieces"]
    model: Name
    version: SemVer
    profile: Name
    have: Annotated[tuple[SemVer, ...], Field(max_length=64)] = ()
    pieces: Annotated[tuple[_PieceHex, ...], Field(max_length=MAX_PIECES)] = ()
    window: Annotated[int, Strict(), Field(ge=1, le=256)] = 8

    @model_validator(mode="after")
    def _recipe_matches_kind(self) -> Self:
        if self.kind == "pieces" and not self.pieces:
            raise ValueError("kind 'pieces' needs a non-empty 'pieces' recipe")
        if self.kind == "manifest" and self.pieces:
            raise ValueError("kind 'manifest' takes no 'pieces'")
        if len(set(self.pieces)) != len(self.pieces):
            raise ValueError("'pieces' lists a piece twice")
        return self
