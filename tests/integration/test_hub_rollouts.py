"""Staged rollouts over 20 simulated devices on a real mosquitto, on SQLite and PostgreSQL."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, update

from cloud_hub.models import AuditEntry, Device
from tests.integration.fleet_sim import Behaviour, SimDevice

pytestmark = pytest.mark.integration

N = 20


def _until(check: Callable[[], bool], timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached in {timeout:.0f}s")
        time.sleep(0.1)


def register(ctx: Any, folder: Path) -> None:
    from cloud_hub.registry import Registry

    with ctx.db.session() as s:
        Registry(s, ctx.store, ctx.trusted).publish_folder(folder, "test-setup")


@dataclass
class Fleet:
    client: Any
    ctx: Any
    devices: dict[str, SimDevice]
    op: dict[str, str]

    def deploy(self, **body: Any) -> Any:
        body = {
            "release": "glm-tiny@1.1.0",
            "selector": {"site": "plant-7"},
            "waves": ["10", "50", "100"],
            "soak_s": 0.5,
            "device_timeout_s": 15,
            **body,
        }
        return self.client.post("/api/v1/rollouts", json=body, headers=self.op)

    def rollout(self, rid: int) -> dict[str, Any]:
        return self.client.get(f"/api/v1/rollouts/{rid}", headers=self.op).json()

    def wait_state(self, rid: int, *states: str, timeout: float = 40.0) -> dict[str, Any]:
        try:
            _until(lambda: self.rollout(rid)["state"] in states, timeout, f"rollout {rid} in {states}")
        except AssertionError as exc:
            raise AssertionError(f"{exc}: {self.rollout(rid)}") from None
        return self.rollout(rid)

    def db_devices(self) -> dict[str, Device]:
        with self.ctx.db.session() as s:
            return {d.id: d for d in s.scalars(select(Device))}

    def waves(self, **body: Any) -> list[list[str]]:
        plan = self.deploy(dry_run=True, **body).json()
        return [[m["device"] for m in w["devices"]] for w in plan["waves"]]


@pytest.fixture
def fleet_factory(
    hub_db_url: str, private_broker: int, publisher: Any, tmp_path: Path
) -> Iterator[Callable[..., Fleet]]:
    from fastapi.testclient import TestClient

    from cloud_hub.auth import Role, create_token
    from cloud_hub.server import build_context, load_app, start_controller, start_ingest
    from cloud_hub.settings import HubSettings
    from edgeglm.mqtt import BrokerSettings

    started: list[Any] = []
    sims: list[SimDevice] = []

    def make(
        behaviours: dict[str, dict[str, Behaviour]] | None = None,
        *,
        version: str | None = "1.0.0",
        n: int = N,
    ) -> Fleet:
        """``n`` devices on ``version`` (None: no model yet), labelled site=plant-7."""
        settings = HubSettings(
            data_dir=tmp_path / "hub", db_url=hub_db_url, trusted_keys=(publisher.public_path,)
        )
        ctx = build_context(settings)
        with ctx.db.session() as s:
            _, op = create_token(s, "ops", Role.operator, "test")
            _, viewer = create_token(s, "viewer", Role.viewer, "test")
        register(ctx, publisher.bundle("1.0.0", seed=1))
        register(ctx, publisher.bundle("1.1.0", seed=2))
        link, ingest = start_ingest(ctx, BrokerSettings(port=private_broker), "hub-under-test")
        ingest.flush_s = 0.1
        controller = start_controller(ctx, "test-controller", tick_s=0.1)
        client = TestClient(load_app(ctx))
        started.extend([controller, (link, ingest), ctx])
        devices = {}
        for i in range(n):
            name = f"box-{i:02d}"
            devices[name] = SimDevice(
                private_broker, name, version, behaviours=(behaviours or {}).get(name, {})
            )
            devices[name].start()
            sims.append(devices[name])
        fleet = Fleet(client, ctx, devices, {"Authorization": f"Bearer {op}"})
        fleet.viewer = {"Authorization": f"Bearer {viewer}"}  # type: ignore[attr-defined]
        _until(
            lambda: len(fleet.db_devices()) == n and all(d.online for d in fleet.db_devices().values()),
            what=f"{n} devices registered",
        )
        for name in devices:
            r = client.patch(
                f"/api/v1/devices/{name}/labels", json={"set": {"site": "plant-7"}}, headers=fleet.op
            )
            assert r.status_code == 200
        return fleet

    yield make
    for sim in sims:  # the devices first, then the hub's parts
        sim.stop()
    for item in started:
        if isinstance(item, tuple):
            item[0].close()
            item[1].stop()
        elif hasattr(item, "stop"):
            item.stop()
        else:
            item.db.dispose()


def _audit_actions(fleet: Fleet, rid: int) -> list[str]:
    with fleet.ctx.db.session() as s:
        return [
            e.action
            for e in s.scalars(
                select(AuditEntry).where(AuditEntry.target == f"rollout/{rid}").order_by(AuditEntry.id)
            )
        ]


def test_dry_run_then_a_rollout_advances_its_waves_to_completion(fleet_factory: Any) -> None:
    fleet = fleet_factory()
    plan = fleet.deploy(dry_run=True, gates=["p95_ratio<=1.5", "error_rate<=0.05"]).json()
    assert [len(w["devices"]) for w in plan["waves"]] == [2, 8, 10]
    assert all(m["bytes"] > 0 and m["from"] == "glm-tiny@1.0.0" for w in plan["waves"] for m in w["devices"])
    assert fleet.waves() == [[m["device"] for m in w["devices"]] for w in plan["waves"]]  # deterministic
    assert all(d.desired_version is None for d in fleet.db_devices().values())  # a dry run writes nothing

    assert (
        fleet.client.post(
            "/api/v1/rollouts", json={"release": "glm-tiny@1.1.0"}, headers=fleet.viewer
        ).status_code
        == 403
    )  # type: ignore[attr-defined]
    r = fleet.deploy(gates=["p95_ratio<=1.5", "error_rate<=0.05"], min_samples=2)
    assert r.status_code == 201, r.text
    rid = r.json()["id"]
    again = fleet.deploy()
    assert again.status_code == 409 and "active rollout" in again.json()["error"]["why"]

    done = fleet.wait_state(rid, "completed", "reverted", "paused")
    assert done["state"] == "completed", done
    assert [w["state"] for w in done["waves"]] == ["passed"] * 3
    assert {d.current_version for d in fleet.db_devices().values()} == {"1.1.0"}
    assert all(dev.version == "1.1.0" for dev in fleet.devices.values())
    actions = _audit_actions(fleet, rid)
    assert actions[0] == "rollout.start" and actions[-1] == "rollout.completed"
    assert actions.count("rollout.wave.pass") == 3


def test_a_rollout_started_before_any_health_takes_its_baseline_when_devices_report(
    fleet_factory: Any,
) -> None:
    """Started right after the fleet came up, before the hub has any old-version health: the
    latency gate takes its baseline once those devices report, instead of pausing without one."""
    fleet = fleet_factory()
    for dev in fleet.devices.values():
        dev.muted = True
    time.sleep(1.0)  # heartbeats already in flight are ingested (beat 0.3 s, flush 0.1 s)
    with fleet.ctx.db.session() as s:
        s.execute(update(Device).values(health={}))
    rid = fleet.deploy(gates=["p95_ratio<=1.5"], min_samples=2).json()["id"]
    _until(lambda: fleet.rollout(rid)["waves"][0]["state"] != "pending", what="the first wave started")
    assert fleet.rollout(rid)["baseline"] == {}  # nothing to take at the start
    for dev in fleet.devices.values():
        dev.muted = False
    done = fleet.wait_state(rid, "completed", "reverted", "paused")
    assert done["state"] == "completed", done
    assert done["baseline"]["0"]["p95_ms"] == 100.0 and done["baseline"]["0"]["devices"] > 0


def test_failures_over_the_threshold_revert_exactly_the_updated_devices(fleet_factory: Any) -> None:
    probe = fleet_factory()
    waves = probe.waves()
    failing = waves[1][:2]  # 2 of the 8 in the second wave: 25% > max 10%
    for dev in probe.devices.values():
        if dev.device_id in failing:
            dev.behaviours["1.1.0"] = Behaviour(fail=True)
    rid = probe.deploy(max_failure_ratio=0.1).json()["id"]
    done = probe.wait_state(rid, "reverted", "completed", "paused")
    assert done["state"] == "reverted" and "failed" in done["reason"]
    moved = set(waves[0]) | set(waves[1])
    _until(
        lambda: all(probe.devices[d].version == "1.0.0" for d in moved), what="moved devices back on 1.0.0"
    )
    rows = probe.db_devices()
    for name in moved:
        assert rows[name].desired_version == "1.0.0", name
    for name in waves[2]:  # the third wave never moved: no desired state was ever sent
        assert rows[name].desired_version is None and probe.devices[name].desired_seen == []
    view = probe.rollout(rid)
    states = {d["device"]: d["state"] for d in view["deployments"]}
    assert {states[d] for d in moved} == {"reverted"} and {states[d] for d in waves[2]} == {"skipped"}

    def reported() -> bool:  # a failing device's report may land after the revert; it is kept
        deps = probe.rollout(rid)["deployments"]
        return all(d["last_step"] == "rolled_back" for d in deps if d["device"] in failing)

    _until(reported, what="the failing devices' rolled_back reports")


def test_a_latency_gate_breach_reverts(fleet_factory: Any) -> None:
    slow = {f"box-{i:02d}": {"1.1.0": Behaviour(p95_ms=300)} for i in range(N)}
    fleet = fleet_factory(slow)
    rid = fleet.deploy(gates=["p95_ratio<=1.2"], min_samples=2, soak_s=3).json()["id"]
    done = fleet.wait_state(rid, "reverted", "completed", "paused")
    assert done["state"] == "reverted" and "p95_ratio" in done["reason"]
    assert done["waves"][0]["state"] == "failed" and done["waves"][1]["state"] == "pending"
    assert "rollout.reverted" in _audit_actions(fleet, rid)


def test_inconclusive_gates_pause_and_never_pass(fleet_factory: Any) -> None:
    silent = {f"box-{i:02d}": {"1.1.0": Behaviour(silent=True)} for i in range(N)}
    fleet = fleet_factory(silent)
    rid = fleet.deploy(gates=["error_rate<=0.02"], min_samples=2, soak_s=0.5).json()["id"]
    done = fleet.wait_state(rid, "paused", "completed", "reverted")
    assert done["state"] == "paused" and "inconclusive" in done["reason"]
    assert done["waves"][0]["state"] == "soaking" and done["current_wave"] == 0


def test_pause_resume_and_abort(fleet_factory: Any) -> None:
    fleet = fleet_factory()
    waves = fleet.waves()
    rid = fleet.deploy(soak_s=1.5).json()["id"]
    _until(lambda: fleet.rollout(rid)["waves"][0]["state"] == "soaking", what="first wave soaking")
    assert fleet.client.post(f"/api/v1/rollouts/{rid}/pause", headers=fleet.op).json()["state"] == "paused"
    time.sleep(2.5)  # longer than the soak: a paused rollout does not move
    assert fleet.rollout(rid)["current_wave"] == 0
    assert all(fleet.devices[d].desired_seen == [] for d in waves[1])
    assert fleet.client.post(f"/api/v1/rollouts/{rid}/pause", headers=fleet.op).status_code == 409
    assert fleet.client.post(f"/api/v1/rollouts/{rid}/resume", headers=fleet.op).json()["state"] == "running"
    _until(lambda: fleet.rollout(rid)["current_wave"] == 1, what="second wave")
    assert fleet.client.post(f"/api/v1/rollouts/{rid}/abort", headers=fleet.op).json()["state"] == "aborted"
    time.sleep(1.0)
    assert fleet.rollout(rid)["state"] == "aborted"
    assert all(fleet.devices[d].desired_seen == [] for d in waves[2])
    again = fleet.deploy(waves=["100"], soak_s=0.2)  # the devices are free again
    assert again.status_code == 201, again.text
    assert fleet.wait_state(again.json()["id"], "completed", "reverted", "paused")["state"] == "completed"
    assert [
        a for a in _audit_actions(fleet, rid) if a in ("rollout.paused", "rollout.running", "rollout.aborted")
    ] == ["rollout.paused", "rollout.running", "rollout.aborted"]


def test_rollback_returns_the_fleet_to_the_previous_version(fleet_factory: Any) -> None:
    fleet = fleet_factory()
    rid = fleet.deploy(waves=["100"], soak_s=0.2).json()["id"]
    assert fleet.wait_state(rid, "completed")["state"] == "completed"
    r = fleet.client.post(
        "/api/v1/rollbacks", json={"model": "glm-tiny", "selector": {"site": "plant-7"}}, headers=fleet.op
    )
    assert r.status_code == 200 and len(r.json()["reverted"]) == N
    _until(lambda: all(d.version == "1.0.0" for d in fleet.devices.values()), what="fleet back on 1.0.0")
    assert fleet.rollout(rid)["state"] == "rolled_back"


def test_pinned_devices_are_skipped_and_an_offline_device_times_out(fleet_factory: Any) -> None:
    fleet = fleet_factory()
    waves = fleet.waves(waves=["10", "100"])
    pinned, gone = waves[1][0], waves[0][0]
    assert (
        fleet.client.put(
            f"/api/v1/devices/{pinned}/pin", json={"version": "1.0.0"}, headers=fleet.op
        ).status_code
        == 200
    )
    plan = fleet.deploy(dry_run=True, waves=["10", "100"]).json()
    assert plan["skipped"] == {"pinned": [pinned]} and plan["devices"] == N - 1
    sim = fleet.devices[gone]
    sim._stop.set()  # no more heartbeats
    sim.client.loop_stop()  # no reconnect either
    sim.client._sock.close()  # a power cut: the broker publishes its last will
    _until(lambda: fleet.db_devices()[gone].online is False, what=f"{gone} seen offline")
    r = fleet.deploy(waves=["1n", "100"], max_failure_ratio=0.0, device_timeout_s=2, soak_s=0.2)
    rid = r.json()["id"]
    first = fleet.rollout(rid)["deployments"]
    assert [d["device"] for d in first if d["wave"] == 0] == [gone]  # the same order as the dry run
    done = fleet.wait_state(rid, "reverted", "completed", "paused")
    assert done["state"] == "reverted" and "1 of 1 device(s) failed" in done["reason"]
    states = {d["device"]: (d["state"], d["detail"]) for d in done["deployments"]}
    assert states[gone] == ("reverted", "offline")  # offline is never success
    assert pinned not in {d["device"] for d in fleet.rollout(rid)["deployments"]}
    assert fleet.db_devices()[pinned].desired_version is None


def test_a_rollout_that_cannot_advance_fails_with_its_reason_while_another_completes(
    fleet_factory: Any,
) -> None:
    from cloud_hub.models import DeviceDeployment

    fleet = fleet_factory()
    names = sorted(fleet.devices)
    for line, members in (("a", names[:10]), ("b", names[10:])):
        for name in members:
            r = fleet.client.patch(
                f"/api/v1/devices/{name}/labels", json={"set": {"line": line}}, headers=fleet.op
            )
            assert r.status_code == 200
    waves = fleet.waves(selector={"line": "a"}, waves=["1n", "100"])
    ra = fleet.deploy(selector={"line": "a"}, waves=["1n", "100"], soak_s=3.0)
    assert ra.status_code == 201, ra.text
    # A box of the second wave re-registers with a profile this release has no build for: its
    # desired state cannot be built when that wave starts.
    moved = waves[1][-1]
    with fleet.ctx.db.session() as s:
        s.execute(update(Device).where(Device.id == moved).values(profile="cpu-arm-int4"))
    rb = fleet.deploy(selector={"line": "b"}, waves=["100"])
    assert rb.status_code == 201, rb.text

    failed = fleet.wait_state(ra.json()["id"], "failed", "completed", "reverted", "paused")
    assert failed["state"] == "failed", failed
    assert "has no build for profile 'cpu-arm-int4'" in failed["reason"]
    done = fleet.wait_state(rb.json()["id"], "completed", "reverted", "paused", "failed")
    assert done["state"] == "completed", done
    assert "rollout.failed" in _audit_actions(fleet, ra.json()["id"])
    with fleet.ctx.db.session() as s:  # its devices are free for the next rollout
        assert not any(
            d.active
            for d in s.scalars(select(DeviceDeployment).where(DeviceDeployment.rollout_id == ra.json()["id"]))
        )


def _signed_doc(folder: Path, key: Any, **changes: Any) -> bytes:
    """The bundle's manifest with ``changes``, signed again as-is: what a publisher with the key
    could send even where our own types would refuse to build it."""
    import base64
    import json

    from edgeglm.bundle import canonical_bytes
    from edgeglm.keys import key_id

    doc = json.loads((folder / "manifest.json").read_text())
    doc.update(changes)
    doc.pop("signature")
    sig = base64.b64encode(key.sign(canonical_bytes(doc))).decode()
    doc["signature"] = {
        "alg": "ed25519",
        "key_id": key_id(key.public_key()),
        "value": sig,
    }
    return json.dumps(doc).encode()


def _next_rollout_id_is(fleet: Fleet, rid: int) -> None:
    """Make the database hand out ``rid`` as the next rollout id (both backends)."""
    from sqlalchemy import text

    from cloud_hub.models import Release, Rollout

    with fleet.ctx.db.session() as s:
        release = s.scalars(select(Release)).first()
        assert release is not None
        s.add(
            Rollout(
                id=rid - 1,
                release_id=release.id,
                selector={},
                waves=[],
                soak_s=0,
                success_threshold=1,
                max_failure_ratio=0,
                gates=[],
                device_timeout_s=1,
                on_failure="pause",
                state="aborted",
                min_samples=1,
                created_by="test",
            )
        )
        s.flush()
        if fleet.ctx.db.dialect == "postgresql":
            s.execute(text("SELECT setval(pg_get_serial_sequence('rollouts', 'id'), :v)"), {"v": rid - 1})


def test_names_versions_and_rollout_ids_are_carried_end_to_end_or_refused_at_entry(
    fleet_factory: Any, publisher: Any, private_broker: int
) -> None:
    """A 64-character model name and the largest rollout id go from publish to the wire and back
    (both databases); a 65- or 200-character name, ``1.0.0-rc..1`` and a rollout id past 2**31-1
    are refused where they enter, with the contract's reason, and the controller never sees them."""
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    from edgeglm.contracts import ROLLOUT_ID_MAX, name_problem, version_problem
    from edgeglm.protocol import Report, encode, report_topic

    fleet = fleet_factory()
    long = "m" * 64
    folder = publisher.bundle("2.0.0", model=long, seed=9)
    for changes, problem in (
        ({"model": "m" * 65}, name_problem("m" * 65)),
        ({"model": "m" * 200}, name_problem("m" * 200)),
        ({"version": "1.0.0-rc..1"}, version_problem("1.0.0-rc..1")),
    ):
        r = fleet.client.post(
            "/api/v1/uploads", content=_signed_doc(folder, publisher.key, **changes), headers=fleet.op
        )
        assert r.status_code == 422 and problem in r.json()["error"]["why"], r.text
    for release, problem in (
        ("m" * 65 + "@2.0.0", name_problem("m" * 65)),
        ("m" * 200 + "@2.0.0", name_problem("m" * 200)),
        ("glm-tiny@1.0.0-rc..1", version_problem("1.0.0-rc..1")),
    ):
        r = fleet.deploy(release=release)
        assert r.status_code == 422 and f"MODEL@VERSION: {problem}" in r.json()["error"]["why"], r.text
    register(fleet.ctx, folder)

    _next_rollout_id_is(fleet, ROLLOUT_ID_MAX)
    r = fleet.deploy(release=f"{long}@2.0.0", selector={"id": "box-00"}, waves=["100"])
    assert r.status_code == 201, r.text
    rid = r.json()["id"]
    assert rid == ROLLOUT_ID_MAX
    done = fleet.wait_state(rid, "completed", "reverted", "paused", "failed")
    assert done["state"] == "completed", done
    assert fleet.db_devices()["box-00"].desired_model == long
    assert fleet.client.get(f"/api/v1/rollouts/{ROLLOUT_ID_MAX + 1}", headers=fleet.op).status_code == 422
    full = fleet.deploy(release="glm-tiny@1.1.0", selector={"id": "box-01"}, waves=["100"])
    assert full.status_code == 409 and f"up to {ROLLOUT_ID_MAX} is taken" in full.json()["error"]["why"]

    # a report naming a rollout id past the contract is dropped as malformed; nothing else changes
    dropped = fleet.ctx.metrics.value("edgeglm_hub_device_messages_dropped_total", reason="malformed")
    report = Report(
        device_id="box-00", rollout_id=rid, step="committed", seq=99, ok=True, version="2.0.0", ts=1.0
    )
    raw = encode(report).replace(f'"{rid}"'.encode(), f'"{ROLLOUT_ID_MAX + 1}"'.encode())
    client = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    client.connect("127.0.0.1", private_broker)
    client.loop_start()
    try:
        client.publish(report_topic("box-00"), raw, qos=1).wait_for_publish(5)
    finally:
        client.loop_stop()
        client.disconnect()
    _until(
        lambda: (
            fleet.ctx.metrics.value("edgeglm_hub_device_messages_dropped_total", reason="malformed") > dropped
        ),
        what="the report dropped as malformed",
    )
    assert fleet.rollout(rid)["state"] == "completed"


