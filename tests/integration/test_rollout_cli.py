"""``edgectl deploy``, ``rollouts status --watch``, ``rollback`` and ``devices pin`` against a real hub
process, real mosquitto and simulated devices speaking the wire protocol: exit codes and messages."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import update

from edgectl import root
from tests.integration.fleet_sim import Behaviour, SimDevice
from tests.integration.hub_process import start_hub
from tests.integration.test_hub_rollouts import _until

pytestmark = pytest.mark.integration

N = 3


@dataclass
class CliFleet:
    url: str
    db: str
    token: str
    devices: dict[str, SimDevice]

    def cli(self, *args: str) -> Any:
        env = {"EDGEGLM_TOKEN": self.token, "EDGEGLM_HUB_URL": self.url}
        return CliRunner().invoke(root, list(args), env=env, catch_exceptions=False)

    def json(self, *args: str) -> Any:
        r = self.cli(*args, "-o", "json")
        assert r.exit_code == 0, r.output
        return json.loads(r.output)

    def deploy(self, release: str, *flags: str) -> int:
        return int(self.json("deploy", release, "--fleet", "site=plant-7", *flags)["id"])

    def watch(self, rid: int) -> Any:
        return self.cli("rollouts", "status", str(rid), "--watch", "--interval", "0.2s")

    def set_profile(self, device: str, profile: str) -> None:
        from cloud_hub.db import open_db
        from cloud_hub.models import Device

        db = open_db(self.db)
        try:
            with db.session() as s:
                s.execute(update(Device).where(Device.id == device).values(profile=profile))
        finally:
            db.dispose()


@pytest.fixture
def cli_fleet(tmp_path: Path, publisher: Any, private_broker: int) -> Iterator[CliFleet]:
    """A hub process (controller ticking every 0.1 s) with 1.0.0, 1.1.0 and 1.2.0 of glm-tiny
    published, and three boxes on 1.0.0 labelled site=plant-7; 1.2.0 fails on every box."""
    data = tmp_path / "hub"
    db = f"sqlite:///{data / 'hub.db'}"
    runner = CliRunner()
    assert runner.invoke(root, ["hub", "migrate", "--db", db]).exit_code == 0
    r = runner.invoke(root, ["hub", "token", "create", "ops", "--role", "operator", "--db", db, "-o", "json"])
    token = json.loads(r.output)["token"]
    proc, url = start_hub(
        "--db",
        db,
        "--data",
        str(data),
        "--trust",
        str(publisher.public_path),
        "--broker",
        f"127.0.0.1:{private_broker}",
        "--tick",
        "0.1",
    )
    sims: list[SimDevice] = []
    try:
        fleet = CliFleet(url, db, token, {})
        for seed, version in enumerate(("1.0.0", "1.1.0", "1.2.0")):
            r = fleet.cli("publish", str(publisher.bundle(version, seed=seed)), "-o", "json")
            assert r.exit_code == 0, r.output
        for i in range(N):
            name = f"box-{i:02d}"
            sim = SimDevice(private_broker, name, "1.0.0", behaviours={"1.2.0": Behaviour(fail=True)})
            sims.append(sim.start())
            fleet.devices[name] = sim
        _until(lambda: len(fleet.json("devices", "list", "--online")) == N, what="the boxes registered")
        for name in fleet.devices:
            assert fleet.cli("devices", "label", name, "site=plant-7").exit_code == 0
        yield fleet
    finally:
        for sim in sims:
            sim.stop()
        proc.terminate()
        proc.wait(20)


def test_watch_exits_0_only_on_completed_and_rollback_after_a_revert_says_so(cli_fleet: CliFleet) -> None:
    fleet = cli_fleet
    plan = fleet.json("deploy", "glm-tiny@1.1.0", "--fleet", "site=plant-7", "--waves", "1n,100", "--dry-run")
    later = plan["waves"][1]["devices"][0]["device"]

    # failed: a box of the second wave turns out to have a profile the release has no build for
    rid = fleet.deploy("glm-tiny@1.1.0", "--waves", "1n,100", "--soak", "1s")
    fleet.set_profile(later, "cpu-arm-int4")
    r = fleet.watch(rid)
    assert r.exit_code == 1, r.output
    assert f"Error: rollout {rid}: failed: the controller could not advance it" in r.output
    assert "hint: edgectl rollouts status" in r.output
    fleet.set_profile(later, "cpu-x86-int4")

    # completed: the watch waits for it, then exits 0
    rid = fleet.deploy("glm-tiny@1.1.0", "--waves", "100", "--soak", "0.2s")
    r = fleet.watch(rid)
    assert r.exit_code == 0, r.output
    assert f"rollout {rid}  glm-tiny@1.1.0  COMPLETED" in r.output and "Error" not in r.output

    # reverted: every box fails 1.2.0
    rid = fleet.deploy("glm-tiny@1.2.0", "--waves", "1n,100", "--soak", "0.2s", "--max-failure", "0%")
    r = fleet.watch(rid)
    assert r.exit_code == 1, r.output
    assert f"Error: rollout {rid}: reverted: wave 0: 1 of 1 device(s) failed" in r.output
    before = fleet.json("rollouts", "status", str(rid))
    assert before["state"] == "reverted"

    # a rollback after the hub's own revert: nothing to do, said with when and why; history kept
    r = fleet.cli("rollback", "glm-tiny")
    assert r.exit_code == 0, r.output
    assert r.output.startswith(
        f"rollout {rid}: nothing to roll back: it was already reverted at {before['updated_at'][:19]}"
    )
    assert f"because {before['reason']}" in r.output
    after = fleet.json("rollouts", "status", str(rid))
    assert (after["state"], after["reason"]) == (before["state"], before["reason"])
    assert after["history"][: len(before["history"])] == before["history"]  # appended, not rewritten
    last = after["history"][-1]
    assert last["action"] == "rollout.rollback" and last["after"]["nothing"].startswith("it was already")
    assert [e["action"] for e in after["history"]].count("rollout.reverted") == 1
    table = fleet.cli("rollouts", "status", str(rid))
    assert "rollout.reverted" in table.output and "rollout.rollback" in table.output

    # aborted
    rid = fleet.deploy("glm-tiny@1.0.0", "--waves", "1n,100", "--soak", "60s")
    assert fleet.cli("rollouts", "abort", str(rid)).exit_code == 0
    r = fleet.watch(rid)
    assert r.exit_code == 1 and f"Error: rollout {rid}: aborted: aborted by ops" in r.output, r.output


def test_pin_and_deploy_refuse_what_does_not_exist_in_words(cli_fleet: CliFleet) -> None:
    fleet = cli_fleet
    r = fleet.cli("devices", "pin", "box-00", "9.9.9")
    assert r.exit_code == 1, r.output
    assert r.output.splitlines() == [
        "Error: release glm-tiny@9.9.9: is not in the registry",
        "hint: Published versions of glm-tiny: 1.0.0, 1.1.0, 1.2.0.",
    ]
    assert fleet.json("devices", "show", "box-00")["pinned_version"] is None
    r = fleet.cli("devices", "pin", "box-00", "1.0")
    assert r.exit_code == 2 and "'1.0' is not a semantic version like 1.4.0" in r.output, r.output
    assert "^(" not in r.output and "pattern" not in r.output  # no regex shown to a person
    assert fleet.cli("devices", "pin", "box-00", "1.1.0").exit_code == 0

    for bad in ("glm-tiny", "glm-tiny@1.0", "glm tiny@1.0.0"):
        r = fleet.cli("deploy", bad, "--dry-run")
        assert r.exit_code == 2 and "write MODEL@VERSION, e.g. glm-tiny@1.1.0" in r.output, r.output
        assert "^(" not in r.output

    # a ratio gate no device can give a baseline to (one box): refused with the absolute form
    r = fleet.cli("deploy", "glm-tiny@1.1.0", "--fleet", "id=box-01", "--gate", "p95_ratio<=1.2", "--dry-run")
    assert r.exit_code == 1, r.output
    assert r.output.startswith("Error: gate p95_ratio<=1.2: no device outside the first wave")
    assert "hint: Gate on absolute latency instead, e.g. --gate 'p95_ms<=250'" in r.output
    r = fleet.cli("deploy", "glm-tiny@1.1.0", "--gate", "p95<=3", "--dry-run")
    assert r.exit_code == 2 and "the metrics are p95_ms, p95_ratio, error_rate, smoke_agreement" in r.output
