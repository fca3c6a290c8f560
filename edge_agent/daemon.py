"""``edge-agent run``: the daemon on each box: serve the active slot, follow the hub's desired state.

    cloud broker ── desired (retained) ──> UpdateWorker ──> UpdateMachine ──> Activator ──> ServingStack
         ^  <── FetchRequests / data ───── MqttFetcher            │ reports            (serves the
         │      (pieces over HTTP first when the desired state offers them: HttpFirstFetcher)
         │                                                        v                   active slot)
         └──── status (retained, LWT) · heartbeats · reports <── Telemetry (outbox) <── heartbeat timer
    local broker (optional; default: the cloud one) ── infer requests ──> ServingStack

The parts, each in its module: :mod:`~edge_agent.links` (the MQTT connections),
:mod:`~edge_agent.serving_stack` (engine, scheduler, MQTT requests and the HTTP API; the one
``edgectl agent serve`` runs too), :mod:`~edge_agent.boot` (the bootstrap bundle and the active
slot), :mod:`~edge_agent.telemetry` (status, heartbeats, reports) and
:mod:`~edge_agent.update.worker` (the desired state). :class:`Agent` builds them and orders them.

Start-up order: the state and the slots first; the active slot is verified (signature and every
file digest) and loaded *before* any link comes up, so a box answers from the model it trusts;
a slot that fails to load at boot is abandoned for the other one. The links then connect in the
background (serving never waits for the cloud), the unfinished update, if any, resumes, and the
worker follows the retained desired state. systemd hears ``READY=1`` when serving, and the
watchdog is petted only while the engine answers. Stop: ``offline`` status, the outbox flushed
(2 s at most), the links closed, then the HTTP API and the scheduler.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path

from edge_agent.activation import Activator
from edge_agent.boot import boot, install_bootstrap
from edge_agent.config import AgentConfig, resolve_profile
from edge_agent.fetch import MqttFetcher
from edge_agent.fetch_http import HttpFirstFetcher, HttpPieces
from edge_agent.inference.engine import Engine
from edge_agent.inference.scheduler import Scheduler
from edge_agent.links import Links
from edge_agent.metrics import Metrics
from edge_agent.notify import Watchdog, notify
from edge_agent.outbox import Outbox
from edge_agent.serving_stack import HttpSettings, ServingStack
from edge_agent.telemetry import Telemetry
from edge_agent.trust import BoxTrust
from edge_agent.update.slots import Slots
from edge_agent.update.state import StateStore
from edge_agent.update.worker import UpdateWorker
from edgeglm.piece_store import PieceStore
from edgeglm.protocol import desired_topic, root_topic

__all__ = ["FAULT_ENV", "Agent"]

log = logging.getLogger(__name__)

FAULT_ENV = "EDGEGLM_FAULT_KILL_AT"  # fault injection for the crash tests: SIGKILL at this step


class Agent:
    def __init__(self, config: AgentConfig) -> None:
        c = self.config = config
        self.device_id = config.device_id
        data = Path(config.data_dir)
        data.mkdir(parents=True, exist_ok=True)
        self.state = StateStore(data / "agent.db")
        self.trust = BoxTrust(
            self.state, trusted_keys=config.trusted_keys, fleet_keys=config.fleet_keys, root=config.trust_root
        )
        self.trusted = self.trust.release
        self.store = PieceStore(data / "pieces")
        self.slots = Slots(data)
        self.profile_name, self.profile_override = resolve_profile(config)
        self.metrics = Metrics()
        self.stack: ServingStack | None = None
        self.activator: Activator | None = None
        self.telemetry = Telemetry(
            self.device_id,
            self.profile_name,
            Outbox(data / "outbox.db", max_rows=c.telemetry.outbox_max_rows),
            self.metrics,
            live=self._live,
            slot=self._slot,
            smoke=lambda: self.activator.last if self.activator is not None else None,
            heartbeat_s=c.telemetry.heartbeat_s,
        )
        self.links: Links | None = None
        self.worker: UpdateWorker | None = None
        self.watchdog: Watchdog | None = None
        self._stopped = False
        self._term = threading.Event()  # SIGTERM / SIGINT

    # ------------------------------------------------------------------------- lifecycle
    def start(self) -> Agent:
        c = self.config
        self.links = links = Links(c, self.telemetry.status)
        self.stack = stack = ServingStack(
            links.serving,
            self.metrics,
            device_id=self.device_id,
            site=c.serving.site,
            queue_size=c.serving.queue_size,
            http=_http_settings(c),
        )
        self.activator = Activator(
            self.trusted,
            self.profile_override,
            active=lambda: self.slots.active,
            serve=self._serve,
            serving=stack.current,
            threads=c.serving.threads,
            keep_previous=c.update.keep_previous_loaded,
            quiesce=stack.front.quiesce,
        )
        install_bootstrap(c.bootstrap_bundle, self.slots, self.store, self.trusted)
        boot(self.slots, self.activator)
        stack.start()
        self.worker = self._worker(links, self.activator)
        self.trust.on_change(self.worker.recheck)
        links.cloud.subscribe(root_topic(), 1, self.trust.on_root)
        links.cloud.subscribe(desired_topic(self.device_id), 1, self.worker.on_desired)
        links.start()
        self.telemetry.start(links.deliver, links.connected)
        self.worker.start()
        self.watchdog = Watchdog(stack.front.healthy)
        self.watchdog.start()
        notify("READY=1")
        log.info("edge agent %s up (profile %s, slot %s)", self.device_id, self.profile_name, self._slot())
        return self

    def _worker(self, links: Links, activator: Activator) -> UpdateWorker:
        u = self.config.update
        mqtt = MqttFetcher(
            links.cloud,
            self.device_id,
            window=u.window,
            batch=u.batch,
            timeout_s=u.request_timeout_s,
            bandwidth_bytes_s=u.bandwidth_bytes_s,
            holds=self.store.__contains__,  # a delta against any piece this box keeps is decodable
            on_bytes=lambda n: self.metrics.update_bytes("mqtt", n),
        )
        fetcher: MqttFetcher | HttpFirstFetcher = mqtt
        offer = None
        if u.http == "auto":
            http = HttpPieces(
                ca_file=u.http_ca_file, timeout_s=u.request_timeout_s, holds=self.store.__contains__
            )
            fetcher = HttpFirstFetcher(
                mqtt,
                http,
                window=u.window,
                on_bytes=self.metrics.update_bytes,
                on_fallback=self.metrics.http_fallback,
            )
            offer = fetcher.offer
        return UpdateWorker(
            self.state,
            self.store,
            self.slots,
            fetcher,
            self.trusted,
            activator,
            device_id=self.config.device_id,
            fleet_keys=self.trust.fleet,
            fresh=self.trust.check_fresh,
            profile=self.profile_name,
            report=self.telemetry.report,
            crash_at=_fault_injection(os.environ.get(FAULT_ENV)),
            offer=offer,
        )

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        if self.worker is not None:
            self.worker.stop()
        self.telemetry.stop()
        notify("STOPPING=1")
        if self.watchdog is not None:
            self.watchdog.stop()
        if self.links is not None:
            self.links.say_offline()
        self.telemetry.close(flush_s=2.0 if self.links is not None else 0.0)
        if self.links is not None:
            self.links.close()
        if self.stack is not None:
            self.stack.stop()
        self.state.close()

    def run_forever(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: self._term.set())
        self.start()
        try:
            while not self._term.wait(1.0):
                pass
        finally:
            self.stop()

    # ------------------------------------------------------------------------- serving
    def _serve(self, engine: Engine) -> Engine | None:
        """The activator's ``serve``: swap ``engine`` in, and say so (retained status)."""
        assert self.stack is not None
        previous = self.stack.serve(engine)
        if self.links is not None and self.links.connected():
            self.links.announce()
        return previous

    def _live(self) -> tuple[Engine, Scheduler] | None:
        return self.stack.current() if self.stack is not None else None

    def _slot(self) -> str | None:
        return self.slots.active_name() if self.slots.manifest(self.slots.active_name()) else None


def _http_settings(config: AgentConfig) -> HttpSettings | None:
    s = config.serving
    address = s.http_address()
    if address is None:
        return None
    return HttpSettings(
        *address,
        token=s.http_token(),
        max_concurrency=s.http_max_concurrency,
        allow_remote=s.http_allow_remote,
        listen_setting="serving.http_listen",
        remote_setting="serving.http_allow_remote",
        token_setting="serving.http_token_file",
    )


def _fault_injection(step: str | None) -> Callable[[str], None] | None:
    if not step:
        return None

    def crash_at(at: str) -> None:
        if at == step:
            log.warning("fault injection: SIGKILL at %s", at)
            os.kill(os.getpid(), signal.SIGKILL)

    return crash_at
