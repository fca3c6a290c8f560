"""The hub's tables (PRODUCT.md section 8), SQLAlchemy 2 declarative; Alembic owns the schema.

    models ─< releases ─< bundles            a release is model + semver; one bundle per profile
    chunks                                  every piece the hub's store holds (id, size)
    uploads                                 a publish in progress: resumable until committed
    devices                                 inventory: profile, labels, pin, current/desired, health
    rollouts ─< rollout_waves
             ─< device_deployments >─ devices
    audit_log                               append-only (triggers refuse UPDATE and DELETE)
    api_tokens                              SHA-256 of the secret, never the secret; a role each
    leases                                  who runs the rollout controller, until when
    piece_bytes                             pieces held in the database piece store (--store database)
    piece_encodings                         (piece, base) encodings sent to devices, made once for all

Times are UTC; :class:`UtcDateTime` hands back aware datetimes on SQLite too. JSON columns hold
small documents (labels, health, gates, before/after); manifests are stored as the exact JSON
text received so that their signature can be checked again later.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from edgeglm.contracts import NAME_MAX, SEMVER_MAX
from edgeglm.lifecycle import DeploymentState, WaveState

__all__ = [
    "ApiToken",
    "AuditEntry",
    "Base",
    "Bundle",
    "Chunk",
    "Device",
    "DeviceDeployment",
    "Lease",
    "Model",
    "PieceBytes",
    "PieceEncodingRow",
    "Release",
    "Rollout",
    "RolloutWave",
    "TrustRoot",
    "Upload",
    "UtcDateTime",
    "utcnow",
]


def utcnow() -> datetime:
    return datetime.now(UTC)


class UtcDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC datetime on every backend (SQLite stores it naive)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    type_annotation_map: ClassVar[dict[Any, Any]] = {
        datetime: UtcDateTime(),
        dict[str, Any]: JSON(),
        list[Any]: JSON(),
    }


class Model(Base):
    __tablename__ = "models"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(NAME_MAX), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    releases: Mapped[list[Release]] = relationship(back_populates="model", order_by="Release.id")


class Release(Base):
    __tablename__ = "releases"
    __table_args__ = (UniqueConstraint("model_id", "version"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="RESTRICT"))
    version: Mapped[str] = mapped_column(String(SEMVER_MAX))
    # semver core as integers so that "latest" and ordering need no string tricks
    major: Mapped[int] = mapped_column(Integer)
    minor: Mapped[int] = mapped_column(Integer)
    patch: Mapped[int] = mapped_column(Integer)
    prerelease: Mapped[str] = mapped_column(String(SEMVER_MAX), default="")
    dataset_version: Mapped[str | None] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    created_by: Mapped[str] = mapped_column(String(128))
    model: Mapped[Model] = relationship(back_populates="releases")
    bundles: Mapped[list[Bundle]] = relationship(back_populates="release", order_by="Bundle.profile")


class Bundle(Base):
    """One profile's bundle of a release: its signed manifest, exactly as published."""

    __tablename__ = "bundles"
    __table_args__ = (UniqueConstraint("release_id", "profile"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    release_id: Mapped[int] = mapped_column(ForeignKey("releases.id", ondelete="CASCADE"))
    profile: Mapped[str] = mapped_column(String(NAME_MAX))
    manifest_json: Mapped[str] = mapped_column(Text)
    manifest_digest: Mapped[str] = mapped_column(String(80), index=True)
    key_id: Mapped[str] = mapped_column(String(16))
    total_bytes: Mapped[int] = mapped_column(BigInteger)
    pieces: Mapped[int] = mapped_column(Integer)
    quality: Mapped[dict[str, Any]] = mapped_column(default=dict)
    quality_passed: Mapped[bool] = mapped_column(Boolean)
    forced: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    release: Mapped[Release] = relationship(back_populates="bundles")


class Chunk(Base):
    """A piece in the hub's content-addressed store (the bytes live on disk, by id)."""

    __tablename__ = "chunks"
    piece_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    size: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Upload(Base):
    """A publish in progress: the verified manifest waits here until all its pieces arrived."""

    __tablename__ = "uploads"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    manifest_json: Mapped[str] = mapped_column(Text)
    manifest_digest: Mapped[str] = mapped_column(String(80), index=True)
    model: Mapped[str] = mapped_column(String(NAME_MAX))
    version: Mapped[str] = mapped_column(String(SEMVER_MAX))
    profile: Mapped[str] = mapped_column(String(NAME_MAX))
    force: Mapped[bool] = mapped_column(Boolean, default=False)
    state: Mapped[str] = mapped_column(String(16), default="open")  # open | committed
    created_by: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Device(Base):
    __tablename__ = "devices"
    id: Mapped[str] = mapped_column(String(NAME_MAX), primary_key=True)
    profile: Mapped[str | None] = mapped_column(String(NAME_MAX))
    labels: Mapped[dict[str, Any]] = mapped_column(default=dict)
    online: Mapped[bool] = mapped_column(Boolean, default=False)
    agent_version: Mapped[str | None] = mapped_column(String(64))
    current_model: Mapped[str | None] = mapped_column(String(NAME_MAX))
    current_version: Mapped[str | None] = mapped_column(String(SEMVER_MAX))
    desired_model: Mapped[str | None] = mapped_column(String(NAME_MAX))
    desired_version: Mapped[str | None] = mapped_column(String(SEMVER_MAX))
    pinned_version: Mapped[str | None] = mapped_column(String(SEMVER_MAX))
    # the last sequence number signed into this device's desired state (edgeglm.desired_signing)
    desired_seq: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    # what the desired state was last signed with: the hub signs it again before it expires, or
    # once the fleet key changed (cloud_hub.desired.refresh_desired)
    desired_rollout_id: Mapped[int | None] = mapped_column(Integer)
    desired_signed_at: Mapped[float | None] = mapped_column(Float)
    desired_key_id: Mapped[str | None] = mapped_column(String(16))
    # HTTP access to piece bytes (cloud_hub.device_credentials): a token names the epoch it was
    # issued under; allowing a revoked device again bumps it, so older tokens stay refused
    http_epoch: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    http_revoked: Mapped[bool] = mapped_column(Boolean, default=False, server_default=text("false"))
    health: Mapped[dict[str, Any]] = mapped_column(default=dict)
    heartbeats: Mapped[int] = mapped_column(BigInteger, default=0)
    last_seen: Mapped[datetime | None] = mapped_column()
    registered_at: Mapped[datetime] = mapped_column(default=utcnow)


class TrustRoot(Base):
    """One version of the fleet's root of trust (edgeglm.trust_root), exactly as signed offline."""

    __tablename__ = "trust_roots"
    version: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    document: Mapped[str] = mapped_column(Text)
    added_by: Mapped[str] = mapped_column(String(128))
    added_at: Mapped[datetime] = mapped_column(default=utcnow)


class Rollout(Base):
    __tablename__ = "rollouts"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    release_id: Mapped[int] = mapped_column(ForeignKey("releases.id", ondelete="RESTRICT"))
    previous_release_id: Mapped[int | None] = mapped_column(ForeignKey("releases.id", ondelete="RESTRICT"))
    selector: Mapped[dict[str, Any]] = mapped_column(default=dict)
    # the parameters of edgeglm.rollout_params.RolloutParams (its defaults), selector and waves parsed
    waves: Mapped[list[Any]] = mapped_column(default=list)  # [{"percent": 5.0}, ..., {"count": 3}]
    soak_s: Mapped[float] = mapped_column(Float)
    success_threshold: Mapped[float] = mapped_column(Float)
    max_failure_ratio: Mapped[float] = mapped_column(Float)
    gates: Mapped[list[Any]] = mapped_column(default=list)
    device_timeout_s: Mapped[float] = mapped_column(Float)
    on_failure: Mapped[str] = mapped_column(String(16))
    state: Mapped[str] = mapped_column(String(16), index=True)  # edgeglm.lifecycle.RolloutState
    min_samples: Mapped[int] = mapped_column(Integer)
    min_requests: Mapped[int] = mapped_column(Integer, default=1)  # served before a gate is judged
    baseline: Mapped[dict[str, Any]] = mapped_column(default=dict)  # health of the old version, per wave
    current_wave: Mapped[int] = mapped_column(Integer, default=0)
    reason: Mapped[str] = mapped_column(Text, default="")
    created_by: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    wave_rows: Mapped[list[RolloutWave]] = relationship(order_by="RolloutWave.index")


class RolloutWave(Base):
    __tablename__ = "rollout_waves"
    __table_args__ = (UniqueConstraint("rollout_id", "index"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    rollout_id: Mapped[int] = mapped_column(ForeignKey("rollouts.id", ondelete="CASCADE"))
    index: Mapped[int] = mapped_column(Integer)
    size: Mapped[int] = mapped_column(Integer)  # devices in this wave (cumulative target minus earlier)
    state: Mapped[str] = mapped_column(String(16), default=WaveState.PENDING)  # edgeglm.lifecycle
    started_at: Mapped[datetime | None] = mapped_column()
    soak_until: Mapped[datetime | None] = mapped_column()
    finished_at: Mapped[datetime | None] = mapped_column()


class DeviceDeployment(Base):
    __tablename__ = "device_deployments"
    __table_args__ = (
        UniqueConstraint("rollout_id", "device_id"),
        # one active rollout per device, enforced by the database itself
        Index(
            "ux_device_deployments_active",
            "device_id",
            unique=True,
            sqlite_where=text("active"),
            postgresql_where=text("active"),
        ),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    rollout_id: Mapped[int] = mapped_column(ForeignKey("rollouts.id", ondelete="CASCADE"))
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id", ondelete="CASCADE"))
    wave: Mapped[int] = mapped_column(Integer)
    from_version: Mapped[str | None] = mapped_column(String(SEMVER_MAX))
    to_version: Mapped[str] = mapped_column(String(SEMVER_MAX))
    state: Mapped[str] = mapped_column(String(16), default=DeploymentState.PENDING)  # edgeglm.lifecycle
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    detail: Mapped[str] = mapped_column(Text, default="")
    last_step: Mapped[str] = mapped_column(String(32), default="")
    started_at: Mapped[datetime | None] = mapped_column()
    resolved_at: Mapped[datetime | None] = mapped_column()
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    # optimistic locking: the controller and device reports both settle a deployment; the one
    # that read a stale row fails its transaction and retries instead of overwriting the other
    row_version: Mapped[int] = mapped_column(Integer, default=1)
    __mapper_args__ = {"version_id_col": row_version}  # noqa: RUF012


class AuditEntry(Base):
    __tablename__ = "audit_log"
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    actor: Mapped[str] = mapped_column(String(128))
    action: Mapped[str] = mapped_column(String(64), index=True)
    target: Mapped[str] = mapped_column(String(256), index=True)
    before: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    after: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    trace_id: Mapped[str] = mapped_column(String(64))


class ApiToken(Base):
    __tablename__ = "api_tokens"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    role: Mapped[str] = mapped_column(String(16))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))  # the first characters, to recognise a token
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    created_by: Mapped[str] = mapped_column(String(128))
    last_used_at: Mapped[datetime | None] = mapped_column()
    revoked_at: Mapped[datetime | None] = mapped_column()


class Lease(Base):
    __tablename__ = "leases"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    holder: Mapped[str] = mapped_column(String(128))
    expires_at: Mapped[datetime] = mapped_column()


class PieceBytes(Base):
    """A piece held by the database piece store (cloud_hub.database_storage): content-addressed,
    written once (a second writer's INSERT does nothing), verified against its id on every read."""

    __tablename__ = "piece_bytes"
    piece_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    size: Mapped[int] = mapped_column(BigInteger)
    data: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class PieceEncodingRow(Base):
    """A piece as sent to devices, raw (``base_id`` empty) or as a delta against ``base_id``: the
    fields of :class:`edgeglm.tensor_delta.Encoded` plus the BLAKE3 of the payload, checked on read."""

    __tablename__ = "piece_encodings"
    piece_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    base_id: Mapped[str] = mapped_column(String(64), primary_key=True)  # "" for no base
    encoding: Mapped[int] = mapped_column(Integer)  # edgeglm.protocol.PieceEncoding
    width: Mapped[int] = mapped_column(Integer)
    digest: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(BigInteger)  # of the payload
    payload: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
