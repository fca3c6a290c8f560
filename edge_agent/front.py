"""Which engine answers requests right now; swapped in one assignment when a slot becomes active.

    sensors ──> infer topics ──> Front.handle ──> the current InferService ──> its Scheduler/Engine
                                                   (before any model: ``unavailable`` replies)

:meth:`Front.serve` builds a scheduler and service for the new engine and makes it current; the
old one finishes the requests it had accepted (``InferService.retire``) on a background thread and
then stops, so a switch drops nothing. :meth:`Front.healthy` is what the systemd watchdog asks: the
scheduler thread is alive and, when it has work, has made a decode step recently.
"""

from __future__ import annotations

import logging
import threading
import time

from edge_agent.inference.engine import Engine
from edge_agent.inference.scheduler import Scheduler
from edge_agent.metrics import Metrics
from edge_agent.serving import InferService
from edgeglm.mqtt import Incoming, MqttLink

__all__ = ["Front"]

log = logging.getLogger(__name__)


class Front:
    def __init__(
        self,
        link: MqttLink | None,  # None: HTTP only, no MQTT requests
        metrics: Metrics,
        *,
        device_id: str,
        site: str | None = None,
        queue_size: int | None = None,
        stall_s: float = 20.0,
    ) -> None:
        self.link, self.metrics = link, metrics
        self.device_id, self.site, self.queue_size = device_id, site, queue_size
        self.stall_s = stall_s
        self._service = InferService(None, None, link, metrics, device_id=device_id, site=site)
        self._lock = threading.Lock()
        self._progress = (0, time.monotonic())  # (scheduler steps, when they last changed)
        self._retiring: dict[int, threading.Thread] = {}  # id(engine) -> its service retiring

    def topics(self) -> list[str]:
        """The MQTT topics requests arrive on (none without a link)."""
        return self._service.topics() if self.link is not None else []

    def start(self) -> Front:
        if self.link is not None:
            for topic in self.topics():
                self.link.subscribe(topic, 1, self.handle)
        return self

    def handle(self, incoming: Incoming) -> None:
        self._service.handle(incoming)

    def current(self) -> tuple[Engine, Scheduler] | None:
        svc = self._service
        if svc.engine is None or svc.scheduler is None:
            return None
        return svc.engine, svc.scheduler

    def serve(self, engine: Engine) -> Engine | None:
        """Make ``engine`` answer requests; returns the engine it replaced (now retiring)."""
        scheduler = Scheduler(engine, queue_size=self.queue_size, metrics=self.metrics).start()
        service = InferService(
            engine, scheduler, self.link, self.metrics, device_id=self.device_id, site=self.site
        )
        with self._lock:
            old, self._service = self._service, service
            self._progress = (0, time.monotonic())
        self.metrics.set_model(engine.model, engine.version)
        log.info("now serving %s@%s", engine.model, engine.version)
        if old.scheduler is None or old.engine is None:
            return None
        key = id(old.engine)

        def retire() -> None:
            try:
                old.retire()
            finally:
                with self._lock:
                    self._retiring.pop(key, None)  # done: nothing to wait for, nothing kept

        t = threading.Thread(target=retire, name="retire-engine", daemon=True)
        with self._lock:
            self._retiring[key] = t
        t.start()
        return old.engine

    def quiesce(self, engine: Engine, timeout_s: float = 120.0) -> None:
        """Wait until a replaced ``engine`` has finished the requests it had (before reusing it)."""
        with self._lock:
            t = self._retiring.get(id(engine))
        if t is not None:
            t.join(timeout_s)

    def retiring(self) -> int:
        """Replaced engines still finishing their requests."""
        with self._lock:
            return len(self._retiring)

    def healthy(self) -> bool:
        svc = self._service
        sched = svc.scheduler
        if sched is None:
            return True  # no model yet: the agent itself is fine (it waits for one)
        if not sched.alive:
            return False
        now = time.monotonic()
        with self._lock:
            steps, since = self._progress
            if sched.steps != steps or not (sched.queue_depth or sched.running):
                self._progress = (sched.steps, now)
                return True
        return now - since < self.stall_s

    def stop(self) -> None:
        sched = self._service.scheduler
        if sched is not None:
            sched.stop()
