"""Which releases the gateway serves a device: only those the hub targeted at that device.

A device (named by its fetch topic, never by the request body) may fetch a manifest or pieces of
``model@version`` for ``profile`` only when::

    profile == devices.profile                      the profile it registered with
    and (model, version) is one of
        devices.desired_model / desired_version     its desired state (cloud_hub.desired)
        an active device_deployments row of it      the release of a rollout that holds it

Anything else (an unknown device, another release, another profile) is :class:`PermissionDenied`,
which the gateway answers with an ERROR frame ``forbidden``. The deployment rows are written when
a rollout is created, so a wave's desired state (published before the transaction that records it
commits) is covered already; a desired state set by hand or by a revert can still reach the device
before its row is visible, which is why the agent retries ``forbidden`` on a manifest a few times.

A device's scope is cached for ``ttl_s``: a request inside the cached scope is answered from the
cache, one outside it reads the database again (a newly targeted release is served as soon as its
row commits), so a revoked target stops being served within ``ttl_s``. The cache holds at most
``max_devices`` scopes (least recently used out first).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import select

from cloud_hub.db import Database
from cloud_hub.models import Device, DeviceDeployment, Model, Release, Rollout
from edgeglm.errors import PermissionDenied

__all__ = ["FetchScope"]

_HINT = "The hub serves a device only the releases it targeted at it, for its registered profile."


@dataclass(frozen=True)
class _Scope:
    profile: str | None
    releases: frozenset[tuple[str, str]]  # (model, version)
    read_at: float

    def allows(self, model: str, version: str, profile: str) -> bool:
        return profile == self.profile and (model, version) in self.releases


class FetchScope:
    def __init__(
        self,
        db: Database,
        *,
        ttl_s: float = 2.0,
        max_devices: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.db = db
        self.ttl_s = ttl_s
        self.max_devices = max_devices
        self.clock = clock
        self._cache: OrderedDict[str, _Scope] = OrderedDict()
        self._lock = threading.Lock()

    def check(self, device_id: str, model: str, version: str, profile: str) -> None:
        """Return if ``device_id`` may fetch ``model@version`` for ``profile``; else PermissionDenied."""
        now = self.clock()
        with self._lock:
            cached = self._cache.get(device_id)
        fresh = cached is not None and now - cached.read_at < self.ttl_s
        if fresh and cached is not None and cached.allows(model, version, profile):
            return
        scope = self._read(device_id, now)
        if scope.allows(model, version, profile):
            return
        what = f"fetch of {model}@{version} for {profile} by {device_id}"
        if scope.profile is None:
            raise PermissionDenied(what, "the device is not registered with the hub", hint=_HINT)
        if profile != scope.profile:
            raise PermissionDenied(what, f"the device's profile is {scope.profile!r}", hint=_HINT)
        raise PermissionDenied(what, "the hub has not targeted this release at the device", hint=_HINT)

    def forget(self, device_id: str) -> None:
        """Drop a cached scope (the next request reads the database)."""
        with self._lock:
            self._cache.pop(device_id, None)

    def _read(self, device_id: str, now: float) -> _Scope:
        with self.db.session() as s:
            device = s.get(Device, device_id)
            if device is None:
                scope = _Scope(None, frozenset(), now)
            else:
                releases = {
                    (model, version)
                    for model, version in s.execute(
                        select(Model.name, DeviceDeployment.to_version)
                        .join(Rollout, Rollout.id == DeviceDeployment.rollout_id)
                        .join(Release, Release.id == Rollout.release_id)
                        .join(Model, Model.id == Release.model_id)
                        .where(DeviceDeployment.device_id == device_id, DeviceDeployment.active.is_(True))
                    )
                }
                if device.desired_model and device.desired_version:
                    releases.add((device.desired_model, device.desired_version))
                scope = _Scope(device.profile, frozenset(releases), now)
        with self._lock:
            self._cache[device_id] = scope
            self._cache.move_to_end(device_id)
            while len(self._cache) > self.max_devices:
                self._cache.popitem(last=False)
        return scope
