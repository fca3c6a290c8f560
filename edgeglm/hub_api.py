"""The hub's HTTP API as data: every request body and every answer, defined once for the hub and
``edgectl`` (PRODUCT.md sections 8, 9 and 11). The hub validates and documents its answers with
these models (``/openapi.json``); the command line decodes the same answers with them.

    whoami                  CallerView
    uploads                 UploadView, PieceView, PublishedView (ReleaseView + BundleView)
    releases                ReleaseView, ReleaseDetail (+ its BundleViews)
    devices                 DeviceView                      PinBody, LabelsBody
                            HttpAccessView                  HttpAccessBody
    audit                   AuditView
    tokens                  TokenView, NewTokenView         TokenBody
    rollouts                RolloutView, RolloutDetail, DryRunView, RollbackView
                                                            DeployBody, RollbackBody
    any error               ErrorView {"error": {type, what, why, hint, trace_id}}

Names, versions, digests, rollout ids and lifecycle states are the contracts' own types
(:mod:`edgeglm.contracts`, :mod:`edgeglm.lifecycle`). Two spellings are this API's own: a time is
ISO 8601 as ``datetime.isoformat()`` writes it, and a rollout id is a JSON number (a wire
message writes it as a decimal string). Only pydantic here: an edge box imports this module too.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    StrictBool,
    WithJsonSchema,
    field_validator,
)

from edgeglm.contracts import (
    LABEL_VALUE_PATTERN,
    TOKEN_NAME_PATTERN,
    Digest,
    Name,
    PieceId,
    RolloutId,
    SemVer,
    name_problem,
    version_problem,
)
from edgeglm.lifecycle import DeploymentState, RolloutState, WaveState
from edgeglm.planner import PlanMode
from edgeglm.rollout_params import OnFailure, RolloutParams

__all__ = [
    "API_PREFIX",
    "PIECES_IN_FLIGHT",
    "AuditView",
    "BundleView",
    "CallerView",
    "DeployBody",
    "DeploymentView",
    "DeviceView",
    "DryRunView",
    "ErrorInfo",
    "ErrorView",
    "HealthView",
    "HttpAccessBody",
    "HttpAccessView",
    "LabelsBody",
    "NewTokenView",
    "PieceView",
    "PinBody",
    "PlannedDevice",
    "PlannedWave",
    "PublishedView",
    "ReleaseDetail",
    "ReleaseView",
    "RollbackBody",
    "RollbackView",
    "RolloutDetail",
    "RolloutView",
    "RootChainView",
    "RootView",
    "TokenBody",
    "TokenRole",
    "TokenView",
    "UploadStatus",
    "UploadView",
    "WaveView",
]

API_PREFIX = "/api/v1"
# HTTP piece requests one device may have in flight at the hub (more: 429); the agent's HTTP window
# is capped to it. The hub's thread pool (40) then serves ten boxes at full speed, not one.
PIECES_IN_FLIGHT = 4


def _iso(t: datetime) -> str:
    return t.isoformat()


# A time as the hub has always written it (``+00:00``, not pydantic's ``Z``).
_Time = Annotated[
    datetime,
    PlainSerializer(_iso, return_type=str, when_used="json"),
    WithJsonSchema({"type": "string", "format": "date-time"}, mode="serialization"),
]
# The rollout id contract, written as the JSON number the HTTP API has always answered with.
_RolloutNo = Annotated[RolloutId, PlainSerializer(int, return_type=int, when_used="json")]


class TokenRole(StrEnum):
    """What a token may do: viewer reads, operator changes the fleet, admin also manages tokens."""

    VIEWER = "viewer"
    OPERATOR = "operator"
    ADMIN = "admin"


class UploadStatus(StrEnum):
    OPEN = "open"  # pieces may still be missing
    COMMITTED = "committed"  # the release has this bundle


# ------------------------------------------------------------------------------ bodies
class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class HttpAccessBody(_Body):
    """``PUT /devices/{id}/http-access``: allow (a new credential epoch) or revoke HTTP fetches."""

    allowed: StrictBool


class HttpAccessView(BaseModel):
    """Whether a device may fetch piece bytes over HTTP, and its credential epoch."""

    device_id: Name
    allowed: bool
    epoch: int


class PinBody(_Body):
    """``PUT /devices/{id}/pin``: a version the registry holds for the device's model."""

    version: SemVer

    @field_validator("version", mode="before")  # the contract's words, not its pattern
    @classmethod
    def _version(cls, v: Any) -> Any:
        if isinstance(v, str) and (problem := version_problem(v)) is not None:
            raise ValueError(problem)
        return v


