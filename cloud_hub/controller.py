"""The rollout controller: one hub process at a time (a database lease) moves rollouts along.

Each tick, for every running rollout, the current wave's state picks its step (``_STEPS``); the
step returns a :class:`~edgeglm.lifecycle.WaveEvent` or nothing, and the wave moves as
``edgeglm.lifecycle.WAVE_TRANSITIONS`` says (the rollout as ``ROLLOUT_TRANSITIONS`` says)::

    pending    capture the old version's health (baseline); desired state to the wave's devices
    deploying  a device succeeds when it reports ``committed`` or is seen online on the target;
               a gate breach on the devices updated so far fails the wave at once;
               it fails on a failed report or when ``device_timeout_s`` passes (offline never
               succeeds); failures over ``max_failure_ratio``, or successes under
               ``success_threshold`` once all are settled -> failure; else soak
    soaking    health gates on the updated devices' heartbeats since their update, against the
               baseline (captured now if no old-version device had served at the start):
               a breach -> failure at once; at soak end pass -> next wave (or completed);
               idle (fewer than ``min_requests`` served) -> wait for traffic, saying so in
               the rollout's reason, never pause; inconclusive -> wait one more soak, then
               pause (never pass); a resume waives a missing baseline from then on
    failure    on_failure=revert: desired state back to the previous version for exactly the
               devices this rollout moved (rollout ``reverted``); pause: rollout ``paused``

All state is in the database and every rule is idempotent, so a hub killed mid-wave and started
again (or another replica taking the lease) continues where it stopped.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, ClassVar

from sqlalchemy import or_, select, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import IntegrityError as DbIntegrityError
from sqlalchemy.orm import Session
from sqlalchemy.orm.exc import StaleDataError

from cloud_hub import audit
from cloud_hub.db import Database
from cloud_hub.desired import FleetKey, next_sequences, publish_desired, refresh_desired
from cloud_hub.gates import Verdict, baseline_of, evaluate, parse_gate
from cloud_hub.inventory import devices_by_id, matches
from cloud_hub.models import Device, DeviceDeployment, Lease, Release, Rollout, RolloutWave, utcnow
from cloud_hub.rollouts import (
    Publish,
    deployments_in,
    release_devices,
    revert_devices,
    settle_deployments,
    start_deployments,
)
from edgeglm.lifecycle import (
    FAILED_DEPLOYMENT,
    DeploymentState,
    LifecycleError,
    RolloutEvent,
    RolloutState,
    WaveEvent,
    WaveState,
    next_rollout_state,
    next_wave_state,
)
from edgeglm.rollout_params import OnFailure

__all__ = ["Controller"]

log = logging.getLogger(__name__)

LEASE = "rollout-controller"
ACTOR = "controller"


@dataclass(frozen=True)
class _Move:
    """What a wave's step decided: the event that moves the wave, and why (for a failure)."""

    event: WaveEvent
    why: str = ""


def _waiting_prefix(wave: RolloutWave) -> str:
    return f"wave {wave.index} waiting"


def _baseline(r: Rollout, wave: RolloutWave) -> dict[str, Any]:
    """The old version's latency for ``wave``: its own, else the latest taken; {} if none."""
    for key in (str(wave.index), "latest"):
        base = r.baseline.get(key) or {}
        if base.get("p95_ms"):
            return dict(base)
    return {}


# a wave state's step (see Controller._STEPS): controller, session, rollout, its current wave, the
# wave's deployments, the release's model and version, now
Step = Callable[
    ["Controller", Session, Rollout, RolloutWave, list[DeviceDeployment], str, str, datetime], "_Move | None"
]


