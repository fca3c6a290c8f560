"""The Rollouts pages: the list, one rollout live, and the operator's controls (each confirmed first).

    GET  /ui/rollouts                        newest first: release, state, progress, who, when
    GET  /ui/rollouts/{id}                   waves and their devices, each gate's value against its
                                             threshold and the baseline, latency per wave (chart)
    GET  /ui/rollouts/{id}/live              the same page's live part alone: the page polls it
                                             every 2 s and swaps it in (no reload)
    GET  /ui/rollouts/{id}/{action}          operator: what pause / resume / abort / rollback will
                                             do, and the form that confirms it
    POST /ui/rollouts/{id}/{action}          operator + CSRF: does it through cloud_hub.rollouts,
                                             audited with the token's name as the API does

Gate values are what the controller would judge now (:func:`cloud_hub.gates.evaluate` over the
health the updated devices reported since their update, against the wave's baseline); nothing
here writes but the four controls.
"""

from __future__ import annotations

import json
import re
import statistics
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from cloud_hub import rollouts
from cloud_hub.gates import evaluate, parse_gate
from cloud_hub.inventory import devices_by_id
from cloud_hub.models import DeviceDeployment, Model, Release, Rollout
from cloud_hub.ui.access import Form, Ui
from cloud_hub.ui.session import SignedIn
from edgeglm.contracts import ROLLOUT_ID_MAX
from edgeglm.errors import ConflictError, NotFoundError
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
]

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


def live_state(s: Session, r: Rollout) -> dict[str, Any]:
    """Everything the live part of a rollout's page shows."""
    detail = rollouts.rollout_detail(s, r)
    deps = list(s.scalars(select(DeviceDeployment).where(DeviceDeployment.rollout_id == r.id)))
    devices = devices_by_id(s, [d.device_id for d in deps])
    fresh: dict[str, dict[str, Any]] = {}  # device -> health reported from the new version since its update
    for dep in deps:
        device = devices.get(dep.device_id)
        health = dict(device.health or {}) if device is not None else {}
        since = dep.started_at.timestamp() if dep.started_at else float("inf")
        if (
            dep.state == DeploymentState.SUCCEEDED
            and health.get("version") == dep.to_version
            and float(health.get("ts", 0)) >= since
        ):
            fresh[dep.device_id] = health
    by_wave: dict[int, list[Any]] = {}
    for d in detail.deployments:
        by_wave.setdefault(d.wave, []).append(d)
    waves = []
    for w in detail.waves:
        members = by_wave.get(w.wave, [])
        base = (r.baseline.get(str(w.wave)) or {}).get("p95_ms")
        waves.append(
            {
                "view": w,
                "deployments": members,
                "p95": _median_p95([fresh[d.device] for d in members if d.device in fresh]),
                "baseline": base,
                "health": {
                    d.device: devices[d.device].health if d.device in devices else {} for d in members
                },
            }
        )
    gates = [parse_gate(g) for g in r.gates]
    baseline: dict[str, Any] = {}
    for key in (str(r.current_wave), "latest"):
        if (r.baseline.get(key) or {}).get("p95_ms"):
            baseline = dict(r.baseline[key])
            break
    succeeded = sum(1 for d in deps if d.state == DeploymentState.SUCCEEDED)
    verdict = evaluate(
        gates,
        list(fresh.values()),
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
    return {
        "rollout": detail,
        "waves": waves,
        "verdict": verdict,
        "gates": gate_rows,
        "baseline": baseline,
        "chart": json.dumps(chart),
        "now": datetime.now(UTC),
    }


def rollout_page(ui: Ui, request: Request, who: SignedIn) -> Response:
    with ui.hub.db.session() as s:
        r = _rollout(s, request)
        state = live_state(s, r)
        actions = allowed(s, r, state["rollout"].release)
        return ui.render(request, "rollout.html", who, actions=actions, **state)


def live_fragment(ui: Ui, request: Request, who: SignedIn) -> Response:
    with ui.hub.db.session() as s:
        r = _rollout(s, request)
        state = live_state(s, r)
        actions = allowed(s, r, state["rollout"].release)
        return ui.render(request, "rollout_live.html", who, actions=actions, **state)


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
