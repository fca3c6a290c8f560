"""``edgectl agent serve``: one fixed bundle on the serving stack, until SIGINT/SIGTERM.

    Server(settings).start() ──> ServingStack (HTTP port bound) ──> Engine.load ──> stack.serve
                             ──> stack.start (infer topics, HTTP API) ──> MQTT connect (blocking)

The stack is the one ``edge-agent run`` serves on (:mod:`edge_agent.serving_stack`); here it has a
link of its own and never swaps its engine. An absent broker fails the start
(:class:`UnavailableError`, exit 69); a taken ``--http`` port is a :class:`ConfigError` (exit 78).
Tests and benchmarks start and stop one in-process. Model updates, slots and telemetry belong to
the update daemon (``edge-agent run``).

``trusted`` None loads the bundle unverified: ``edgectl agent serve`` allows that only with
``--insecure-unsigned`` (:func:`edge_agent.entry.serve_bundle` refuses it otherwise), and this
server logs a warning whenever it does.
"""

from __future__ import annotations

import logging
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_agent.http_api import DEFAULT_MAX_CONCURRENCY
from edge_agent.inference.engine import Engine
from edge_agent.inference.scheduler import Scheduler
from edge_agent.metrics import Metrics
from edge_agent.serving_stack import HttpSettings, ServingStack
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
    http_token: str | None = field(default=None, repr=False)  # None: no Authorization needed
    http_allow_remote: bool = False
    http_max_concurrency: int = DEFAULT_MAX_CONCURRENCY
    profile: DeviceProfile | None = None
    trusted: dict[str, Any] | None = None
    queue_size: int | None = None
    threads: int | None = None


class Server:
    def __init__(self, settings: ServeSettings) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.stack: ServingStack | None = None
        self._stopped = threading.Event()

    @property
    def engine(self) -> Engine | None:
        now = self.stack.current() if self.stack is not None else None
        return now[0] if now is not None else None

    @property
    def scheduler(self) -> Scheduler | None:
        now = self.stack.current() if self.stack is not None else None
        return now[1] if now is not None else None

    def start(self) -> Server:
        s = self.settings
        link = None if s.broker is None else MqttLink(s.broker, client_id=f"edge-agent-{s.device_id}")
        self.stack = ServingStack(
            link,
            self.metrics,
            device_id=s.device_id,
            site=s.site,
            queue_size=s.queue_size,
            http=None if s.http_host is None else self._http(),
            owns_link=True,
        )
        if s.trusted is None:
            log.warning("serving %s UNSIGNED: its signature and file digests are not checked", s.bundle)
        try:
            self.stack.serve(Engine.load(s.bundle, profile=s.profile, trusted=s.trusted, threads=s.threads))
            self.stack.start()
            if link is not None:
                link.connect()
        except BaseException:
            self.stop()
            raise
        return self

    def _http(self) -> HttpSettings:
        s = self.settings
        assert s.http_host is not None
        return HttpSettings(
            s.http_host,
            s.http_port,
            token=s.http_token,
            max_concurrency=s.http_max_concurrency,
            allow_remote=s.http_allow_remote,
            listen_setting="--http",
            remote_setting="--http-allow-remote",
            token_setting="--http-token-file",
        )

    def stop(self) -> None:
        if self.stack is not None:
            self.stack.stop()
        self._stopped.set()

    def run_forever(self) -> None:
        """Start, serve until SIGINT or SIGTERM, stop. The handlers come first: a signal that
        arrives while the model loads (or just after the HTTP front answers) still stops cleanly."""
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: self._stopped.set())
        self.start()
        self._stopped.wait()
        self.stop()
