"""The device inventory over HTTP: list and show, and the operator's pins, labels and HTTP access
to piece bytes (audited). Revoking or allowing HTTP access signs the device's desired state again
(without a credential, or with one of the new epoch), when the hub publishes desired states."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from sqlalchemy.orm import Session

from cloud_hub import device_credentials
from cloud_hub.context import HubContext
from cloud_hub.desired import publish_desired
from cloud_hub.inventory import Inventory, device_view, parse_selector
from cloud_hub.models import Device
from cloud_hub.routes.deps import Hub, NamePath, Operator, Viewer
from edgeglm.hub_api import API_PREFIX, DeviceView, HttpAccessBody, HttpAccessView, LabelsBody, PinBody

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


@router.put("/devices/{device_id}/http-access")
def http_access(device_id: NamePath, body: HttpAccessBody, who: Operator, hub: Hub) -> HttpAccessView:
    """Revoke (its credentials are refused at once; it fetches over MQTT) or allow again (under a
    new epoch: a credential issued before stays refused) a device's HTTP fetches of piece bytes."""
    change = device_credentials.allow if body.allowed else device_credentials.revoke
    with hub.db.session() as s:
        device = change(s, device_id, who.name)
        _sign_again(s, device, hub)
        return HttpAccessView(device_id=device.id, allowed=not device.http_revoked, epoch=device.http_epoch)


def _sign_again(s: Session, device: Device, hub: HubContext) -> None:
    """The device's desired state, signed again with (or without) a credential, when there is one."""
    if hub.publish is None or hub.fleet is None or not device.desired_model or not device.desired_version:
        return
    publish_desired(
        s,
        device,
        device.desired_model,
        device.desired_version,
        device.desired_rollout_id,
        hub.publish,
        fleet=hub.fleet,
    )