class LabelsBody(_Body):
    """``PATCH /devices/{id}/labels``: labels to set and label keys to remove."""

    set: dict[str, Annotated[str, Field(pattern=f"^{LABEL_VALUE_PATTERN}$")]] = Field(
        default_factory=dict, max_length=64
    )
    remove: list[Annotated[str, Field(max_length=63)]] = Field(default_factory=list, max_length=64)


class TokenBody(_Body):
    """``POST /tokens``."""

    name: str = Field(pattern=f"^{TOKEN_NAME_PATTERN}$")
    role: TokenRole


class DeployBody(RolloutParams):
    """``POST /rollouts``: the release, the rollout's parameters, ``dry_run``, and ``force`` (an
    admin deploys a bundle that failed its quality gate: without it the hub refuses)."""

    release: str
    dry_run: bool = False
    force: bool = False

    @field_validator("release", mode="before")  # before any size check: the contract's own words
    @classmethod
    def _release(cls, v: Any) -> Any:
        if not isinstance(v, str):
            return v  # the str check says it
        model, at, version = v.rpartition("@")
        if not at:
            raise ValueError(f"{v[:80]!r} has no @VERSION: write it as MODEL@VERSION, e.g. glm-tiny@1.1.0")
        if (problem := name_problem(model) or version_problem(version)) is not None:
            raise ValueError(f"write it as MODEL@VERSION: {problem}")
        return v


class RollbackBody(_Body):
    """``POST /rollbacks``: the model whose latest rollout goes back, on the devices ``selector`` picks."""

    model: Name
    selector: dict[str, Annotated[str, Field(max_length=63)]] = Field(default_factory=dict, max_length=32)


# ------------------------------------------------------------------------------ answers
class ErrorInfo(BaseModel):
    type: str  # the edgeglm.errors class
    what: str
    why: str
    hint: str
    trace_id: str


class ErrorView(BaseModel):
    """Every error answer: ``{"error": {type, what, why, hint, trace_id}}``."""

    error: ErrorInfo


class HealthView(BaseModel):
    status: Literal["ok"]
    db: str  # the database's dialect: sqlite or postgresql


class CallerView(BaseModel):
    """Who the bearer token is."""

    name: str
    role: TokenRole


class UploadView(BaseModel):
    """A publish in progress: the pieces the hub still lacks, as (piece id, size)."""

    upload_id: str  # 32 hex digits; empty for a bundle the hub holds without an upload record
    model: Name
    version: SemVer
    profile: Name
    manifest_digest: Digest
    state: UploadStatus
    missing: list[tuple[PieceId, int]]
    missing_bytes: int
    total_pieces: int
    total_bytes: int


class PieceView(BaseModel):
    piece: PieceId
    stored: bool  # false: the hub held it already
    bytes: int


class BundleView(BaseModel):
    profile: Name
    manifest_digest: Digest
    key_id: str
    total_bytes: int
    pieces: int
    quality_passed: bool
    forced: bool
    quality: dict[str, Any]
    created_at: _Time


class ReleaseView(BaseModel):
    model: Name
    version: SemVer
    dataset_version: str | None
    profiles: list[Name]
    created_at: _Time
    created_by: str


class ReleaseDetail(ReleaseView):
    bundles: list[BundleView]


