"""The Rollouts pages: the list, one rollout live, and the operator's controls (each confirmed first).

    GET  /ui/rollouts                        newest first: release, state, progress, who, when
    GET  /ui/rollouts/{id}                   waves and their devices, each gate's value against its
                                             threshold and the baseline, latency per wave (chart)
    GET  /ui/rollouts/{id}/live              the same page's live part alone: the page polls it
                                             every 2 s and swaps it in (no reload)
    GET  /ui/rollouts/{id}/waves/{n}         one wave's devices, past waves included: from/to version,
                                             state, last report, p95, error rate; 200 a page by
                                             device id (``?after=``, ``?limit=``, ``?state=``)
    GET  /ui/rollouts/{id}/{action}          operator: what pause / resume / abort / rollback will
                                             do, and the form that confirms it
    POST /ui/rollouts/{id}/{action}          operator + CSRF: does it through cloud_hub.rollouts,
                                             audited with the token's name as the API does

Gate values are what the controller would judge now (:func:`cloud_hub.gates.evaluate` over the
health the updated devices reported since their update, against the wave's baseline); nothing
here writes but the four controls.
"""

from __future__ import annotations

import hashlib
import json
import re
import statistics
import time
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from cloud_hub import rollouts
from cloud_hub.auth import Role
from cloud_hub.gates import evaluate, parse_gate
from cloud_hub.models import AuditEntry, Device, DeviceDeployment, Model, Release, Rollout
from cloud_hub.ui.access import Form, Ui
from cloud_hub.ui.paging import Paging
from cloud_hub.ui.session import SignedIn
from edgeglm.contracts import ROLLOUT_ID_MAX
from edgeglm.errors import ConflictError, NotFoundError, UsageError
from edgeglm.hub_api import AuditView, DeploymentView
from edgeglm.lifecycle import DeploymentState, RolloutEvent, rollout_sources

__all__ = [
    "ACTIONS",
    "allowed",
    "confirm_page",
    "control",
    "live_fragment",
    "refusal",
    "rollout_id_of",
    "rollout_page",
    "rollouts_page",
    "wave_page",
]

DEVICES_SHOWN = 200  # of the current wave, on the page and in each poll
HISTORY_SHOWN = 50  # newest audit entries of the rollout shown

# action -> (what the confirmation says it does, the event whose source states allow it)
ACTIONS: dict[str, tuple[str, RolloutEvent]] = {
    "pause": ("stops moving to the next wave; devices keep what they run", RolloutEvent.PAUSE),
    "resume": ("goes on: the current wave soaks again before the next starts", RolloutEvent.RESUME),
    "abort": (
        "ends it for good; devices keep what they run, waves not started are skipped",
        RolloutEvent.ABORT,
    ),
    "rollback": ("sends every device it moved back to the version it ran before", RolloutEvent.ROLLBACK),
}


def rollouts_page(ui: Ui, request: Request, who: SignedIn) -> Response:
    with ui.hub.db.session() as s:
        views = [rollouts.rollout_view(s, r) for r in rollouts.listing(s, limit=100)]
        return ui.render(request, "rollouts.html", who, rollouts=views)


def rollout_id_of(request: Request) -> int:
    """The path's rollout id; one no rollout can have (0, or past what the wire and the database
    carry) is a 404 here, as the API's ``RolloutIdPath`` refuses it, not an overflow."""
    text = str(request.path_params["rollout_id"])
    if not re.fullmatch(r"[0-9]{1,10}", text) or not 1 <= int(text) <= ROLLOUT_ID_MAX:
        raise NotFoundError(f"rollout {text[:24]!r}", f"does not exist (ids are 1 to {ROLLOUT_ID_MAX})")
    return int(text)


def _rollout(s: Session, request: Request) -> Rollout:
    return rollouts.find(s, rollout_id_of(request))


def _latest_of(s: Session, model: str) -> int | None:
    return s.scalar(
        select(Rollout.id)
        .join(Release, Rollout.release_id == Release.id)
        .join(Model)
        .where(Model.name == model)
        .order_by(Rollout.id.desc())
        .limit(1)
    )