class Controller:
    def __init__(
        self,
        db: Database,
        publish: Publish | None,
        holder: str,
        *,
        fleet: FleetKey | None,
        tick_s: float = 0.5,
        lease_s: float = 10.0,
        on_event: Callable[[str, int, str], None] | None = None,
    ) -> None:
        self.db = db
        self.publish = publish
        self.fleet = fleet
        self.holder = holder
        self.tick_s = tick_s
        self.lease_s = lease_s
        self.on_event = on_event
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.refresh_every_s = 30.0
        self._next_refresh = 0.0

    # ------------------------------------------------------------------------ loop
    def start(self) -> Controller:
        self._thread = threading.Thread(target=self._loop, name="rollout-controller", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                if self.acquire():
                    self.tick()
            except StaleDataError:
                log.info("a deployment changed under this tick (a device report); next tick re-reads it")
            except Exception:  # the database went away for a moment: try again next tick
                log.exception("rollout controller tick failed")
            self._stop.wait(self.tick_s)

    def acquire(self) -> bool:
        """Take or renew the lease; False while another holder's lease is valid."""
        now = utcnow()
        until = now + timedelta(seconds=self.lease_s)
        try:
            with self.db.session() as s:
                res = s.execute(
                    update(Lease)
                    .where(Lease.name == LEASE, or_(Lease.holder == self.holder, Lease.expires_at < now))
                    .values(holder=self.holder, expires_at=until)
                )
                if res.rowcount:  # type: ignore[attr-defined]
                    return True
                if s.get(Lease, LEASE) is not None:
                    return False
                s.add(Lease(name=LEASE, holder=self.holder, expires_at=until))
        except DbIntegrityError:  # another replica inserted it first
            return False
        return True

    def tick(self) -> None:
        self._refresh()
        with self.db.session() as s:
            running = select(Rollout.id).where(Rollout.state == RolloutState.RUNNING).order_by(Rollout.id)
            ids = list(s.scalars(running))
        for rid in ids:
            try:
                with self.db.session() as s:
                    rollout = s.get(Rollout, rid)
                    if rollout is not None and rollout.state == RolloutState.RUNNING:
                        self._advance(s, rollout)
            except (DBAPIError, StaleDataError):
                raise  # the database, not this rollout: the loop tries again next tick
            except Exception as exc:  # this rollout cannot go on (its desired state cannot be built)
                log.exception("rollout %s cannot advance", rid)
                self._give_up(rid, f"{type(exc).__name__}: {str(exc)[:300]}")

    def _refresh(self) -> None:
        """Now and then: desired states near their expiry, or signed by a retired fleet key."""
        now = time.monotonic()
        if self.fleet is None or now < self._next_refresh:
            return
        self._next_refresh = now + self.refresh_every_s
        with self.db.session() as s:
            refresh_desired(s, self.publish, self.fleet, now=time.time())

    def _give_up(self, rid: int, why: str) -> None:
        """End rollout ``rid`` as ``failed`` with ``why``; the other rollouts go on."""
        with self.db.session() as s:
            rollout = s.get(Rollout, rid)
            if rollout is None or rollout.state != RolloutState.RUNNING:
                return
            release_devices(s, rollout)  # they may join another rollout; moved ones stay put
            self._finish(s, rollout, RolloutEvent.GIVE_UP, f"the controller could not advance it: {why}")

    # --------------------------------------------------------------------- one wave
    def _advance(self, s: Session, r: Rollout) -> None:
        wave = next(w for w in r.wave_rows if w.index == r.current_wave)
        now = utcnow()
        deps = list(
            s.scalars(
                select(DeviceDeployment).where(
                    DeviceDeployment.rollout_id == r.id, DeviceDeployment.wave == wave.index
                )
            )
        )
        release = s.get(Release, r.release_id)
        assert release is not None
        step = self._STEPS.get(WaveState(wave.state))
        if step is None:  # passed or failed: the rollout moved on or ended with it
            raise LifecycleError(f"rollout {r.id} is running on wave {wave.index}, which is {wave.state}")
        move = step(self, s, r, wave, deps, release.model.name, release.version, now)
        if move is None:
            return
        wave.state = next_wave_state(wave.state, move.event)
        if move.event is WaveEvent.FAIL:
            wave.finished_at = now
            if r.on_failure == OnFailure.REVERT:
                reverted = revert_devices(s, r, self.publish, fleet=self.fleet)
                self._finish(s, r, RolloutEvent.REVERT, f"{move.why}; reverted {len(reverted)} device(s)")
            else:
                self._finish(s, r, RolloutEvent.HOLD, move.why)
        elif move.event is WaveEvent.PASS:
            wave.finished_at = now
            if r.reason.startswith(_waiting_prefix(wave)):
                r.reason = ""  # the wave got its traffic
            if wave.index + 1 < len(r.wave_rows):
                r.current_wave, r.updated_at = wave.index + 1, now
                log.info("rollout %s advanced to wave %s of %s", r.id, r.current_wave, len(r.wave_rows))
            else:
                self._finish(s, r, RolloutEvent.COMPLETE, "every wave passed")

    def _start_wave(
        self,
        s: Session,
        r: Rollout,
        wave: RolloutWave,
        deps: list[DeviceDeployment],
        model: str,
        version: str,
        now: datetime,
    ) -> _Move | None:
        self._capture_baseline(s, r, wave, model, version)
        waiting = [d for d in deps if d.state == DeploymentState.WAITING]
        devices = devices_by_id(s, [d.device_id for d in waiting])
        told = [(dep, devices[dep.device_id]) for dep in waiting if dep.device_id in devices]
        gone = [dep for dep in waiting if dep.device_id not in devices]
        sequences = next_sequences(s, [device.id for _, device in told], now=time.time())
        # Devices locked (above), then their deployments locked and moved to pending, all before
        # a single desired state goes out: an abort that committed first stops this tick here
        # (StaleDataError, rolled back) instead of after the whole wave was told the new version.
        start_deployments(s, [dep for dep, _ in told], now)
        self._tell(s, r, [device for _, device in told], model, version, sequences)
        for dep in gone:
            dep.state, dep.detail = DeploymentState.FAILED, "device left the inventory"
        wave.started_at = now
        self._event(s, r, "wave.start", f"wave {wave.index}: {len(deps)} device(s)")
        return _Move(WaveEvent.START)

    def _tell(
        self,
        s: Session,
        r: Rollout,
        devices: list[Device],
        model: str,
        version: str,
        sequences: dict[str, int],
    ) -> None:
        """Publish ``model@version`` as each device's desired state, under the sequence numbers
        taken for them (:func:`next_sequences`, which locked their rows)."""
        digests: dict[str, str] = {}
        for device in devices:
            publish_desired(
                s,
                device,
                model,
                version,
                r.id,
                self.publish,
                digests,
                fleet=self.fleet,
                sequence=sequences[device.id],
            )

    def _settle(
        self,
        s: Session,
        r: Rollout,
        wave: RolloutWave,
        deps: list[DeviceDeployment],
        model: str,
        version: str,
        now: datetime,
    ) -> _Move | None:
        devices = devices_by_id(s, [d.device_id for d in deps if d.state == DeploymentState.PENDING])
        lost: list[Device] = []  # told, but their desired row says otherwise: tell them again
        settled: list[tuple[DeviceDeployment, DeploymentState, str]] = []
        for dep in deps:
            if dep.state != DeploymentState.PENDING:
                continue
            device = devices.get(dep.device_id)
            started = dep.started_at or now
            if (
                device is not None
                and device.online
                and device.current_model == model
                and device.current_version == version
                and device.last_seen is not None
                and device.last_seen >= started
            ):
                settled.append((dep, DeploymentState.SUCCEEDED, "seen running the target"))
            elif (now - started).total_seconds() > r.device_timeout_s:
                offline = device is None or not device.online
                why = "offline" if offline else f"no result in {r.device_timeout_s:g}s"
                settled.append((dep, DeploymentState.TIMED_OUT, why))
            elif device is not None and device.desired_version != version:
                lost.append(device)  # a lost publish
        settle_deployments(s, settled, now)  # a report that settled one meanwhile stands
        if lost:
            sequences = next_sequences(s, [d.id for d in lost], now=time.time())
            self._tell(s, r, lost, model, version, sequences)
        if r.gates and any(d.state == DeploymentState.SUCCEEDED for d in deps):
            early = self._verdict(s, r, wave, now)  # a breach stops the wave before it finishes
            if early.state == "breach":
                return self._failing(f"wave {wave.index}: {early.detail}")
        size = max(len(deps), 1)
        failed = sum(d.state in FAILED_DEPLOYMENT for d in deps)
        if failed / size > r.max_failure_ratio:
            return self._failing(f"wave {wave.index}: {failed} of {len(deps)} device(s) failed")
        if any(d.state == DeploymentState.PENDING for d in deps):
            return None
        ok = sum(d.state == DeploymentState.SUCCEEDED for d in deps)
        if ok / size < r.success_threshold:
            return self._failing(
                f"wave {wave.index}: {ok} of {len(deps)} succeeded, under {r.success_threshold:g}"
            )
        wave.soak_until = now + timedelta(seconds=r.soak_s)
        self._event(s, r, "wave.soak", f"wave {wave.index}: {ok} succeeded; soaking {r.soak_s:g}s")
        return _Move(WaveEvent.SETTLE)

    def _capture_baseline(self, s: Session, r: Rollout, wave: RolloutWave, model: str, version: str) -> None:
        """Store what the matching online devices not yet in the rollout report now as ``wave``'s
        baseline (and as the latest one); nothing when none of them has reported health yet."""
        moving = {
            d.device_id
            for d in s.scalars(
                select(DeviceDeployment).where(
                    DeviceDeployment.rollout_id == r.id, DeviceDeployment.state != DeploymentState.WAITING
                )
            )
        }
        old = [
            dict(d.health)
            for d in s.scalars(select(Device).where(Device.online.is_(True)))
            if matches(d, r.selector)
            and d.id not in moving
            and d.health
            and d.current_model == model
            and d.current_version != version
        ]
        base = baseline_of(old)
        if base:
            r.baseline = {**r.baseline, str(wave.index): base, "latest": base}
            log.info("rollout %s wave %s baseline: %s", r.id, wave.index, base)

    def _verdict(self, s: Session, r: Rollout, wave: RolloutWave, now: datetime) -> Verdict:
        """The gates on the health updated devices reported from the new version since their update."""
        gates = [parse_gate(g) for g in r.gates]
        if not gates:
            return Verdict("pass", "no gates")
        succeeded = deployments_in(s, r.id, {DeploymentState.SUCCEEDED})  # this tick's too, unflushed
        with s.no_autoflush:  # this tick's settled deployments are written at its commit
            devices = devices_by_id(s, [d.device_id for d in succeeded])
        updated = []
        for dep in succeeded:
            device = devices.get(dep.device_id)
            since = (dep.started_at or now).timestamp()
            health = device.health if device is not None else None
            if health and health.get("version") == dep.to_version and float(health.get("ts", 0)) >= since:
                updated.append(dict(health))
        if any(g.metric == "p95_ratio" for g in gates) and not _baseline(r, wave):
            # No old-version device had served when the wave started (a rollout started right
            # after the fleet came up, or an idle one): the ones still on it may have by now.
            release = s.get(Release, r.release_id)
            assert release is not None
            self._capture_baseline(s, r, wave, release.model.name, release.version)
        return evaluate(
            gates,
            updated,
            _baseline(r, wave),
            max(1, min(r.min_samples, len(succeeded))),
            r.min_requests,
            waived=str(r.baseline.get("waived", "")),
        )

    def _soak(
        self,
        s: Session,
        r: Rollout,
        wave: RolloutWave,
        deps: list[DeviceDeployment],
        model: str,
        version: str,
        now: datetime,
    ) -> _Move | None:
        if wave.soak_until is None:  # resumed: soak again
            wave.soak_until = now + timedelta(seconds=r.soak_s)
        verdict = self._verdict(s, r, wave, now)
        if verdict.state == "breach":
            return self._failing(f"wave {wave.index}: {verdict.detail}")
        if now < wave.soak_until:
            return None
        if verdict.state == "pass":
            self._event(s, r, "wave.pass", f"wave {wave.index}: {verdict.detail}")
            return _Move(WaveEvent.PASS)
        if verdict.state == "idle":  # no traffic yet: wait for it as long as it takes, never pause
            self._waiting(s, r, wave, verdict.detail)
            return None
        if now >= wave.soak_until + timedelta(seconds=r.soak_s):  # waited one more soak
            if verdict.lacks == "baseline":  # a resume waives it (rollouts.resume)
                r.baseline = {**r.baseline, "missing": f"wave {wave.index}: {verdict.detail}"}
            self._finish(s, r, RolloutEvent.HOLD, f"wave {wave.index} inconclusive: {verdict.detail}")
        return None

    def _waiting(self, s: Session, r: Rollout, wave: RolloutWave, detail: str) -> None:
        """Say in the rollout's reason why the wave waits; audit and log when the wait begins."""
        text = f"{_waiting_prefix(wave)} {detail.removeprefix('waiting ')}"
        if r.reason == text:
            return
        begins = not r.reason.startswith(_waiting_prefix(wave))
        r.reason = text
        if begins:
            self._event(s, r, "wave.wait", text)

    _STEPS: ClassVar[Mapping[WaveState, Step]] = {
        WaveState.PENDING: _start_wave,
        WaveState.DEPLOYING: _settle,
        WaveState.SOAKING: _soak,
    }

    # ----------------------------------------------------------------------- ends
    @staticmethod
    def _failing(why: str) -> _Move:
        return _Move(WaveEvent.FAIL, why)

    def _finish(self, s: Session, r: Rollout, event: RolloutEvent, why: str) -> None:
        before = r.state
        state = next_rollout_state(r.state, event)
        r.state, r.reason, r.updated_at = state, why, utcnow()
        if state == RolloutState.COMPLETED:
            release_devices(s, r)  # every wave started: none is left waiting to be skipped
        audit.record(
            s,
            ACTOR,
            f"rollout.{state}",
            f"rollout/{r.id}",
            {"state": before},
            {"state": state, "reason": why},
        )
        log.info("rollout %s %s: %s", r.id, state, why)
        if self.on_event:
            self.on_event(state, r.id, why)

    def _event(self, s: Session, r: Rollout, action: str, why: str) -> None:
        r.updated_at = utcnow()
        audit.record(
            s, ACTOR, f"rollout.{action}", f"rollout/{r.id}", after={"wave": r.current_wave, "detail": why}
        )
        log.info("rollout %s %s: %s", r.id, action, why)
