"""Key rotation from the root of trust (issue 21), against a real ``edge-agent run``, a private
mosquitto and the hub's gateway and trust store: the box is provisioned with root version 1 only;
every later root reaches it through the chain the hub publishes retained. A release key and a
fleet key are each rotated and the old one revoked while the box keeps updating; what the revoked
key signs is refused from then on, also after a restart; a forged root changes nothing; an expired
root freezes updates until a newer one comes."""

# ruff: noqa: F811 - the fixtures `world` and `versions` come from test_agent_daemon, by name
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cloud_hub import trust
from cloud_hub.registry import Registry
from edgectl.demo.procs import wait_for
from edgeglm.trust_root import root_body, sign_root
from tests.agent_bundles import derive
from tests.integration.test_agent_daemon import World, versions, world  # noqa: F401 - fixtures

pytestmark = [pytest.mark.integration, pytest.mark.security]


class Roots:
    """The offline side: the root key, and the next root version signed and handed to the hub."""

    def __init__(self, world: World, key: Ed25519PrivateKey) -> None:
        self.world, self.key, self.version = world, key, 0

    def body(self, release: list[Any], fleet: list[Any], expires_in: float = 3600.0) -> dict[str, Any]:
        return root_body(
            self.version + 1,
            root=[self.key.public_key()],
            release=[k.public_key() for k in release],
            fleet=[k.public_key() for k in fleet],
            expires_at=time.time() + expires_in,
        )

    def next(self, release: list[Any], fleet: list[Any], *, expires_in: float = 3600.0) -> bytes:
        """Sign the next version, add it to the hub (which publishes the chain) and return it."""
        raw = sign_root(self.body(release, fleet, expires_in), [self.key])
        ctx = self.world.ctx
        with ctx.db.session() as s:
            trust.add_root(s, raw, "test-admin", fleet_key_id=None)
            s.flush()
            trust.publish_chain(s, ctx.publish)
        self.version += 1
        return raw


def _provision(world: World, roots: Roots, release: list[Any], fleet: list[Any]) -> Any:
    path = world.root / "root.json"
    path.write_bytes(roots.next(release, fleet))
    return world.agent(trust_root=str(path), trusted_keys=None, fleet_keys=None).start()


def _register(world: World, folder: Path) -> None:
    with world.ctx.db.session() as s:
        Registry(s, world.ctx.store, trust.release_keys(s, world.ctx.trusted)).publish_folder(folder, "test")


def _ended(world: World, rollout: int) -> bool:
    return any(step in ("committed", "failed") for step, _ in world.wire.steps(rollout))


def _update(world: World, folder: Path, rollout: int) -> bool:
    world.wire.desire(folder, rollout)
    wait_for(lambda: _ended(world, rollout), 120, f"rollout {rollout} to end")
    return ("committed", True) in world.wire.steps(rollout)


def _advanced(agent: Any, version: int, mark: int = 0) -> None:
    agent.wait_log(rf"root of trust advanced from version \d+ to {version}\b", 30, after=mark)


