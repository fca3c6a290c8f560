"""The device inventory: what each box is, runs and reports; and the operator's pins and labels.

Devices appear by their retained ``status`` message (registration); heartbeats update health and
``last_seen`` in batches (see ``cloud_hub.ingest``); a device is offline by its last will or when
no heartbeat came within the timeout. Operators label devices (the fleet selector of a rollout
matches labels) and pin them to a version (rollouts skip pinned devices): a version the registry
holds for the model the device runs (or is told to run; for a box that runs none, of any model).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping, Sequence

from sqlalchemy import select
from sqlalchemy.orm import Session

from cloud_hub import audit
from cloud_hub.models import Device, Model, Release
from edgeglm.contracts import LABEL_KEY_PATTERN, LABEL_VALUE_PATTERN
from edgeglm.errors import NotFoundError, UsageError
from edgeglm.hub_api import DeviceView

__all__ = ["Inventory", "device_view", "devices_by_id", "matches", "parse_selector"]

log = logging.getLogger(__name__)

_LABEL_KEY = re.compile(LABEL_KEY_PATTERN)
_LABEL_VALUE = re.compile(LABEL_VALUE_PATTERN)
_RESERVED = {"id", "profile", "model", "version"}  # selector keys that match device fields


def parse_selector(pairs: Iterable[str]) -> dict[str, str]:
    """``["site=plant-7", "line=3"]`` -> {"site": "plant-7", "line": "3"}; all must match."""
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not _LABEL_KEY.fullmatch(key) or not _LABEL_VALUE.fullmatch(value):
            raise UsageError("fleet selector", f"{pair!r}: write key=value (letters, digits, ._-)")
        if key in out and out[key] != value:
            raise UsageError("fleet selector", f"{key} is given twice with different values")
        out[key] = value
    return out


def matches(device: Device, selector: Mapping[str, str]) -> bool:
    for key, value in selector.items():
        if key in _RESERVED:
            actual = {
                "id": device.id,
                "profile": device.profile,
                "model": device.current_model,
                "version": device.current_version,
            }[key]
        else:
            actual = (device.labels or {}).get(key)
        if actual != value:
            return False
    return True


def devices_by_id(s: Session, ids: Sequence[str]) -> dict[str, Device]:
    """The devices of ``ids`` in a few queries (a wave may hold thousands of them)."""
    out: dict[str, Device] = {}
    for i in range(0, len(ids), 5000):
        out.update({d.id: d for d in s.scalars(select(Device).where(Device.id.in_(ids[i : i + 5000])))})
    return out


def device_view(d: Device) -> DeviceView:
    return DeviceView(
        id=d.id,
        profile=d.profile,
        labels=dict(d.labels or {}),
        online=d.online,
        agent_version=d.agent_version,
        current=f"{d.current_model}@{d.current_version}" if d.current_model else None,
        desired=f"{d.desired_model}@{d.desired_version}" if d.desired_model else None,
        pinned_version=d.pinned_version,
        health=dict(d.health or {}),
        heartbeats=d.heartbeats,
        last_seen=d.last_seen,
        registered_at=d.registered_at,
    )


class Inventory:
    def __init__(self, session: Session) -> None:
        self.s = session

    def list(self, selector: Mapping[str, str] | None = None, *, online: bool | None = None) -> list[Device]:
        q = select(Device).order_by(Device.id)
        if online is not None:
            q = q.where(Device.online == online)
        rows = list(self.s.scalars(q))
        return [d for d in rows if matches(d, selector)] if selector else rows

    def get(self, device_id: str) -> Device:
        d = self.s.get(Device, device_id)
        if d is None:
            raise NotFoundError(f"device {device_id}", "is not in the inventory (it registers on connect)")
        return d

    def pin(self, device_id: str, version: str, actor: str) -> Device:
        from cloud_hub.registry import semver_key

        semver_key(version)
        d = self.get(device_id)
        self._check_published(d, version)
        before = d.pinned_version
        d.pinned_version = version
        audit.record(self.s, actor, "device.pin", f"device/{d.id}", {"pinned": before}, {"pinned": version})
        log.info("device %s pinned to %s by %s (was %s)", d.id, version, actor, before)
        return d

    def _check_published(self, d: Device, version: str) -> None:
        """NotFoundError unless the registry holds ``version`` of the device's model."""
        from cloud_hub.registry import semver_key

        model = d.current_model or d.desired_model
        q = select(Model.name, Release.version).join(Release.model)
        rows = list(self.s.execute(q.where(Model.name == model) if model else q))
        if any(v == version for _, v in rows):
            return
        what = f"release {model}@{version}" if model else f"version {version}"
        known = sorted({v for _, v in rows}, key=semver_key)
        where = f"of {model}" if model else "(device " + d.id + " runs no model yet)"
        raise NotFoundError(
            what,
            "is not in the registry" + ("" if model else " for any model"),
            hint=f"Published versions {where}: {', '.join(known)}." if known else "Nothing is published yet.",
        )

    def unpin(self, device_id: str, actor: str) -> Device:
        d = self.get(device_id)
        before = d.pinned_version
        d.pinned_version = None
        audit.record(self.s, actor, "device.unpin", f"device/{d.id}", {"pinned": before}, {"pinned": None})
        log.info("device %s unpinned by %s (was %s)", d.id, actor, before)
        return d

    def label(self, device_id: str, set_: Mapping[str, str], remove: Iterable[str], actor: str) -> Device:
        d = self.get(device_id)
        before = dict(d.labels or {})
        labels = dict(before)
        for key, value in set_.items():
            if key in _RESERVED:
                raise UsageError("label", f"{key!r} is reserved (it matches the device's own field)")
            labels[key] = value
        for key in remove:
            labels.pop(key, None)
        d.labels = labels
        audit.record(self.s, actor, "device.label", f"device/{d.id}", {"labels": before}, {"labels": labels})
        return d
