"""Fault injection on a whole installation: broker, hub and agents as real processes, one fault each.

Every test starts a managed mosquitto, ``edgectl hub serve`` (SQLite) and two ``edge-agent run``
processes that install 1.0.0 at first start, rolls 1.1.0 out (every float tensor of 1.0.0
changed, downloads capped so a fault lands mid-transfer), breaks one thing on purpose, and then
asserts the same four things (``_converged``):

- every device ends with a loadable current model: ``edge-agent status`` names it and the agent
  answers a sensor request over MQTT;
- hub state converges: the rollout ended as expected, and each device's current version is its
  desired version and the expected one;
- the audit log is complete: the start, one ``wave.start`` per wave begun, exactly one end;
- the outbox lost nothing: each agent's outbox drains to empty, with nothing dropped, and the hub
  holds each device's final report (the deployment settled with the reported last step).
"""

from __future__ import annotations

import contextlib
import random
import shutil
import sqlite3
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from edgectl.demo.fleet import LocalFleet
from edgectl.demo.partition import TcpProxy
from edgectl.demo.procs import wait_for
from tests.agent_bundles import derive

pytestmark = [pytest.mark.integration, pytest.mark.chaos]

MODEL = "tiny-edge"
BOXES = ["chaos-a", "chaos-b"]
CAP = 20_000  # bytes/s per agent: the 1.1.0 download (~0.1 MB on the wire) takes several seconds


@dataclass
class Versions:
    v1: Path
    v11: Path
    public: Path


@pytest.fixture(scope="module")
def versions(tiny_bundle: Any, tmp_path_factory: pytest.TempPathFactory) -> Versions:
    from edgeglm.keys import load_private_key

    folder, _profile, public = tiny_bundle("fused-int8")
    key = load_private_key(public.with_suffix(".key"))
    root = tmp_path_factory.mktemp("chaos-versions")
    v11 = derive(folder, root / "1.1.0", key, "1.1.0", fraction=1.0, noise=1e-3)
    return Versions(folder, v11, public)


@pytest.fixture
def fleet(versions: Versions, tmp_path: Path) -> Iterator[LocalFleet]:
    f = LocalFleet(tmp_path / "run", versions.public)
    try:
        f.start_hub()
        for folder in (versions.v1, versions.v11):
            f.publish(folder)
        yield f
    finally:
        f.close()


def _start(fleet: LocalFleet, versions: Versions, **kw: Any) -> None:
    fleet.start_agents(
        BOXES,
        {"update": {"bandwidth_bytes_s": CAP, "request_timeout_s": 3.0}, "telemetry": {"heartbeat_s": 0.5}},
        top={"bootstrap_bundle": str(versions.v1)},
        **kw,
    )
    for box in BOXES:
        fleet.label(box, site="demo")
    wait_for(lambda: _currents(fleet) == {b: f"{MODEL}@1.0.0" for b in BOXES}, 60, "1.0.0 on every box")


def _currents(fleet: LocalFleet) -> dict[str, str | None]:
    try:
        return {d: v["current"] for d, v in fleet.devices().items() if d in BOXES}
    except Exception:
        return {}


def _deployment(fleet: LocalFleet, rollout: int, box: str) -> dict[str, Any] | None:
    try:
        deps = fleet.rollout(rollout).get("deployments", [])
    except Exception:  # the hub restarting
        return None
    return next((d for d in deps if d["device"] == box), None)


def _step_seen(fleet: LocalFleet, rollout: int, box: str, steps: tuple[str, ...]) -> bool:
    d = _deployment(fleet, rollout, box)
    return d is not None and d["last_step"] in steps


def _outbox_pending(data: Path) -> int:
    """Rows still waiting in an agent's outbox, read while the agent runs."""
    with contextlib.closing(sqlite3.connect(f"file:{data / 'outbox.db'}?mode=ro", uri=True, timeout=5)) as c:
        return int(c.execute("select count(*) from outbox").fetchone()[0])


