"""What a box tells the hub about itself: its status, heartbeats and update reports.

    heartbeat timer ──> Heartbeat ──┐
    update worker   ──> Report ─────┴──> Outbox (SQLite) ──> cloud link, when it is up
    links           <── Status (retained online / offline), built here

Reports and heartbeats are written to the outbox first, so they survive a partition and a
restart; their ``seq`` numbers are unique across restarts. A heartbeat that cannot be queued (a
full disk, most likely) is dropped with one warning a minute, not a traceback a beat.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import sqlalchemy.exc

from edge_agent.inference.engine import Engine
from edge_agent.inference.scheduler import Scheduler
from edge_agent.metrics import Metrics
from edge_agent.outbox import Outbox, OutboxItem
from edge_agent.smoke import SmokeResult
from edgeglm import __version__
from edgeglm.protocol import Heartbeat, Progress, Report, Status, encode, heartbeat_topic, report_topic

__all__ = ["Telemetry"]

log = logging.getLogger(__name__)


class Telemetry:
    """``live()`` names what serves now, ``slot()`` the active slot, ``smoke()`` its last smoke test."""

    def __init__(
        self,
        device_id: str,
        profile: str,
        outbox: Outbox,
        metrics: Metrics,
        *,
        live: Callable[[], tuple[Engine, Scheduler] | None],
        slot: Callable[[], str | None],
        smoke: Callable[[], SmokeResult | None],
        heartbeat_s: float,
    ) -> None:
        self.device_id, self.profile, self.outbox, self.metrics = device_id, profile, outbox, metrics
        self.live, self.slot, self.smoke = live, slot, smoke
        self.heartbeat_s = heartbeat_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, deliver: Callable[[OutboxItem], bool], connected: Callable[[], bool]) -> Telemetry:
        """Send the outbox through ``deliver`` while ``connected()``; beat every ``heartbeat_s``."""
        self.outbox.start(deliver, connected)
        self._thread = threading.Thread(target=self._beat, name="heartbeats", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """No heartbeat from now on (the box is about to say it is offline)."""
        self._stop.set()

    def close(self, flush_s: float = 0.0) -> None:
        """Stop; wait up to ``flush_s`` for the outbox to drain, then close it."""
        self.stop()
        if flush_s > 0:
            self.outbox.flush(flush_s)
        self.outbox.close()

    def status(self, state: str) -> bytes:
        live = self.live()
        return encode(
            Status(
                device_id=self.device_id,
                state=state,  # type: ignore[arg-type]
                profile=self.profile,
                model=live[0].model if live else None,
                version=live[0].version if live else None,
                slot=self.slot() if live else None,  # type: ignore[arg-type]
                agent_version=__version__,
                ts=time.time(),
            )
        )

    def report(
        self,
        rollout_id: int | None,
        version: str,
        step: str,
        ok: bool,
        reason: str | None,
        progress: dict[str, int] | None = None,
    ) -> None:
        def body(seq: int) -> bytes:
            return encode(
                Report(
                    device_id=self.device_id,
                    rollout_id=rollout_id,
                    step=step,
                    seq=seq,
                    ok=ok,
                    reason=reason[:500] if reason else None,
                    progress=Progress(**progress) if progress else None,
                    version=version,
                    ts=time.time(),
                )
            )

        self.outbox.put("report", report_topic(self.device_id), body, qos=1, seq="report")
        log.info("report %s ok=%s%s", step, ok, f" ({reason[:200]})" if reason else "")

    def heartbeat(self) -> None:
        live = self.live()
        health = self.metrics.health()
        last = self.smoke()
        if last is not None:
            health = health.model_copy(update={"smoke_agreement": last.agreement})

        def body(seq: int) -> bytes:  # seq: unique across restarts, like report seqs
            return encode(
                Heartbeat(
                    device_id=self.device_id,
                    ts=time.time(),
                    model=live[0].model if live else None,
                    version=live[0].version if live else None,
                    health=health,
                    seq=seq,
                )
            )

        self.outbox.put("heartbeat", heartbeat_topic(self.device_id), body, qos=0, seq="heartbeat")

    def _beat(self) -> None:
        warned = 0.0
        while not self._stop.wait(self.heartbeat_s):
            try:
                self.heartbeat()
            except (OSError, sqlalchemy.exc.OperationalError) as exc:  # a full disk, most likely
                if time.monotonic() - warned > 60:  # one line a minute, not a traceback a beat
                    warned = time.monotonic()
                    log.warning("heartbeat not queued (it is dropped): %s", str(exc).splitlines()[0][:200])
            except Exception:
                log.exception("heartbeat failed")
