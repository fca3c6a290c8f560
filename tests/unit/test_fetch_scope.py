"""Which releases the gateway serves a device (cloud_hub.fetch_scope), on a SQLite hub database."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edgeglm.errors import PermissionDenied


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Any]:
    from cloud_hub.db import migrate, open_db
    from cloud_hub.models import Device, Model, Release

    url = f"sqlite:///{tmp_path / 'hub.db'}"
    migrate(url)
    database = open_db(url)
    with database.session() as s:
        model = Model(name="glm")
        s.add(model)
        s.flush()
        for v in ("1.0.0", "1.1.0", "2.0.0"):
            major, minor, patch = (int(x) for x in v.split("."))
            s.add(
                Release(model_id=model.id, version=v, major=major, minor=minor, patch=patch, created_by="t")
            )
        s.add(Device(id="box", profile="cpu", desired_model="glm", desired_version="1.0.0"))
        s.add(Device(id="other", profile="gpu"))
    yield database
    database.dispose()


def _rollout(db: Any, device: str, version: str) -> None:
    from sqlalchemy import select

    from cloud_hub.models import DeviceDeployment, Release, Rollout

    with db.session() as s:
        release = s.scalar(select(Release).where(Release.version == version))
        r = Rollout(
            release_id=release.id,
            soak_s=1,
            success_threshold=1,
            max_failure_ratio=0,
            device_timeout_s=60,
            on_failure="revert",
            state="running",
            min_samples=1,
            created_by="t",
        )
        s.add(r)
        s.flush()
        dep = DeviceDeployment(rollout_id=r.id, device_id=device, wave=0, to_version=version, state="waiting")
        s.add(dep)


def test_the_desired_release_for_the_registered_profile_only(db: Any) -> None:
    from cloud_hub.fetch_scope import FetchScope

    scope = FetchScope(db)
    scope.check("box", "glm", "1.0.0", "cpu")
    for model, version, profile, why in [
        ("glm", "1.1.0", "cpu", "not targeted"),
        ("glm", "1.0.0", "gpu", "profile is 'cpu'"),
        ("other-model", "1.0.0", "cpu", "not targeted"),
    ]:
        with pytest.raises(PermissionDenied, match=why):
            scope.check("box", model, version, profile)
    with pytest.raises(PermissionDenied, match="not registered"):
        scope.check("stranger", "glm", "1.0.0", "cpu")
    with pytest.raises(PermissionDenied, match="not targeted"):
        scope.check("other", "glm", "1.0.0", "gpu")  # box's target is not other's


def test_an_active_rollout_targets_its_release_before_the_wave_starts(db: Any) -> None:
    from cloud_hub.fetch_scope import FetchScope

    scope = FetchScope(db)
    with pytest.raises(PermissionDenied):
        scope.check("box", "glm", "2.0.0", "cpu")
    _rollout(db, "box", "2.0.0")
    scope.check("box", "glm", "2.0.0", "cpu")  # a miss reads the database again at once
    scope.check("box", "glm", "1.0.0", "cpu")  # and the desired one still counts


def test_a_revoked_target_stops_being_served_within_the_ttl(db: Any) -> None:
    from cloud_hub.fetch_scope import FetchScope
    from cloud_hub.models import Device

    clock = Clock()
    scope = FetchScope(db, ttl_s=2.0, clock=clock)
    scope.check("box", "glm", "1.0.0", "cpu")
    with db.session() as s:
        s.get(Device, "box").desired_version = "1.1.0"
    scope.check("box", "glm", "1.0.0", "cpu")  # cached: still served for up to ttl_s
    clock.now += 2.0
    with pytest.raises(PermissionDenied):
        scope.check("box", "glm", "1.0.0", "cpu")
    scope.check("box", "glm", "1.1.0", "cpu")


def test_the_cache_is_bounded(db: Any) -> None:
    from cloud_hub.fetch_scope import FetchScope

    scope = FetchScope(db, max_devices=3)
    for i in range(20):
        with pytest.raises(PermissionDenied):
            scope.check(f"stranger-{i}", "glm", "1.0.0", "cpu")
    assert len(scope._cache) == 3


def test_have_keeps_only_versions_the_device_was_given_or_reported(db: Any) -> None:
    """A delta is invertible: a version the device never held must not become a delta base."""
    from sqlalchemy import select

    from cloud_hub.fetch_scope import MAX_HAVE, FetchScope
    from cloud_hub.models import Device, DeviceDeployment

    scope = FetchScope(db)
    assert scope.held("box", "glm", ["1.0.0", "1.1.0", "2.0.0"]) == (("1.0.0",), 2)  # desired only
    with db.session() as s:
        s.get(Device, "box").current_model, s.get(Device, "box").current_version = "glm", "1.1.0"
    assert scope.held("box", "glm", ["2.0.0", "1.1.0"]) == (("1.1.0",), 1)  # a miss reads again
    _rollout(db, "box", "2.0.0")
    with db.session() as s:  # a finished rollout still counts: the box held its release
        dep = s.scalar(select(DeviceDeployment).where(DeviceDeployment.device_id == "box"))
        dep.active, dep.from_version = False, "0.9.0"
    assert scope.held("box", "glm", ["2.0.0", "0.9.0"]) == (("2.0.0", "0.9.0"), 0)
    assert scope.held("box", "other-model", ["1.0.0"]) == ((), 1)  # versions are per model
    assert scope.held("stranger", "glm", ["1.0.0"]) == ((), 1)
    many = ["1.0.0"] + [f"3.0.{i}" for i in range(MAX_HAVE + 2)]
    assert scope.held("box", "glm", many) == (("1.0.0",), len(many) - 1)  # capped, then filtered