def refusal(s: Session, r: Rollout, release: str, action: str) -> str | None:
    """Why ``action`` does not apply to ``r`` now, or None when it does: its state must be one the
    action leaves from, and a rollback needs ``r`` to be its model's latest rollout."""
    model = release.rpartition("@")[0]
    event = ACTIONS[action][1]
    if r.state not in rollout_sources(event):
        return f"it is {r.state}; to {action} it, it must be " + " or ".join(sorted(rollout_sources(event)))
    if action == "rollback" and (latest := _latest_of(s, model)) != r.id:
        return (
            f"it is not the latest rollout of {model} (rollout {latest} is); only a model's latest"
            " rollout can be rolled back"
        )
    return None


def allowed(s: Session, r: Rollout, release: str) -> list[str]:
    """The controls that apply to ``r`` now (rollback: only the model's latest rollout has one)."""
    return [a for a in ACTIONS if refusal(s, r, release, a) is None]


def _median_p95(healths: list[dict[str, Any]]) -> float | None:
    busy = [
        float(h["latency_p95_ms"]) for h in healths if int(h.get("requests", 0)) > 0 and "latency_p95_ms" in h
    ]
    return statistics.median(busy) if busy else None


def _wave_counts(s: Session, r: Rollout) -> dict[int, dict[str, int]]:
    counts: dict[int, dict[str, int]] = {}
    for wave, state, n in s.execute(
        select(DeviceDeployment.wave, DeviceDeployment.state, func.count())
        .where(DeviceDeployment.rollout_id == r.id)
        .group_by(DeviceDeployment.wave, DeviceDeployment.state)
    ):
        counts.setdefault(int(wave), {})[str(state)] = int(n)
    return counts


def _fresh(s: Session, r: Rollout) -> dict[int, list[dict[str, Any]]]:
    """Per wave, the health its updated devices reported from the new version since their update
    (what the controller judges): two columns of the succeeded deployments and their devices."""
    rows = s.execute(
        select(DeviceDeployment.wave, DeviceDeployment.to_version, DeviceDeployment.started_at, Device.health)
        .join(Device, Device.id == DeviceDeployment.device_id)
        .where(DeviceDeployment.rollout_id == r.id, DeviceDeployment.state == DeploymentState.SUCCEEDED)
    )
    fresh: dict[int, list[dict[str, Any]]] = {}
    for wave, to_version, started_at, health in rows:
        health = dict(health or {})
        since = started_at.timestamp() if started_at else float("inf")
        if health.get("version") == to_version and float(health.get("ts", 0)) >= since:
            fresh.setdefault(int(wave), []).append(health)
    return fresh


def _shown(s: Session, r: Rollout) -> tuple[list[DeploymentView], dict[str, dict[str, Any]]]:
    """The current wave's first :data:`DEVICES_SHOWN` deployments (by device id) and their health."""
    rows = s.execute(
        select(DeviceDeployment, Device.health)
        .outerjoin(Device, Device.id == DeviceDeployment.device_id)
        .where(DeviceDeployment.rollout_id == r.id, DeviceDeployment.wave == r.current_wave)
        .order_by(DeviceDeployment.device_id)
        .limit(DEVICES_SHOWN)
    ).all()
    views = [rollouts.deployment_view(d) for d, _ in rows]
    return views, {d.device_id: dict(health or {}) for d, health in rows}


