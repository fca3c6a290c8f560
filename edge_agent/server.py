"""Serving one bundle: engine, scheduler, metrics, MQTT requests and the optional HTTP API.

    Server(settings).start() ──> Engine.load ──> Scheduler ──> InferService (MQTT) ──> HttpApi
                                                                                   (/v1, /metrics)

``edgectl agent serve`` runs one until SIGINT/SIGTERM; tests and benchmarks start and stop it
in-process. Model updates, slots and telemetry belong to the update daemon (``edge-agent run``).
"""

from __future__ import annotations

import logging
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_agent.inference.engine import Engine
from edge_agent.inference.scheduler import Scheduler
from edge_agent.metrics import Metrics
from edge_agent.serving import InferService
from edgeglm.mqtt import BrokerSettings, MqttLink
from edgeglm.profiles import DeviceProfile

__all__ = ["ServeSettings", "Server"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeSettings:
    bundle: Path
    device_id: str
    broker: BrokerSettings | None = field(default_factory=BrokerSettings)  # None: no MQTT (HTTP only)
    site: str | None = None
    http_host: str | None = None  # None: no HTTP API
    http_port: int = 8080
    profile: DeviceProfile | None = None
    trusted: dict[str, Any] | None = None
    queue_size: int | None = None
    threads: int | None = None


class Server:
    def __init__(self, settings: ServeSettings) -> None:
        self.settings = settings
        self.engine: Engine | None = None
        self.scheduler: Scheduler | None = None
        self.link: MqttLink | None = None
        self.http: Any = None
        self.metrics = Metrics()
        self._stopped = threading.Event()

    def start(self) -> Server:
        s = self.settings
        try:
            self.engine = Engine.load(s.bundle, profile=s.profile, trusted=s.trusted, threads=s.threads)
            self.metrics.set_model(self.engine.model, self.engine.version)
            self.scheduler = Scheduler(self.engine, queue_size=s.queue_size, metrics=self.metrics).start()
            if s.broker is not None:
                self.link = MqttLink(s.broker, client_id=f"edge-agent-{s.device_id}")
                service = InferService(
                    self.engine, self.scheduler, self.link, self.metrics, device_id=s.device_id, site=s.site
                )
                service.start()
                self.link.connect()
                log.info("serving %s on %s", self.engine.model, ", ".join(service.topics()))
            if s.http_host is not None:
                from edge_agent.http_api import HttpApi

                self.http = HttpApi(
                    self.engine, self.scheduler, self.metrics, host=s.http_host, port=s.http_port
                ).start()
                log.info("HTTP API on %s", self.http.url)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.http is not None:
            self.http.stop()
        if self.link is not None:
            self.link.close()
        if self.scheduler is not None:
            self.scheduler.stop()
        self._stopped.set()

    def run_forever(self) -> None:
        """Start, serve until SIGINT or SIGTERM, stop."""
        self.start()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: self._stopped.set())
        self._stopped.wait()
        self.stop()
