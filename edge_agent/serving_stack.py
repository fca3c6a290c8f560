"""The serving stack both entry points build: engine -> scheduler -> MQTT requests + OpenAI HTTP.

    ServingStack.serve(engine) ──> Front: a Scheduler and an InferService for it, made current
                                     ^                       ^
        infer topics (MQTT link) ────┘                       └──── HttpApi (/v1, /metrics, /healthz)
                                                                   asks Front.current per request

``edgectl agent serve`` (:mod:`edge_agent.server`) builds one for a fixed bundle on an MQTT link of
its own (``owns_link``); ``edge-agent run`` (:mod:`edge_agent.daemon`) builds one on its serving
link (the local broker's, else the cloud's) and serves each engine an update activates: the old one
finishes what it accepted (see :mod:`edge_agent.front`). Without a model every request is answered
``unavailable`` (MQTT) or 503 (HTTP).

The HTTP port is bound when the stack is built, before any model loads, so a taken port fails at
once (:class:`ConfigError` naming the setting, exit 78). :meth:`start` subscribes to the infer
topics and starts the HTTP API; :meth:`stop` stops the HTTP API, then the stack's own link, then
the scheduler.
"""

from __future__ import annotations

import logging

from edge_agent.front import Front
from edge_agent.http_api import HttpApi
from edge_agent.inference.engine import Engine
from edge_agent.inference.scheduler import Scheduler
from edge_agent.metrics import Metrics
from edgeglm.errors import ConfigError
from edgeglm.mqtt import MqttLink

__all__ = ["ServingStack"]

log = logging.getLogger(__name__)


class ServingStack:
    """One box's request serving: the swappable front on ``link`` and the optional HTTP API."""

    def __init__(
        self,
        link: MqttLink | None,  # None: no MQTT requests (HTTP only)
        metrics: Metrics,
        *,
        device_id: str,
        site: str | None = None,
        queue_size: int | None = None,
        http: tuple[str, int] | None = None,  # (host, port) of the HTTP API; None: none
        http_setting: str = "http",  # the flag or config key that set ``http`` (for errors)
        owns_link: bool = False,  # close ``link`` on stop (nobody else uses it)
    ) -> None:
        self.link, self.metrics, self.owns_link = link, metrics, owns_link
        self.front = Front(link, metrics, device_id=device_id, site=site, queue_size=queue_size)
        self.http = None if http is None else _bind(http, metrics, self.front, http_setting)

    def serve(self, engine: Engine) -> Engine | None:
        """Answer requests with ``engine`` from now on; returns the engine it replaced (retiring)."""
        return self.front.serve(engine)

    def current(self) -> tuple[Engine, Scheduler] | None:
        return self.front.current()

    def start(self) -> ServingStack:
        self.front.start()
        if topics := self.front.topics():
            log.info("taking inference requests on %s", ", ".join(topics))
        if self.http is not None:
            self.http.start()
        return self

    def stop(self) -> None:
        if self.http is not None:
            self.http.stop()
        if self.owns_link and self.link is not None:
            self.link.close()
        self.front.stop()


def _bind(address: tuple[str, int], metrics: Metrics, front: Front, setting: str) -> HttpApi:
    host, port = address
    try:
        return HttpApi(None, None, metrics, host=host, port=port, current=front.current)
    except OSError as exc:  # the port is taken, or the address is not this box's
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        raise ConfigError(setting, f"cannot listen on {where}: {exc}") from exc
