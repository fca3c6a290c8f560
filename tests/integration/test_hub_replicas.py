"""Three hub replicas on one PostgreSQL and one broker; one of them killed with SIGKILL mid-wave.

Three ``edgectl hub serve`` processes share one database (a schema of its own), one mosquitto and
one fleet key; each has its own data folder, so every byte a replica serves comes from the piece
store they share in the database. A bundle is published through the first replica's HTTP API.
The devices are the agent's own update machinery in this process (``UpdateWorker`` driving the
``UpdateMachine``, an ``MqttFetcher`` with small batches under a bandwidth cap, a real
``PieceStore``, A/B slots), one MQTT connection each; only the engine is left out (activation
checks the bundle's signature and serves nothing). Their fetch requests go through the broker's
shared subscription, so all three replicas answer them: before the kill, each replica's
``edgeglm_hub_pieces_served_total`` (its /metrics) is above zero.

The rollout runs in two waves. Once the first wave has settled and the second is downloading, the
replica that holds the rollout controller's lease is killed with SIGKILL: the broker drops its
session, its requests in flight time out and are asked again of the others, and another replica
takes the lease and finishes the rollout. Every device ends on the new version and no piece that
passed verification was fetched twice (``UpdateMachine.fetched``).
"""

from __future__ import annotations

import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import PG_ADMIN, Publisher, _pg_reachable
from tests.tensor_bundles import tensor_bundle

pytestmark = pytest.mark.integration

MODEL, PROFILE = "glm-tiny", "cpu-x86-int4"
BOXES = [f"replica-box-{i}" for i in range(6)]
PIECE = 32 * 1024  # tensor ``a`` (512 KiB) is 16 pieces: each box asks for them 2 at a time
CAP = 96_000  # bytes/s per box: a box's download takes a few seconds, so the kill lands mid-wave
SERVED = "edgeglm_hub_pieces_served_total"  # by transport; these boxes fetch over MQTT only


