"""For the people and machines that run the hub: ``/healthz`` and the Prometheus ``/metrics``.

``/metrics`` reads the fleet gauges from the database at each scrape (``cloud_hub.metrics``); a
database that does not answer leaves them out (``edgeglm_hub_database_up 0``) and the counters
are still served. See docs/metrics.md.
"""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import PlainTextResponse

from cloud_hub.metrics import read_fleet
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
def metrics(hub: Hub) -> PlainTextResponse:
    fleet = read_fleet(hub.db)
    text = hub.metrics.render(fleet, database_up=fleet is not None)
    return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")
