"""Device traffic into the inventory: registration, status (with the last will), heartbeats.

    MQTT (paho thread)            ingest queue (bounded)          flush thread, every flush_s
    $share/hub/.../status  ──>  decode, check topic == body  ──>  one transaction per batch:
    $share/hub/.../hb             malformed: logged, dropped        upsert devices, count heartbeats,
                                                                    latest health; sweep: no heartbeat
                                                                    within offline_after_s -> offline

Hub replicas subscribe through shared subscriptions, so each message reaches exactly one of
them; every write is an idempotent upsert keyed by device id, so the replicas never conflict.
A batch keeps the newest status and heartbeat per device (by the device's own ``ts``) and adds
up the heartbeat count, so 10,000 devices at one heartbeat per 5 s are a few small transactions
per second. Nothing a device sends can stop the loop: bad payloads are counted by reason (a text
field holding NUL is one: PostgreSQL cannot store it, and it would fail its whole batch at every try).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, cast

from sqlalchemy import Table, bindparam, insert, select, update

from cloud_hub.db import Database
from cloud_hub.metrics import HubMetrics
from cloud_hub.models import Device, DeviceDeployment, utcnow
from edgeglm.errors import ProtocolError
from edgeglm.lifecycle import DeploymentState
from edgeglm.mqtt import Incoming
from edgeglm.protocol import (
    UPDATE_FAILED,
    UPDATE_SUCCEEDED,
    Heartbeat,
    Report,
    Status,
    TopicKind,
    decode,
    parse_device_topic,
)

__all__ = ["Ingest"]

log = logging.getLogger(__name__)


@dataclass
class _Pending:
    status: Status | None = None
    heartbeat: Heartbeat | None = None
    beats: int = 0
    seen: float = 0.0
    online: bool = True  # what the last message to arrive says (a last will arrives after the beats)


_DEVICES = cast(Table, Device.__table__)
# A known device's row: what the batch says, and its heartbeat count added to in SQL (a replica
# that read the count before another replica's batch committed would otherwise lose that batch's).
_UPSERT_KNOWN = (
    update(_DEVICES)
    .where(_DEVICES.c.id == bindparam("b_id"))
    .values(
        heartbeats=_DEVICES.c.heartbeats + bindparam("b_heartbeats"),
        **{
            name: bindparam(f"b_{name}")
            for name in (
                "online",
                "last_seen",
                "profile",
                "agent_version",
                "current_model",
                "current_version",
                "health",
            )
        },
    )
)


def _holds_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_holds_nul(v) for v in value.values())
    if isinstance(value, list | tuple):
        return any(_holds_nul(v) for v in value)
    return False


class Ingest:
    def __init__(
        self,
        db: Database,
        metrics: HubMetrics,
        *,
        flush_s: float = 0.25,
        offline_after_s: float = 90.0,
        max_queue: int = 200_000,
    ) -> None:
        self.db = db
        self.metrics = metrics
        self.flush_s = flush_s
        self.offline_after_s = offline_after_s
        self._queue: queue.Queue[tuple[TopicKind, Any, float]] = queue.Queue(max_queue)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_sweep = 0.0

    # ------------------------------------------------------------------ MQTT handlers
    def on_message(self, msg: Incoming) -> None:
        """Any device message the hub consumes; runs on paho's thread, so it only decodes and queues."""
        try:
            device_id, kind = parse_device_topic(msg.topic)
            if kind is TopicKind.STATUS:
                body: Any = decode(Status, msg.payload)
            elif kind is TopicKind.HEARTBEAT:
                body = decode(Heartbeat, msg.payload)
            elif kind is TopicKind.REPORT:
                body = decode(Report, msg.payload)
            else:
                return
            if body.device_id != device_id:
                raise ProtocolError(kind.value, f"body names device {body.device_id!r}, topic {device_id!r}")
            if _holds_nul(body.model_dump()):  # PostgreSQL refuses it: the whole batch would fail, forever
                raise ProtocolError(kind.value, "a text field holds a NUL character")
        except ProtocolError as exc:
            self.metrics.inc("edgeglm_hub_device_messages_dropped_total", reason="malformed")
            log.warning("dropped a message on %.120s: %s", msg.topic, exc)
            return
        try:
            self._queue.put_nowait((kind, body, time.time()))
        except queue.Full:
            self.metrics.inc("edgeglm_hub_device_messages_dropped_total", reason="backlog")
            log.warning("ingest backlog full: dropped %s from %s", kind.value, device_id)

    # ------------------------------------------------------------------------- loop
    def start(self) -> Ingest:
        self._thread = threading.Thread(target=self._loop, name="hub-ingest", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        self.flush()  # what arrived before the stop is written

    def _loop(self) -> None:
        while not self._stop.wait(self.flush_s):
            try:
                self.flush()
                if time.time() - self._last_sweep >= min(10.0, self.offline_after_s / 3):
                    self.sweep()
            except Exception:  # the database went away: keep the backlog, retry next turn
                log.exception("ingest flush failed; retrying")

    def flush(self) -> int:
        """Write everything queued in one transaction; returns how many messages it held."""
        pending: dict[str, _Pending] = {}
        reports: list[Report] = []
        taken: list[tuple[TopicKind, Any, float]] = []
        while True:
            try:
                taken.append(self._queue.get_nowait())
            except queue.Empty:
                break
        if not taken:
            return 0
        for kind, body, arrived in taken:
            if kind is TopicKind.REPORT:
                reports.append(body)
                continue
            p = pending.setdefault(body.device_id, _Pending())
            p.seen = max(p.seen, arrived)
            if kind is TopicKind.STATUS:
                p.online = body.state == "online"
                if p.status is None or body.ts >= p.status.ts:
                    p.status = body
            else:
                p.online = True
                p.beats += 1
                if p.heartbeat is None or body.ts >= p.heartbeat.ts:
                    p.heartbeat = body
        try:
            self._write(pending, reports)
        except Exception:
            for item in taken:  # nothing is lost: back into the queue for the next turn
                try:
                    self._queue.put_nowait(item)
                except queue.Full:
                    break
            raise
        beats = sum(p.beats for p in pending.values())
        self.metrics.inc("edgeglm_hub_heartbeats_total", float(beats))
        self.metrics.inc(
            "edgeglm_hub_status_total", float(sum(p.status is not None for p in pending.values()))
        )
        return len(taken)

    def _write(self, pending: dict[str, _Pending], reports: list[Report]) -> None:
        """One upsert per device; every row carries the same columns (executemany needs that).

        Rows are locked in one order by every writer, so two transactions never wait for each
        other in a circle (PostgreSQL would abort one as a deadlock): devices before deployments,
        devices in id order (the rollout controller takes its sequence numbers the same way), and
        deployments in id order (the ORM's flush order)."""
        with self.db.session() as s:
            known = {d.id: d for d in s.scalars(select(Device).where(Device.id.in_(list(pending))))}
            new_rows: list[dict[str, Any]] = []
            changes: list[dict[str, Any]] = []
            now = utcnow()
            for device_id, p in pending.items():
                old = known.get(device_id)
                row: dict[str, Any] = {
                    "id": device_id,
                    "online": p.online,
                    "last_seen": datetime.fromtimestamp(p.seen, UTC),
                    "heartbeats": p.beats,  # a new row's count; a known one is counted up in SQL
                    "profile": old.profile if old else None,
                    "agent_version": old.agent_version if old else None,
                    "current_model": old.current_model if old else None,
                    "current_version": old.current_version if old else None,
                    "health": dict(old.health or {}) if old else {},
                }
                if p.status is not None:
                    st = p.status
                    row |= {"profile": st.profile, "agent_version": st.agent_version}
                    if st.model is not None:
                        row |= {"current_model": st.model, "current_version": st.version}
                if p.heartbeat is not None:
                    hb = p.heartbeat
                    row["health"] = {**hb.health.model_dump(), "ts": hb.ts, "version": hb.version}
                    if hb.model is not None:
                        row |= {"current_model": hb.model, "current_version": hb.version}
                if old is None:
                    new_rows.append({**row, "labels": {}, "registered_at": now})
                else:
                    changes.append(row)
            s.expunge_all()  # the bulk statements below are the only device writes
            if new_rows:
                new_rows.sort(key=lambda r: str(r["id"]))
                s.execute(insert(Device), new_rows)
                for r in new_rows:
                    log.info("device %s registered (profile %s)", r["id"], r["profile"])
            if changes:
                changes.sort(key=lambda r: str(r["id"]))
                s.execute(_UPSERT_KNOWN, [{f"b_{k}": v for k, v in row.items()} for row in changes])
            self._apply_reports(s, reports)  # after the devices: written at the commit

    def _apply_reports(self, s: Any, reports: list[Report]) -> None:
        """Update events settle a device's deployment; a repeated report changes nothing."""
        usable = [r for r in reports if r.rollout_id is not None]
        deps: dict[tuple[int | None, str], DeviceDeployment] = {}
        for rollout_id in {r.rollout_id for r in usable}:
            ids = [r.device_id for r in usable if r.rollout_id == rollout_id]
            for i in range(0, len(ids), 5000):
                q = select(DeviceDeployment).where(
                    DeviceDeployment.rollout_id == rollout_id,
                    DeviceDeployment.device_id.in_(ids[i : i + 5000]),
                )
                deps.update({(d.rollout_id, d.device_id): d for d in s.scalars(q)})
        for rep in usable:
            dep = deps.get((rep.rollout_id, rep.device_id))
            if dep is None:
                self.metrics.inc("edgeglm_hub_device_messages_dropped_total", reason="unknown_rollout")
                continue
            final = rep.step == UPDATE_SUCCEEDED or rep.step in UPDATE_FAILED
            if dep.state != DeploymentState.PENDING:
                # settled already (or not started): at-least-once delivery repeats reports. A late
                # final report is still recorded; a late progress report does not rewind the step.
                if final:
                    dep.last_step = rep.step
                continue
            dep.last_step = rep.step
            if rep.ok and rep.step == UPDATE_SUCCEEDED and rep.version == dep.to_version:
                dep.state, dep.resolved_at = DeploymentState.SUCCEEDED, utcnow()
                dep.detail = "reported committed"
            elif not rep.ok or rep.step in UPDATE_FAILED:
                dep.state, dep.resolved_at = DeploymentState.FAILED, utcnow()
                dep.detail = f"{rep.step}: {rep.reason or 'no reason given'}"[:500]
            dep.updated_at = utcnow()

    def sweep(self) -> int:
        """Mark devices offline whose last message is older than ``offline_after_s``."""
        self._last_sweep = time.time()
        cutoff = utcnow() - timedelta(seconds=self.offline_after_s)
        with self.db.session() as s:
            result = s.execute(
                update(Device).where(Device.online.is_(True), Device.last_seen < cutoff).values(online=False)
            )
            count = int(result.rowcount or 0)  # type: ignore[attr-defined]
        if count:
            log.info("%d device(s) went offline (no heartbeat for %.0fs)", count, self.offline_after_s)
        return count
