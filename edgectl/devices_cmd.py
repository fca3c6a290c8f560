"""``edgectl devices`` and ``edgectl audit``: the inventory and the audit log, through the hub's API."""

from __future__ import annotations

from typing import Any

import click

from edgectl.output import emit, output_option, render_table
from edgectl.remote import client_from, hub_options
from edgeglm.contracts import version_problem
from edgeglm.hub_api import API_PREFIX, AuditView, DeviceView, HttpAccessView


class Version(click.ParamType):
    """A semantic version, e.g. ``1.1.0``."""

    name = "version"

    def convert(self, value: Any, param: Any, ctx: Any) -> str:
        if (problem := version_problem(str(value))) is not None:
            self.fail(problem, param, ctx)
        return str(value)


def _labels(d: DeviceView) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(d.labels.items()))


def _device_table(rows: list[DeviceView]) -> str:
    return render_table(
        ["DEVICE", "ONLINE", "PROFILE", "CURRENT", "DESIRED", "PINNED", "LABELS", "LAST SEEN"],
        [
            [
                d.id,
                "yes" if d.online else "no",
                d.profile,
                d.current,
                d.desired,
                d.pinned_version,
                _labels(d),
                d.last_seen and d.last_seen.isoformat(),
            ]
            for d in rows
        ],
    )


@click.group("devices")
def devices() -> None:
    """Devices in the inventory: list, show, pin / unpin, label, HTTP access to piece bytes."""


@devices.command("list")
@click.option("--fleet", "fleet", multiple=True, metavar="KEY=VALUE", help="Label selector (repeatable).")
@click.option("--online/--offline", "online", default=None, help="Only devices online (or offline).")
@hub_options
@output_option
def devices_list(
    fleet: tuple[str, ...], online: bool | None, hub_url: str, token: str | None, output: str
) -> None:
    rows = client_from(hub_url, token).get(
        f"{API_PREFIX}/devices", list[DeviceView], selector=",".join(fleet) or None, online=online
    )
    emit(rows, output, _device_table)


@devices.command("show")
@click.argument("device_id")
@hub_options
@output_option
def devices_show(device_id: str, hub_url: str, token: str | None, output: str) -> None:
    d = client_from(hub_url, token).get(f"{API_PREFIX}/devices/{device_id}", DeviceView)

    def table(d: DeviceView) -> str:
        lines = [_device_table([d]), ""]
        lines += [f"health.{k}: {v}" for k, v in sorted(d.health.items())]
        return "\n".join(lines).rstrip()

    emit(d, output, table)


@devices.command("pin")
@click.argument("device_id")
@click.argument("version", type=Version())
@hub_options
@output_option
def devices_pin(device_id: str, version: str, hub_url: str, token: str | None, output: str) -> None:
    """Keep DEVICE_ID on VERSION: rollouts skip it until it is unpinned. VERSION must be published
    for the model the device runs (the hub lists those that are when it is not)."""
    d = client_from(hub_url, token).call(
        "PUT", f"{API_PREFIX}/devices/{device_id}/pin", DeviceView, json_body={"version": version}
    )
    emit(d, output, lambda d: f"{d.id} pinned to {d.pinned_version}")


@devices.command("unpin")
@click.argument("device_id")
@hub_options
@output_option
def devices_unpin(device_id: str, hub_url: str, token: str | None, output: str) -> None:
    d = client_from(hub_url, token).call("DELETE", f"{API_PREFIX}/devices/{device_id}/pin", DeviceView)
    emit(d, output, lambda d: f"{d.id} unpinned")


@devices.command("label")
@click.argument("device_id")
@click.argument("changes", nargs=-1, required=True, metavar="KEY=VALUE|KEY-...")
@hub_options
@output_option
def devices_label(
    device_id: str, changes: tuple[str, ...], hub_url: str, token: str | None, output: str
) -> None:
    """Set labels (site=plant-7) or remove them (site-)."""
    from edgeglm.errors import UsageError

    set_: dict[str, str] = {}
    remove: list[str] = []
    for change in changes:
        if "=" in change:
            key, _, value = change.partition("=")
            set_[key] = value
        elif change.endswith("-") and len(change) > 1:
            remove.append(change[:-1])
        else:
            raise UsageError("label", f"{change!r}: write KEY=VALUE to set or KEY- to remove")
    d = client_from(hub_url, token).call(
        "PATCH",
        f"{API_PREFIX}/devices/{device_id}/labels",
        DeviceView,
        json_body={"set": set_, "remove": remove},
    )
    emit(d, output, lambda d: f"{d.id} labels: {_labels(d)}")


@devices.command("http-access")
@click.argument("device_id")
@click.option("--revoke", "allowed", flag_value=False, default=None, help="Refuse its HTTP credential now.")
@click.option("--allow", "allowed", flag_value=True, help="Allow HTTP again, under a new credential epoch.")
@hub_options
@output_option
def devices_http_access(
    device_id: str, allowed: bool | None, hub_url: str, token: str | None, output: str
) -> None:
    """Revoke or allow DEVICE_ID's fetches of piece bytes over HTTP (audited). Revoked, its token
    is refused at once and it fetches over MQTT; allowed again, tokens issued before stay refused."""
    from edgeglm.errors import UsageError

    if allowed is None:
        raise UsageError("http-access", "say --revoke or --allow")
    view = client_from(hub_url, token).call(
        "PUT", f"{API_PREFIX}/devices/{device_id}/http-access", HttpAccessView, json_body={"allowed": allowed}
    )
    state = "allowed" if view.allowed else "revoked"
    emit(view, output, lambda v: f"{v.device_id}: HTTP access {state} (credential epoch {v.epoch})")


@click.group("audit")
def audit() -> None:
    """The hub's append-only audit log."""


@audit.command("list")
@click.option("--actor", default=None)
@click.option("--action", default=None, help="e.g. release.publish, device.pin, rollout.start")
@click.option("--target", default=None, help="Prefix, e.g. device/ or release/glm-edge-1.5b@")
@click.option("--limit", type=click.IntRange(1, 1000), default=50, show_default=True)
@hub_options
@output_option
def audit_list(
    actor: str | None,
    action: str | None,
    target: str | None,
    limit: int,
    hub_url: str,
    token: str | None,
    output: str,
) -> None:
    rows = client_from(hub_url, token).get(
        f"{API_PREFIX}/audit", list[AuditView], actor=actor, action=action, target=target, limit=limit
    )
    emit(
        rows,
        output,
        lambda rs: render_table(
            ["ID", "AT", "ACTOR", "ACTION", "TARGET", "TRACE"],
            [[r.id, r.at.isoformat(), r.actor, r.action, r.target, r.trace_id] for r in rs],
        ),
    )