class PublishedView(BaseModel):
    """A committed upload: the release and the bundle it gained."""

    release: ReleaseView
    bundle: BundleView


class DeviceView(BaseModel):
    id: Name
    profile: Name | None
    labels: dict[str, str]
    online: bool
    agent_version: str | None
    current: str | None  # MODEL@VERSION
    desired: str | None
    pinned_version: SemVer | None
    health: dict[str, Any]
    heartbeats: int
    last_seen: _Time | None
    registered_at: _Time | None


class AuditView(BaseModel):
    id: int
    at: _Time
    actor: str
    action: str
    target: str
    before: dict[str, Any] | None
    after: dict[str, Any] | None
    trace_id: str


class TokenView(BaseModel):
    """A token as listed: never its secret."""

    name: str
    role: TokenRole
    prefix: str
    created_at: _Time
    created_by: str
    last_used_at: _Time | None
    revoked: bool


class NewTokenView(TokenView):
    """A token just made; ``token`` is its secret, shown this once and stored only as a hash."""

    token: str


class RootView(BaseModel):
    """A version of the fleet's root of trust: the key ids it makes valid, by role."""

    version: int
    expires_at: float
    root: list[str]
    release: list[str]
    fleet: list[str]


class RootChainView(BaseModel):
    """Every root version the hub holds, oldest first, exactly as signed (as published on MQTT)."""

    roots: list[dict[str, Any]]


class WaveView(BaseModel):
    wave: int
    size: int
    state: WaveState
    soak_until: _Time | None


class RolloutView(BaseModel):
    id: _RolloutNo
    release: str  # MODEL@VERSION
    state: RolloutState
    reason: str
    current_wave: int
    waves: list[WaveView]
    devices: dict[DeploymentState, int]  # how many of its devices are in each state
    selector: dict[str, str]
    gates: list[str]
    min_requests: int  # requests the wave's updated devices serve before a gate is judged
    on_failure: OnFailure
    created_by: str
    created_at: _Time
    updated_at: _Time
    # per wave (and "latest"): the old version's latency when the wave started, from devices that
    # served requests; "missing": why it paused without one; "waived": who resumed it regardless
    baseline: dict[str, Any]


class DeploymentView(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    device: Name
    wave: int
    state: DeploymentState
    from_: SemVer | None = Field(validation_alias="from", serialization_alias="from")
    to: SemVer
    last_step: str
    detail: str


class RolloutDetail(RolloutView):
    deployments: list[DeploymentView]
    history: list[AuditView] = Field(default_factory=list)  # its audit rows, oldest first


class PlannedDevice(BaseModel):
    """A device of a dry run's wave and what its update would cost."""

    model_config = ConfigDict(populate_by_name=True)

    device: Name
    from_: str | None = Field(validation_alias="from", serialization_alias="from")  # MODEL@VERSION
    bytes: int
    mode: PlanMode
    conflict_rollout: _RolloutNo | None  # another active rollout the device is in


class PlannedWave(BaseModel):
    wave: int
    devices: list[PlannedDevice]
    bytes: int


class DryRunView(BaseModel):
    """``POST /rollouts`` with ``dry_run``: the waves, their devices and bytes; nothing is written."""

    dry_run: Literal[True] = True
    release: str
    selector: dict[str, str]
    devices: int
    waves: list[PlannedWave]
    skipped: dict[str, list[str]]  # reason -> device ids
    conflicts: int
    bytes_estimated: bool  # raw sizes of the pieces a device lacks; tensor deltas only shrink it
    # Profiles whose bundle (among those sent) failed its quality gate: deploying needs admin + force.
    quality_failed: list[Name] = Field(default_factory=list)


class RollbackView(BaseModel):
    rollout: _RolloutNo
    reverted: list[Name]  # the devices sent back
    state: RolloutState  # the rollout's state after it
    nothing: str = ""  # why nothing was sent back (e.g. the hub had reverted it already)
