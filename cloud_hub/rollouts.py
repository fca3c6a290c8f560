"""Rollouts: which devices, in which waves, and the operator's controls (the loop is ``controller``).

    deploy ──> running ──(waves pass)──> completed
                │  ↑ resume       failure / gate breach: on_failure = revert ──> reverted
                ↓  │                                     on_failure = pause  ──> paused
               paused (operator, or inconclusive gates)
    abort: running | paused ──> aborted (devices keep what they run)
    rollback MODEL --fleet: the last rollout's moved devices back to what they ran ──> rolled_back

Devices: the fleet selector's matches whose profile has a bundle in the release, minus pinned
devices and devices already on the target. Wave membership is deterministic: devices are ordered
by SHA-256 of ``model@version/device`` and waves are cumulative (``5,25,100`` percent; ``3n`` is
a count of devices), so a dry run shows exactly the waves the rollout will run. A device takes
part in one active rollout at a time; the database enforces it with a partial unique index.
Dry runs, rollouts and rollbacks are answered as the API's views (:mod:`edgeglm.hub_api`).

A ``p95_ratio`` gate needs a baseline: devices the selector matches that run the model on another
version and are not in the first wave. Where there is none (a first deploy, a one-box fleet) the
gate could never be judged, so the dry run and the deploy refuse it and name ``p95_ms`` instead.

A bundle that failed its quality gate (an admin published it with --force) is deployed only by an
admin who says ``force`` again: an operator is refused (403), an admin without it too (409); the
dry run names such bundles, and the rollout's audit row records ``forced``.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import case, func, or_, select, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import set_committed_value
from sqlalchemy.orm.exc import StaleDataError

from cloud_hub import audit
from cloud_hub.auth import Principal, Role
from cloud_hub.desired import FleetKey
from cloud_hub.gates import parse_gate
from cloud_hub.inventory import devices_by_id, matches, parse_selector
from cloud_hub.models import (
    AuditEntry,
    Bundle,
    Device,
    DeviceDeployment,
    Model,
    Release,
    Rollout,
    RolloutWave,
    utcnow,
)
from cloud_hub.registry import Registry
from edgeglm.bundle import Manifest, parse_manifest
from edgeglm.contracts import ROLLOUT_ID_MAX
from edgeglm.errors import ConflictError, NotFoundError, PermissionDenied, UsageError
from edgeglm.hub_api import (
    AuditView,
    DeploymentView,
    DryRunView,
    PlannedDevice,
    PlannedWave,
    RollbackView,
    RolloutDetail,
    RolloutView,
    WaveView,
)
from edgeglm.lifecycle import (
    ACTIVE_ROLLOUT,
    DeploymentState,
    LifecycleError,
    RolloutEvent,
    RolloutState,
    WaveState,
    next_rollout_state,
    rollout_sources,
)
from edgeglm.planner import plan as plan_update
from edgeglm.rollout_params import DEFAULTS, OnFailure, RolloutParams

__all__ = [
    "DeploySpec",
    "Publish",
    "RolloutPlan",
    "abort",
    "create",
    "deployment_view",
    "deployments_in",
    "dry_run",
    "find",
    "listing",
    "parse_waves",
    "pause",
    "release_devices",
    "resume",
    "revert_devices",
    "rollback",
    "rollout_detail",
    "rollout_view",
    "settle_deployments",
    "start_deployments",
]

log = logging.getLogger(__name__)

_NOT_MOVED = frozenset({DeploymentState.WAITING, DeploymentState.SKIPPED, DeploymentState.REVERTED})
_MOVED = frozenset(DeploymentState) - _NOT_MOVED
_WAVE = re.compile(r"^(\d+(?:\.\d+)?)(%?|n)$")

Publish = Callable[[str, bytes, int, bool], None]  # topic, payload, qos, retain


def parse_waves(text: str | Sequence[str]) -> list[dict[str, Any]]:
    """``"5,25,100"`` -> cumulative percentages; ``"3n"`` a device count. The last must cover all."""
    items = [w.strip() for w in (text.split(",") if isinstance(text, str) else text) if w.strip()]
    if not items:
        raise UsageError("--waves", "give at least one wave, e.g. 5,25,100")
    waves: list[dict[str, Any]] = []
    for item in items:
        m = _WAVE.match(item)
        if not m:
            raise UsageError("--waves", f"{item!r}: a percentage (25 or 25%) or a device count (3n)")
        value = float(m[1])
        if m[2] == "n":
            if value < 1 or value != int(value):
                raise UsageError("--waves", f"{item!r}: a device count is a whole number >= 1")
            waves.append({"count": int(value)})
        else:
            if not 0 < value <= 100:
                raise UsageError("--waves", f"{item!r}: a percentage is in (0, 100]")
            waves.append({"percent": value})
    if "percent" not in waves[-1] or waves[-1]["percent"] != 100:
        waves.append({"percent": 100.0})
    return waves


def wave_targets(waves: Sequence[Mapping[str, Any]], total: int) -> list[int]:
    """Cumulative device counts per wave, strictly growing (an empty wave is dropped)."""
    out: list[int] = []
    for w in waves:
        n = int(w["count"]) if "count" in w else math.ceil(total * float(w["percent"]) / 100 - 1e-9)
        n = min(max(n, 1 if total else 0), total)
        if not out or n > out[-1]:
            out.append(n)
    return out


@dataclass(frozen=True)
class DeploySpec:
    """A rollout asked for: the release and its parameters, parsed (a wrong one is a UsageError)."""

    model: str
    version: str
    params: RolloutParams = DEFAULTS
    selector: dict[str, str] = field(init=False)
    waves: list[dict[str, Any]] = field(init=False)

    def __post_init__(self) -> None:
        p = self.params
        object.__setattr__(self, "selector", parse_selector(f"{k}={v}" for k, v in p.selector.items()))
        object.__setattr__(self, "waves", parse_waves(p.waves))
        for g in p.gates:
            parse_gate(g)


@dataclass(frozen=True)
class RolloutPlan:
    release: Release
    previous: Release | None
    devices: list[Device]  # in wave order
    targets: list[int]  # cumulative counts
    skipped: dict[str, list[str]]  # reason -> device ids
    bundles: dict[str, Bundle]  # profile -> bundle of the release
    conflicts: dict[str, int]  # device id -> other active rollout id
    on_other_version: list[str]  # matching devices running the model on another version


def _order_key(release: Release, device_id: str) -> str:
    return hashlib.sha256(f"{release.model.name}@{release.version}/{device_id}".encode()).hexdigest()


def _plan(s: Session, spec: DeploySpec) -> RolloutPlan:
    registry = Registry(s, None, {})  # type: ignore[arg-type]  # reading only
    release = registry.release(spec.model, spec.version)
    bundles = {b.profile: b for b in release.bundles}
    skipped: dict[str, list[str]] = {"pinned": [], "no bundle for profile": [], "already on target": []}
    chosen: list[Device] = []
    other: list[str] = []
    for d in s.scalars(select(Device).order_by(Device.id)):
        if not matches(d, spec.selector):
            continue
        if d.current_model == spec.model and d.current_version != spec.version:
            other.append(d.id)
        if d.pinned_version:
            skipped["pinned"].append(d.id)
        elif d.profile not in bundles:
            skipped["no bundle for profile"].append(d.id)
        elif d.current_model == spec.model and d.current_version == spec.version:
            skipped["already on target"].append(d.id)
        else:
            chosen.append(d)
    chosen.sort(key=lambda d: _order_key(release, d.id))
    conflicts = {
        dep.device_id: dep.rollout_id
        for dep in s.scalars(
            select(DeviceDeployment).where(
                DeviceDeployment.active.is_(True), DeviceDeployment.device_id.in_([d.id for d in chosen])
            )
        )
    }
    previous = _previous_release(s, release)
    plan = RolloutPlan(
        release, previous, chosen, wave_targets(spec.waves, len(chosen)), skipped, bundles, conflicts, other
    )
    _check_ratio_gates(spec, plan)
    return plan


def _check_ratio_gates(spec: DeploySpec, p: RolloutPlan) -> None:
    """Refuse a ``p95_ratio`` gate that could never be judged: no device outside the first wave
    runs the model on another version, so no wave would ever have a baseline to compare with."""
    ratio = [g for g in spec.params.gates if parse_gate(g).metric == "p95_ratio"]
    if not ratio or not p.devices:
        return
    first = {d.id for d in p.devices[: p.targets[0]]}
    if any(d not in first for d in p.on_other_version):
        return
    why = (
        f"no device outside the first wave runs {spec.model} on another version to give it a"
        " baseline ("
        + (
            "a first deploy: none runs it yet"
            if not p.on_other_version
            else f"all {len(p.on_other_version)} that do are in the first wave"
        )
        + "), so it could never pass"
    )
    hint = "Gate on absolute latency instead, e.g. --gate 'p95_ms<=250' (see --gate-min-requests)"
    if len(p.on_other_version) > 1:
        hint += ", or start with a smaller first wave (--waves 1n,100)"
    raise ConflictError(f"gate {ratio[0]}", why, hint=hint + ".")


def _failed_quality(p: RolloutPlan) -> list[str]:
    """The profiles whose bundle this rollout would send failed its quality gate."""
    sent = {d.profile for d in p.devices}
    return sorted(profile for profile, b in p.bundles.items() if profile in sent and not b.quality_passed)


def _check_quality(spec: DeploySpec, failed: list[str], who: Principal, force: bool) -> None:
    if not failed:
        return
    what = f"rollout of {spec.model}@{spec.version}"
    why = f"its bundle for {', '.join(failed)} failed the quality gate (published with --force)"
    if who.role < Role.admin:
        raise PermissionDenied(
            what, f"{why}: deploying it needs role admin; token {who.name!r} has {who.role.name}"
        )
    if not force:
        raise ConflictError(what, why, hint="Deploy it anyway with --force (force: true), as an admin.")


def _previous_release(s: Session, release: Release) -> Release | None:
    older = [
        r
        for r in release.model.releases
        if (r.major, r.minor, r.patch) < (release.major, release.minor, release.patch)
    ]
    return max(older, key=lambda r: (r.major, r.minor, r.patch), default=None)


def _held_manifest(s: Session, device: Device) -> Manifest | None:
    if not device.current_model or not device.current_version or not device.profile:
        return None
    b = s.scalar(
        select(Bundle)
        .join(Release)
        .join(Model)
        .where(
            Model.name == device.current_model,
            Release.version == device.current_version,
            Bundle.profile == device.profile,
        )
    )
    return parse_manifest(b.manifest_json, None)[0] if b else None


def dry_run(s: Session, spec: DeploySpec) -> DryRunView:
    """The waves, their devices and the bytes each device would download (nothing is written)."""
    p = _plan(s, spec)
    targets = [parse_manifest(b.manifest_json, None)[0] for b in p.bundles.values()]
    by_profile = {m.profile: m for m in targets}
    waves, start = [], 0
    for i, end in enumerate(p.targets):
        members = []
        for d in p.devices[start:end]:
            held = _held_manifest(s, d)
            assert d.profile is not None  # the plan chose it for its profile's bundle
            cost = plan_update(by_profile[d.profile], [held] if held else [])
            members.append(
                PlannedDevice(
                    device=d.id,
                    from_=f"{d.current_model}@{d.current_version}" if d.current_model else None,
                    bytes=cost.bytes_to_send,
                    mode=cost.mode,
                    conflict_rollout=p.conflicts.get(d.id),
                )
            )
        waves.append(PlannedWave(wave=i, devices=members, bytes=sum(m.bytes for m in members)))
        start = end
    return DryRunView(
        release=f"{spec.model}@{spec.version}",
        selector=spec.selector,
        devices=len(p.devices),
        waves=waves,
        skipped={k: v for k, v in p.skipped.items() if v},
        conflicts=len(p.conflicts),
        bytes_estimated=True,  # raw sizes of the pieces a device lacks; tensor deltas only shrink it
        quality_failed=_failed_quality(p),
    )


def create(s: Session, spec: DeploySpec, who: Principal, *, force: bool = False) -> Rollout:
    """A running rollout of ``spec``, started by ``who``; ``force``: an admin deploys a bundle
    that failed its quality gate anyway (recorded in the audit row)."""
    actor = who.name
    p = _plan(s, spec)
    if not p.devices:
        raise ConflictError(
            f"rollout of {spec.model}@{spec.version}",
            "no device to update: "
            + (", ".join(f"{k}: {len(v)}" for k, v in p.skipped.items() if v) or "none match"),
            hint="Check --fleet, pins, and that the release has a bundle for the devices' profiles.",
        )
    if p.conflicts:
        ids = sorted(set(p.conflicts.values()))
        raise ConflictError(
            f"rollout of {spec.model}@{spec.version}",
            f"{len(p.conflicts)} device(s) are in active rollout(s) {ids}",
            hint="Wait for them, or pause / abort them first (edgectl rollouts abort ID).",
        )
    failed = _failed_quality(p)
    _check_quality(spec, failed, who, force)
    rollout = Rollout(
        release_id=p.release.id,
        previous_release_id=p.previous.id if p.previous else None,
        selector=dict(spec.selector),
        waves=list(spec.waves),
        **spec.params.model_dump(mode="json", exclude={"selector", "waves"}),
        state=RolloutState.RUNNING,
        created_by=actor,
    )
    s.add(rollout)
    try:
        s.flush()
    except DBAPIError as exc:  # PostgreSQL: the id sequence (a 32-bit serial) is used up
        if getattr(exc.orig, "sqlstate", None) != "2200H":
            raise
        raise _ids_exhausted(spec) from exc
    if rollout.id > ROLLOUT_ID_MAX:  # SQLite: its row ids go on past what the wire carries
        raise _ids_exhausted(spec)
    start = 0
    for i, end in enumerate(p.targets):
        s.add(RolloutWave(rollout_id=rollout.id, index=i, size=end - start))
        for d in p.devices[start:end]:
            s.add(
                DeviceDeployment(
                    rollout_id=rollout.id,
                    device_id=d.id,
                    wave=i,
                    from_version=d.current_version if d.current_model == spec.model else None,
                    to_version=spec.version,
                    state=DeploymentState.WAITING,
                    active=True,
                )
            )
        start = end
    s.flush()  # the partial unique index refuses a device already in another active rollout
    audit.record(
        s,
        actor,
        "rollout.start",
        f"rollout/{rollout.id}",
        after={
            "release": f"{spec.model}@{spec.version}",
            "selector": spec.selector,
            "devices": len(p.devices),
            "waves": p.targets,
            "gates": list(spec.params.gates),
            "min_requests": spec.params.min_requests,
            "on_failure": spec.params.on_failure.value,
            "forced": bool(failed),
            **({"quality_failed": failed} if failed else {}),
        },
    )
    log.info(
        "rollout %s created by %s: %s@%s to %d device(s) in waves %s, gates %s, on failure %s",
        rollout.id,
        actor,
        spec.model,
        spec.version,
        len(p.devices),
        p.targets,
        list(spec.params.gates) or "none",
        spec.params.on_failure.value,
    )
    return rollout


def _ids_exhausted(spec: DeploySpec) -> ConflictError:
    return ConflictError(
        f"rollout of {spec.model}@{spec.version}",
        f"every rollout id up to {ROLLOUT_ID_MAX} is taken",
        hint="A rollout id is a 32-bit number on the wire and in the database: this one is full.",
    )


def listing(s: Session, state: RolloutState | None = None, *, limit: int = 200) -> list[Rollout]:
    """The newest rollouts first, only those in ``state`` if given."""
    q = select(Rollout).order_by(Rollout.id.desc()).limit(limit)
    if state:
        q = q.where(Rollout.state == state)
    return list(s.scalars(q))


def find(s: Session, rollout_id: int) -> Rollout:
    r = s.get(Rollout, rollout_id)
    if r is None:
        raise NotFoundError(f"rollout {rollout_id}", "does not exist")
    return r


def _transition(s: Session, rollout_id: int, event: RolloutEvent, actor: str, why: str) -> Rollout:
    r = find(s, rollout_id)
    try:
        to = next_rollout_state(r.state, event)
    except LifecycleError:
        need = " or ".join(rollout_sources(event))
        raise ConflictError(f"rollout {rollout_id}", f"is {r.state}; this needs it {need}") from None
    before = r.state
    r.state, r.reason, r.updated_at = to, why, utcnow()
    audit.record(
        s, actor, f"rollout.{to}", f"rollout/{r.id}", {"state": before}, {"state": to, "reason": why}
    )
    log.info("rollout %s %s -> %s: %s", r.id, before, to, why)
    return r


def pause(s: Session, rollout_id: int, actor: str) -> Rollout:
    return _transition(s, rollout_id, RolloutEvent.PAUSE, actor, f"paused by {actor}")


def resume(s: Session, rollout_id: int, actor: str) -> Rollout:
    """Running again; the current wave soaks again. A rollout the controller paused for want of a
    baseline goes on without its ``p95_ratio`` while there is none (waived by ``actor``; the other
    gates still judge every wave), so it does not pause again for the same missing baseline."""
    r = _transition(s, rollout_id, RolloutEvent.RESUME, actor, f"resumed by {actor}")
    wave = next((w for w in r.wave_rows if w.index == r.current_wave), None)
    if wave is not None and wave.state == WaveState.SOAKING:
        wave.soak_until = None  # soak again from now: the pause may have hidden a breach
    if "missing" in r.baseline:
        baseline = dict(r.baseline)
        missing = baseline.pop("missing")
        waived = f"waived by {actor} at {r.updated_at.isoformat(timespec='seconds')}"
        r.baseline = {**baseline, "waived": waived}
        r.reason = f"resumed by {actor}: p95_ratio is left out while no baseline exists ({missing})"
        audit.record(
            s, actor, "rollout.gate.waive", f"rollout/{r.id}", after={"gate": "p95_ratio", "why": missing}
        )
        log.info("rollout %s: p95_ratio waived by %s: %s", r.id, actor, missing)
    return r


def abort(s: Session, rollout_id: int, actor: str) -> Rollout:
    r = _transition(s, rollout_id, RolloutEvent.ABORT, actor, f"aborted by {actor}")
    release_devices(s, r)
    return r


def start_deployments(s: Session, deps: Sequence[DeviceDeployment], now: datetime) -> None:
    """``deps`` (waiting; their devices were just told) are pending from ``now``: one UPDATE per
    up to 5,000 of them (rows locked in id order), each row's version bumped as an ORM update
    does. A row no longer waiting (an abort came first) is a StaleDataError: the tick is tried
    again. A device report that only noted its step on a waiting row (the device answered before
    this commit) does not stop it, as it would stop an ORM update. The objects are expired."""
    ids = sorted(d.id for d in deps)
    for i in range(0, len(ids), 5000):
        chunk = ids[i : i + 5000]
        where = (DeviceDeployment.id.in_(chunk), DeviceDeployment.state == DeploymentState.WAITING)
        with s.no_autoflush:
            s.execute(
                select(DeviceDeployment.id).where(*where).order_by(DeviceDeployment.id).with_for_update()
            )
            done = s.execute(
                update(DeviceDeployment)
                .where(*where)
                .values(
                    state=DeploymentState.PENDING,
                    started_at=now,
                    updated_at=now,
                    row_version=DeviceDeployment.row_version + 1,
                )
                .execution_options(synchronize_session=False)
            )
        changed = int(done.rowcount)  # type: ignore[attr-defined]
        if changed != len(chunk):
            raise StaleDataError(f"{len(chunk) - changed} deployment(s) stopped waiting meanwhile")
    for dep in deps:
        s.expire(dep)


def settle_deployments(
    s: Session, outcomes: Sequence[tuple[DeviceDeployment, DeploymentState, str]], now: datetime
) -> None:
    """Settle pending deployments as the controller judged them (state, detail), without the
    optimistic lock failing its whole tick when a device report settled one first: one UPDATE
    per outcome for the rows still pending (locked in id order), versioned as an ORM update is.
    A row settled meanwhile keeps the report's outcome; every object takes what its row holds
    now, and none is left for the ORM to flush."""
    groups: dict[tuple[DeploymentState, str], dict[int, DeviceDeployment]] = {}
    for dep, state, detail in outcomes:
        groups.setdefault((state, detail), {})[dep.id] = dep
    stale: list[int] = []
    for (state, detail), deps in groups.items():
        ids = sorted(deps)
        for i in range(0, len(ids), 5000):
            where = (
                DeviceDeployment.id.in_(ids[i : i + 5000]),
                DeviceDeployment.state == DeploymentState.PENDING,
            )
            with s.no_autoflush:
                s.execute(
                    select(DeviceDeployment.id).where(*where).order_by(DeviceDeployment.id).with_for_update()
                )
                rows = s.execute(
                    update(DeviceDeployment)
                    .where(*where)
                    .values(
                        state=state,
                        detail=detail,
                        resolved_at=now,
                        updated_at=now,
                        row_version=DeviceDeployment.row_version + 1,
                    )
                    .returning(DeviceDeployment.id, DeviceDeployment.row_version)
                    .execution_options(synchronize_session=False)
                ).all()
            done = {dep_id: version for dep_id, version in rows}
            for dep_id in ids[i : i + 5000]:
                if dep_id not in done:
                    stale.append(dep_id)
                    continue
                dep = deps[dep_id]
                for key, value in (
                    ("state", state),
                    ("detail", detail),
                    ("resolved_at", now),
                    ("updated_at", now),
                    ("row_version", done[dep_id]),
                ):
                    set_committed_value(dep, key, value)
    for i in range(0, len(stale), 5000):  # settled by a report first: read what it says
        with s.no_autoflush:
            s.scalars(
                select(DeviceDeployment)
                .where(DeviceDeployment.id.in_(stale[i : i + 5000]))
                .execution_options(populate_existing=True)
            ).all()


def release_devices(s: Session, rollout: Rollout) -> None:
    """The rollout's devices may join another one; those whose wave never started are skipped.

    One UPDATE for the whole rollout (a wave of 10,000 devices is not 10,000 row updates). It
    bumps each row's version as an ORM update does, so a device report that read a row before
    it fails its version check and retries; the deployments this session holds are expired."""
    s.flush()
    state = DeviceDeployment.state
    touched = (
        DeviceDeployment.rollout_id == rollout.id,
        or_(DeviceDeployment.active.is_(True), state == DeploymentState.WAITING),
    )
    # locked in id order first, as the ORM's flushes lock deployments (no deadlock with ingest)
    s.execute(select(DeviceDeployment.id).where(*touched).order_by(DeviceDeployment.id).with_for_update())
    s.execute(
        update(DeviceDeployment)
        .where(*touched)
        .values(
            active=False,
            state=case((state == DeploymentState.WAITING, DeploymentState.SKIPPED), else_=state),
            row_version=DeviceDeployment.row_version + 1,
        )
        .execution_options(synchronize_session=False)
    )
    for obj in list(s.identity_map.values()):
        if isinstance(obj, DeviceDeployment):
            s.expire(obj)


def deployments_in(
    s: Session, rollout_id: int, states: Collection[DeploymentState]
) -> list[DeviceDeployment]:
    """The rollout's deployments in ``states`` as this session sees them, its changes not yet
    flushed included, without flushing them (a wave's hundreds of versioned row updates wait
    for the commit, after the desired states went out)."""
    with s.no_autoflush:
        found = {
            d.id: d
            for d in s.scalars(
                select(DeviceDeployment).where(
                    DeviceDeployment.rollout_id == rollout_id, DeviceDeployment.state.in_(list(states))
                )
            )
        }
        for obj in s.dirty:  # changed here, into (or out of) ``states``
            if isinstance(obj, DeviceDeployment) and obj.rollout_id == rollout_id:
                found[obj.id] = obj
    return [d for d in found.values() if d.state in states]


def revert_devices(
    s: Session,
    rollout: Rollout,
    publish: Publish | None,
    *,
    fleet: FleetKey | None,
    only: Sequence[str] | None = None,
) -> list[str]:
    """Desired state back to what each moved device ran before, for exactly those devices."""
    from cloud_hub.desired import next_sequences, publish_desired

    moved = [dep for dep in deployments_in(s, rollout.id, _MOVED) if only is None or dep.device_id in only]
    model = s.get(Release, rollout.release_id).model.name  # type: ignore[union-attr]
    reverted = []
    with s.no_autoflush:  # the settled deployments are written after the desired states went out
        devices = devices_by_id(s, [dep.device_id for dep in moved])
    sequences = next_sequences(s, list(devices), now=time.time())
    digests: dict[str, str] = {}
    for dep in moved:
        device = devices.get(dep.device_id)
        if device is None:
            continue
        publish_desired(
            s,
            device,
            model,
            dep.from_version,
            None,
            publish,
            digests,
            fleet=fleet,
            sequence=sequences[device.id],
        )
        dep.state, dep.active, dep.updated_at = DeploymentState.REVERTED, False, utcnow()
        reverted.append(dep.device_id)
        back = f"{model}@{dep.from_version}" if dep.from_version else "no model"
        log.info("rollout %s: device %s sent back to %s", rollout.id, dep.device_id, back)
    release_devices(s, rollout)
    return reverted


def rollback(
    s: Session,
    model: str,
    selector: Mapping[str, str],
    actor: str,
    publish: Publish | None,
    fleet: FleetKey | None,
    *,
    rollout_id: int | None = None,
) -> RollbackView:
    """The latest rollout of ``model``: its moved devices (matching ``selector``) go back.

    ``rollout_id``: the rollout the caller means (the dashboard's ``/ui/rollouts/{id}/rollback``);
    when it is not ``model``'s latest any more, a ConflictError and nothing changes.

    Nothing left to send back (the hub reverted it already, or it moved no device and has ended):
    the answer says so and why, the rollout keeps its state and reason, and the audit log gets the
    attempt. Moved devices of which none matches ``selector``: a ConflictError. Otherwise the
    rollout is ``rolled_back`` and its reason says so after the one it had.
    """
    r = s.scalar(
        select(Rollout)
        .join(Release, Rollout.release_id == Release.id)
        .join(Model)
        .where(Model.name == model)
        .order_by(Rollout.id.desc())
    )
    if r is None:
        raise NotFoundError(f"model {model}", "has no rollout to roll back")
    if rollout_id is not None and r.id != rollout_id:
        raise ConflictError(
            f"rollback of rollout {rollout_id}",
            f"it is not the latest rollout of {model} (rollout {r.id} is); only a model's latest"
            " rollout can be rolled back",
            hint=f"Open rollout {r.id} to roll back what it moved.",
        )
    target = f"rollout/{r.id}"
    moved = [
        dep.device_id
        for dep in s.scalars(select(DeviceDeployment).where(DeviceDeployment.rollout_id == r.id))
        if dep.state not in _NOT_MOVED
    ]
    if not moved and r.state not in ACTIVE_ROLLOUT:
        at = r.updated_at.isoformat(timespec="seconds")
        nothing = f"it was already {r.state} at {at}"
        nothing += f" because {r.reason}" if r.reason else ""
        audit.record(
            s, actor, "rollout.rollback", target, {"state": r.state}, {"state": r.state, "nothing": nothing}
        )
        log.info("rollback of %s by %s: nothing to send back: %s", model, actor, nothing)
        return RollbackView(rollout=r.id, reverted=[], state=RolloutState(r.state), nothing=nothing)
    devices = [d.id for d in s.scalars(select(Device)) if matches(d, selector)]
    if moved and not set(moved) & set(devices):
        raise ConflictError(
            f"rollback of rollout {r.id}",
            f"none of the {len(moved)} device(s) it moved matches the selector {dict(selector)}",
            hint="Leave out --fleet to send them all back, or check it with edgectl devices list --fleet.",
        )
    before, reason = r.state, r.reason
    reverted = revert_devices(s, r, publish, fleet=fleet, only=devices)
    r.state = next_rollout_state(r.state, RolloutEvent.ROLLBACK)
    r.reason = f"{reason}; then rolled back by {actor}" if reason else f"rolled back by {actor}"
    r.updated_at = utcnow()
    audit.record(
        s,
        actor,
        "rollout.rollback",
        target,
        {"state": before, "reason": reason},
        {"state": r.state, "devices": reverted, "selector": dict(selector)},
    )
    log.info("rollout %s %s -> %s: %d device(s) sent back by %s", r.id, before, r.state, len(reverted), actor)
    return RollbackView(rollout=r.id, reverted=reverted, state=RolloutState(r.state))


def rollout_view(s: Session, r: Rollout) -> RolloutView:
    release = s.get(Release, r.release_id)
    assert release is not None
    counts = {
        DeploymentState(state): int(n)
        for state, n in s.execute(
            select(DeviceDeployment.state, func.count())
            .where(DeviceDeployment.rollout_id == r.id)
            .group_by(DeviceDeployment.state)
        )
    }
    return RolloutView(
        id=r.id,
        release=f"{release.model.name}@{release.version}",
        state=RolloutState(r.state),
        reason=r.reason,
        current_wave=r.current_wave,
        waves=[
            WaveView(wave=w.index, size=w.size, state=WaveState(w.state), soak_until=w.soak_until)
            for w in r.wave_rows
        ],
        devices=counts,
        selector=r.selector,
        gates=r.gates,
        min_requests=r.min_requests,
        on_failure=OnFailure(r.on_failure),
        created_by=r.created_by,
        created_at=r.created_at,
        updated_at=r.updated_at,
        baseline=r.baseline,
    )


def deployment_view(d: DeviceDeployment) -> DeploymentView:
    """One device's deployment as the API and the dashboard show it."""
    return DeploymentView(
        device=d.device_id,
        wave=d.wave,
        state=DeploymentState(d.state),
        from_=d.from_version,
        to=d.to_version,
        last_step=d.last_step,
        detail=d.detail,
    )


def rollout_detail(s: Session, r: Rollout) -> RolloutDetail:
    """The rollout's view and each of its devices, by wave."""
    rows = s.scalars(
        select(DeviceDeployment)
        .where(DeviceDeployment.rollout_id == r.id)
        .order_by(DeviceDeployment.wave, DeviceDeployment.device_id)
    )
    deployments = [deployment_view(d) for d in rows]
    history = [
        AuditView.model_validate(e, from_attributes=True)
        for e in s.scalars(
            select(AuditEntry).where(AuditEntry.target == f"rollout/{r.id}").order_by(AuditEntry.id)
        )
    ]
    return RolloutDetail(**dict(rollout_view(s, r)), deployments=deployments, history=history)
