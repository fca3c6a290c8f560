"""Attacks on the desired state by someone who can publish on the broker (issue 21), against a real
``edge-agent run``, a private mosquitto and the hub's gateway. Only a desired state the hub's fleet
key signed for this device, unexpired, not issued far ahead, with a sequence not below the accepted
one moves the box; the rest is refused (and reported) or, for an older signed one, ignored."""

# ruff: noqa: F811 - the fixtures `world` and `versions` come from test_agent_daemon, by name
from __future__ import annotations

import time
from pathlib import Path

import pytest

from edgectl.demo.procs import wait_for
from edgeglm.bundle import load_manifest, manifest_digest
from edgeglm.desired_signing import DESIRED_TTL_S, sign_desired
from edgeglm.keys import create_keypair, load_private_key
from edgeglm.protocol import Desired, encode
from tests.integration.test_agent_daemon import World, versions, world  # noqa: F401 - fixtures

pytestmark = [pytest.mark.integration, pytest.mark.security]


def _desired(folder: Path, rollout_id: int | None, **fields: object) -> Desired:
    m, doc = load_manifest(folder, None)
    body = Desired(
        model=m.model,
        version=m.version,
        manifest_digest=manifest_digest(doc),
        rollout_id=rollout_id,
        profile=m.profile,
        issued_at=time.time(),
    )
    return body.model_copy(update=fields)


def _committed(world: World, rollout: int) -> bool:
    return ("committed", True) in world.wire.steps(rollout)


def _refusals(world: World) -> list[str]:
    return [r.reason or "" for r in world.wire.reports if r.step == "desired_refused"]


def _to_v11(world: World) -> None:
    world.wire.desire(world.versions.v11, 11)
    wait_for(lambda: _committed(world, 11), 120, "the signed update to 1.1.0")


def test_forged_misaddressed_expired_and_future_desired_states_are_refused_and_reported(
    world: World, tmp_path: Path
) -> None:
    agent = world.agent().start()
    try:
        agent.wait_log(r"edge agent \S+ up")
        _to_v11(world)
        now = time.time()
        # The downgrade-and-pin attack: unsigned, back to 1.0.0, issued a year ahead.
        world.wire.publish_raw(encode(_desired(world.versions.v1, 666, issued_at=now + 365 * 86400)))
        wait_for(lambda: len(_refusals(world)) >= 1, 30, "the unsigned desired state refused")
        assert "not signed" in _refusals(world)[-1]
        # Signed, but by a key the box does not trust.
        rogue, _, _ = create_keypair(tmp_path / "rogue", "rogue")
        forged = _desired(
            world.versions.v1, 667, device_id=world.device_id, sequence=2**62, expires_at=now + 60
        )
        world.wire.publish_raw(sign_desired(forged, load_private_key(rogue)))
        wait_for(lambda: len(_refusals(world)) >= 2, 30, "the rogue-signed desired state refused")
        assert "not a trusted fleet key" in _refusals(world)[-1]
        # Signed by the fleet key: for another device; expired; issued an hour ahead of the box.
        attempts = [
            ({"device_id": "another-box"}, "for device 'another-box'"),
            ({"issued_at": now - 2 * DESIRED_TTL_S, "expires_at": now - DESIRED_TTL_S}, "expired"),
            ({"issued_at": now + 3600, "expires_at": now + 7200}, "ahead of this box's clock"),
        ]
        for n, (fields, why) in enumerate(attempts, start=3):
            world.wire.publish_desired(_desired(world.versions.v1, 600 + n, **fields))
            wait_for(lambda n=n: len(_refusals(world)) >= n, 30, f"refusal {n}")
            assert why in _refusals(world)[-1], _refusals(world)[-1]
        time.sleep(1.0)
        assert agent.active_version() == "1.1.0"  # none of them moved the box
        assert not any(r.rollout_id is not None and r.rollout_id >= 600 for r in world.wire.reports)
        # The hub's own next desired state is not shadowed by the forged far-future one.
        world.wire.desire(world.versions.v1, 12)
        wait_for(lambda: _committed(world, 12), 60, "the signed revert to 1.0.0")
        assert agent.active_version() == "1.0.0"
    finally:
        agent.stop()


def test_a_replayed_signed_desired_state_is_ignored_across_a_restart(world: World) -> None:
    agent = world.agent().start()
    try:
        agent.wait_log(r"edge agent \S+ up")
        old = world.wire.publish_desired(_desired(world.versions.v1, 10))  # what it runs already
        _to_v11(world)
        agent.kill9()
        mark = len(agent.log())
        agent.start()
        agent.wait_log(r"edge agent \S+ up", after=mark)
        mark = len(agent.log())
        world.wire.publish_raw(old)  # the older signed one, replayed after the restart
        agent.wait_log(r"ignored a stale desired state", 30, after=mark)
        time.sleep(1.0)
        assert agent.active_version() == "1.1.0"
        assert not _refusals(world)  # a replay is ignored, not reported
        # A later signed revert (a higher sequence) still works.
        world.wire.desire(world.versions.v1, 12)
        wait_for(lambda: _committed(world, 12), 60, "the signed revert to 1.0.0")
    finally:
        agent.stop()
