"""Attacks on the fetch path by someone with broker access (issue 21), against a private mosquitto,
the hub's real gateway (in process, SQLite) and, where it matters, a real ``edge-agent run``.

Each test failed on the code before device-scoped fetches. Checked by running this file in a copy
of this change whose cloud_hub/, edge_agent/ and edgeglm/ were those of commit 474f66a (tests/ and
the edgectl/demo harness as here, PYTHONPATH pointing at the copy): (i) the old hub answered a fetch
naming device A, sent by B on the one shared ``edgeglm/v1/hub/fetch``, on A's data topic (the spy
saw A's manifest); (ii) it served the untargeted 1.3.0 manifest and pieces and another profile's
manifest; (iii) the old agent took the attacker's 60 MiB manifest frame as the start of the
manifest, the hub's frames then raised out of the assembler, and the update failed; (iv) the
flooding device was never told ``rate_limited``.
Topics are spelled out here (not built with ``fetch_topic``) so that the attacks read the same on
both sides of the change.
"""

# ruff: noqa: F811 - the fixtures `world` and `versions` come from test_agent_daemon, by name
from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import pytest

from edgectl.demo.procs import wait_for
from edgeglm.bundle import load_manifest
from edgeglm.mqtt import BrokerSettings, Incoming, MqttLink
from edgeglm.protocol import (
    FRAME_HEADER_SIZE,
    ErrorBody,
    FetchRequest,
    Frame,
    FrameKind,
    PieceEncoding,
    decode,
    encode,
)
from tests.hub_desired import desire_in_hub
from tests.integration.test_agent_daemon import World, versions, world  # noqa: F401 - fixtures

pytestmark = [pytest.mark.integration, pytest.mark.security]

DROPPED = "edgeglm_hub_device_messages_dropped_total"
OLD_FETCH = "edgeglm/v1/hub/fetch"  # the one shared fetch topic before this change
MIB = 1 << 20


def _fetch(device_id: str) -> str:
    return f"edgeglm/v1/dev/{device_id}/fetch"


def _data(device_id: str) -> str:
    return f"edgeglm/v1/dev/{device_id}/data"


@dataclass
class Box:
    """A raw MQTT client playing a device (or an attacker): publishes requests, collects frames."""

    link: MqttLink
    device_id: str
    frames: dict[str, list[Frame]] = field(default_factory=dict)  # data topic -> frames
    lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def on(cls, port: int, device_id: str, *listen: str) -> Box:
        link = MqttLink(BrokerSettings(port=port), f"{device_id}-{uuid.uuid4().hex[:6]}").connect()
        box = cls(link, device_id)
        for topic in listen or (_data(device_id),):
            link.subscribe(topic, 1, box._on_frame)
        time.sleep(0.3)  # the SUBACK
        return box

    def _on_frame(self, msg: Incoming) -> None:
        with self.lock:
            self.frames.setdefault(msg.topic, []).append(Frame.unpack(msg.payload))

    def got(self, topic: str) -> list[Frame]:
        with self.lock:
            return list(self.frames.get(topic, []))

    def ask(self, topic: str, *, qos: int = 1, **fields: Any) -> str:
        rid = uuid.uuid4().hex[:16]
        body = {"device_id": self.device_id, "request_id": rid, "kind": "manifest", **fields}
        self.link.publish(topic, encode(FetchRequest(**body)), qos=qos)
        return rid

    def close(self) -> None:
        self.link.close()


def _release(world: World) -> tuple[str, str]:
    m = load_manifest(world.versions.v11, None)[0]
    return m.model, m.profile


def _codes(frames: list[Frame]) -> list[str]:
    return [decode(ErrorBody, f.payload).code for f in frames if f.kind == FrameKind.ERROR]


# -------------------------------------------------------------------------------- (i)
def test_a_device_cannot_fetch_for_another_device(world: World) -> None:
    model, profile = _release(world)
    a, b = f"box-a-{uuid.uuid4().hex[:6]}", f"box-b-{uuid.uuid4().hex[:6]}"
    for device in (a, b):  # both are targeted: only who asks for whom decides
        desire_in_hub(world.ctx, device, model, "1.1.0", profile=profile)
    spy = Box.on(world.broker.port, "spy", _data("+"))
    box_b = Box.on(world.broker.port, b)
    box_a = Box.on(world.broker.port, a)
    try:
        want = {"model": model, "version": "1.1.0", "profile": profile, "device_id": a}
        box_b.ask(_fetch(b), **want)  # on B's own topic, naming A
        box_b.ask(OLD_FETCH, **want)  # on the old shared topic, naming A
        box_b.ask(_fetch(a), **{**want, "device_id": b})  # on A's topic, the body naming B
        time.sleep(2.0)
        assert spy.got(_data(a)) == [] and spy.got(_data(b)) == []  # nothing went anywhere
        assert world.ctx.metrics.value(DROPPED, reason="wrong_device") == 2  # dropped, counted
        # A asking for itself is answered: the silence above was the refusal, not a broken hub
        box_a.ask(_fetch(a), **want)
        wait_for(lambda: box_a.got(_data(a)), 10, "A's own manifest")
        assert box_a.got(_data(a))[0].kind == FrameKind.MANIFEST
    finally:
        for box in (spy, box_a, box_b):
            box.close()


