"""The dashboard's rollout controls act on the rollout of their URL and on no other, and only when
the action applies to it now (cloud_hub.ui.rollout_pages.control): two rollouts of one model, the
older one's rollback refused (409) while the newer one is untouched; the newer one rolled back; a
second rollback says there is nothing to send back. And a device's page lists its own audit rows,
not those of every device whose id starts with its id."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from cloud_hub.models import Device, DeviceDeployment, Release, Rollout
from tests.unit import ui_hub
from tests.unit.ui_hub import ORIGIN


@dataclass
class Hub:
    client: Any
    ctx: Any
    tokens: dict[str, str]
    older: int  # glm-tiny 1.1.0 on box-1, completed
    newer: int  # glm-tiny 1.2.0 on box-10, completed: the model's latest rollout

    def sign_in(self, role: str) -> str:
        self.client.cookies.clear()
        ui_hub.sign_in(self.client, self.tokens[role], next="/ui/")
        return ui_hub.csrf_of(self.client.get("/ui/").text)

    def post(self, path: str, data: dict[str, str]) -> Any:
        return self.client.post(path, data=data, headers=ORIGIN)

    def states(self) -> tuple[str, str]:
        with self.ctx.db.session() as s:
            return (s.get(Rollout, self.older).state, s.get(Rollout, self.newer).state)  # type: ignore[union-attr]


def _rollout(s: Any, release: Release, device: str, from_version: str | None) -> int:
    r = ui_hub.add_rollout(
        s, release, waves=[{"percent": 100.0}], state="completed", wave_rows=[(1, "passed")]
    )
    s.add(
        DeviceDeployment(
            rollout_id=r.id,
            device_id=device,
            wave=0,
            from_version=from_version,
            to_version=release.version,
            state="succeeded",
        )
    )
    s.flush()
    return int(r.id)


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hub]:
    from cloud_hub.auth import Role

    ctx = ui_hub.new_hub(tmp_path_factory.mktemp("ui-controls"))
    with ctx.db.session() as s:
        tokens = {
            role.name: ui_hub.add_token(s, f"{role.name}-c", role) for role in (Role.viewer, Role.operator)
        }
        releases = {v: ui_hub.add_release(s, version=v) for v in ("1.0.0", "1.1.0", "1.2.0")}
        for device, version in (("box-1", "1.1.0"), ("box-10", "1.2.0")):
            s.add(
                Device(
                    id=device,
                    profile="cpu-x86-int4",
                    labels={},
                    online=True,
                    current_model="glm-tiny",
                    current_version=version,
                )
            )
        s.flush()
        older = _rollout(s, releases["1.1.0"], "box-1", "1.0.0")
        newer = _rollout(s, releases["1.2.0"], "box-10", None)  # back to no model: no bundle needed
    with ui_hub.client_of(ctx) as client:
        yield Hub(client, ctx, tokens, older, newer)
    ctx.db.dispose()


def test_rollback_of_an_older_rollout_is_refused_and_touches_no_other(hub: Hub) -> None:
    csrf = hub.sign_in("operator")
    confirm = hub.client.get(f"/ui/rollouts/{hub.older}/rollback")
    assert confirm.status_code == 200
    assert 'name="confirm"' not in confirm.text  # no form to confirm
    assert f"not the latest rollout of glm-tiny (rollout {hub.newer} is)" in confirm.text
    # the form posted anyway (a stale tab, a crafted request): refused, and nothing changed
    r = hub.post(f"/ui/rollouts/{hub.older}/rollback", {"csrf": csrf, "confirm": "rollback"})
    assert r.status_code == 409, r.text
    assert f"not the latest rollout of glm-tiny (rollout {hub.newer} is)" in r.text
    assert hub.states() == ("completed", "completed")
    with hub.ctx.db.session() as s:
        from cloud_hub import audit

        assert audit.list_entries(s, action="rollout.rollback") == []


def test_an_action_the_state_does_not_allow_is_refused_on_the_post(hub: Hub) -> None:
    csrf = hub.sign_in("operator")
    for action in ("pause", "resume", "abort"):
        r = hub.post(f"/ui/rollouts/{hub.newer}/{action}", {"csrf": csrf, "confirm": action})
        assert r.status_code == 409, (action, r.text)
        assert "it is completed" in r.text
    assert hub.states() == ("completed", "completed")


def test_rollback_of_the_latest_acts_on_it_and_then_says_nothing_is_left(hub: Hub) -> None:
    csrf = hub.sign_in("operator")
    r = hub.post(f"/ui/rollouts/{hub.newer}/rollback", {"csrf": csrf, "confirm": "rollback"})
    assert r.status_code == 303, r.text
    assert r.headers["location"] == f"/ui/rollouts/{hub.newer}"
    assert hub.states() == ("completed", "rolled_back")
    again = hub.post(f"/ui/rollouts/{hub.newer}/rollback", {"csrf": csrf, "confirm": "rollback"})
    assert again.status_code == 200
    assert f"Rollout {hub.newer}: nothing to roll back" in again.text
    assert "it was already rolled_back" in again.text
    assert hub.states() == ("completed", "rolled_back")


def test_a_device_page_lists_its_own_audit_rows_only(hub: Hub) -> None:
    from cloud_hub import audit

    with hub.ctx.db.session() as s:
        audit.record(s, "someone", "device.pin", "device/box-10", {}, {"pinned": "ROW-OF-BOX-10"})
        audit.record(s, "someone", "device.pin", "device/box-1", {}, {"pinned": "ROW-OF-BOX-1"})
    hub.sign_in("viewer")
    page = hub.client.get("/ui/devices/box-1")
    assert page.status_code == 200
    assert "ROW-OF-BOX-1" in page.text and "ROW-OF-BOX-10" not in page.text
    assert "ROW-OF-BOX-10" in hub.client.get("/ui/devices/box-10").text


@pytest.mark.parametrize("rollout", ["0", "3000000000", "99999999999999999999", "9" * 5000, "%C2%B2", "abc"])
def test_a_rollout_id_no_rollout_can_have_is_a_404_page(hub: Hub, rollout: str) -> None:
    csrf = hub.sign_in("operator")
    for path in (f"/ui/rollouts/{rollout}", f"/ui/rollouts/{rollout}/live", f"/ui/rollouts/{rollout}/pause"):
        page = hub.client.get(path)
        assert page.status_code == 404, (path, page.text[-300:])
        assert "does not exist" in page.text
    posted = hub.post(f"/ui/rollouts/{rollout}/pause", {"csrf": csrf, "confirm": "pause"})
    assert posted.status_code == 404 and "does not exist" in posted.text


def test_numbers_that_are_not_ascii_digits_are_a_400_page(hub: Hub) -> None:
    csrf = hub.sign_in("operator")
    audit = hub.client.get("/ui/audit", params={"before": "²"})
    assert audit.status_code == 400 and "is not an entry id" in audit.text
    start = hub.post(
        "/ui/deploy/start", {"csrf": csrf, "release": "glm-tiny@1.1.0", "issued": "²", "plan": "x"}
    )
    assert start.status_code == 400 and "is not a time in seconds" in start.text
    body = f"csrf={csrf}&confirm=pause".encode()
    length = hub.client.post(
        f"/ui/rollouts/{hub.newer}/pause",
        content=body,
        headers={
            **ORIGIN,
            "Content-Type": "application/x-www-form-urlencoded",
            "Content-Length": "²".encode("latin-1"),  # as the server reads the byte 0xb2
        },
    )
    assert length.status_code == 400 and "is not a number of bytes" in length.text


def test_sign_out_clears_the_cookie_even_when_the_session_is_gone(hub: Hub) -> None:
    from cloud_hub import tokens
    from cloud_hub.auth import Role, create_token

    with hub.ctx.db.session() as s:
        _, hub.tokens["short"] = create_token(s, "short-c", Role.viewer, "test")
    csrf = hub.sign_in("short")
    assert hub.post("/ui/logout", {"x": "1"}).status_code == 403  # a live session needs its CSRF token
    assert (
        hub.client.post(
            "/ui/logout", data={"csrf": csrf}, headers={"Origin": "https://evil.test"}
        ).status_code
        == 403
    )
    with hub.ctx.db.session() as s:
        tokens.revoke(s, "short-c", "test")
    out = hub.post("/ui/logout", {"csrf": csrf})
    assert out.status_code == 303 and out.headers["location"] == "/ui/login"
    assert "edgeglm_ui=; Max-Age=0" in out.headers["set-cookie"]
    hub.client.cookies.set("edgeglm_ui", "s1:garbage", domain="hub.test", path="/ui")
    assert hub.post("/ui/logout", {}).status_code == 303  # an altered cookie: cleared too
