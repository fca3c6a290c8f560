"""Staged rollouts over HTTP: deploy (or a dry run), list and show, pause / resume / abort, rollback.

The rollout controller (``cloud_hub.controller``) moves a running rollout along; these routes
only start, read and steer it.
"""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter
from fastapi import Path as PathParam

from cloud_hub import rollouts
from cloud_hub.auth import Role, require
from cloud_hub.inventory import parse_selector
from cloud_hub.rollouts import DeploySpec
from cloud_hub.routes.deps import Hub, Operator, Viewer
from edgeglm.contracts import RolloutId
from edgeglm.hub_api import (
    API_PREFIX,
    DeployBody,
    DryRunView,
    RollbackBody,
    RollbackView,
    RolloutDetail,
    RolloutView,
)
from edgeglm.lifecycle import RolloutState
from edgeglm.rollout_params import RolloutParams

__all__ = ["router"]

router = APIRouter(prefix=API_PREFIX, tags=["rollouts"])
RolloutIdPath = Annotated[RolloutId, PathParam()]
_CONTROLS = {"pause": rollouts.pause, "resume": rollouts.resume, "abort": rollouts.abort}


@router.post("/rollouts", status_code=201)
def deploy(body: DeployBody, who: Operator, hub: Hub) -> RolloutView | DryRunView:
    """Start a staged rollout (the controller moves it along), or only show it (``dry_run``).
    ``force``: an admin deploys a release whose bundle failed its quality gate."""
    if body.force:
        require(who, Role.admin, "deploying with --force")
    model, _, version = body.release.partition("@")
    params = RolloutParams.model_validate(body.model_dump(exclude={"release", "dry_run", "force"}))
    spec = DeploySpec(model=model, version=version, params=params)
    with hub.db.session() as s:
        if body.dry_run:
            return rollouts.dry_run(s, spec)
        return rollouts.rollout_view(s, rollouts.create(s, spec, who, force=body.force))


@router.get("/rollouts")
def list_rollouts(who: Viewer, hub: Hub, state: RolloutState | None = None) -> list[RolloutView]:
    with hub.db.session() as s:
        return [rollouts.rollout_view(s, r) for r in rollouts.listing(s, state)]


@router.get("/rollouts/{rollout_id}")
def show_rollout(
    rollout_id: RolloutIdPath, who: Viewer, hub: Hub, devices: bool = True
) -> RolloutDetail | RolloutView:
    """``devices=false`` leaves out the per-device list (a large rollout's is long)."""
    with hub.db.session() as s:
        r = rollouts.find(s, rollout_id)
        return rollouts.rollout_detail(s, r) if devices else rollouts.rollout_view(s, r)


@router.post("/rollouts/{rollout_id}/{action}")
def control_rollout(
    rollout_id: RolloutIdPath, action: Literal["pause", "resume", "abort"], who: Operator, hub: Hub
) -> RolloutView:
    with hub.db.session() as s:
        return rollouts.rollout_view(s, _CONTROLS[action](s, rollout_id, who.name))


@router.post("/rollbacks")
def rollback(body: RollbackBody, who: Operator, hub: Hub) -> RollbackView:
    """The model's latest rollout: its moved devices matching ``selector`` back to their old version."""
    selector = parse_selector(f"{k}={v}" for k, v in body.selector.items())
    with hub.db.session() as s:
        return rollouts.rollback(s, body.model, selector, who.name, hub.publish, hub.fleet)