# ------------------------------------------------------------------------------- (ii)
def test_a_release_or_profile_not_targeted_at_the_device_is_forbidden(world: World) -> None:
    from cloud_hub.models import Device

    model, profile = _release(world)
    device = f"box-{uuid.uuid4().hex[:6]}"
    desire_in_hub(world.ctx, device, model, "1.1.0", profile=profile)  # its target: 1.1.0
    foreign = f"box-{uuid.uuid4().hex[:6]}"
    with world.ctx.db.session() as s:  # registered with another profile, desired 1.1.0
        s.add(Device(id=foreign, profile="cpu-x86-int4", desired_model=model, desired_version="1.1.0"))
    big = load_manifest(world.versions.big, None)[0]
    untargeted = sorted(big.piece_ids())[:8]  # 1.3.0 is published, but never targeted at it
    box = Box.on(world.broker.port, device)
    other = Box.on(world.broker.port, foreign)
    try:
        for topic in (_fetch(device), OLD_FETCH):  # the old shared topic has no listener any more
            box.ask(topic, model=model, version="1.3.0", profile=profile)
            box.ask(topic, kind="pieces", model=model, version="1.3.0", profile=profile, pieces=untargeted)
            box.ask(topic, model=model, version="1.1.0", profile="cpu-x86-int4")  # a foreign profile
        for topic in (_fetch(foreign), OLD_FETCH):
            other.ask(topic, model=model, version="1.1.0", profile=profile)  # not its profile
        wait_for(lambda: len(box.got(_data(device))) >= 3 and other.got(_data(foreign)), 15, "the answers")
        time.sleep(1.0)
        got = box.got(_data(device)) + other.got(_data(foreign))
        assert _codes(got) == ["forbidden"] * 4, _codes(got)
        assert not [f for f in got if f.kind != FrameKind.ERROR]  # no manifest or piece bytes
        assert world.ctx.metrics.value(DROPPED, reason="forbidden") >= 4
    finally:
        box.close()
        other.close()


# ------------------------------------------------------------------------------ (iii)
def _room() -> int:
    from edgeglm.protocol import DEFAULT_MAX_MESSAGE_BYTES

    return DEFAULT_MAX_MESSAGE_BYTES - FRAME_HEADER_SIZE


def _lies(req: FetchRequest, sizes: dict[str, int]) -> list[Frame]:
    """Frames whose sizes disagree with the manifest: 60 MiB pieces, 60 MiB encodings, many parts."""
    if req.kind == "manifest":
        return [
            Frame(
                kind=FrameKind.MANIFEST,
                encoding=PieceEncoding.RAW,
                piece_id=bytes(32),
                piece_size=60 * MIB,
                encoded_size=60 * MIB,
                payload=b"{" * 1000,
                parts=60_000,
            )
        ]
    out = []
    for pid in req.pieces:
        common = {"kind": FrameKind.PIECE, "encoding": PieceEncoding.ZSTD, "piece_id": bytes.fromhex(pid)}
        out.append(
            Frame(**common, piece_size=60 * MIB, encoded_size=60 * MIB, payload=b"p" * 1000, parts=60_000)
        )
        size = sizes[pid]  # the real piece size, an encoding far over what zstd can need for it
        out.append(Frame(**common, piece_size=size, encoded_size=60 * MIB, payload=b"e" * 1000, parts=60_000))
    return out


def _flood(pid: str) -> list[Frame]:
    """One piece claimed at 60 MiB, and all 60 MiB of it sent, part by part."""
    room = _room()
    parts = 60 * MIB // room
    return [
        Frame(
            kind=FrameKind.PIECE,
            encoding=PieceEncoding.ZSTD,
            piece_id=bytes.fromhex(pid),
            piece_size=60 * MIB,
            encoded_size=parts * room,
            payload=bytes([i % 251]) * room,
            part=i,
            parts=parts,
            offset=i * room,
        )
        for i in range(parts)
    ]


def _rss(pid: int) -> int:
    """The process's resident memory in bytes (0 once it has exited)."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            lines = fh.read().splitlines()
    except OSError:
        return 0
    return next((int(line.split()[1]) * 1024 for line in lines if line.startswith("VmRSS:")), 0)


class Attacker:
    """Reads the agent's fetch requests (their ids) and answers each first, with lies."""

    def __init__(self, port: int, device_id: str, sizes: dict[str, int], agent_pid: int) -> None:
        self.device_id, self.sizes, self.agent_pid = device_id, sizes, agent_pid
        self.answered = 0
        self.flooded = threading.Event()
        self.rss_before = 0
        self.link = MqttLink(BrokerSettings(port=port), f"attacker-{uuid.uuid4().hex[:6]}").connect()
        for topic in (_fetch(device_id), OLD_FETCH):
            self.link.subscribe(topic, 1, self._on_request)
        time.sleep(0.3)

    def _on_request(self, msg: Incoming) -> None:
        req = decode(FetchRequest, msg.payload)
        if req.device_id != self.device_id:
            return
        self.answered += 1
        self._send(req, _lies(req, self.sizes))
        if req.kind == "pieces" and not self.flooded.is_set():
            self.rss_before = _rss(self.agent_pid)
            self.flooded.set()
            threading.Thread(target=self._send, args=(req, _flood(req.pieces[0])), daemon=True).start()

    def _send(self, req: FetchRequest, frames: list[Frame]) -> None:
        for frame in frames:
            self.link.publish(_data(self.device_id), frame.pack(), qos=0, correlation=req.request_id.encode())

    def close(self) -> None:
        self.link.close()