def _paused_count(fleet: Fleet, rid: int) -> int:
    return _audit_actions(fleet, rid).count("rollout.paused")


def test_a_first_deploy_refuses_a_ratio_gate_and_passes_on_absolute_latency(fleet_factory: Any) -> None:
    """Boxes that run no model yet: no device can give p95_ratio a baseline, so the dry run and the
    deploy refuse it by name and point at p95_ms; p95_ms passes once the wave served requests."""
    fleet = fleet_factory(version=None, n=4)
    for body in ({"dry_run": True}, {}):
        r = fleet.deploy(gates=["p95_ratio<=1.2"], **body)
        assert r.status_code == 409, r.text
        err = r.json()["error"]
        assert err["what"] == "gate p95_ratio<=1.2" and "a first deploy" in err["why"]
        assert "p95_ms<=" in err["hint"]
    assert all(d.desired_version is None for d in fleet.db_devices().values())  # nothing was started

    gates = ["p95_ms<=250", "error_rate<=0.05"]
    # 2 + 2 boxes serving 100 requests a heartbeat each: one box alone is not enough for a wave
    rid = fleet.deploy(gates=gates, waves=["50", "100"], min_requests=150, min_samples=1).json()["id"]
    done = fleet.wait_state(rid, "completed", "reverted", "paused")
    assert done["state"] == "completed", done
    assert done["min_requests"] == 150
    passes = [
        e["after"]["detail"] for e in fleet.rollout(rid)["history"] if e["action"] == "rollout.wave.pass"
    ]
    assert len(passes) == len(done["waves"]) and all("p95_ms<=250 (100)" in p for p in passes), passes


