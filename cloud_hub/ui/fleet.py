"""The Fleet page (devices, filterable by the API's selector syntax) and a device's page.

GET /ui/                   the fleet: online state, version, profile, labels, last heartbeat,
                           p95 latency (ms) and error rate (%) from its latest heartbeat;
                           ``?selector=site=plant-7,line=3`` and ``?online=yes|no`` filter it
GET /ui/devices/{id}       one device: what it runs and is told to run, its deployments (each
                           rollout's wave, state and the last step it reported), its audit
                           rows (target exactly ``device/{id}``, not a prefix as in the API)
"""

from __future__ import annotations

from sqlalchemy import select
from starlette.requests import Request
from starlette.responses import Response

from cloud_hub.inventory import Inventory, parse_selector
from cloud_hub.models import AuditEntry, DeviceDeployment
from cloud_hub.ui.access import Ui
from cloud_hub.ui.session import SignedIn
from edgeglm.errors import UsageError

__all__ = ["device_page", "fleet_page"]


def fleet_page(ui: Ui, request: Request, who: SignedIn) -> Response:
    text = request.query_params.get("selector", "").strip()[:1024]
    online_text = request.query_params.get("online", "")
    online = {"yes": True, "no": False, "": None}.get(online_text)
    if online is None and online_text:
        raise UsageError("online", f"{online_text[:20]!r}: choose yes, no or leave it empty")
    error = ""
    try:
        selector = parse_selector(p.strip() for p in text.split(",") if p.strip())
    except UsageError as exc:
        selector, error = None, f"{exc.what}: {exc.why}"
    with ui.hub.db.session() as s:
        devices = [] if selector is None else Inventory(s).list(selector, online=online)
        return ui.render(
            request,
            "fleet.html",
            who,
            devices=devices,
            selector=text,
            online=online_text,
            error=error,
            status=400 if error else 200,
        )


def device_page(ui: Ui, request: Request, who: SignedIn) -> Response:
    device_id = request.path_params["device_id"]
    with ui.hub.db.session() as s:
        device = Inventory(s).get(device_id)
        deployments = list(
            s.scalars(
                select(DeviceDeployment)
                .where(DeviceDeployment.device_id == device.id)
                .order_by(DeviceDeployment.rollout_id.desc())
                .limit(50)
            )
        )
        # exactly this device's rows: the API's target filter is a prefix (device/box-1 would
        # also match device/box-10), which a device's page must not be
        entries = list(
            s.scalars(
                select(AuditEntry)
                .where(AuditEntry.target == f"device/{device.id}")
                .order_by(AuditEntry.id.desc())
                .limit(50)
            )
        )
        return ui.render(request, "device.html", who, device=device, deployments=deployments, entries=entries)
