"""A deploy started from the dashboard is bound to the dry run it showed, over HTTP: the real
POST /ui/deploy/plan, then /ui/deploy/start with the plan page's own hidden fields. The same
fields get past the binding (the service then answers for itself); one field changed, or the
same fields replayed over 15 minutes later (the dashboard's clock moved, no sleep), are refused
with "no dry run", and nothing is created."""

from __future__ import annotations

import html
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from cloud_hub.models import Device, Rollout
from tests.unit.ui_hub import ORIGIN, add_release, add_token, client_of, new_hub, sign_in

NO_DRY_RUN = "has no dry run of these parameters in this session"


@dataclass
class Hub:
    client: Any
    ctx: Any
    now: list[float]  # the dashboard's clock


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hub]:
    from starlette.applications import Starlette
    from starlette.routing import Mount

    from cloud_hub.auth import Role
    from cloud_hub.ui import create_ui

    ctx = new_hub(tmp_path_factory.mktemp("ui-deploy"))
    with ctx.db.session() as s:
        secret = add_token(s, "operator-d", Role.operator)
        add_release(s)
        s.add(Device(id="box-1", profile="cpu-x86-int4", labels={"site": "plant-7"}, online=True))
    now = [1_800_000_000.0]
    app = Starlette(routes=[Mount("/ui", create_ui(ctx, clock=lambda: now[0]))])
    with client_of(ctx, app) as client:
        sign_in(client, secret)
        yield Hub(client, ctx, now)
    ctx.db.dispose()


def _hidden(page: str) -> dict[str, str]:
    start = page[page.index('action="/ui/deploy/start"') :]
    return {
        html.unescape(name): html.unescape(value)
        for name, value in re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)">', start)
    }


def _rollouts(hub: Hub) -> int:
    with hub.ctx.db.session() as s:
        return s.query(Rollout).count()


def test_a_start_is_bound_to_its_dry_run_and_its_time(hub: Hub) -> None:
    csrf = re.search(r'name="csrf" value="([^"]+)"', hub.client.get("/ui/deploy").text)[1]  # type: ignore[index]
    fields = {
        "csrf": csrf,
        "release": "glm-tiny@1.1.0",
        "selector": "site=plant-7",
        "waves": "1n,100",
        "gates": "error_rate<=0.05",
        "soak_s": "2",
    }
    plan = hub.client.post("/ui/deploy/plan", data=fields, headers=ORIGIN)
    assert plan.status_code == 200 and "Dry run: glm-tiny@1.1.0" in plan.text
    signed = _hidden(plan.text)
    assert signed["plan"] and signed["issued"] == str(int(hub.now[0]))

    def start(**changed: str) -> Any:
        return hub.client.post("/ui/deploy/start", data={**signed, **changed}, headers=ORIGIN)

    # exactly what the dry run showed gets past the binding: the service answers (no box has a
    # bundle for its profile here, so there is nothing to update)
    same = start()
    assert same.status_code == 409 and "no device to update" in same.text, same.text
    for changed in ({"gates": "error_rate<=0.5"}, {"waves": "100"}, {"selector": ""}, {"soak_s": "3"}):
        other = start(**changed)
        assert other.status_code == 409 and NO_DRY_RUN in other.text, changed
    moved = start(issued=str(int(hub.now[0]) + 1))  # the time is signed too
    assert moved.status_code == 409 and NO_DRY_RUN in moved.text
    hub.now[0] += 15 * 60 + 1  # the same confirmation, replayed after 15 minutes
    late = start()
    assert late.status_code == 409 and NO_DRY_RUN in late.text
    assert _rollouts(hub) == 0
