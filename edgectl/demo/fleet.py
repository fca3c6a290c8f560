"""A whole EdgeGLM installation on one machine: broker, hub, edge agents, an operator and a sensor.

``LocalFleet`` starts each part as the real process an operator runs (``mosquitto``,
``edgectl hub serve``, ``edge-agent run``) and talks to them only as an operator and a sensor
do: the hub's HTTP API with an operator token, and MQTT 5 requests to the agents. The demo tells
its story with it; the end-to-end and chaos tests break parts of it on purpose.
"""

from __future__ import annotations

import json
import queue
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgectl.demo.agent_box import AgentBox
from edgectl.demo.procs import HubProc, ManagedBroker, Procs, wait_for
from edgectl.hub_client import HubClient
from edgeglm.lifecycle import FINAL_ROLLOUT

if TYPE_CHECKING:
    from edgectl.demo.kept import KeptProcess
    from edgeglm.protocol import InferReply

API = "/api/v1"
ENDED = FINAL_ROLLOUT
BYTES_SENT = "edgeglm_hub_data_bytes_sent_total"
# The demo's agents keep the shipped pace more closely than a test's quick one.
DEMO_PACE: dict[str, dict[str, Any]] = {
    "cloud": {"reconnect_max_s": 2.0},
    "telemetry": {"heartbeat_s": 1.0},
    "update": {"request_timeout_s": 5.0},
}


class Sensor:
    """An MQTT 5 sensor: publishes a request with a response topic and correlation data."""

    def __init__(self, port: int) -> None:
        from edgeglm.mqtt import BrokerSettings, MqttLink

        self.reply_topic = f"sensors/demo-{uuid.uuid4().hex[:8]}/reply"
        self._replies: queue.Queue[tuple[bytes | None, bytes]] = queue.Queue()
        self.link = MqttLink(
            BrokerSettings(port=port, reconnect_min_s=0.2, reconnect_max_s=2.0),
            f"sensor-{uuid.uuid4().hex[:8]}",
        )
        self.link.subscribe(self.reply_topic, 1, lambda m: self._replies.put((m.correlation, m.payload)))
        self.link.start()

    def ask(
        self,
        device_id: str,
        prompt: str,
        max_tokens: int = 24,
        timeout: float = 60.0,
        stop: tuple[str, ...] = ("\n",),
    ) -> InferReply:
        """The final reply to one greedy request (sent again every 5 s until answered: a request
        published while the agent is not subscribed yet is gone)."""
        from edgeglm.protocol import InferReply, decode, infer_topic

        self.link.wait_connected(timeout)
        body = json.dumps({"prompt": prompt, "max_tokens": max_tokens, "stop": list(stop)}).encode()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            key = uuid.uuid4().hex.encode()
            self.link.publish(
                infer_topic(device_id), body, qos=1, correlation=key, response_topic=self.reply_topic
            )
            resend = min(deadline, time.monotonic() + 5.0)
            while (left := resend - time.monotonic()) > 0:
                try:
                    corr, payload = self._replies.get(timeout=left)
                except queue.Empty:
                    break
                reply = decode(InferReply, payload)
                if corr == key and reply.done:
                    return reply
        raise TimeoutError(f"no reply from {device_id} within {timeout:.0f}s")

    def close(self) -> None:
        self.link.close()


