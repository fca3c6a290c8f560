"""Writes to the same rows from two places at once (replicas, the controller), SQLite and PostgreSQL.

The controller takes a wave's sequence numbers in one statement, and starts and settles its
deployments in one statement each; another transaction (a device report through another
replica's ingest, an operator's abort) may change the same rows in between. Two replicas' ingest
batches for one device may commit out of order. Each case below is what must happen then.
"""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import select

from tests.integration.test_hub_rollouts import register

pytestmark = pytest.mark.integration


@pytest.fixture
def wave(hub: Any, publisher: Any) -> tuple[Any, int, list[str]]:
    """Four registered devices on 1.0.0 and a rollout of 1.1.0 to them (one wave, not started)."""
    from cloud_hub import rollouts
    from cloud_hub.auth import Principal, Role
    from cloud_hub.models import Device, utcnow
    from edgeglm.rollout_params import RolloutParams

    ctx = hub.ctx
    register(ctx, publisher.bundle("1.0.0", seed=1))
    register(ctx, publisher.bundle("1.1.0", seed=2))
    ids = [f"wave-box-{i}" for i in range(4)]
    with ctx.db.session() as s:
        for i in ids:
            s.add(
                Device(
                    id=i,
                    profile="cpu-x86-int4",
                    online=True,
                    current_model="glm-tiny",
                    current_version="1.0.0",
                    last_seen=utcnow(),
                )
            )
    with ctx.db.session() as s:
        spec = rollouts.DeploySpec("glm-tiny", "1.1.0", RolloutParams(waves=("100",)))
        rid = rollouts.create(s, spec, Principal("ops", Role.operator)).id
    return ctx, rid, ids


def _deps(ctx: Any, rid: int) -> dict[str, Any]:
    from cloud_hub.models import DeviceDeployment

    with ctx.db.session() as s:
        rows = s.scalars(select(DeviceDeployment).where(DeviceDeployment.rollout_id == rid))
        return {d.device_id: (d.state, d.detail) for d in rows}


def test_sequences_of_a_wave_rise_and_are_never_below_the_clock(wave: tuple[Any, int, list[str]]) -> None:
    from cloud_hub.desired import next_sequences

    ctx, _rid, ids = wave
    with ctx.db.session() as s:
        first = next_sequences(s, [*ids, "not-registered"], now=time.time())
    with ctx.db.session() as s:
        again = next_sequences(s, ids, now=time.time() - 3600)  # a clock gone back: still above
    assert set(first) == set(ids) and all(first[i] >= int(time.time() * 1000) - 60_000 for i in ids)
    assert all(again[i] == first[i] + 1 for i in ids)


def test_a_report_that_settled_a_deployment_first_stands(wave: tuple[Any, int, list[str]]) -> None:
    """The controller judged a deployment from the inventory while a report settled it in another
    transaction: the controller's tick goes on (no optimistic-lock failure) and the report wins."""
    from cloud_hub.models import DeviceDeployment, utcnow
    from cloud_hub.rollouts import settle_deployments, start_deployments
    from edgeglm.lifecycle import DeploymentState

    ctx, rid, ids = wave
    now = utcnow()
    with ctx.db.session() as s:
        deps = list(s.scalars(select(DeviceDeployment).where(DeviceDeployment.rollout_id == rid)))
        start_deployments(s, deps, now)
    with ctx.db.session() as s:  # the controller's tick reads the pending deployments ...
        deps = {
            d.device_id: d
            for d in s.scalars(select(DeviceDeployment).where(DeviceDeployment.rollout_id == rid))
        }
        with ctx.db.session() as other:  # ... a failed report lands through an ingest meanwhile
            reported = other.scalar(
                select(DeviceDeployment).where(
                    DeviceDeployment.rollout_id == rid, DeviceDeployment.device_id == ids[0]
                )
            )
            assert reported is not None
            reported.state, reported.detail = DeploymentState.FAILED, "download: no space"
        later = now + timedelta(seconds=1)
        settle_deployments(
            s, [(d, DeploymentState.SUCCEEDED, "seen running the target") for d in deps.values()], later
        )
        assert deps[ids[0]].state == DeploymentState.FAILED  # what its row holds now
        assert all(deps[i].state == DeploymentState.SUCCEEDED for i in ids[1:])
        assert not s.dirty
    assert _deps(ctx, rid) == {
        ids[0]: (DeploymentState.FAILED, "download: no space"),
        **{i: (DeploymentState.SUCCEEDED, "seen running the target") for i in ids[1:]},
    }


def test_a_wave_aborted_while_it_starts_is_not_started(wave: tuple[Any, int, list[str]]) -> None:
    from sqlalchemy.orm.exc import StaleDataError

    from cloud_hub import rollouts
    from cloud_hub.models import DeviceDeployment, utcnow
    from edgeglm.lifecycle import DeploymentState

    ctx, rid, _ids = wave
    with pytest.raises(StaleDataError), ctx.db.session() as s:  # the tick fails, to be tried again
        deps = list(s.scalars(select(DeviceDeployment).where(DeviceDeployment.rollout_id == rid)))
        with ctx.db.session() as other:
            rollouts.abort(other, rid, "ops")  # the wave's devices are skipped
        rollouts.start_deployments(s, deps, utcnow())
    assert {state for state, _ in _deps(ctx, rid).values()} == {DeploymentState.SKIPPED}