def _converged(fleet: LocalFleet, rollout: int, state: str, version: str, waves: int) -> dict[str, Any]:
    """The four promises of the module docstring, for every box; returns the rollout."""
    r = fleet.wait_rollout(rollout, 180)
    assert r["state"] == state, (r["state"], r["reason"])
    want = f"{MODEL}@{version}"

    def settled() -> bool:
        try:
            devices = fleet.devices()
        except Exception:
            return False
        return all(devices[b]["current"] == want and devices[b]["online"] for b in BOXES)

    wait_for(settled, 60, f"every box online on {version}")
    devices = fleet.devices()
    for box in BOXES:
        assert devices[box]["desired"] in (want, None), devices[box]
    sensor = fleet.connect_sensor()
    for box in BOXES:
        agent = fleet.agents[box]
        assert agent.proc.alive(), agent.proc.log()[-2000:]
        status = agent.status()
        assert status["slot_" + status["active_slot"]] == want, status
        reply = sensor.ask(box, "The sensor reads", max_tokens=4)
        assert reply.error is None and reply.done, reply
        wait_for(lambda a=agent: _outbox_pending(a.data) == 0, 30, f"{box}'s outbox to drain")
        assert "heartbeats dropped" not in agent.proc.log() and "deleted unsent" not in agent.proc.log()
    for dep in r["deployments"]:  # the final report reached the hub, or the hub reverted/failed it
        assert dep["state"] in ("succeeded", "failed", "reverted", "skipped"), dep
    audit = [e for e in fleet.audit() if e["target"] == f"rollout/{rollout}"]
    actions = [e["action"] for e in audit]
    assert actions.count("rollout.start") == 1, actions
    assert actions.count("rollout.wave.start") == r["current_wave"] + 1 == waves, (actions, r["current_wave"])
    ends = [a for a in actions if a in ("rollout.completed", "rollout.reverted", "rollout.paused")]
    assert ends == [f"rollout.{state}"], actions
    return r


def _deploy(fleet: LocalFleet, waves: list[str] | None = None, **body: Any) -> int:
    body.setdefault("device_timeout_s", 120.0)
    return int(fleet.deploy(f"{MODEL}@1.1.0", waves=waves or ["100"], soak_s=1.0, **body)["id"])


# ---------------------------------------------------------------------------------------- faults


def test_broker_restart_mid_rollout(fleet: LocalFleet, versions: Versions) -> None:
    _start(fleet, versions)
    rollout = _deploy(fleet)
    wait_for(lambda: _step_seen(fleet, rollout, BOXES[0], ("downloading",)), 60, "a download under way")
    assert fleet.broker is not None
    fleet.broker.stop()
    time.sleep(3)
    fleet.broker.start()
    _converged(fleet, rollout, "completed", "1.1.0", waves=1)


@pytest.mark.parametrize("step", ["downloading", "activating"])
def test_agent_kill_9_mid_update(fleet: LocalFleet, versions: Versions, step: str) -> None:
    """The agent SIGKILLs itself right after persisting ``step``; systemd would start it again."""
    from edge_agent.daemon import FAULT_ENV

    _start(fleet, versions, env={BOXES[0]: {FAULT_ENV: step}})
    rollout = _deploy(fleet)
    victim = fleet.agents[BOXES[0]]
    wait_for(lambda: not victim.proc.alive(), 90, f"the kill at {step}")
    assert victim.proc.popen is not None and victim.proc.popen.returncode == -9
    victim.start()  # without the fault
    _converged(fleet, rollout, "completed", "1.1.0", waves=1)
    assert victim.proc.starts == 2


def test_hub_kill_9_mid_wave(fleet: LocalFleet, versions: Versions) -> None:
    _start(fleet, versions)
    rollout = fleet.deploy(f"{MODEL}@1.1.0", waves=["1n", "100"], soak_s=4.0, device_timeout_s=120.0)["id"]

    def soaking() -> bool:
        try:
            return fleet.rollout(rollout)["waves"][0]["state"] == "soaking"
        except Exception:
            return False

    wait_for(soaking, 90, "wave 0 soaking")
    assert fleet.hub is not None
    fleet.hub.proc.kill9()
    time.sleep(1)
    fleet.hub.start()
    r = _converged(fleet, rollout, "completed", "1.1.0", waves=2)
    assert [w["state"] for w in r["waves"]] == ["passed", "passed"]


