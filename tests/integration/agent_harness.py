"""The real daemon under test: ``edge-agent run`` as a process, a mosquitto we can stop, the hub.

``Broker`` is a private mosquitto on a fixed loopback port that a test may stop and start again.
``AgentProc`` writes an ``agent.toml`` and runs ``edge-agent run`` with its log in a file (kill -9
and restart at will). ``Wire`` is a paho client that plays the hub's desired state and watches
reports and status, and sends inference requests like a sensor.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from edgectl.demo.fleet import Sensor
from edgectl.demo.procs import free_port, toml_text, wait_for
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

EDGE_AGENT = str(Path(sys.executable).with_name("edge-agent"))


class Broker:
    """A private mosquitto on ``port``; ``stop()`` and ``start()`` again on the same port."""

    def __init__(self, root: Path, extra: str = "", port: int | None = None) -> None:
        self.port = port or free_port()
        self.conf = root / f"mosquitto-{self.port}.conf"
        listener = extra or f"listener {self.port} 127.0.0.1\nallow_anonymous true\n"
        user = "user root\n" if os.geteuid() == 0 else ""
        self.conf.write_text(f"{listener}set_tcp_nodelay true\npersistence false\n{user}")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Broker:
        self.proc = subprocess.Popen(["mosquitto", "-c", str(self.conf)], stderr=subprocess.DEVNULL)
        wait_for(self._up, 10, f"mosquitto on port {self.port}")
        return self

    def _up(self) -> bool:
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
            return True
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None


class TcpProxy:
    """A loopback TCP forwarder to ``target`` that a test can cut (a network partition) and restore."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.port = free_port()
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._server: socket.socket | None = None
        self.restore()

    def restore(self) -> None:
        srv = socket.socket()
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind(("127.0.0.1", self.port))
        srv.listen(16)
        self._server = srv
        threading.Thread(target=self._accept, args=(srv,), daemon=True).start()

    def cut(self) -> None:
        """Close the listener and every connection through it."""
        with self._lock:
            srv, self._server = self._server, None
            conns, self._conns = self._conns, []
        if srv is not None:
            with contextlib.suppress(OSError):
                srv.shutdown(socket.SHUT_RDWR)  # wakes the accept() blocked on it (close alone does not)
            srv.close()
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
            c.close()

    def _accept(self, srv: socket.socket) -> None:
        while True:
            try:
                client, _ = srv.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)


class AgentProc:
    """``edge-agent run`` with a config of our making; the log goes to ``log_path``."""

    def __init__(self, root: Path, device_id: str, port: int, trusted: Path, **config: Any) -> None:
        self.root = root
        self.device_id = device_id
        self.data = root / "data"
        self.config_path = root / "agent.toml"
        self.log_path = root / "agent.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        sections: dict[str, dict[str, Any]] = {
            "cloud": {"url": f"mqtt://127.0.0.1:{port}", "reconnect_min_s": 0.2, "reconnect_max_s": 1.0},
            "telemetry": {"heartbeat_s": 0.5},
            "update": {"request_timeout_s": 3.0},
        }
        top: dict[str, Any] = {
            "device_id": device_id,
            "profile": "cpu-x86-int8",
            "data_dir": str(self.data),
            "trusted_keys": [str(trusted)],
            "log_level": "debug",
        }
        for key, value in config.items():
            if key in sections or isinstance(value, dict):
                sections.setdefault(key, {}).update(value)
            elif value is None:
                top.pop(key, None)  # left out of the file
            else:
                top[key] = value
        self.config_path.write_text(toml_text(top, sections))

    def start(self, env: dict[str, str] | None = None) -> AgentProc:
        self.starts += 1
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child keeps it
        log.write(f"\n=== start {self.starts} ===\n".encode())
        log.flush()
        full = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC")}
        full.update(env or {})
        self.proc = subprocess.Popen(
            [EDGE_AGENT, "run", "--config", str(self.config_path)], stderr=log, stdout=log, env=full
        )
        log.close()
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_log(self, pattern: str, timeout: float = 60.0, after: int = 0) -> re.Match[str]:
        rx = re.compile(pattern)
        found: re.Match[str] = wait_for(
            lambda: rx.search(self.log()[after:]), timeout, f"agent log line /{pattern}/"
        )
        return found

    def wait_exit(self, timeout: float = 60.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def kill9(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                return self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                return self.proc.wait(10)
        return self.proc.returncode

    def verified_pieces(self) -> list[str]:
        """Every piece the agent verified into its store, across all its runs (from its debug log)."""
        return re.findall(r"piece ([0-9a-f]{64}) verified", self.log())

    def state(self) -> Any:
        from edge_agent.update.state import StateStore

        store = StateStore(self.data / "agent.db")
        try:
            return store.latest()
        finally:
            store.close()

    def active_version(self) -> str | None:
        from edge_agent.update.slots import Slots

        m = Slots(self.data).manifest(Slots(self.data).active_name())
        return m.version if m is not None else None


class Wire:
    """The test's own MQTT client: desired states out; reports, status and replies in (requests go
    through the demo's :class:`Sensor`, as a sensor sends them)."""

    def __init__(self, port: int, device_id: str) -> None:
        self.device_id = device_id
        self.reports: list[Report] = []
        self.status: list[Status] = []
        self.heartbeats: list[Heartbeat] = []
        self.sensor = Sensor(port)
        self.lock = threading.Lock()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
        self.client.on_message = self._on_message
        self.client.on_connect = lambda c, *_: c.subscribe(
            [
                (report_topic(device_id), 1),
                (status_topic(device_id), 1),
                (heartbeat_topic(device_id), 0),
            ]
        )
        self.client.reconnect_delay_set(0.2, 1)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def _on_message(self, _c: Any, _u: Any, msg: Any) -> None:
        if msg.topic == report_topic(self.device_id):
            with self.lock:
                self.reports.append(decode(Report, msg.payload))
        elif msg.topic == status_topic(self.device_id) and msg.payload:
            with self.lock:
                self.status.append(decode(Status, msg.payload))
        elif msg.topic == heartbeat_topic(self.device_id):
            with self.lock:
                self.heartbeats.append(decode(Heartbeat, msg.payload))

    def desire(self, folder: Path, rollout_id: int) -> None:
        from edgeglm.bundle import load_manifest, manifest_digest

        m, doc = load_manifest(folder, None)
        body = Desired(
            model=m.model,
            version=m.version,
            manifest_digest=manifest_digest(doc),
            rollout_id=rollout_id,
            profile=m.profile,
            issued_at=time.time(),
        )
        self.client.publish(desired_topic(self.device_id), encode(body), qos=1, retain=True).wait_for_publish(
            5
        )

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
        self.client.loop_stop()
        self.client.disconnect()