def test_an_abort_before_a_wave_starts_tells_no_device(wave: tuple[Any, int, list[str]]) -> None:
    """The controller read a wave's waiting deployments; an operator's abort committed before the
    controller's wave start. The tick fails before any desired state goes out (it used to tell
    the whole wave the new version, then fail, leaving the boxes installing an aborted release)."""
    from sqlalchemy.orm.exc import StaleDataError

    from cloud_hub import rollouts
    from cloud_hub.controller import Controller
    from cloud_hub.models import DeviceDeployment, Rollout, utcnow

    ctx, rid, _ids = wave
    sent: list[tuple[Any, ...]] = []
    controller = Controller(ctx.db, lambda *a: sent.append(a), "test-tick", fleet=ctx.fleet)
    with pytest.raises(StaleDataError), ctx.db.session() as s:
        r = s.get(Rollout, rid)
        assert r is not None
        deps = list(s.scalars(select(DeviceDeployment).where(DeviceDeployment.rollout_id == rid)))
        with ctx.db.session() as other:
            rollouts.abort(other, rid, "ops")
        controller._start_wave(s, r, r.wave_rows[0], deps, "glm-tiny", "1.1.0", utcnow())
    assert sent == []


def _ingest(ctx: Any) -> Any:
    from cloud_hub.ingest import Ingest
    from cloud_hub.metrics import HubMetrics

    return Ingest(ctx.db, HubMetrics())  # not started: the test queues and flushes by hand


def _status(device: str, version: str, ts: float) -> Any:
    from edgeglm.protocol import Status

    return Status(
        device_id=device,
        state="online",
        profile="cpu-x86-int4",
        model="glm-tiny",
        version=version,
        agent_version="0.1.0",
        ts=ts,
    )


def _beat(device: str, version: str, ts: float) -> Any:
    from edgeglm.protocol import Health, Heartbeat

    health = Health(
        latency_p50_ms=40,
        latency_p95_ms=80,
        tokens_per_s=20,
        error_rate=0.0,
        queue_depth=0,
        rss_mb=100,
        requests=5,
        errors=0,
    )
    return Heartbeat(device_id=device, ts=ts, model="glm-tiny", version=version, health=health, seq=1)


def test_a_late_batch_of_older_messages_from_another_replica_changes_only_the_count(hub: Any) -> None:
    """Replica B took an old heartbeat (1.0.0) before replica A took the box's newer status
    (1.1.0), but A's batch committed first: the row keeps 1.1.0, and counts both heartbeats."""
    from cloud_hub.models import Device
    from edgeglm.protocol import TopicKind

    a, b = _ingest(hub.ctx), _ingest(hub.ctx)
    t = time.time()
    a._queue.put((TopicKind.STATUS, _status("late-box", "1.0.0", t - 60), t - 60))  # registered
    a._queue.put((TopicKind.HEARTBEAT, _beat("late-box", "1.0.0", t - 59), t - 59))
    a.flush()
    b._queue.put((TopicKind.HEARTBEAT, _beat("late-box", "1.0.0", t - 10), t - 10))  # B is slow
    a._queue.put((TopicKind.STATUS, _status("late-box", "1.1.0", t - 5), t - 5))
    a._queue.put((TopicKind.HEARTBEAT, _beat("late-box", "1.1.0", t - 4), t - 4))
    a.flush()
    b.flush()
    with hub.ctx.db.session() as s:
        row = s.get(Device, "late-box")
        assert row is not None
        assert (row.current_version, row.health["version"], row.heartbeats) == ("1.1.0", "1.1.0", 3)


def test_a_first_status_that_commits_after_later_heartbeats_still_registers_the_box(hub: Any) -> None:
    """A new box's status reached replica A, its next heartbeat replica B, and B's batch committed
    first: the older status still fills the profile and versions the row has none of (it is the
    only status the box sends; with no profile every desired state for it would fail)."""
    from cloud_hub.models import Device
    from edgeglm.protocol import TopicKind

    a, b = _ingest(hub.ctx), _ingest(hub.ctx)
    t = time.time()
    a._queue.put((TopicKind.STATUS, _status("slow-status-box", "1.0.0", t - 10), t - 10))
    b._queue.put((TopicKind.HEARTBEAT, _beat("slow-status-box", "1.0.0", t - 5), t - 5))
    b.flush()
    a.flush()
    with hub.ctx.db.session() as s:
        row = s.get(Device, "slow-status-box")
        assert row is not None
        assert (row.profile, row.agent_version, row.current_version) == ("cpu-x86-int4", "0.1.0", "1.0.0")


@pytest.mark.parametrize("hub_db_url", ["postgresql"], indirect=True)  # SQLite has no row locks
def test_a_report_on_a_deployment_the_controller_holds_waits_for_the_next_turn(
    wave: tuple[Any, int, list[str]],
) -> None:
    """The controller's tick holds a deployment row: an ingest batch does not wait for it (a lock
    wait there could close a circle with the controller's device rows); the report is applied
    on a later turn, once the row is free."""
    from cloud_hub.models import DeviceDeployment, utcnow
    from cloud_hub.rollouts import start_deployments
    from edgeglm.lifecycle import DeploymentState
    from edgeglm.protocol import Report, TopicKind

    ctx, rid, ids = wave
    with ctx.db.session() as s:
        start_deployments(s, list(s.scalars(select(DeviceDeployment))), utcnow())
    ingest = _ingest(ctx)
    done = Report(
        device_id=ids[0], rollout_id=rid, step="committed", seq=1, ok=True, version="1.1.0", ts=time.time()
    )
    with ctx.db.session() as tick:
        tick.execute(
            select(DeviceDeployment.id).where(DeviceDeployment.device_id == ids[0]).with_for_update()
        )
        ingest._queue.put((TopicKind.REPORT, done, time.time()))
        assert ingest.flush() == 1  # returned at once: the row is held
        assert ingest._queue.qsize() == 1  # the report waits for the next turn
    assert _deps(ctx, rid)[ids[0]][0] == DeploymentState.PENDING
    ingest.flush()
    assert _deps(ctx, rid)[ids[0]] == (DeploymentState.SUCCEEDED, "reported committed")
