"""The audit log: one append-only row per write, in the transaction of the write itself.

``record()`` adds the row to the caller's session, so the change and its audit row commit or
roll back together. The table refuses UPDATE and DELETE (triggers, see the first migration).
The trace id comes from the request (``X-Trace-Id`` or a fresh one) through :data:`trace_id`.
"""

from __future__ import annotations

import contextvars
import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from cloud_hub.models import AuditEntry

__all__ = ["list_entries", "new_trace_id", "record", "trace_id"]

trace_id: contextvars.ContextVar[str] = contextvars.ContextVar("trace_id", default="")


def new_trace_id() -> str:
    return uuid.uuid4().hex


def record(
    session: Session,
    actor: str,
    action: str,
    target: str,
    before: dict[str, Any] | None = None,
    after: dict[str, Any] | None = None,
) -> AuditEntry:
    entry = AuditEntry(
        actor=actor,
        action=action,
        target=target,
        before=before,
        after=after,
        trace_id=trace_id.get() or new_trace_id(),
    )
    session.add(entry)
    return entry


def list_entries(
    session: Session,
    *,
    actor: str | None = None,
    action: str | None = None,
    target: str | None = None,
    since: datetime | None = None,
    limit: int = 100,
) -> list[AuditEntry]:
    q = select(AuditEntry).order_by(AuditEntry.id.desc()).limit(max(1, min(limit, 1000)))
    if actor:
        q = q.where(AuditEntry.actor == actor)
    if action:
        q = q.where(AuditEntry.action == action)
    if target:
        q = q.where(AuditEntry.target.startswith(target, autoescape=True))
    if since:
        q = q.where(AuditEntry.at >= since)
    return list(session.scalars(q))
