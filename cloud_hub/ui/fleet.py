"""The Fleet page (devices, filterable by the API's selector syntax) and a device's page.

GET /ui/                   the fleet: online state, version, profile, labels, last heartbeat,
                           p95 latency (ms) and error rate (%) from its latest heartbeat;
                           ``?selector=site=plant-7,line=3`` and ``?online=yes|no`` filter it;
                           200 devices a page by id, ``?after=<id>`` the next (``?limit=`` up
                           to 500; see :mod:`cloud_hub.ui.paging`)
GET /ui/devices/{id}       one device: what it runs and is told to run, its deployments (each
                           rollout's wave, state and the last step it reported), its audit
                           rows (target exactly ``device/{id}``, not a prefix as in the API)
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy import ColumnElement, func, select, true
from sqlalchemy.orm import Session, load_only
from starlette.requests import Request
from starlette.responses import Response

from cloud_hub.inventory import Inventory, matches, parse_selector
from cloud_hub.models import AuditEntry, Device, DeviceDeployment
from cloud_hub.ui.access import Ui
from cloud_hub.ui.paging import SCAN_CHUNK, SCAN_MAX, Paging
from cloud_hub.ui.session import SignedIn
from edgeglm.errors import UsageError

__all__ = ["FleetPage", "device_page", "fleet_page", "fleet_rows"]


_SCAN_COLUMNS = load_only(
    Device.id, Device.labels, Device.profile, Device.current_model, Device.current_version
)


@dataclass
class FleetPage:
    """One page of the fleet: its devices, how many match in all (None: a selector matched in
    Python, whose total is not counted), where the next page starts, and how far a page that
    stopped at :data:`SCAN_MAX` scanned rows got."""

    devices: list[Device] = field(default_factory=list)
    total: int | None = None
    in_fleet: int = 0  # devices the online filter leaves, counted in SQL
    next_after: str | None = None
    scanned: int = 0
    scan_stopped_at: str | None = None  # the last id scanned when the scan limit cut the page


def fleet_rows(
    s: Session, selector: dict[str, str], online: bool | None, paging: Paging, scan_max: int = SCAN_MAX
) -> FleetPage:
    """The devices of one page, by id after ``paging.after``: the online filter and the paging in
    SQL; the selector by :func:`cloud_hub.inventory.matches` (the API's listing's own test) over
    chunks of :data:`SCAN_CHUNK` rows, until the page is full or ``scan_max`` rows are scanned."""
    where: ColumnElement[bool] = true() if online is None else Device.online == online
    in_fleet = int(s.scalar(select(func.count()).select_from(Device).where(where)) or 0)
    after = paging.after
    if not selector:
        q = select(Device).where(where).order_by(Device.id).limit(paging.limit + 1)
        rows = list(s.scalars(q if after is None else q.where(Device.id > after)))
        more = len(rows) > paging.limit
        rows = rows[: paging.limit]
        return FleetPage(rows, in_fleet, in_fleet, rows[-1].id if more and rows else None, len(rows))
    page = FleetPage(in_fleet=in_fleet)
    found: list[str] = []
    # the scan reads only what a selector can name (a device's labels and its own fields; any
    # other column ``matches`` read would load lazily: slower, never wrong); the page's devices
    # are then read whole in one query
    scan = select(Device).options(_SCAN_COLUMNS).where(where).order_by(Device.id).limit(SCAN_CHUNK)
    while True:
        chunk = list(s.scalars(scan if after is None else scan.where(Device.id > after)))
        for d in chunk:
            page.scanned += 1
            after = d.id
            if matches(d, selector):
                found.append(d.id)
                if len(found) > paging.limit:
                    page.next_after = found[paging.limit - 1]
                    break
        else:
            if len(chunk) == SCAN_CHUNK and page.scanned >= scan_max:
                page.scan_stopped_at = page.next_after = after
            elif len(chunk) == SCAN_CHUNK:
                continue
        break
    ids = found[: paging.limit]
    whole = select(Device).where(Device.id.in_(ids)).order_by(Device.id)
    page.devices = list(s.scalars(whole.execution_options(populate_existing=True))) if ids else []
    return page


def fleet_page(ui: Ui, request: Request, who: SignedIn) -> Response:
    text = request.query_params.get("selector", "").strip()[:1024]
    online_text = request.query_params.get("online", "")
    online = {"yes": True, "no": False, "": None}.get(online_text)
    if online is None and online_text:
        raise UsageError("online", f"{online_text[:20]!r}: choose yes, no or leave it empty")
    paging = Paging.of(request)
    error = ""
    try:
        selector = parse_selector(p.strip() for p in text.split(",") if p.strip())
    except UsageError as exc:
        selector, error = None, f"{exc.what}: {exc.why}"
    kept = {"selector": text, "online": online_text}
    with ui.hub.db.session() as s:
        page = FleetPage() if selector is None else fleet_rows(s, selector, online, paging)
        return ui.render(
            request,
            "fleet.html",
            who,
            devices=page.devices,
            page=page,
            next_page=paging.query(kept, page.next_after) if page.next_after else "",
            first_page=paging.query(kept, None) if paging.after else "",
            after=paging.after or "",
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