def _until(check: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while not (got := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not reached in {timeout:.0f}s")
        time.sleep(0.1)
    return got


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A migrated-by-the-hubs, empty PostgreSQL schema for the replicas, dropped afterwards."""
    import sqlalchemy as sa

    why = _pg_reachable()
    if why:
        pytest.fail(f"PostgreSQL at 127.0.0.1:5432 is required for the replica test: {why}")
    schema = f"hub_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(PG_ADMIN)
    with admin.begin() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    try:
        yield f"{PG_ADMIN}?options=-csearch_path%3D{schema}"
    finally:
        with admin.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


class _Activation:
    """The agent's activation without an engine: the slot's manifest must verify; nothing serves."""

    def __init__(self, trusted: dict[str, Any]) -> None:
        self.trusted = trusted

    def __call__(self, folder: Path) -> None:
        from edgeglm.bundle import load_manifest

        load_manifest(folder, self.trusted)

    def serving(self) -> None:
        return None

    def discard(self) -> None:
        return None


class Box:
    """One device: 1.0.0 installed in slot b, the agent's update worker on its own MQTT link,
    status (retained, with a last will) and a heartbeat every half second naming what it runs."""

    def __init__(
        self, root: Path, device_id: str, port: int, v1: Path, trusted: dict[str, Any], fleet: dict[str, Any]
    ) -> None:
        from edge_agent.fetch import MqttFetcher
        from edge_agent.update.slots import Slots
        from edge_agent.update.state import StateStore
        from edge_agent.update.worker import UpdateWorker
        from edgeglm.assembler import assemble_bundle
        from edgeglm.bundle import load_manifest
        from edgeglm.bundle_files import ingest_folder
        from edgeglm.mqtt import BrokerSettings, MqttLink
        from edgeglm.piece_store import PieceStore
        from edgeglm.protocol import desired_topic, status_topic

        self.id = device_id
        self.slots = Slots(root / "slots")
        self.store = PieceStore(root / "pieces")
        manifest, doc = load_manifest(v1, None)
        ingest_folder(v1, manifest, self.store)
        assemble_bundle(manifest, doc, self.store, self.slots.clear("b"))
        self.slots.switch("b")
        self.seq = 0
        self.lock = threading.Lock()
        settings = BrokerSettings(port=port, reconnect_min_s=0.2, reconnect_max_s=1.0)
        self.link = MqttLink(
            settings, device_id, will=(status_topic(device_id), self._status("offline"), 1, True)
        )
        fetcher = MqttFetcher(
            self.link, device_id, batch=2, timeout_s=3.0, bandwidth_bytes_s=CAP, holds=self.store.__contains__
        )
        self.worker = UpdateWorker(
            StateStore(root / "agent.db"),
            self.store,
            self.slots,
            fetcher,
            trusted,
            _Activation(trusted),  # type: ignore[arg-type]
            device_id=device_id,
            fleet_keys=fleet,
            profile=PROFILE,
            report=self._report,
        )
        self.link.subscribe(desired_topic(device_id), 1, self.worker.on_desired)
        self._stop = threading.Event()

    @property
    def version(self) -> str | None:
        m = self.slots.manifest(self.slots.active_name())
        return m.version if m is not None else None

    def _next(self) -> int:
        with self.lock:
            self.seq += 1
            return self.seq

    def _status(self, state: str) -> bytes:
        from edgeglm.protocol import Status, encode

        return encode(
            Status(
                device_id=self.id,
                state=state,  # type: ignore[arg-type]
                profile=PROFILE,
                model=MODEL,
                version=self.version if state == "online" else None,
                agent_version="0.1.0",
                ts=time.time(),
            )
        )

    def _report(
        self,
        rollout_id: int | None,
        version: str,
        step: str,
        ok: bool,
        reason: str | None,
        progress: dict[str, int] | None,
    ) -> None:
        from edgeglm.protocol import Progress, Report, encode, report_topic, status_topic

        rep = Report(
            device_id=self.id,
            rollout_id=rollout_id,
            step=step,
            seq=self._next(),
            ok=ok,
            reason=reason[:500] if reason else None,
            progress=Progress(**progress) if progress else None,
            version=version,
            ts=time.time(),
        )
        self.link.publish(report_topic(self.id), encode(rep), qos=1)
        self.link.publish(status_topic(self.id), self._status("online"), qos=1, retain=True)

    def _beat(self) -> None:
        from edgeglm.protocol import Health, Heartbeat, encode, heartbeat_topic, status_topic

        self.link.publish(status_topic(self.id), self._status("online"), qos=1, retain=True)
        health = Health(
            latency_p50_ms=40,
            latency_p95_ms=80,
            tokens_per_s=20,
            error_rate=0.0,
            queue_depth=0,
            rss_mb=100,
            requests=0,
            errors=0,
        )
        while not self._stop.wait(0.5):
            beat = Heartbeat(
                device_id=self.id,
                ts=time.time(),
                model=MODEL,
                version=self.version,
                health=health,
                seq=self._next(),
            )
            self.link.publish(heartbeat_topic(self.id), encode(beat), qos=0)

    def start(self) -> Box:
        self.link.connect()
        self.worker.start()
        threading.Thread(target=self._beat, name=f"beat-{self.id}", daemon=True).start()
        return self

    @property
    def fetched(self) -> list[str]:
        return list(self.worker.machine.fetched)

    def stop(self) -> None:
        self._stop.set()
        self.worker.stop()
        self.link.close()


def test_three_replicas_serve_one_rollout_and_survive_a_kill_mid_wave(
    pg_url: str, private_broker: int, publisher: Publisher, tmp_path: Path
) -> None:
    from edgectl.demo.procs import HubProc
    from edgectl.hub_client import HubClient
    from edgectl.registry_cmd import publish_bundle
    from edgeglm.keys import load_public_keys

    v1 = tensor_bundle(publisher.root, publisher.key, "1.0.0", 0.0, piece_bytes=PIECE)
    v11 = tensor_bundle(publisher.root, publisher.key, "1.1.0", 1e-3, piece_bytes=PIECE)
    hubs: list[HubProc] = []
    boxes: list[Box] = []
    try:
        for i in range(3):  # one fleet key on every replica, each its own data folder
            root = tmp_path / f"hub-{i}"
            if hubs:
                root.mkdir()
                for name in ("fleet.key", "fleet.pub"):
                    shutil.copy2(hubs[0].root / name, root / name)
            hub = HubProc(root, pg_url, private_broker, publisher.public_path)
            if not hubs:
                hub.migrate()
            hubs.append(hub.start())
        op = HubClient(hubs[0].url, hubs[0].create_token("replica-ops", "operator"))
        for folder in (v1, v11):
            publish_bundle(op, folder, progress=False)  # through the first replica only

        trusted = dict(load_public_keys([publisher.public_path]))
        fleet = dict(load_public_keys([hubs[0].fleet_public]))
        for device_id in BOXES:
            boxes.append(Box(tmp_path / device_id, device_id, private_broker, v1, trusted, fleet).start())

        def api(method: str, path: str, body: Any = None) -> Any:
            alive = next(h for h in hubs if h.proc.alive())  # the load balancer's choice
            client = HubClient(alive.url, op.token)
            return client.request(method, path, json_body=body) if body else client.request(method, path)

        _until(
            lambda: {d["id"] for d in api("GET", "/api/v1/devices?online=true")} >= set(BOXES),
            60,
            "every box registered",
        )
        rollout = api(
            "POST",
            "/api/v1/rollouts",
            {
                "release": f"{MODEL}@1.1.0",
                "waves": ["50", "100"],
                "soak_s": 0,
                "max_failure_ratio": 0,
                "device_timeout_s": 180,
            },
        )
        rid = rollout["id"]
        first = {d["device"] for d in api("GET", f"/api/v1/rollouts/{rid}")["deployments"] if d["wave"] == 0}
        second = [b for b in boxes if b.id not in first]

        def mid_second_wave() -> bool:
            view = api("GET", f"/api/v1/rollouts/{rid}?devices=false")
            return view["current_wave"] == 1 and any(b.fetched and b.version == "1.0.0" for b in second)

        _until(mid_second_wave, 120, "the second wave downloading")
        served = [h.metric(SERVED) for h in hubs]
        assert all(n > 0 for n in served), f"pieces served per replica before the kill: {served}"
        victim = next(h for h in hubs if h.proc.pid is not None and _holds_lease(pg_url, h.proc.pid))
        victim.proc.kill9()  # SIGKILL: no goodbye to the broker, the lease left to expire

        def ended() -> dict[str, Any] | None:
            view: dict[str, Any] = api("GET", f"/api/v1/rollouts/{rid}?devices=false")
            return view if view["state"] != "running" else None

        done = _until(ended, 180, "the rollout to end")
        assert done["state"] == "completed", done
        assert {b.id: b.version for b in boxes} == dict.fromkeys(BOXES, "1.1.0")
        for b in boxes:
            assert b.fetched, f"{b.id} fetched nothing"
            twice = sorted({p for p in b.fetched if b.fetched.count(p) > 1})
            assert not twice, f"{b.id} fetched verified pieces again: {twice}"
        survivors = [h for h in hubs if h is not victim]
        after = [h.metric(SERVED) for h in survivors]
        before = [n for h, n in zip(hubs, served, strict=True) if h is not victim]
        assert any(a > b for a, b in zip(after, before, strict=True)), "the survivors served the rest"
    finally:
        for b in boxes:
            b.stop()
        for h in reversed(hubs):
            h.proc.stop()


def _holds_lease(url: str, pid: int) -> bool:
    """Whether hub process ``pid`` holds the rollout controller's lease (its holder names the pid)."""
    import sqlalchemy as sa

    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            holder = conn.execute(
                sa.text("SELECT holder FROM leases WHERE name = 'rollout-controller'")
            ).scalar()
    finally:
        engine.dispose()
    return str(holder or "").split(":")[1:2] == [str(pid)]