def test_frames_whose_sizes_disagree_with_the_manifest_are_dropped_and_the_update_commits(
    world: World,
) -> None:
    m11 = load_manifest(world.versions.v11, None)[0]
    sizes = {pid: size for f in m11.files for pid, size in f.pieces}
    send = world.ctx.gateway.send

    def far_away(topic: str, payload: bytes, correlation: bytes) -> None:
        time.sleep(0.3)  # a hub farther away than the attacker: the lies arrive first
        send(topic, payload, correlation)

    world.ctx.gateway.send = far_away
    agent = world.agent().start()
    attacker = None
    stop = threading.Event()
    try:
        agent.wait_log(r"edge agent \S+ up")
        assert agent.proc.popen is not None
        pid = agent.proc.popen.pid
        attacker = Attacker(world.broker.port, world.device_id, sizes, pid)
        peak = [0]

        def sample() -> None:
            while not stop.wait(0.05):
                peak[0] = max(peak[0], _rss(pid))

        sampler = threading.Thread(target=sample, name="rss-sampler", daemon=True)
        sampler.start()
        world.wire.desire(world.versions.v11, 91)
        ended = lambda: any(s in ("committed", "failed") for s, _ in world.wire.steps(91))  # noqa: E731
        wait_for(lambda: attacker.flooded.is_set() or ended(), 60, "the agent's first pieces request")
        time.sleep(3.0)  # the 60 MiB arrive and are dropped
        flood_peak = peak[0] - attacker.rss_before
        wait_for(ended, 120, "the end of the update")
        assert ("committed", True) in world.wire.steps(91), world.wire.steps(91)
        assert agent.active_version() == "1.1.0"
        log = agent.log()
        assert "dropped a frame for manifest" in log and "manifest limit" in log
        assert "piece_size: 62914560 is not the manifest's" in log
        assert "encoded_size: 62914560 is over" in log
        assert flood_peak < 30 * MIB, f"the agent grew by {flood_peak / MIB:.0f} MiB during the flood"
        assert attacker.answered >= 2
    finally:
        stop.set()
        if attacker is not None:
            attacker.close()
        agent.stop()


# ------------------------------------------------------------------------------- (iv)
def test_a_flooding_device_is_rate_limited_while_another_device_updates(world: World) -> None:
    model, profile = _release(world)
    agent = world.agent().start()
    flooder = Box.on(world.broker.port, f"flood-{uuid.uuid4().hex[:6]}")
    stop = threading.Event()
    sent = [0]

    def flood() -> None:
        while not stop.is_set() and sent[0] < 30_000:  # ~1,000 requests/s until the update ends
            for topic in (_fetch(flooder.device_id), OLD_FETCH):  # the old topic has no listener
                flooder.ask(topic, qos=0, model=model, version="1.1.0", profile=profile)
            sent[0] += 1
            if sent[0] % 50 == 0:
                time.sleep(0.05)

    flooding = threading.Thread(target=flood, name="flooder", daemon=True)
    try:
        agent.wait_log(r"edge agent \S+ up")
        flooding.start()
        wait_for(lambda: sent[0] >= 500, 30, "the flood")
        world.wire.desire(world.versions.v11, 95)  # another device updates during the flood
        wait_for(
            lambda: any(s in ("committed", "failed") for s, _ in world.wire.steps(95)), 120, "the update"
        )
        stop.set()
        flooding.join(10)
        assert ("committed", True) in world.wire.steps(95), world.wire.steps(95)
        got = flooder.got(_data(flooder.device_id))
        codes = _codes(got)
        assert "rate_limited" in codes, codes[:5]
        told = [decode(ErrorBody, f.payload) for f in got if f.kind == FrameKind.ERROR]
        assert any("retry after" in b.message for b in told if b.code == "rate_limited")
        assert codes.count("rate_limited") < sent[0] // 10  # once per burst, then silence
        assert len(got) < sent[0] // 2  # most of the flood was dropped before any work
        assert world.ctx.metrics.value(DROPPED, reason="rate_limited") >= sent[0] // 2  # counted
        assert world.ctx.metrics.value(DROPPED, reason="backlog") == 0  # the shared backlog held
    finally:
        stop.set()
        flooder.close()
        agent.stop()
