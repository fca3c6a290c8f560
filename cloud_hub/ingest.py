"""Device traffic into the inventory: registration, status (with the last will), heartbeats.

    MQTT (paho thread)            ingest queue (bounded)          flush thread, every flush_s
    $share/hub/.../status  ──>  decode, check topic == body  ──>  one transaction per batch:
    $share/hub/.../hb             malformed: logged, dropped        upsert devices, count heartbeats,
                                                                    latest health; sweep: no heartbeat
                                                                    within offline_after_s -> offline

Hub replicas subscribe through shared subscriptions, so each message reaches exactly one of
them; every write is an idempotent upsert keyed by device id. A batch keeps the newest status and
heartbeat per device (by the device's own ``ts``) and adds up the heartbeat count, so 10,000
devices at one heartbeat per 5 s are a few small transactions per second.

A device's messages are dealt to several replicas, whose batches may commit out of order (one
waited for a lock, or failed and was tried again). So a known device's row is written by one
statement that reads nothing first: the count is added in SQL, and what the batch says (online,
status, model, health) replaces the row's only if the batch arrived after the message the row
holds (``last_seen``, the hub's clock at arrival), and only the fields the batch has a message
for. A late batch of old heartbeats cannot put back the version a newer status replaced.

Locks: a batch locks its devices in id order, then the deployments its reports settle, in id
order and skipping any another transaction holds (the rollout controller in a tick): those
reports wait in the queue for the next turn. So an ingest batch only ever waits for device rows,
taken in one ordered pass, and never deadlocks with another replica's batch or the controller.

Nothing a device sends can stop the loop: bad payloads are counted by reason (a text field
holding NUL is one: PostgreSQL cannot store it, and it would fail its whole batch at every try).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, cast

from sqlalchemy import Boolean, Table, and_, bindparam, case, insert, or_, select, update

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


def _known_device_update() -> Any:
    """The one statement that writes a known device's row (module docstring), per row of an
    executemany: ``b_*`` parameters, ``b_has_status`` / ``b_has_model`` / ``b_has_beat`` saying
    which fields the batch has a message for."""
    c = _DEVICES.c

    def param(name: str) -> Any:
        return bindparam(f"b_{name}", type_=c[name].type)

    newer = or_(c.last_seen.is_(None), c.last_seen <= param("last_seen"))
    has = {k: bindparam(f"b_has_{k}", type_=Boolean) for k in ("status", "model", "beat")}

    def newer_if(flag: str | None, name: str) -> Any:
        # an older message still fills a field the row has nothing in: a new device's status can
        # commit after another replica's batch of its later heartbeats (a NULL profile would make
        # every desired state for it fail), and it is the only status that device sends
        when = newer if flag is None else and_(or_(newer, c[name].is_(None)), has[flag])
        return case((when, param(name)), else_=c[name])

    return (
        update(_DEVICES)
        .where(c.id == bindparam("b_id"))
        .values(
            heartbeats=c.heartbeats + param("heartbeats"),
            online=newer_if(None, "online"),
            last_seen=newer_if(None, "last_seen"),
            profile=newer_if("status", "profile"),
            agent_version=newer_if("status", "agent_version"),
            current_model=newer_if("model", "current_model"),
            current_version=newer_if("model", "current_version"),
            health=newer_if("beat", "health"),
        )
    )


_UPDATE_KNOWN = _known_device_update()


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
        reports: list[tuple[Report, float]] = []
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
                reports.append((body, arrived))
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
            later = self._write(pending, reports)
        except Exception:
            for item in taken:  # nothing is lost: back into the queue for the next turn
                try:
                    self._queue.put_nowait(item)
                except queue.Full:
                    break
            raise
        for rep, arrived in later:  # their deployments were busy: the next turn applies them
            try:
                self._queue.put_nowait((TopicKind.REPORT, rep, arrived))
            except queue.Full:
                self.metrics.inc("edgeglm_hub_device_messages_dropped_total", reason="backlog")
                log.warning("ingest backlog full: dropped a report from %s", rep.device_id)
        beats = sum(p.beats for p in pending.values())
        self.metrics.inc("edgeglm_hub_heartbeats_total", float(beats))
        self.metrics.inc(
            "edgeglm_hub_status_total", float(sum(p.status is not None for p in pending.values()))
        )
        return len(taken)

    def _write(
        self, pending: dict[str, _Pending], reports: list[tuple[Report, float]]
    ) -> list[tuple[Report, float]]:
        """Devices (new ones inserted, known ones by :data:`_UPDATE_KNOWN`), then the reports;
        returns the reports whose deployment another transaction holds (for the next turn)."""
        with self.db.session() as s:
            known = set(s.scalars(select(Device.id).where(Device.id.in_(list(pending)))))
            new_rows: list[dict[str, Any]] = []
            changes: list[dict[str, Any]] = []
            now = utcnow()
            for device_id, p in sorted(pending.items()):  # rows locked in id order
                row: dict[str, Any] = {
                    "id": device_id,
                    "online": p.online,
                    "last_seen": datetime.fromtimestamp(p.seen, UTC),
                    "heartbeats": p.beats,
                    "profile": None,
                    "agent_version": None,
                    "current_model": None,
                    "current_version": None,
                    "health": {},
                }
                has_model = False
                if p.status is not None:
                    st = p.status
                    row |= {"profile": st.profile, "agent_version": st.agent_version}
                    if st.model is not None:
                        row |= {"current_model": st.model, "current_version": st.version}
                        has_model = True
                if p.heartbeat is not None:
                    hb = p.heartbeat
                    row["health"] = {**hb.health.model_dump(), "ts": hb.ts, "version": hb.version}
                    if hb.model is not None:
                        row |= {"current_model": hb.model, "current_version": hb.version}
                        has_model = True
                if device_id not in known:
                    new_rows.append({**row, "labels": {}, "registered_at": now})
                    continue
                flags = {
                    "has_status": p.status is not None,
                    "has_model": has_model,
                    "has_beat": p.heartbeat is not None,
                }
                changes.append({f"b_{k}": v for k, v in (row | flags).items()})
            if new_rows:
                s.execute(insert(Device), new_rows)
                for r in new_rows:
                    log.info("device %s registered (profile %s)", r["id"], r["profile"])
            if changes:
                s.execute(_UPDATE_KNOWN, changes)
            return self._apply_reports(s, reports)  # after the devices: written at the commit

    def _apply_reports(self, s: Any, reports: list[tuple[Report, float]]) -> list[tuple[Report, float]]:
        """Update events settle a device's deployment; a repeated report changes nothing. The
        deployments are locked in id order, skipping those another transaction holds: their
        reports are returned, to be applied next turn."""
        usable = [(r, at) for r, at in reports if r.rollout_id is not None]
        deps: dict[tuple[int | None, str], DeviceDeployment] = {}
        for rollout_id in {r.rollout_id for r, _ in usable}:
            ids = sorted({r.device_id for r, _ in usable if r.rollout_id == rollout_id})
            for i in range(0, len(ids), 5000):
                q = (
                    select(DeviceDeployment)
                    .where(
                        DeviceDeployment.rollout_id == rollout_id,
                        DeviceDeployment.device_id.in_(ids[i : i + 5000]),
                    )
                    .order_by(DeviceDeployment.id)
                    .with_for_update(skip_locked=True)
                )
                deps.update({(d.rollout_id, d.device_id): d for d in s.scalars(q)})
        held = self._held(s, [r for r, _ in usable if (r.rollout_id, r.device_id) not in deps])
        later: list[tuple[Report, float]] = []
        for rep, at in usable:
            key = (rep.rollout_id, rep.device_id)
            dep = deps.get(key)
            if dep is None:
                if key in held:
                    later.append((rep, at))
                else:
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
        return later

    @staticmethod
    def _held(s: Any, reports: list[Report]) -> set[tuple[int | None, str]]:
        """Which of the deployments these reports name exist (another transaction holds them)."""
        out: set[tuple[int | None, str]] = set()
        for rollout_id in {r.rollout_id for r in reports}:
            ids = sorted({r.device_id for r in reports if r.rollout_id == rollout_id})
            for i in range(0, len(ids), 5000):
                q = select(DeviceDeployment.device_id).where(
                    DeviceDeployment.rollout_id == rollout_id,
                    DeviceDeployment.device_id.in_(ids[i : i + 5000]),
                )
                out.update((rollout_id, device_id) for device_id in s.scalars(q))
        return out

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