def live_state(s: Session, r: Rollout) -> dict[str, Any]:
    """Everything the live part of a rollout's page shows, read in a few aggregate queries: the
    state, each wave's counts per deployment state, the gates and the chart over the updated
    devices' health, the current wave's devices (at most :data:`DEVICES_SHOWN`, by id), and the
    newest :data:`HISTORY_SHOWN` entries of its history. A 10,000-device rollout is not 10,000
    rows of HTML every 2 s."""
    view = rollouts.rollout_view(s, r)
    counts = _wave_counts(s, r)
    fresh = _fresh(s, r)
    shown, health = _shown(s, r)
    waves = []
    for w in view.waves:
        in_wave = counts.get(w.wave, {})
        current = w.wave == r.current_wave
        waves.append(
            {
                "view": w,
                "counts": dict(sorted(in_wave.items())),
                "deployments": shown if current else [],
                "more": max(0, sum(in_wave.values()) - len(shown)) if current else 0,
                "p95": _median_p95(fresh.get(w.wave, [])),
                "baseline": (r.baseline.get(str(w.wave)) or {}).get("p95_ms"),
                "health": health if current else {},
            }
        )
    gates = [parse_gate(g) for g in r.gates]
    baseline: dict[str, Any] = {}
    for key in (str(r.current_wave), "latest"):
        if (r.baseline.get(key) or {}).get("p95_ms"):
            baseline = dict(r.baseline[key])
            break
    succeeded = view.devices.get(DeploymentState.SUCCEEDED, 0)
    verdict = evaluate(
        gates,
        [h for healths in fresh.values() for h in healths],
        baseline,
        max(1, min(r.min_samples, succeeded)),
        r.min_requests,
        waived=str(r.baseline.get("waived", "")),
    )
    gate_rows = [
        {
            "gate": str(g),
            "metric": g.metric,
            "op": g.op,
            "threshold": g.threshold,
            "value": verdict.values.get(g.metric),
            "holds": g.holds(verdict.values[g.metric]) if g.metric in verdict.values else None,
        }
        for g in gates
    ]
    chart = {
        "waves": [w["view"].wave for w in waves],
        "updated": [w["p95"] for w in waves],
        "baseline": [w["baseline"] for w in waves],
    }
    history = [
        AuditView.model_validate(e, from_attributes=True)
        for e in s.scalars(
            select(AuditEntry)
            .where(AuditEntry.target == f"rollout/{r.id}")
            .order_by(AuditEntry.id.desc())
            .limit(HISTORY_SHOWN)
        )
    ]
    return {
        "rollout": view,
        "waves": waves,
        "verdict": verdict,
        "gates": gate_rows,
        "baseline": baseline,
        "chart": json.dumps(chart),
        "history": history,
        "now": datetime.now(UTC),
    }


def wave_index_of(request: Request, r: Rollout) -> int:
    """The path's wave number: 0 to the rollout's last wave, else a 404."""
    text = str(request.path_params["wave"])
    last = len(r.waves) - 1
    if not re.fullmatch(r"[0-9]{1,4}", text) or not 0 <= int(text) <= last:
        raise NotFoundError(
            f"wave {text[:24]!r} of rollout {r.id}", f"does not exist (its waves are 0 to {last})"
        )
    return int(text)


def wave_page(ui: Ui, request: Request, who: SignedIn) -> Response:
    """One wave's deployments, read-only, a page at a time by device id (the wave's count and
    the state filter in SQL), whatever wave the rollout is at now."""
    paging = Paging.of(request)
    state_text = request.query_params.get("state", "")
    states = [str(st) for st in DeploymentState]
    if state_text and state_text not in states:
        raise UsageError("state", f"{state_text[:30]!r}: choose one of " + ", ".join(states))
    with ui.hub.db.session() as s:
        r = _rollout(s, request)
        index = wave_index_of(request, r)
        view = rollouts.rollout_view(s, r)
        where = [DeviceDeployment.rollout_id == r.id, DeviceDeployment.wave == index]
        if state_text:
            where.append(DeviceDeployment.state == state_text)
        total = int(s.scalar(select(func.count()).select_from(DeviceDeployment).where(*where)) or 0)
        if paging.after is not None:
            where.append(DeviceDeployment.device_id > paging.after)
        rows = s.execute(
            select(DeviceDeployment, Device.health)
            .outerjoin(Device, Device.id == DeviceDeployment.device_id)
            .where(*where)
            .order_by(DeviceDeployment.device_id)
            .limit(paging.limit + 1)
        ).all()
        more = len(rows) > paging.limit
        rows = rows[: paging.limit]
        kept = {"state": state_text}
        return ui.render(
            request,
            "rollout_wave.html",
            who,
            rollout=view,
            wave=next((w for w in view.waves if w.wave == index), None),
            index=index,
            deployments=[(d, dict(health or {})) for d, health in rows],
            total=total,
            states=states,
            state=state_text,
            next_page=paging.query(kept, rows[-1][0].device_id) if more and rows else "",
            first_page=paging.query(kept, None) if paging.after else "",
            now=datetime.now(UTC),
        )


