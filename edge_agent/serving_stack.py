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
once (:class:`ConfigError` naming the setting, exit 78). So does an address beyond loopback
(127.0.0.0/8, ::1, localhost) unless :class:`HttpSettings` ``allow_remote`` says it is meant; then
a warning is logged, a louder one without a token. :meth:`start` subscribes to the infer topics and
starts the HTTP API; :meth:`stop` stops the HTTP API, then the stack's own link, then the scheduler.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from edge_agent.front import Front
from edge_agent.http_api import DEFAULT_MAX_CONCURRENCY, HttpApi, is_loopback
from edge_agent.inference.engine import Engine
from edge_agent.inference.scheduler import Scheduler
from edge_agent.metrics import Metrics
from edgeglm.errors import ConfigError
from edgeglm.mqtt import MqttLink

__all__ = ["HttpSettings", "ServingStack"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HttpSettings:
    """The HTTP API's settings, and the flags or config keys that set them (named in errors)."""

    host: str
    port: int
    token: str | None = field(default=None, repr=False)  # None: no Authorization needed
    max_concurrency: int = DEFAULT_MAX_CONCURRENCY
    allow_remote: bool = False  # may listen beyond loopback
    listen_setting: str = "http"
    remote_setting: str = "http_allow_remote"
    token_setting: str = "http_token_file"


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
        http: HttpSettings | None = None,  # None: no HTTP API
        owns_link: bool = False,  # close ``link`` on stop (nobody else uses it)
    ) -> None:
        self.link, self.metrics, self.owns_link = link, metrics, owns_link
        self.front = Front(link, metrics, device_id=device_id, site=site, queue_size=queue_size)
        self.http = None if http is None else _bind(http, metrics, self.front)

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


def _bind(http: HttpSettings, metrics: Metrics, front: Front) -> HttpApi:
    host, port = http.host, http.port
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if not is_loopback(host):
        if not http.allow_remote:
            raise ConfigError(
                http.remote_setting,
                f"{where} is reachable beyond this box; set {http.remote_setting} to mean it",
                hint=f"Listen on 127.0.0.1 instead, or set {http.remote_setting} (and {http.token_setting}).",
            )
        log.warning("the HTTP API listens on %s: reachable beyond this box (%s)", where, http.remote_setting)
        if http.token is None:
            log.warning(
                "THE HTTP API ON %s NEEDS NO TOKEN: anyone who reaches it can use the model; set %s",
                where,
                http.token_setting,
            )
    try:
        return HttpApi(
            None,
            None,
            metrics,
            host=host,
            port=port,
            current=front.current,
            token=http.token,
            max_concurrency=http.max_concurrency,
        )
    except OSError as exc:  # the port is taken, or the address is not this box's
        raise ConfigError(http.listen_setting, f"cannot listen on {where}: {exc}") from exc