def test_a_ratio_gate_on_a_one_box_fleet_is_refused(fleet_factory: Any) -> None:
    fleet = fleet_factory(n=2)
    r = fleet.deploy(gates=["p95_ratio<=1.2"], selector={"id": "box-00"}, dry_run=True)
    assert r.status_code == 409 and "all 1 that do are in the first wave" in r.json()["error"]["why"]
    r = fleet.deploy(gates=["p95_ratio<=1.2"], waves=["100"])  # both boxes in one wave
    assert r.status_code == 409 and "--waves 1n,100" in r.json()["error"]["hint"], r.text
    assert fleet.deploy(gates=["p95_ratio<=1.2"], waves=["1n", "100"], dry_run=True).status_code == 201


def test_an_idle_wave_waits_for_traffic_and_never_passes_or_pauses(fleet_factory: Any) -> None:
    """Updated boxes that serve nothing report 0 requests and 0 ms: no gate passes on that; the
    wave waits, saying why, for as long as it takes (no pause), and passes once traffic comes."""
    idle = {f"box-{i:02d}": {"1.1.0": Behaviour(idle=True)} for i in range(3)}
    fleet = fleet_factory(idle, version=None, n=3)
    rid = fleet.deploy(gates=["p95_ms<=250"], waves=["100"], soak_s=0.3, min_samples=1).json()["id"]
    _until(lambda: "waiting for traffic" in fleet.rollout(rid)["reason"], what="the wave waiting")
    time.sleep(2.0)  # several soaks: an inconclusive wave would have paused by now
    view = fleet.rollout(rid)
    assert view["state"] == "running" and view["waves"][0]["state"] == "soaking", view
    assert view["reason"].startswith("wave 0 waiting for traffic: the updated devices served 0 of the 20")
    assert _audit_actions(fleet, rid).count("rollout.wave.wait") == 1
    for dev in fleet.devices.values():
        dev.behaviours["1.1.0"] = Behaviour(p95_ms=80)  # requests arrive
    done = fleet.wait_state(rid, "completed", "reverted", "paused")
    assert done["state"] == "completed" and done["reason"] == "every wave passed", done
    assert _paused_count(fleet, rid) == 0


