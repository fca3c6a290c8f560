"""For the people and machines that run the hub: ``/healthz`` and the Prometheus ``/metrics``."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import PlainTextResponse

from cloud_hub.routes.deps import Hub
from edgeglm.hub_api import HealthView

__all__ = ["router"]

router = APIRouter(tags=["ops"])


@router.get("/healthz")
def healthz(hub: Hub) -> HealthView:
    """The database answers."""
    hub.db.ping()
    return HealthView(status="ok", db=hub.db.dialect)


@router.get(
    "/metrics",
    response_class=PlainTextResponse,
    responses={200: {"description": "Prometheus text exposition format (not JSON)."}},
)
def metrics(hub: Hub) -> str:
    return hub.metrics.render()
