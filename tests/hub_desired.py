"""A device's desired release recorded in an in-process hub's database, by the hub's own code.

Tests that publish desired states by hand (``edgectl.demo.wire.Wire``) instead of through a
rollout still need the hub to have targeted the release at the device: its gateway serves a
device only those (``cloud_hub.fetch_scope``). ``recorder`` is ``Wire(record=...)``'s hook.
"""

from __future__ import annotations

from typing import Any

from edgectl.demo.procs import wait_for


def desire_in_hub(ctx: Any, device_id: str, model: str, version: str, *, profile: str | None = None) -> None:
    """``cloud_hub.desired.publish_desired`` without publishing (the caller publishes); with
    ``profile`` a device not registered yet is registered with it first (as its status would)."""
    from cloud_hub.desired import publish_desired
    from cloud_hub.models import Device

    with ctx.db.session() as s:
        device = s.get(Device, device_id)
        if device is None:
            assert profile is not None, f"{device_id} is not registered with the hub"
            device = Device(id=device_id, profile=profile)
            s.add(device)
            s.flush()
        publish_desired(s, device, model, version, None, None, fleet=ctx.fleet)


def registered(ctx: Any, device_id: str) -> bool:
    from cloud_hub.models import Device

    with ctx.db.session() as s:
        device = s.get(Device, device_id)
        return device is not None and device.profile is not None


def recorder(ctx: Any, device_id: str, timeout: float = 30.0) -> Any:
    """``Wire(record=recorder(ctx, id))``: once the device has registered (its status reached the
    hub's ingest), each ``wire.desire`` records the release as the device's desired one."""

    def record(manifest: Any, _rollout_id: int) -> None:
        wait_for(lambda: registered(ctx, device_id), timeout, f"{device_id} registered with the hub")
        desire_in_hub(ctx, device_id, manifest.model, manifest.version)

    return record
