"""The hub's side of one device's wire, played by hand: desired states out; reports, status,
heartbeats and inference replies in (requests go through :class:`~edgectl.demo.fleet.Sensor`,
as a sensor sends them). Used where a test or a benchmark drives one agent without a hub."""

from __future__ import annotations

import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgectl.demo.fleet import Sensor
from edgeglm.desired_signing import DESIRED_TTL_S, sign_desired
from edgeglm.keys import create_keypair, load_private_key
from edgeglm.mqtt import BrokerSettings, MqttLink
from edgeglm.protocol import (
    Desired,
    Heartbeat,
    InferReply,
    Report,
    Status,
    decode,
    desired_topic,
    encode,
    heartbeat_topic,
    report_topic,
    status_topic,
)

if TYPE_CHECKING:
    from edgeglm.bundle import Manifest

__all__ = ["Wire"]

Record = Callable[["Manifest", int], None]  # a hub records a desired state: (manifest, rollout id)


class Wire:
    """One device's wire, seen from the hub's seat (``reports``, ``status``, ``heartbeats`` as
    they arrive; ``desire()`` publishes a desired state; ``ask()`` a sensor's request)."""

    def __init__(
        self, port: int, device_id: str, fleet_key: Path | None = None, *, record: Record | None = None
    ) -> None:
        """``fleet_key``: the private key desired states are signed with (a hub's fleet key);
        without one the wire makes its own, whose public half is ``fleet_public``. ``record``:
        called by :meth:`desire` before it publishes, as a hub records a desired state in its
        database first; the hub's gateway serves a device only the releases recorded for it."""
        self.device_id = device_id
        self.record = record
        if fleet_key is None:
            self._keys = tempfile.TemporaryDirectory(prefix="wire-fleet-")
            fleet_key, _, _ = create_keypair(Path(self._keys.name), "fleet")
        self.fleet_key = load_private_key(fleet_key)
        self.fleet_public = fleet_key.with_suffix(".pub")
        self.sequence = int(time.time() * 1000)  # as the hub counts: never below its clock in ms
        self.reports: list[Report] = []
        self.status: list[Status] = []
        self.heartbeats: list[Heartbeat] = []
        self.sensor = Sensor(port)
        self.lock = threading.Lock()
        self.link = MqttLink(
            BrokerSettings(port=port, reconnect_min_s=0.2, reconnect_max_s=1.0),
            f"wire-{device_id}-{uuid.uuid4().hex[:6]}",
        )
        self.link.subscribe(report_topic(device_id), 1, self._on_report)
        self.link.subscribe(status_topic(device_id), 1, self._on_status)
        self.link.subscribe(heartbeat_topic(device_id), 0, self._on_heartbeat)
        self.link.start()  # reconnects and subscribes again after a broker outage
        if not self.link.wait_connected(10):
            raise TimeoutError(f"no MQTT broker on port {port}")

    def _on_report(self, msg: Any) -> None:
        with self.lock:
            self.reports.append(decode(Report, msg.payload))

    def _on_status(self, msg: Any) -> None:
        if msg.payload:
            with self.lock:
                self.status.append(decode(Status, msg.payload))

    def _on_heartbeat(self, msg: Any) -> None:
        with self.lock:
            self.heartbeats.append(decode(Heartbeat, msg.payload))

    def desire(self, folder: Path, rollout_id: int) -> None:
        from edgeglm.bundle import load_manifest, manifest_digest

        m, doc = load_manifest(folder, None)
        if self.record is not None:
            self.record(m, rollout_id)
        self.publish_desired(
            Desired(
                model=m.model,
                version=m.version,
                manifest_digest=manifest_digest(doc),
                rollout_id=rollout_id,
                profile=m.profile,
                issued_at=time.time(),
            )
        )

    def publish_desired(self, body: Desired, *, sign: bool = True) -> bytes:
        """``body`` with this device, the next sequence and a 30-day expiry, signed (unless
        ``sign`` is false: then published as given); the payload published."""
        self.sequence += 1
        if sign:
            body = body.model_copy(
                update={
                    "device_id": body.device_id or self.device_id,
                    "sequence": body.sequence or self.sequence,
                    "expires_at": body.expires_at or body.issued_at + DESIRED_TTL_S,
                }
            )
            payload = sign_desired(body, self.fleet_key)
        else:
            payload = encode(body)
        self.publish_raw(payload)
        return payload

    def publish_raw(self, payload: bytes) -> None:
        """Any bytes, retained on the device's desired topic (as anyone with broker access could)."""
        self.link.publish(desired_topic(self.device_id), payload, qos=1, retain=True).wait_for_publish(5)

    def online(self, version: str) -> bool:
        with self.lock:
            return any(s.state == "online" and s.version == version for s in self.status)

    def steps(self, rollout_id: int) -> list[tuple[str, bool]]:
        with self.lock:
            return [(r.step, r.ok) for r in self.reports if r.rollout_id == rollout_id]

    def ask(self, prompt: str = "The sensor reads", timeout: float = 60.0) -> InferReply:
        """One greedy 4-token request, sent again every 5 s until answered (an agent that is just
        starting has not subscribed yet: a QoS 1 message to no subscriber is gone); the final reply."""
        return self.sensor.ask(self.device_id, prompt, max_tokens=4, timeout=timeout, stop=())

    def close(self) -> None:
        self.sensor.close()
        self.link.close()
