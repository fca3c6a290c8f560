"""The append-only audit log over HTTP, newest first."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from cloud_hub import audit
from cloud_hub.models import AuditEntry
from cloud_hub.routes.deps import Hub, Viewer
from edgeglm.hub_api import API_PREFIX, AuditView

__all__ = ["router"]

router = APIRouter(prefix=API_PREFIX, tags=["audit"])


def _view(e: AuditEntry) -> AuditView:
    return AuditView(
        id=e.id,
        at=e.at,
        actor=e.actor,
        action=e.action,
        target=e.target,
        before=e.before,
        after=e.after,
        trace_id=e.trace_id,
    )


@router.get("/audit")
def list_audit(
    who: Viewer,
    hub: Hub,
    actor: Annotated[str | None, Query(max_length=128)] = None,
    action: Annotated[str | None, Query(max_length=64)] = None,
    target: Annotated[str | None, Query(max_length=256)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> list[AuditView]:
    """``target`` is a prefix: ``device/`` or ``release/glm-edge-1.5b@``."""
    with hub.db.session() as s:
        entries = audit.list_entries(s, actor=actor, action=action, target=target, limit=limit)
        return [_view(e) for e in entries]
