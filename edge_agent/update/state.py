"""The update's persisted state: one row per update, its step written *before* the step runs.

SQLite through SQLAlchemy (the agent's own database, ``agent.db`` in its data directory). The step
name is a stable string (never an ordinal). ``attempts`` counts how often a step was entered for
this update: the loop guard of the machine reads it.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import JSON, Integer, LargeBinary, String, Text, TypeDecorator, select
from sqlalchemy.engine import Dialect, Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from edge_agent.sqlite import durable_engine

__all__ = ["StateStore", "UpdateRecord"]


class _Base(DeclarativeBase):
    pass


class _RolloutIdText(TypeDecorator[int]):
    """A :data:`~edgeglm.contracts.RolloutId` kept as its wire text (the column predates the type)."""

    impl = String(64)
    cache_ok = True

    def process_bind_param(self, value: int | None, dialect: Dialect) -> str | None:
        return None if value is None else str(int(value))

    def process_result_value(self, value: str | None, dialect: Dialect) -> int | None:
        return int(value) if value is not None and value.isdecimal() else None


class UpdateRecord(_Base):
    __tablename__ = "updates"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    rollout_id: Mapped[int | None] = mapped_column(_RolloutIdText())
    model: Mapped[str] = mapped_column(String(128))
    version: Mapped[str] = mapped_column(String(64))
    profile: Mapped[str] = mapped_column(String(128))
    manifest_digest: Mapped[str] = mapped_column(String(80))
    step: Mapped[str] = mapped_column(String(32))
    previous_slot: Mapped[str] = mapped_column(String(1))
    target_slot: Mapped[str] = mapped_column(String(1))
    manifest_json: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    reason: Mapped[str] = mapped_column(Text, default="")
    updated_at: Mapped[str] = mapped_column(String(40))


class _AcceptedDesired(_Base):
    """The newest desired state this box accepted (one row): its sequence never goes back."""

    __tablename__ = "accepted_desired"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sequence: Mapped[int] = mapped_column(Integer)
    digest: Mapped[str] = mapped_column(String(64))


class _AcceptedRoot(_Base):
    """The newest root of trust this box accepted (edgeglm.trust_root): one row."""

    __tablename__ = "accepted_root"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version: Mapped[int] = mapped_column(Integer)
    document: Mapped[bytes] = mapped_column(LargeBinary)


class StateStore:
    def __init__(self, path: Path) -> None:
        self.engine: Engine = durable_engine(path)  # a row committed survives a power cut
        _Base.metadata.create_all(self.engine)

    def latest(self) -> UpdateRecord | None:
        with Session(self.engine, expire_on_commit=False) as s:
            return s.scalar(select(UpdateRecord).order_by(UpdateRecord.id.desc()))

    def begin(self, **fields: Any) -> UpdateRecord:
        rec = UpdateRecord(updated_at=_now(), attempts={}, **fields)
        with Session(self.engine, expire_on_commit=False) as s, s.begin():
            s.add(rec)
        return rec

    def enter(self, rec: UpdateRecord, step: str, **changes: Any) -> UpdateRecord:
        """Persist ``step`` (and ``changes``) before its side effect; count the entry."""
        with Session(self.engine, expire_on_commit=False) as s, s.begin():
            row = s.get(UpdateRecord, rec.id)
            assert row is not None
            attempts = dict(row.attempts or {})
            attempts[step] = int(attempts.get(step, 0)) + 1
            row.step, row.attempts, row.updated_at = step, attempts, _now()
            for key, value in changes.items():
                setattr(row, key, value)
        return row

    def save(self, rec: UpdateRecord, **changes: Any) -> UpdateRecord:
        """Persist ``changes`` within the current step (not counted as an entry)."""
        with Session(self.engine, expire_on_commit=False) as s, s.begin():
            row = s.get(UpdateRecord, rec.id)
            assert row is not None
            for key, value in changes.items():
                setattr(row, key, value)
            row.updated_at = _now()
        return row

    def accepted_desired(self) -> tuple[int, str] | None:
        """(sequence, payload digest) of the newest desired state accepted, if any."""
        with Session(self.engine) as s:
            row = s.get(_AcceptedDesired, 1)
            return None if row is None else (row.sequence, row.digest)

    def accept_desired(self, sequence: int, digest: str) -> None:
        """Record it before acting on it (durable: a power cut cannot make the box go back)."""
        with Session(self.engine) as s, s.begin():
            row = s.get(_AcceptedDesired, 1) or _AcceptedDesired(id=1)
            row.sequence, row.digest = sequence, digest
            s.add(row)

    def accepted_root(self) -> bytes | None:
        """The newest root document accepted through the chain, if any."""
        with Session(self.engine) as s:
            row = s.get(_AcceptedRoot, 1)
            return None if row is None else row.document

    def accept_root(self, version: int, document: bytes) -> None:
        """Record a root before trusting it (durable: a power cut cannot bring back a revoked key)."""
        with Session(self.engine) as s, s.begin():
            row = s.get(_AcceptedRoot, 1) or _AcceptedRoot(id=1)
            row.version, row.document = version, document
            s.add(row)

    def close(self) -> None:
        self.engine.dispose()


def _now() -> str:
    return datetime.now(UTC).isoformat()
