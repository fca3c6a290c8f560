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

The versions a device says it holds (``have``: a FetchRequest's, or the HTTP delta route's query)
choose the delta bases it is sent, and a tensor delta (XOR / SUB) is invertible: whoever holds the
target piece and its delta against a base recovers the base. So :meth:`FetchScope.held` keeps only
the versions of the model this device was given or reported::

    devices.current_model / current_version         what it last reported running
    devices.desired_model / desired_version         its desired state
    every device_deployments row of it              to_version and from_version, active or not

at most :data:`MAX_HAVE` of them; the others are dropped before planning (a dropped version just
gives no delta base: the piece goes raw) and counted in ``edgeglm_hub_have_dropped_total``. The
current version is the device's own word (its heartbeat); a device that lies about it can reach
the versions it names, so treat a device's broker credential as the boundary it is.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from sqlalchemy import select

from cloud_hub.db import Database
from cloud_hub.models import Device, DeviceDeployment, Model, Release, Rollout
from edgeglm.errors import PermissionDenied

__all__ = ["MAX_HAVE", "FetchScope"]

MAX_HAVE = 8  # versions of ``have`` considered: a box holds two slots, a few more are slack

_HINT = "The hub serves a device only the releases it targeted at it, for its registered profile."


@dataclass(frozen=True)
class _Scope:
    profile: str | None
    releases: frozenset[tuple[str, str]]  # (model, version)
    read_at: float
    known: frozenset[tuple[str, str]] = frozenset()  # (model, version) it was given or reported

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

    def held(self, device_id: str, model: str, have: Iterable[str]) -> tuple[tuple[str, ...], int]:
        """The versions of ``have`` (first :data:`MAX_HAVE` distinct ones) this device was given or
        reported for ``model``, in their order, and how many were dropped."""
        asked = tuple(dict.fromkeys(have))
        if not asked:
            return (), 0
        now = self.clock()
        with self._lock:
            scope = self._cache.get(device_id)
        first = asked[:MAX_HAVE]
        if (
            scope is None
            or now - scope.read_at >= self.ttl_s
            or any((model, v) not in scope.known for v in first)
        ):
            scope = self._read(device_id, now)
        kept = tuple(v for v in first if (model, v) in scope.known)
        return kept, len(asked) - len(kept)

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
                releases: set[tuple[str, str]] = set()
                known: set[tuple[str, str]] = set()
                for model, to_version, from_version, active in s.execute(
                    select(
                        Model.name,
                        DeviceDeployment.to_version,
                        DeviceDeployment.from_version,
                        DeviceDeployment.active,
                    )
                    .join(Rollout, Rollout.id == DeviceDeployment.rollout_id)
                    .join(Release, Release.id == Rollout.release_id)
                    .join(Model, Model.id == Release.model_id)
                    .where(DeviceDeployment.device_id == device_id)
                ):
                    if active:
                        releases.add((model, to_version))
                    known.add((model, to_version))
                    if from_version:
                        known.add((model, from_version))
                if device.desired_model and device.desired_version:
                    releases.add((device.desired_model, device.desired_version))
                if device.current_model and device.current_version:
                    known.add((device.current_model, device.current_version))
                scope = _Scope(device.profile, frozenset(releases), now, frozenset(known | releases))
        with self._lock:
            self._cache[device_id] = scope
            self._cache.move_to_end(device_id)
            while len(self._cache) > self.max_devices:
                self._cache.popitem(last=False)
        return scope