def test_a_release_key_is_rotated_and_revoked_while_the_box_keeps_updating(
    world: World, tmp_path: Path
) -> None:
    old_release, new_release = world.versions.key, Ed25519PrivateKey.generate()
    fleet = world.wire.fleet_key
    roots = Roots(world, Ed25519PrivateKey.generate())
    agent = _provision(world, roots, [old_release], [fleet])
    try:
        agent.wait_log(r"edge agent \S+ up")
        assert _update(world, world.versions.v11, 11)  # signed by the old release key

        roots.next([old_release, new_release], [fleet])  # both valid while rotating
        _advanced(agent, 2)
        v14 = derive(world.versions.v1, tmp_path / "1.4.0", new_release, "1.4.0")
        _register(world, v14)
        assert _update(world, v14, 14)
        assert agent.active_version() == "1.4.0"

        roots.next([new_release], [fleet])  # the old release key revoked
        _advanced(agent, 3)
        assert not _update(world, world.versions.v11, 15)  # still on disk, but signed by a revoked key
        failed = [r.reason or "" for r in world.wire.reports if r.rollout_id == 15 and not r.ok]
        assert failed and "not trusted" in failed[-1], failed
        assert agent.active_version() == "1.4.0"

        mark = len(agent.log())  # a forged next root changes nothing
        rogue = Ed25519PrivateKey.generate()
        forged = Roots(world, rogue)
        forged.version = roots.version
        world.wire.link.publish(
            "edgeglm/v1/fleet/root",
            b'{"roots":[' + sign_root(forged.body([old_release], [fleet]), [rogue]) + b"]}",
            qos=1,
            retain=True,
        ).wait_for_publish(5)
        agent.wait_log(
            r"refused a root-of-trust chain: root version 4: is not signed by the root keys", 30, mark
        )

        v16 = derive(world.versions.v1, tmp_path / "1.6.0", new_release, "1.6.0", scale=1.002)
        _register(world, v16)
        assert _update(world, v16, 16)  # the box keeps updating under the new key

        agent.kill9()  # the accepted root survives a restart; the provisioned file is version 1
        mark = len(agent.log())
        agent.start()
        agent.wait_log(r"root of trust version 3 ", 30, after=mark)
        assert not _update(world, world.versions.v11, 17)
        assert agent.active_version() == "1.6.0"
    finally:
        agent.stop()


def test_a_fleet_key_is_rotated_and_revoked_and_an_expired_root_freezes_updates(world: World) -> None:
    release = world.versions.key
    old_fleet, new_fleet = world.wire.fleet_key, Ed25519PrivateKey.generate()
    roots = Roots(world, Ed25519PrivateKey.generate())
    agent = _provision(world, roots, [release], [old_fleet])
    try:
        agent.wait_log(r"edge agent \S+ up")
        assert _update(world, world.versions.v11, 11)

        # The hub signs with its new key before the box has the root naming it: refused at first,
        # acted on as soon as the root arrives.
        world.wire.fleet_key = new_fleet
        world.wire.desire(world.versions.v1, 12)
        wait_for(
            lambda: any(r.step == "desired_refused" for r in world.wire.reports), 30, "the early refusal"
        )
        roots.next([release], [old_fleet, new_fleet])
        _advanced(agent, 2)
        wait_for(lambda: _ended(world, 12), 120, "rollout 12 once the root names the new key")
        assert ("committed", True) in world.wire.steps(12)

        roots.next([release], [new_fleet])  # the old fleet key revoked
        _advanced(agent, 3)
        refused = sum(r.step == "desired_refused" for r in world.wire.reports)
        world.wire.fleet_key = old_fleet  # someone holding the revoked key
        world.wire.desire(world.versions.v11, 13)
        wait_for(
            lambda: sum(r.step == "desired_refused" for r in world.wire.reports) > refused, 30, "refusal"
        )
        assert "not a trusted fleet key" in (world.wire.reports[-1].reason or "")
        time.sleep(1.0)
        assert agent.active_version() == "1.0.0" and not world.wire.steps(13)

        # A root that has expired (a newer one withheld): no desired state is acted on.
        roots.next([release], [new_fleet], expires_in=-60.0)
        _advanced(agent, 4)
        world.wire.fleet_key = new_fleet
        refused = sum(r.step == "desired_refused" for r in world.wire.reports)
        world.wire.desire(world.versions.v11, 14)
        wait_for(lambda: sum(r.step == "desired_refused" for r in world.wire.reports) > refused, 30, "frozen")
        assert "expired" in (world.wire.reports[-1].reason or "")
        roots.next([release], [new_fleet])  # a fresh root: the waiting desired state goes ahead
        _advanced(agent, 5)
        wait_for(lambda: _ended(world, 14), 120, "rollout 14 under a fresh root")
        assert ("committed", True) in world.wire.steps(14)
        assert agent.active_version() == "1.1.0"
    finally:
        agent.stop()
