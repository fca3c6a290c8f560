"""The device inventory over HTTP: list and show, and the operator's pins and labels (audited)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from cloud_hub.inventory import Inventory, device_view, parse_selector
from cloud_hub.routes.deps import Hub, NamePath, Operator, Viewer
from edgeglm.hub_api import API_PREFIX, DeviceView, LabelsBody, PinBody

__all__ = ["router"]

router = APIRouter(prefix=API_PREFIX, tags=["devices"])


@router.get("/devices")
def list_devices(
    who: Viewer,
    hub: Hub,
    selector: Annotated[str | None, Query(max_length=1024)] = None,
    online: bool | None = None,
) -> list[DeviceView]:
    """``selector``: comma-separated ``key=value`` labels, all of which must match."""
    sel = parse_selector(p for p in (selector or "").split(",") if p)
    with hub.db.session() as s:
        return [device_view(d) for d in Inventory(s).list(sel, online=online)]


@router.get("/devices/{device_id}")
def show_device(device_id: NamePath, who: Viewer, hub: Hub) -> DeviceView:
    with hub.db.session() as s:
        return device_view(Inventory(s).get(device_id))


@router.put("/devices/{device_id}/pin")
def pin_device(device_id: NamePath, body: PinBody, who: Operator, hub: Hub) -> DeviceView:
    with hub.db.session() as s:
        return device_view(Inventory(s).pin(device_id, body.version, who.name))


@router.delete("/devices/{device_id}/pin")
def unpin_device(device_id: NamePath, who: Operator, hub: Hub) -> DeviceView:
    with hub.db.session() as s:
        return device_view(Inventory(s).unpin(device_id, who.name))


@router.patch("/devices/{device_id}/labels")
def label_device(device_id: NamePath, body: LabelsBody, who: Operator, hub: Hub) -> DeviceView:
    parse_selector(f"{k}={v}" for k, v in body.set.items())  # same rules as a selector
    with hub.db.session() as s:
        return device_view(Inventory(s).label(device_id, body.set, body.remove, who.name))
