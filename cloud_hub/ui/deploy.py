"""A new deploy from the dashboard: the form, its dry run, and a start that only follows a dry run.

    GET  /ui/deploy           operator: the form (release, selector, waves, gates, soak, ...)
    POST /ui/deploy/plan      operator + CSRF: the dry run (cloud_hub.rollouts.dry_run): waves,
                              devices, bytes each device downloads; and a confirmation form that
                              carries the same parameters with a plan token, an HMAC of them
                              bound to this session and time (cloud_hub.ui.session.SessionKey.plan)
    POST /ui/deploy/start     operator + CSRF + a plan token that matches the parameters sent, at
                              most 15 minutes old: cloud_hub.rollouts.create (audited
                              ``rollout.start``); else refused, 409, "show its dry run first"

The parameters are :class:`edgeglm.rollout_params.RolloutParams` (its defaults, its limits); a
deploy of a bundle that failed its quality gate (admin, ``--force``) is left to ``edgectl``.
"""

from __future__ import annotations

import json
import re
from typing import Any

from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from cloud_hub import rollouts
from cloud_hub.inventory import parse_selector
from cloud_hub.registry import Registry, parse_ref
from cloud_hub.rollouts import DeploySpec
from cloud_hub.ui.access import Form, Ui
from cloud_hub.ui.session import SignedIn
from edgeglm.errors import ConflictError, UsageError
from edgeglm.rollout_params import DEFAULTS, RolloutParams

__all__ = ["FIELDS", "deploy_form", "deploy_plan", "deploy_start", "params_of"]

FIELDS = ("release", "selector", "waves", "gates", "soak_s", "device_timeout_s", "on_failure", "min_requests")


def _list(text: str) -> list[str]:
    return [p.strip() for p in text.split(",") if p.strip()]


def params_of(form: Form) -> tuple[str, RolloutParams, str]:
    """(release, parameters, canonical text) of the deploy form's fields; a wrong one is a UsageError
    that names it."""
    release = form.get("release", "").strip()
    model, version = parse_ref(release)
    raw: dict[str, Any] = {
        "selector": parse_selector(_list(form.get("selector", ""))),
        "waves": _list(form.get("waves", "")) or list(DEFAULTS.waves),
        "gates": _list(form.get("gates", "")),
        "on_failure": form.get("on_failure", "") or DEFAULTS.on_failure.value,
    }
    for name in ("soak_s", "device_timeout_s", "min_requests"):
        if (value := form.get(name, "").strip()) != "":
            raw[name] = value
    try:
        params = RolloutParams.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "deploy"
        raise UsageError(where, str(first.get("msg", "invalid"))[:200]) from None
    DeploySpec(model=model, version=version, params=params)  # waves and gates parse, or UsageError
    canonical = json.dumps(
        {"release": f"{model}@{version}", **params.model_dump(mode="json")}, sort_keys=True
    )
    return f"{model}@{version}", params, canonical


def _fields(form: Form) -> dict[str, str]:
    return {name: form.get(name, "") for name in FIELDS}


def _releases(ui: Ui) -> list[str]:
    with ui.hub.db.session() as s:
        return [f"{r.model.name}@{r.version}" for r in reversed(Registry(s, None, {}).releases())]  # type: ignore[arg-type]


def deploy_form(ui: Ui, request: Request, who: SignedIn) -> Response:
    fields = {name: request.query_params.get(name, "") for name in FIELDS}
    return ui.render(
        request, "deploy.html", who, fields=fields, releases=_releases(ui), defaults=DEFAULTS, error=""
    )


def deploy_plan(ui: Ui, request: Request, who: SignedIn, form: Form) -> Response:
    try:
        release, params, canonical = params_of(form)
        model, _, version = release.partition("@")
        with ui.hub.db.session() as s:
            plan = rollouts.dry_run(s, DeploySpec(model=model, version=version, params=params))
    except (UsageError, ConflictError) as exc:
        return ui.render(
            request,
            "deploy.html",
            who,
            status=400 if isinstance(exc, UsageError) else 409,
            fields=_fields(form),
            releases=_releases(ui),
            defaults=DEFAULTS,
            error=f"{exc.what}: {exc.why}",
        )
    issued = int(ui.clock())
    return ui.render(
        request,
        "deploy_plan.html",
        who,
        plan=plan,
        params=params,
        fields=_fields(form),
        issued=issued,
        plan_token=ui.key.plan(who.ticket, canonical, issued),
    )


def deploy_start(ui: Ui, request: Request, who: SignedIn, form: Form) -> Response:
    release, params, canonical = params_of(form)
    issued_text = form.get("issued", "")
    if issued_text and not re.fullmatch(r"[0-9]{1,18}", issued_text):
        raise UsageError("issued", f"{issued_text[:20]!r} is not a time in seconds")
    issued = int(issued_text) if issued_text else -1
    if not ui.key.plan_ok(who.ticket, canonical, issued, form.get("plan"), now=ui.clock()):
        raise ConflictError(
            f"deploy of {release}",
            "has no dry run of these parameters in this session (or it is over 15 minutes old)",
            hint="Show its dry run first (Deploy, then Dry run), and confirm from there.",
        )
    model, _, version = release.partition("@")
    with ui.hub.db.session() as s:
        rollout = rollouts.create(s, DeploySpec(model=model, version=version, params=params), who.principal)
        rollout_id = rollout.id
    return RedirectResponse(f"/ui/rollouts/{rollout_id}", status_code=303)