def test_an_agent_cut_off_past_the_device_timeout(fleet: LocalFleet, versions: Versions) -> None:
    """Offline is never success: the cut box times out, the rollout reverts, and the box, back on
    line, follows the reverted desired state: both boxes end on 1.0.0."""
    proxy = TcpProxy(fleet.start_broker())
    _start(fleet, versions, ports={BOXES[1]: proxy.port})
    proxy.cut()
    wait_for(lambda: not fleet.devices()[BOXES[1]]["online"], 30, "the hub to see the box offline")
    rollout = _deploy(fleet, device_timeout_s=20.0)
    r = fleet.wait_rollout(rollout, 120)
    deps = {d["device"]: d for d in r["deployments"]}
    assert r["state"] == "reverted" and "offline" in deps[BOXES[1]]["detail"], r
    assert deps[BOXES[0]]["last_step"] == "committed", deps  # it updated, then was reverted
    proxy.restore()
    _converged(fleet, rollout, "reverted", "1.0.0", waves=1)


def test_a_full_disk_during_assembly(fleet: LocalFleet, versions: Versions, tmp_path: Path) -> None:
    """One box's data folder is a small tmpfs: 1.1.0's pieces fit, its assembled slot does not.
    The update fails cleanly, the box keeps serving 1.0.0, the hub reverts, the space comes back."""
    data = tmp_path / "run" / "agents" / BOXES[0] / "data"
    data.mkdir(parents=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(data)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a size-limited tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        _start(fleet, versions)
        used = shutil.disk_usage(data).used
        pieces = sum(p.stat().st_size for p in versions.v11.iterdir() if p.is_file())
        # room for the new pieces plus a little; the second copy (the assembled slot) cannot fit
        size_kb = (used + pieces + 200_000) // 1024
        subprocess.run(["mount", "-o", f"remount,size={size_kb}k", str(data)], check=True)
        rollout = _deploy(fleet)
        r = _converged(fleet, rollout, "reverted", "1.0.0", waves=1)
        failed = next(d for d in r["deployments"] if d["device"] == BOXES[0])
        assert "space" in failed["detail"].lower() or "disk" in failed["detail"].lower(), failed
        assert not list(data.rglob("*.partial")), "a partly written file was left behind"
        inactive = "b" if fleet.agents[BOXES[0]].status()["active_slot"] == "a" else "a"
        assert not any((data / "slots" / inactive).rglob("*")), "the half-assembled slot was kept"
        log = fleet.agents[BOXES[0]].proc.log()
        assert "Traceback" not in log  # full disk: clear lines, no crash
        assert "dropping the pieces of the failed update" in log
        du = subprocess.run(["du", "-a", str(data)], capture_output=True, text=True).stdout
        assert shutil.disk_usage(data).free > 400_000, du  # the space came back
    finally:
        fleet.close()
        subprocess.run(["umount", "-l", str(data)], capture_output=True)


def test_a_corrupted_piece_on_the_hub_then_a_repair(fleet: LocalFleet, versions: Versions) -> None:
    """A stored piece of 1.1.0 rots on the hub's disk. The hub refuses to serve it (it verifies
    what it reads), the boxes cannot finish, the rollout reverts; publishing 1.1.0 again sends only
    that piece, and the next rollout completes."""
    from edgeglm.bundle import load_manifest

    _start(fleet, versions)
    m1, m11 = load_manifest(versions.v1, None)[0], load_manifest(versions.v11, None)[0]
    new = sorted(set(m11.piece_ids()) - set(m1.piece_ids()))
    victim = next(p for p in (fleet.root / "hub").rglob("objects/*/*") if p.name in new)
    raw = bytearray(victim.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    victim.write_bytes(bytes(raw))

    rollout = _deploy(fleet, device_timeout_s=60.0)
    _converged(fleet, rollout, "reverted", "1.0.0", waves=1)
    assert fleet.hub is not None and "corrupt" in fleet.hub.proc.log()

    again = fleet.publish(versions.v11)
    assert again["bytes_sent"] == len(raw) and not again["already_published"], again
    actions = [e["action"] for e in fleet.audit()]
    assert "upload.repair" in actions and "release.repair" in actions
    second = _deploy(fleet)
    _converged(fleet, second, "completed", "1.1.0", waves=1)


class _Chaos:
    """A client that repeats every update message it sees (reports, desired states, data frames),
    each copy after a random delay: duplicates, and out of order with what follows. Its own copies
    do not come back to it (MQTT 5 no-local)."""

    TOPICS = ("edgeglm/v1/dev/+/report", "edgeglm/v1/dev/+/data", "edgeglm/v1/dev/+/desired")

    def __init__(self, port: int) -> None:
        import paho.mqtt.client as paho
        from paho.mqtt.enums import CallbackAPIVersion
        from paho.mqtt.subscribeoptions import SubscribeOptions

        self.rng = random.Random(7)
        self.copies = 0
        self.desired: list[tuple[str, bytes, Any]] = []
        self.c = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
        opts = SubscribeOptions(qos=1, noLocal=True)
        self.c.on_connect = lambda c, *_: c.subscribe([(t, opts) for t in self.TOPICS])
        self.c.on_message = self._on_message
        self.c.connect("127.0.0.1", port)
        self.c.loop_start()

    def _on_message(self, _c: Any, _u: Any, msg: Any) -> None:
        if msg.retain:
            return  # a retained copy replayed at subscribe time
        if msg.topic.endswith("/desired"):
            self.desired.append((msg.topic, msg.payload, msg.properties))
        delay = self.rng.uniform(0.05, 1.5)
        threading.Timer(delay, self._repeat, args=(msg.topic, msg.payload, msg.properties)).start()

    def _repeat(self, topic: str, payload: bytes, props: Any) -> None:
        self.copies += 1
        self.c.publish(topic, payload, qos=1, properties=props)

    def replay_desired_backwards(self) -> int:
        """Every desired state seen, newest first: each older than the one before it."""
        for topic, payload, props in reversed(self.desired):
            self.c.publish(topic, payload, qos=1, properties=props).wait_for_publish(5)
        return len(self.desired)

    def close(self) -> None:
        self.c.loop_stop()
        self.c.disconnect()


def test_duplicated_and_reordered_mqtt_messages(fleet: LocalFleet, versions: Versions) -> None:
    """Every report, data frame and desired state arrives twice, the copy late. The rollout still
    completes; then an operator rollback to 1.0.0, after which every earlier desired state is
    replayed newest-first: the boxes ignore the stale ones and stay on 1.0.0."""
    chaos = _Chaos(fleet.start_broker())
    try:
        _start(fleet, versions)
        rollout = _deploy(fleet)
        r = _converged(fleet, rollout, "completed", "1.1.0", waves=1)
        assert chaos.copies > 10, chaos.copies
        assert all(d["state"] == "succeeded" and d["last_step"] == "committed" for d in r["deployments"])

        back = fleet.api().request(
            "POST", "/api/v1/rollbacks", json_body={"model": MODEL, "selector": {"site": "demo"}}
        )
        assert back["reverted"], back
        want = f"{MODEL}@1.0.0"
        wait_for(lambda: _currents(fleet) == {b: want for b in BOXES}, 60, "the rollback")
        assert chaos.replay_desired_backwards() >= 2 * len(BOXES)
        for box in BOXES:
            wait_for(lambda b=box: "ignored a stale desired state" in fleet.agents[b].proc.log(), 20, "stale")
        time.sleep(2)
        assert _currents(fleet) == {b: want for b in BOXES}
        for box in BOXES:
            assert fleet.agents[box].status()["slot_" + fleet.agents[box].status()["active_slot"]] == want
    finally:
        chaos.close()
