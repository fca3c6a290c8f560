"""``edge-agent run`` as a real process against the real hub gateway and a private mosquitto.

A tiny trained GLM is exported once (``tiny_bundle``); ``1.1.0`` is a fine-tune of it (10% of the
float tensors moved by 0.1%), ``1.2.0`` is broken (every norm zeroed: its smoke test fails).
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from edgectl.demo.agent_box import AgentBox
from edgectl.demo.partition import TcpProxy
from edgectl.demo.procs import ManagedBroker, tool, wait_for
from edgectl.demo.wire import Wire
from tests.agent_bundles import derive
from tests.hub_desired import recorder
from tests.integration.test_hub_rollouts import register

pytestmark = pytest.mark.integration


@dataclass
class Versions:
    v1: Path
    v11: Path
    bad: Path
    big: Path  # 1.3.0: every float tensor retrained (a download long enough to interrupt)
    public: Path
    key: Any


@pytest.fixture(scope="module")
def versions(tiny_bundle: Any, tmp_path_factory: pytest.TempPathFactory) -> Versions:
    from edgeglm.keys import load_private_key

    folder, _profile, public = tiny_bundle("fused-int8")
    key = load_private_key(public.with_suffix(".key"))
    root = tmp_path_factory.mktemp("agent-versions")
    return Versions(
        v1=folder,
        v11=derive(folder, root / "1.1.0", key, "1.1.0", scale=1.001),
        bad=derive(folder, root / "1.2.0", key, "1.2.0", scale=0.0, names=("norm",), smoke="source"),
        big=derive(folder, root / "1.3.0", key, "1.3.0", fraction=1.0, noise=1e-3),
        public=public,
        key=key,
    )


@dataclass
class World:
    root: Path
    broker: ManagedBroker
    ctx: Any
    wire: Wire
    versions: Versions
    device_id: str

    def agent(self, port: int | None = None, **config: Any) -> AgentBox:
        config.setdefault("bootstrap_bundle", str(self.versions.v1))
        config.setdefault("fleet_keys", [str(self.wire.fleet_public)])
        port = port or self.broker.port
        return AgentBox(self.root / "box", self.device_id, port, self.versions.public, **config)


@pytest.fixture
def world(versions: Versions, tmp_path: Path) -> Iterator[World]:
    from cloud_hub.db import migrate
    from cloud_hub.server import build_context, start_ingest
    from cloud_hub.settings import HubSettings
    from edgeglm.mqtt import BrokerSettings

    broker = ManagedBroker(tmp_path).start()
    migrate(f"sqlite:///{tmp_path / 'hub.db'}")
    ctx = build_context(
        HubSettings(
            data_dir=tmp_path / "hub",
            db_url=f"sqlite:///{tmp_path / 'hub.db'}",
            trusted_keys=(versions.public,),
        )
    )
    for folder in (versions.v1, versions.v11, versions.bad, versions.big):
        register(ctx, folder)
    link, ingest = start_ingest(ctx, BrokerSettings(port=broker.port), f"hub-{uuid.uuid4().hex[:6]}")
    device = f"box-{uuid.uuid4().hex[:6]}"
    (tmp_path / "box").mkdir()
    wire = Wire(broker.port, device, record=recorder(ctx, device))  # desire() records it in the hub
    try:
        yield World(tmp_path, broker, ctx, wire, versions, device)
    finally:
        wire.close()
        link.close()
        ingest.stop()
        ctx.gateway.close()
        ctx.db.dispose()
        broker.stop()


def _committed(wire: Wire, rollout: int) -> bool:
    return ("committed", True) in wire.steps(rollout)


def _ended(wire: Wire, rollout: int) -> bool:
    return any(step in ("committed", "failed") for step, _ in wire.steps(rollout))


def test_the_daemon_updates_serves_and_reverts_without_downloading(world: World) -> None:
    agent = world.agent().start()
    try:
        agent.wait_log(r"edge agent \S+ up")
        assert world.wire.ask().error is None
        wait_for(
            lambda: any(s.version == "1.0.0" and s.state == "online" for s in world.wire.status), 20, "status"
        )

        world.wire.desire(world.versions.v11, 11)
        wait_for(lambda: _ended(world.wire, 11), 120, "the update to 1.1.0")
        assert _committed(world.wire, 11), world.wire.steps(11)
        assert agent.active_version() == "1.1.0"
        assert world.wire.ask().error is None
        wait_for(lambda: world.wire.online("1.1.0"), 20, "status online 1.1.0")
        fetched = agent.verified_pieces()
        assert fetched and len(fetched) == len(set(fetched))
        progress = [r.progress for r in world.wire.reports if r.step == "downloading" and r.progress]
        assert progress and progress[-1].bytes_done == progress[-1].bytes_total

        world.wire.desire(world.versions.v1, 12)
        wait_for(lambda: _ended(world.wire, 12), 60, "the revert to 1.0.0")
        assert _committed(world.wire, 12), world.wire.steps(12)
        assert agent.active_version() == "1.0.0"
        assert agent.verified_pieces() == fetched  # the revert fetched nothing
        assert "reusing the loaded tiny-edge@1.0.0 (standby)" in agent.log()  # and loaded nothing
        assert world.wire.ask().error is None
        out = subprocess.run(
            [tool("edge-agent"), "status", "--config", str(agent.config_path), "--output", "json"],
            capture_output=True,
            text=True,
            check=True,
        )
        status = json.loads(out.stdout)
        assert status["slot_" + status["active_slot"]] == "tiny-edge@1.0.0"
        assert {status["slot_a"], status["slot_b"]} == {"tiny-edge@1.0.0", "tiny-edge@1.1.0"}
        assert status["last_update"]["step"] == "committed" and status["last_update"]["rollout_id"] == "12"
    finally:
        agent.stop()
    assert agent.proc.popen is not None and agent.proc.popen.returncode == 0
    offline = [s for s in world.wire.status if s.state == "offline"]
    assert offline, "a clean stop publishes the retained offline status"


BANDWIDTH = 20_000  # bytes/s: the 1.3.0 update then takes several seconds


def _step(agent: AgentBox) -> str | None:
    rec = agent.state()
    return rec.step if rec is not None else None


def _settled(agent: AgentBox) -> bool:
    return agent.state().step in ("committed", "failed")


def _answers(world: World, agent: AgentBox, version: str) -> None:
    """The agent is up on ``version`` and answers a request."""
    wait_for(lambda: world.wire.online(version), 60, f"status online {version}")
    reply = world.wire.ask()
    assert reply.error is None and reply.done, reply


@pytest.mark.parametrize(
    ("step", "target", "final"),
    [
        ("fetching_manifest", "v11", "1.1.0"),
        ("downloading", "v11", "1.1.0"),
        ("assembling", "v11", "1.1.0"),
        ("verifying", "v11", "1.1.0"),
        ("activating", "v11", "1.1.0"),
        ("activating:switch", "v11", "1.1.0"),
        ("committed", "v11", "1.1.0"),
        ("rolling_back", "bad", "1.0.0"),
        ("failed", "bad", "1.0.0"),
    ],
)
def test_kill_9_at_every_persisted_step_then_restart(
    world: World, step: str, target: str, final: str
) -> None:
    """SIGKILL right after the step is persisted; the restarted agent finishes or rolls back."""
    from edge_agent.daemon import FAULT_ENV

    agent = world.agent()
    agent.start(env={FAULT_ENV: step})
    try:
        agent.wait_log(r"edge agent \S+ up")
        world.wire.desire(getattr(world.versions, target), 21)
        assert agent.wait_exit(120) == -9  # killed at the step
        assert agent.state().step == step.split(":")[0]
        agent.start()  # no fault this time: the retained desired state is still there
        wait_for(lambda: _ended(world.wire, 21) and agent.state().step in ("committed", "failed"), 120, "end")
        assert agent.active_version() == final
        _answers(world, agent, final)
        ok = final == "1.1.0"
        assert (("committed", True) in world.wire.steps(21)) == ok, world.wire.steps(21)
        if not ok:
            assert ("failed", False) in world.wire.steps(21)
        pieces = agent.verified_pieces()
        assert len(pieces) == len(set(pieces)), "a verified piece was fetched twice"
    finally:
        agent.stop()


def test_kill_9_at_random_moments_during_download(world: World) -> None:
    rng = random.Random(int(os.environ.get("EDGEGLM_TEST_SEED", "7")))
    agent = world.agent(update={"bandwidth_bytes_s": BANDWIDTH})
    agent.start()
    agent.wait_log(r"edge agent \S+ up")
    world.wire.desire(world.versions.big, 31)
    kills = 0
    try:
        mark, started = 0, r"report fetching_manifest ok=True"
        while kills < 3:
            agent.wait_log(started, 60, after=mark)  # this run is downloading
            time.sleep(rng.uniform(0.1, 1.5))
            if agent.state().step != "downloading":
                break
            agent.kill9()
            kills += 1
            mark, started = len(agent.log()), r"resuming update to \S+ at downloading"
            agent.start()
        wait_for(lambda: _ended(world.wire, 31), 120, "the update to end")
        assert _committed(world.wire, 31), world.wire.steps(31)
        assert kills >= 2, "the download was too quick to be interrupted"
        assert agent.active_version() == "1.3.0"
        _answers(world, agent, "1.3.0")
        pieces = agent.verified_pieces()
        assert len(pieces) == len(set(pieces)), "a verified piece was fetched twice"
    finally:
        agent.stop()


def test_broker_down_for_30s_during_download_then_it_continues(world: World) -> None:
    agent = world.agent(update={"bandwidth_bytes_s": BANDWIDTH // 2})
    agent.start()
    try:
        agent.wait_log(r"edge agent \S+ up")
        world.wire.desire(world.versions.big, 41)
        wait_for(lambda: len(agent.verified_pieces()) >= 3, 60, "the download to get going")
        before = len(agent.verified_pieces())
        world.broker.stop()
        time.sleep(30)
        during = len(agent.verified_pieces())
        assert agent.state().step == "downloading"
        world.broker.start()
        wait_for(lambda: _ended(world.wire, 41), 120, "the update to end after the outage")
        assert _committed(world.wire, 41), world.wire.steps(41)
        pieces = agent.verified_pieces()
        assert len(pieces) == len(set(pieces)), "a piece verified before the outage was fetched again"
        assert before <= during < len(pieces)
        assert agent.proc.alive()  # one process all along
        _answers(world, agent, "1.3.0")
    finally:
        agent.stop()


class Tamper:
    """Wraps the real gateway's ``send``: flips a byte in chosen pieces once, or swaps manifests."""

    def __init__(self, send: Any) -> None:
        self.send = send
        self.flip: set[str] = set()  # piece ids (hex) to corrupt the first time they go out
        self.flipped: list[str] = []
        self.manifest: bytes | None = None  # sent instead of whatever manifest is asked for

    def __call__(self, topic: str, payload: bytes, correlation: bytes) -> None:
        from edgeglm.piece_store import piece_id
        from edgeglm.protocol import Frame, FrameKind, PieceEncoding, split_payload

        frame = Frame.unpack(payload)
        pid = frame.piece_id.hex()
        if frame.kind == FrameKind.MANIFEST and self.manifest is not None:
            for f in split_payload(
                FrameKind.MANIFEST,
                PieceEncoding.RAW,
                piece_id=bytes.fromhex(piece_id(self.manifest)),
                piece_size=len(self.manifest),
                payload=self.manifest,
            ):
                self.send(topic, f.pack(), correlation)
            return
        if frame.kind == FrameKind.PIECE and pid in self.flip and frame.part == 0:
            self.flip.discard(pid)
            self.flipped.append(pid)
            body = bytearray(frame.payload)
            body[len(body) // 2] ^= 0x10
            fields = {k: getattr(frame, k) for k in frame.__dataclass_fields__}
            payload = Frame(**{**fields, "payload": bytes(body)}).pack()
        self.send(topic, payload, correlation)


def _tamper(world: World) -> Tamper:
    t = Tamper(world.ctx.gateway.send)
    world.ctx.gateway.send = t
    return t


def test_a_flipped_byte_in_a_piece_is_rejected_and_fetched_again(world: World) -> None:
    from edgeglm.bundle import load_manifest

    tamper = _tamper(world)
    old = load_manifest(world.versions.v1, None)[0].piece_ids()
    new = [p for p in load_manifest(world.versions.big, None)[0].piece_ids() if p not in old]
    tamper.flip = set(new[:3])
    agent = world.agent().start()
    try:
        agent.wait_log(r"edge agent \S+ up")
        world.wire.desire(world.versions.big, 51)
        wait_for(lambda: _ended(world.wire, 51), 120, "the update")
        assert _committed(world.wire, 51), world.wire.steps(51)
        assert len(tamper.flipped) == 3
        assert len(re.findall(r"piece \w+ rejected", agent.log())) == 3
        pieces = agent.verified_pieces()
        assert set(tamper.flipped) <= set(pieces) and len(pieces) == len(set(pieces))
        _answers(world, agent, "1.3.0")
    finally:
        agent.stop()


def _signed_doc(folder: Path) -> dict[str, Any]:
    import json

    return json.loads((folder / "manifest.json").read_text())


@pytest.mark.parametrize("case", ["bad_signature", "dotdot_path"])
def test_a_bad_manifest_is_refused_reported_and_the_current_model_keeps_serving(
    world: World, case: str
) -> None:
    import base64
    import json

    from edgeglm.bundle import canonical_bytes
    from edgeglm.keys import key_id

    doc = _signed_doc(world.versions.v11)
    if case == "bad_signature":
        doc["quality"] = {**doc.get("quality", {}), "passed": True, "note": "edited after signing"}
    else:  # validly signed by the trusted key, but a file path climbs out of the slot
        doc = {k: v for k, v in doc.items() if k != "signature"}
        doc["files"][0]["path"] = "../../escaped.txt"
        key = world.versions.key
        signature = base64.b64encode(key.sign(canonical_bytes(doc))).decode()
        doc["signature"] = {"alg": "ed25519", "key_id": key_id(key.public_key()), "value": signature}
    tamper = _tamper(world)
    tamper.manifest = json.dumps(doc).encode()
    agent = world.agent().start()
    try:
        agent.wait_log(r"edge agent \S+ up")
        world.wire.desire(world.versions.v11, 61)
        wait_for(lambda: _ended(world.wire, 61), 60, "the refusal")
        failed = [r for r in world.wire.reports if r.rollout_id == 61 and r.step == "failed"]
        assert failed and not failed[0].ok and failed[0].reason, world.wire.steps(61)
        assert ("committed", True) not in world.wire.steps(61)
        assert agent.active_version() == "1.0.0"
        assert not agent.verified_pieces()  # nothing was downloaded for a refused manifest
        assert not (agent.root / "escaped.txt").exists() and not (agent.data / "escaped.txt").exists()
        _answers(world, agent, "1.0.0")
    finally:
        agent.stop()


def test_telemetry_waits_in_the_outbox_through_a_partition_and_a_kill(world: World) -> None:
    """Cut the agent off (a TCP proxy), kill -9 it while cut, restart, reconnect: every heartbeat
    queued while cut arrives, in order, none lost across the restart."""
    proxy = TcpProxy(world.broker.port)
    agent = world.agent(port=proxy.port).start()
    try:
        agent.wait_log(r"edge agent \S+ up")
        wait_for(lambda: len(world.wire.heartbeats) >= 2, 20, "heartbeats")
        proxy.cut()
        time.sleep(0.5)
        cut_at = max(h.seq for h in world.wire.heartbeats)
        time.sleep(2.0)  # ~4 heartbeats into the outbox
        agent.kill9()
        agent.start()  # still cut off: it serves nothing over MQTT but keeps queueing
        agent.wait_log(r"edge agent \S+ up", after=len(agent.log()) - 200)
        time.sleep(2.0)
        assert max(h.seq for h in world.wire.heartbeats) == cut_at  # nothing got through
        proxy.restore()
        wait_for(lambda: max(h.seq for h in world.wire.heartbeats) > cut_at + 8, 30, "the backlog")
        seqs = [h.seq for h in world.wire.heartbeats]
        assert seqs == sorted(seqs), "the outbox sends in order"
        after = [s for s in seqs if s > cut_at]
        assert after[0] == cut_at + 1 and after == list(range(after[0], after[0] + len(after)))
        queued = [h for h in world.wire.heartbeats if h.seq > cut_at][:4]
        assert all(h.ts < time.time() - 1.0 for h in queued), "heartbeats from the cut arrive late"
    finally:
        agent.stop()
        proxy.cut()


def test_a_newer_desired_state_supersedes_a_download_in_progress(world: World) -> None:
    agent = world.agent(update={"bandwidth_bytes_s": BANDWIDTH // 2}).start()
    try:
        agent.wait_log(r"edge agent \S+ up")
        world.wire.desire(world.versions.big, 71)
        wait_for(lambda: len(agent.verified_pieces()) >= 2, 60, "the download to get going")
        world.wire.desire(world.versions.v11, 72)  # the hub changed its mind
        wait_for(lambda: _ended(world.wire, 72), 120, "the newer update")
        failed = [r for r in world.wire.reports if r.rollout_id == 71 and r.step == "failed"]
        assert failed and "superseded" in (failed[0].reason or "")
        assert _committed(world.wire, 72) and agent.active_version() == "1.1.0"
        _answers(world, agent, "1.1.0")
    finally:
        agent.stop()


def test_the_http_api_and_metrics_follow_the_engine_an_update_swaps_in(world: World) -> None:
    """``serving.http_listen``: OpenAI-compatible completions and Prometheus /metrics from the
    daemon, answered by whichever engine serves now (1.0.0, then 1.1.0 after the update)."""
    import urllib.request

    from edgectl.demo.procs import free_port

    port = free_port()
    agent = world.agent(serving={"http_listen": f"127.0.0.1:{port}"}).start()
    base = f"http://127.0.0.1:{port}"

    def get(path: str) -> Any:
        with urllib.request.urlopen(base + path, timeout=10) as r:
            body = r.read().decode()
        return json.loads(body) if path != "/metrics" else body

    try:
        agent.wait_log(r"edge agent \S+ up")
        assert get("/healthz")["version"] == "1.0.0"
        req = urllib.request.Request(
            base + "/v1/completions",
            data=json.dumps({"prompt": "The sensor reads", "max_tokens": 4}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=30) as r:
            done = json.loads(r.read())
        assert done["model"] == "tiny-edge" and done["usage"]["completion_tokens"] > 0
        assert re.search(r'^edgeglm_agent_requests_total\{outcome="length"\} [1-9]', get("/metrics"), re.M)

        world.wire.desire(world.versions.v11, 81)
        wait_for(lambda: _ended(world.wire, 81), 120, "the update to 1.1.0")
        assert _committed(world.wire, 81)
        assert get("/healthz")["version"] == "1.1.0"
    finally:
        agent.stop()


def test_an_http_port_already_taken_is_a_config_error(world: World) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        agent = world.agent(serving={"http_listen": f"127.0.0.1:{port}"}).start()
        assert agent.wait_exit(60) == 78
    assert "serving.http_listen: cannot listen on 127.0.0.1:" in agent.log()
    assert "Traceback" not in agent.log()


def test_a_bundle_exported_with_a_profile_file_is_served_without_naming_the_profile_again(
    tiny_checkpoints: Any, tmp_path: Path
) -> None:
    """``edgectl export --profile acme.toml`` records the profile in the manifest: ``edgectl agent
    infer`` and ``edge-agent run`` (config without ``profile``) serve the bundle with it, on a box
    that has no such profile file."""
    from edgeglm.keys import create_keypair
    from edgeglm.profiles import profiles_dir
    from export.tiny_glm import heldout_prompts

    text = (profiles_dir() / "cpu-x86-int8.toml").read_text()
    text = re.sub(r"^name = .*$", 'name = "acme-gateway"', text, flags=re.M)
    text = re.sub(r"^max_context = .*$", "max_context = 384", text, flags=re.M)
    assert 'name = "acme-gateway"' in text and "max_context = 384" in text
    custom = tmp_path / "profiles-of-the-build-host" / "acme.toml"
    custom.parent.mkdir()
    custom.write_text(text)
    private, public, _ = create_keypair(tmp_path / "keys", "release")
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps(heldout_prompts()))
    edgectl = tool("edgectl")
    bundle = tmp_path / "bundle"
    checkpoint = str(tiny_checkpoints("glm-edge"))
    args = ["--profile", str(custom), "--version", "1.0.0", "--key", str(private), "--out", str(bundle)]
    run = subprocess.run(
        [edgectl, "export", checkpoint, *args, "--eval-prompts", str(prompts), "-o", "json"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr
    custom.unlink()  # the box never sees the file

    info = json.loads(
        subprocess.run(
            [edgectl, "export", "inspect", str(bundle), "-o", "json"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    assert info["profile"] == "acme-gateway" and info["device_profile"]["max_context"] == 384

    infer = subprocess.run(
        [
            edgectl,
            "agent",
            "infer",
            str(bundle),
            "--trust",
            str(public),
            "--prompt",
            "The sensor reads",
            "--max-tokens",
            "4",
            "-o",
            "json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert infer.returncode == 0, infer.stderr
    assert json.loads(infer.stdout)["completion_tokens"] >= 1
    too_long = subprocess.run(
        [edgectl, "agent", "infer", str(bundle), "--prompt", "reading " * 400, "-o", "json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert too_long.returncode != 0 and "384" in too_long.stderr  # the recorded context, not 2048

    broker = ManagedBroker(tmp_path).start()
    device = f"box-{uuid.uuid4().hex[:6]}"
    (tmp_path / "box").mkdir()
    wire = Wire(broker.port, device)
    agent = AgentBox(
        tmp_path / "box", device, broker.port, public, profile=None, bootstrap_bundle=str(bundle)
    )
    try:
        agent.start()
        agent.wait_log(r"edge agent \S+ up \(profile acme-gateway")
        reply = wire.ask()
        assert reply.error is None and reply.usage is not None and reply.usage.completion_tokens >= 1
        wait_for(
            lambda: any(s.profile == "acme-gateway" and s.state == "online" for s in wire.status),
            20,
            "status",
        )
    finally:
        agent.stop()
        wire.close()
        broker.stop()