def test_resuming_a_pause_for_a_missing_baseline_does_not_pause_again(
    fleet_factory: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """The boxes left on 1.0.0 serve nothing, so p95_ratio has no baseline: the wave pauses once;
    the operator's resume waives the ratio (the other gates still judge) and it completes. Each
    state change is one INFO line of the hub's."""
    caplog.set_level(logging.INFO, logger="cloud_hub")
    idle_old = {f"box-{i:02d}": {"1.0.0": Behaviour(idle=True)} for i in range(3)}
    fleet = fleet_factory(idle_old, n=3)
    rid = fleet.deploy(
        gates=["p95_ratio<=1.2", "p95_ms<=250"], waves=["1n", "100"], soak_s=0.3, min_samples=1
    ).json()["id"]
    paused = fleet.wait_state(rid, "paused", "completed", "reverted")
    assert paused["state"] == "paused" and "no baseline latency" in paused["reason"], paused
    assert "missing" in paused["baseline"]
    r = fleet.client.post(f"/api/v1/rollouts/{rid}/resume", headers=fleet.op)
    assert r.status_code == 200 and "p95_ratio is left out" in r.json()["reason"], r.text
    done = fleet.wait_state(rid, "completed", "reverted", "paused", timeout=20)
    assert done["state"] == "completed", done
    assert _paused_count(fleet, rid) == 1 and "waived" in done["baseline"]
    assert "rollout.gate.waive" in _audit_actions(fleet, rid)
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    for expected in (
        f"rollout {rid} created by ops: glm-tiny@1.1.0 to 3 device(s)",
        f"rollout {rid} paused: wave 0 inconclusive: no baseline latency",
        f"rollout {rid} paused -> running: resumed by ops",
        f"rollout {rid}: p95_ratio waived by ops",
        f"rollout {rid} advanced to wave 1 of 2",
        f"rollout {rid} completed: every wave passed",
    ):
        assert sum(line.startswith(expected) for line in lines) == 1, (expected, lines)
