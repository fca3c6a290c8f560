"""Simulated edge devices speaking the real wire protocol (paho clients), for the hub's tests."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from edgeglm.protocol import (
    Desired,
    Health,
    Heartbeat,
    Report,
    Status,
    decode,
    desired_topic,
    encode,
    heartbeat_topic,
    report_topic,
    status_topic,
)


@dataclass
class Behaviour:
    """How a device answers an update to ``version`` (keyed by version in :class:`SimDevice`)."""

    fail: bool = False  # report a failed update and stay on the old version
    p95_ms: float = 100.0
    error_rate: float = 0.0
    silent: bool = False  # after updating, send no heartbeats (health gates stay inconclusive)
    idle: bool = False  # serve no request: heartbeats say 0 requests and 0 ms, as an idle agent's do


@dataclass
class SimDevice:
    port: int
    device_id: str
    version: str | None  # None: a box that runs no model yet (a first deploy)
    model: str | None = "glm-tiny"
    profile: str = "cpu-x86-int4"
    labels_site: str = "plant-7"
    behaviours: dict[str, Behaviour] = field(default_factory=dict)
    beat_s: float = 0.3
    muted: bool = False  # send no heartbeats at all for now (the hub has heard no health yet)
    desired_seen: list[str] = field(default_factory=list)

    def start(self) -> SimDevice:
        if self.version is None:
            self.model = None
        self._stop = threading.Event()
        self._seq = 0
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=self.device_id, protocol=paho.MQTTv5)
        self.client.will_set(status_topic(self.device_id), self._status("offline"), qos=1, retain=True)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", self.port)
        self.client.loop_start()
        self._beats = threading.Thread(target=self._beat_loop, daemon=True)
        self._beats.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self.client.disconnect()
        self.client.loop_stop()

    def _status(self, state: str) -> bytes:
        return encode(
            Status(
                device_id=self.device_id,
                state=state,
                profile=self.profile,
                model=self.model,
                version=self.version,
                agent_version="0.1.0",
                ts=time.time(),
            )
        )

    def _on_connect(self, client, _u, _f, _rc, _p) -> None:
        client.subscribe(desired_topic(self.device_id), qos=1)
        client.publish(status_topic(self.device_id), self._status("online"), qos=1, retain=True)

    def _behaviour(self) -> Behaviour:
        return self.behaviours.get(self.version or "", Behaviour())

    def _beat_loop(self) -> None:
        while not self._stop.wait(self.beat_s):
            b = self._behaviour()
            if b.silent or self.muted:
                continue
            self._seq += 1
            p95, requests = (0.0, 0) if b.idle else (b.p95_ms, 100)
            health = Health(
                latency_p50_ms=p95 / 2,
                latency_p95_ms=p95,
                tokens_per_s=0 if b.idle else 20,
                error_rate=0.0 if b.idle else b.error_rate,
                queue_depth=0,
                rss_mb=900,
                requests=requests,
                errors=round(requests * b.error_rate),
            )
            hb = Heartbeat(
                device_id=self.device_id,
                ts=time.time(),
                model=self.model,
                version=self.version,
                health=health,
                seq=self._seq,
            )
            self.client.publish(heartbeat_topic(self.device_id), encode(hb), qos=0)

    def _on_message(self, client, _u, msg) -> None:
        if not msg.payload:
            return
        want = decode(Desired, msg.payload)
        self.desired_seen.append(want.version)
        if want.version == self.version:
            return
        threading.Timer(0.05, self._update, args=(want,)).start()

    def _update(self, want: Desired) -> None:
        b = self.behaviours.get(want.version, Behaviour())
        self._seq += 1
        if b.fail:
            rep = Report(
                device_id=self.device_id,
                rollout_id=want.rollout_id,
                step="rolled_back",
                seq=self._seq,
                ok=False,
                reason="smoke test disagreed",
                version=want.version,
                ts=time.time(),
            )
            self.client.publish(report_topic(self.device_id), encode(rep), qos=1)
            return
        self.version, self.model = want.version, want.model
        rep = Report(
            device_id=self.device_id,
            rollout_id=want.rollout_id,
            step="committed",
            seq=self._seq,
            ok=True,
            version=want.version,
            ts=time.time(),
        )
        self.client.publish(report_topic(self.device_id), encode(rep), qos=1)
        self.client.publish(status_topic(self.device_id), self._status("online"), qos=1, retain=True)