def fingerprint(s: Session, r: Rollout, can_act: bool) -> str:
    """A weak ETag of everything the live part shows, from a few aggregates: the rollout's row,
    its waves, its deployments (count, row versions, last change), the last heartbeat of its
    updated devices, its last audit entry, the caller's buttons, and the minute (relative times)."""
    deps = s.execute(
        select(
            func.count(),
            func.coalesce(func.sum(DeviceDeployment.row_version), 0),
            func.max(DeviceDeployment.updated_at),
        ).where(DeviceDeployment.rollout_id == r.id)
    ).one()
    seen = s.scalar(
        select(func.max(Device.last_seen))
        .join(DeviceDeployment, DeviceDeployment.device_id == Device.id)
        .where(DeviceDeployment.rollout_id == r.id, DeviceDeployment.state == DeploymentState.SUCCEEDED)
    )
    last_entry = s.scalar(select(func.max(AuditEntry.id)).where(AuditEntry.target == f"rollout/{r.id}"))
    waves = [(w.index, w.state, w.soak_until) for w in r.wave_rows]
    text = repr(
        (
            r.id,
            r.state,
            r.current_wave,
            r.reason,
            r.updated_at,
            json.dumps(r.baseline, sort_keys=True, default=str),
            tuple(deps),
            seen,
            last_entry,
            waves,
            can_act,
            int(time.time() // 60),
        )
    )
    return 'W/"' + hashlib.sha256(text.encode()).hexdigest()[:32] + '"'


def rollout_page(ui: Ui, request: Request, who: SignedIn) -> Response:
    with ui.hub.db.session() as s:
        r = _rollout(s, request)
        state = live_state(s, r)
        actions = allowed(s, r, state["rollout"].release)
        return ui.render(request, "rollout.html", who, actions=actions, **state)


def live_fragment(ui: Ui, request: Request, who: SignedIn) -> Response:
    """The live part alone; 304 when its :func:`fingerprint` is the ``If-None-Match`` sent."""
    with ui.hub.db.session() as s:
        r = _rollout(s, request)
        etag = fingerprint(s, r, who.role >= Role.operator)
        if etag in [t.strip() for t in request.headers.get("if-none-match", "").split(",")]:
            return Response(status_code=304, headers={"ETag": etag, "Cache-Control": "no-store"})
        state = live_state(s, r)
        actions = allowed(s, r, state["rollout"].release)
        response = ui.render(request, "rollout_live.html", who, actions=actions, **state)
        response.headers["ETag"] = etag
        return response


def _action(request: Request) -> str:
    action = str(request.path_params["action"])
    if action not in ACTIONS:
        raise NotFoundError(f"rollout action {action[:40]!r}", "is not one of " + ", ".join(ACTIONS))
    return action


def confirm_page(ui: Ui, request: Request, who: SignedIn) -> Response:
    action = _action(request)
    with ui.hub.db.session() as s:
        r = _rollout(s, request)
        view = rollouts.rollout_view(s, r)
        return ui.render(
            request,
            "confirm.html",
            who,
            rollout=view,
            action=action,
            effect=ACTIONS[action][0],
            refused=refusal(s, r, view.release, action),
        )


def control(ui: Ui, request: Request, who: SignedIn, form: Form) -> Response:
    """Does ``action`` to the rollout of the path, and to no other: in one database session its
    row is read (locked where the database can), the action checked against its state now (a
    rollback: against its model's latest rollout too), then done; else 409 and nothing changes."""
    action = _action(request)
    rollout_id = rollout_id_of(request)
    what = f"{action} of rollout {rollout_id}"
    if form.get("confirm") != action:
        raise ConflictError(what, "was not confirmed", hint="Use its confirmation form.")
    with ui.hub.db.session() as s:
        r = s.get(Rollout, rollout_id, with_for_update=True)
        if r is None:
            raise NotFoundError(f"rollout {rollout_id}", "does not exist")
        release = rollouts.rollout_view(s, r).release
        if (why := refusal(s, r, release, action)) is not None:
            raise ConflictError(
                what, why, hint=f"Open rollout {rollout_id} again: it shows the controls that apply now."
            )
        if action == "rollback":
            model = release.rpartition("@")[0]
            done = rollouts.rollback(
                s, model, {}, who.name, ui.hub.publish, ui.hub.fleet, rollout_id=rollout_id
            )
            if done.nothing:
                view = rollouts.rollout_view(s, r)
                return ui.render(
                    request, "nothing_to_roll_back.html", who, rollout=view, nothing=done.nothing
                )
            acted = done.rollout
        else:
            {"pause": rollouts.pause, "resume": rollouts.resume, "abort": rollouts.abort}[action](
                s, rollout_id, who.name
            )
            acted = rollout_id
    return RedirectResponse(f"/ui/rollouts/{acted}", status_code=303)