class LocalFleet:
    """Broker + hub + agents under ``root``; ``close()`` stops every process it started."""

    def __init__(
        self,
        root: Path,
        trusted: Path,
        *,
        db_url: str | None = None,
        broker_port: int | None = None,
        say: Callable[[str], None] = lambda _line: None,
    ) -> None:
        self.root = root
        self.trusted = trusted
        self.say = say
        self.procs = Procs()
        self.broker: ManagedBroker | None = None
        self.broker_port = broker_port or 0
        self.db_url = db_url or f"sqlite:///{root / 'hub' / 'hub.db'}"
        self.hub: HubProc | None = None
        self.agents: dict[str, AgentBox] = {}
        self.operator: HubClient | None = None
        self.viewer: HubClient | None = None
        self.sensor: Sensor | None = None
        self._lock = threading.Lock()

    # ------------------------------------------------------------------------------ start
    def start_broker(self) -> int:
        if not self.broker_port:
            broker = ManagedBroker(self.root / "broker", max_packet_bytes=1 << 20)
            self.broker = self.procs.add(broker.start())
            self.broker_port = self.broker.port
            self.say(f"mosquitto on 127.0.0.1:{self.broker_port} (generated config, TCP_NODELAY on)")
        return self.broker_port

    def start_hub(self) -> HubProc:
        hub = HubProc(self.root / "hub", self.db_url, self.start_broker(), self.trusted)
        hub.migrate()
        self.operator = HubClient(hub.url, hub.create_token("demo-operator", "operator"))
        self.viewer = HubClient(hub.url, hub.create_token("demo-viewer", "viewer"))
        self.hub = self.procs.add(hub.start())
        dialect = "PostgreSQL" if self.db_url.startswith("postgresql") else "SQLite"
        self.say(f"cloud hub on {hub.url} ({dialect}), operator and viewer tokens created (stored hashed)")
        return hub

    def start_agents(
        self,
        ids: list[str],
        extra: Mapping[str, Mapping[str, Any]] | None = None,
        *,
        top: Mapping[str, Any] | None = None,
        ports: Mapping[str, int] | None = None,
        env: Mapping[str, Mapping[str, str]] | None = None,
    ) -> None:
        """``edge-agent run`` for each id; ``ports`` sends some through another port (a proxy),
        ``env`` gives some an environment of their own (fault injection)."""
        for device_id in ids:
            port = (ports or {}).get(device_id, self.broker_port)
            root = self.root / "agents" / device_id
            config: dict[str, Any] = {name: dict(table) for name, table in DEMO_PACE.items()}
            if self.hub is not None:
                config["fleet_keys"] = [str(self.hub.fleet_public)]
            for name, table in (extra or {}).items():
                config.setdefault(name, {}).update(table)
            box = AgentBox(root, device_id, port, self.trusted, **config, **(top or {}))
            self.agents[device_id] = self.procs.add(box.start((env or {}).get(device_id)))
        model = "no model yet"
        if top and "bootstrap_bundle" in top:
            model = f"installing {Path(top['bootstrap_bundle']).name} at first start"
        self.say(f"{len(ids)} edge agents started (edge-agent run, own data folders, {model})")
        wait_for(lambda: self.online(ids), 90, "the agents to register with the hub", 0.2)

    def connect_sensor(self) -> Sensor:
        if self.sensor is None:
            self.sensor = Sensor(self.broker_port)
        return self.sensor

    # ------------------------------------------------------------------------------ operator
    def api(self) -> HubClient:
        assert self.operator is not None, "start_hub() first"
        return self.operator

    def devices(self) -> dict[str, dict[str, Any]]:
        return {d["id"]: d for d in self.api().request("GET", f"{API}/devices")}

    def online(self, ids: list[str]) -> bool:
        try:
            known = self.devices()
        except Exception:  # the hub restarting: not yet
            return False
        return all(known.get(i, {}).get("online") for i in ids)

    def label(self, device_id: str, **labels: str) -> None:
        self.api().request("PATCH", f"{API}/devices/{device_id}/labels", json_body={"set": labels})

    def publish(self, folder: Path) -> dict[str, Any]:
        from edgectl.registry_cmd import publish_bundle

        return publish_bundle(self.api(), folder, progress=False)

    def deploy(self, release: str, **body: Any) -> dict[str, Any]:
        body = {
            "release": release,
            "selector": {"site": "demo"},
            "waves": ["100"],
            "soak_s": 1.0,
            "max_failure_ratio": 0.0,
            "device_timeout_s": 120.0,
            **body,
        }
        return dict(self.api().request("POST", f"{API}/rollouts", json_body=body))

    def rollout(self, rollout_id: int) -> dict[str, Any]:
        return dict(self.api().request("GET", f"{API}/rollouts/{rollout_id}"))

    def wait_rollout(self, rollout_id: int, timeout: float = 300.0) -> dict[str, Any]:
        def ended() -> dict[str, Any] | None:
            try:
                r = self.rollout(rollout_id)
            except Exception:  # the hub restarting: ask again
                return None
            return r if r["state"] in ENDED else None

        return dict(wait_for(ended, timeout, f"rollout {rollout_id} to end", 0.25))

    def audit(self, limit: int = 1000) -> list[dict[str, Any]]:
        return list(self.api().request("GET", f"{API}/audit", params={"limit": limit}))

    def bytes_sent(self) -> float:
        assert self.hub is not None
        return self.hub.metric(BYTES_SENT)

    # ------------------------------------------------------------------------------ stop
    def detach(self) -> list[KeptProcess]:
        """Leave every process running (``edgectl demo --keep``): the sensor closes, the rest are
        no longer ours to stop; returns who they are, in start order. A process that has exited
        already stops them all (EdgeError): a demo is left running whole or not at all."""
        from edgectl.demo.kept import record

        if self.sensor is not None:
            self.sensor.close()
            self.sensor = None
        procs = [thing.proc if hasattr(thing, "proc") else thing for thing in self.procs.started]
        try:
            kept = [record(p.name, p.pid, p.log_path) for p in procs if p.pid is not None]
        except BaseException:
            self.procs.stop_all()
            raise
        self.procs.started.clear()
        return kept

    def close(self) -> list[tuple[str, int | None]]:
        if self.sensor is not None:
            self.sensor.close()
            self.sensor = None
        return self.procs.stop_all()
