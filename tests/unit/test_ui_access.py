"""The dashboard's checks in front of every handler (cloud_hub.ui.access), on the real app over a
SQLite file: origin, session, role before any body is read, body size and type, CSRF; a deploy
that skipped its dry run; and every value escaped in the pages (a hostile label, reason, detail)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from cloud_hub.models import Device, DeviceDeployment, Rollout
from tests.unit.ui_hub import add_release, add_rollout, add_token, client_of, csrf_of, new_hub, sign_in

HOSTILE = '<script>alert("x")</script><img src=x onerror=alert(1)>'


@dataclass
class App:
    client: Any
    ctx: Any
    tokens: dict[str, str]
    rollout: int

    def sign_in(self, role: str) -> str:
        """Signs the client in as ``role`` (its cookie jar holds the session); its CSRF token."""
        self.client.cookies.clear()
        sign_in(self.client, self.tokens[role], headers={}, next="/ui/")
        return csrf_of(self.client.get("/ui/").text)

    def state(self) -> str:
        with self.ctx.db.session() as s:
            return s.get(Rollout, self.rollout).state  # type: ignore[union-attr]


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[App]:
    from cloud_hub.auth import Role

    ctx = new_hub(tmp_path_factory.mktemp("ui"))
    with ctx.db.session() as s:
        tokens = {role.name: add_token(s, f"{role.name}-t", role) for role in Role}
        release = add_release(s)
        s.add(
            Device(
                id="box-1",
                profile="cpu-x86-int4",
                labels={"site": HOSTILE},
                online=True,
                current_model="glm-tiny",
            )
        )
        rollout = add_rollout(
            s,
            release,
            selector={"site": "plant-7"},
            waves=[{"percent": 100.0}],
            state="running",
            wave_rows=[(1, "pending")],
            reason=HOSTILE,
        )
        s.add(
            DeviceDeployment(
                rollout_id=rollout.id, device_id="box-1", wave=0, to_version="1.1.0", detail=HOSTILE
            )
        )
        rid = rollout.id
    # https: the client sends the Secure cookie back
    with client_of(ctx) as client:
        yield App(client, ctx, tokens, rid)
    ctx.db.dispose()


def _post(app: App, path: str, data: dict[str, str] | None = None, **kw: Any) -> Any:
    headers = {"Origin": "https://hub.test", **kw.pop("headers", {})}
    return app.client.post(path, data=data, headers=headers, **kw)


def test_a_page_without_a_session_redirects_to_sign_in(app: App) -> None:
    app.client.cookies.clear()
    r = app.client.get(f"/ui/rollouts/{app.rollout}?x=1")
    assert r.status_code == 303
    assert r.headers["location"] == f"/ui/login?next=%2Fui%2Frollouts%2F{app.rollout}%3Fx%3D1"


def test_sign_in_refuses_a_bad_token_a_missing_csrf_and_a_foreign_next(app: App) -> None:
    app.client.cookies.clear()
    form = app.client.get("/ui/login")
    csrf = re.search(r'name="csrf" value="([^"]+)"', form.text)[1]  # type: ignore[index]
    bad = _post(app, "/ui/login", {"csrf": csrf, "token": "egh_" + "x" * 43})
    assert bad.status_code == 401 and "not valid" in bad.text
    assert _post(app, "/ui/login", {"token": app.tokens["viewer"]}).status_code == 403
    away = _post(app, "/ui/login", {"csrf": csrf, "token": app.tokens["viewer"], "next": "//evil.test/x"})
    assert away.status_code == 303 and away.headers["location"] == "/ui/"


@pytest.mark.parametrize("action", ["pause", "abort", "rollback"])
def test_a_viewer_is_refused_before_the_body_is_read(app: App, action: str) -> None:
    csrf = app.sign_in("viewer")
    r = _post(app, f"/ui/rollouts/{app.rollout}/{action}", {"csrf": csrf, "confirm": action})
    assert r.status_code == 403 and "needs role operator" in r.text
    assert app.client.get(f"/ui/rollouts/{app.rollout}/{action}").status_code == 403
    # a body over the limit is refused for the role, not for its size: it was never looked at
    huge = _post(
        app,
        f"/ui/rollouts/{app.rollout}/{action}",
        content=b"a=" + b"x" * 100_000,
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert huge.status_code == 403
    assert app.state() == "running"


def test_an_operator_post_needs_its_own_csrf_token_and_this_origin(app: App) -> None:
    viewer_csrf = app.sign_in("viewer")
    csrf = app.sign_in("operator")
    path = f"/ui/rollouts/{app.rollout}/pause"
    assert _post(app, path, {"confirm": "pause"}).status_code == 403
    assert _post(app, path, {"confirm": "pause", "csrf": viewer_csrf}).status_code == 403
    assert (
        _post(
            app, path, {"confirm": "pause", "csrf": csrf}, headers={"Origin": "https://evil.test"}
        ).status_code
        == 403
    )
    cross = app.client.post(
        path, data={"confirm": "pause", "csrf": csrf}, headers={"Sec-Fetch-Site": "cross-site"}
    )
    assert cross.status_code == 403
    assert _post(app, path, {"csrf": csrf}).status_code == 409  # not confirmed
    big = _post(
        app,
        path,
        content=b"csrf=" + b"x" * 20_000,
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert big.status_code == 413
    assert _post(app, path, content=b"{}", headers={"Content-Type": "application/json"}).status_code == 415
    assert app.state() == "running"
    done = _post(app, path, {"confirm": "pause", "csrf": csrf})
    assert done.status_code == 303 and done.headers["location"] == f"/ui/rollouts/{app.rollout}"
    assert app.state() == "paused"
    with app.ctx.db.session() as s:
        from cloud_hub import audit

        row = audit.list_entries(s, target=f"rollout/{app.rollout}", limit=1)[0]
        assert (row.actor, row.action) == ("operator-t", "rollout.paused")  # as the API audits it
    resumed = _post(app, f"/ui/rollouts/{app.rollout}/resume", {"confirm": "resume", "csrf": csrf})
    assert resumed.status_code == 303 and app.state() == "running"


def test_a_deploy_start_without_its_dry_run_is_refused(app: App) -> None:
    csrf = app.sign_in("operator")
    fields = {"csrf": csrf, "release": "glm-tiny@1.1.0", "selector": "site=plant-7", "waves": "100"}
    r = _post(app, "/ui/deploy/start", fields)
    assert r.status_code == 409 and "no dry run" in r.text
    forged = _post(app, "/ui/deploy/start", {**fields, "issued": "1800000000", "plan": "A" * 43})
    assert forged.status_code == 409


def test_every_value_is_escaped(app: App) -> None:
    app.sign_in("viewer")
    for path in (
        "/ui/",
        "/ui/devices/box-1",
        f"/ui/rollouts/{app.rollout}",
        f"/ui/rollouts/{app.rollout}/live",
    ):
        page = app.client.get(path)
        assert page.status_code == 200, path
        assert "<script>alert" not in page.text and "<img src=x" not in page.text, path
        assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;" in page.text, path
        csp = page.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
        assert page.headers["x-frame-options"] == "DENY"
        assert page.headers["cache-control"] == "no-store"
    # no inline script anywhere: every <script> loads a file of the hub's own
    assert all(
        re.fullmatch(r'<script src="/ui/static/[^"]+" defer></script>', tag)
        for tag in re.findall(r"<script[^>]*>.*?</script>", page.text, re.S)
    )


def test_the_static_files_ship_with_their_license(app: App) -> None:
    assert app.client.get("/ui/static/vendor/uplot/uPlot.iife.min.js").status_code == 200
    assert "MIT License" in app.client.get("/ui/static/vendor/uplot/LICENSE").text


def test_the_audit_page_filters_and_pages(app: App) -> None:
    from cloud_hub import audit

    with app.ctx.db.session() as s:
        for i in range(60):
            audit.record(s, "pager", "device.label" if i % 2 else "device.pin", f"device/p-{i}")
    app.sign_in("viewer")
    first = app.client.get("/ui/audit", params={"actor": "pager"})
    assert first.text.count('<th scope="row">pager</th>') == 50
    older = re.search(r'href="/ui/audit(\?[^"]+)" rel="next"', first.text)
    assert older is not None and "before=" in older[1]
    second = app.client.get("/ui/audit" + older[1].replace("&amp;", "&"))
    assert second.text.count('<th scope="row">pager</th>') == 10
    assert 'rel="next"' not in second.text
    pins = app.client.get(
        "/ui/audit", params={"actor": "pager", "action": "device.pin", "subject": "device/p-1"}
    )
    assert pins.text.count('<th scope="row">pager</th>') == 5  # p-10, p-12, ... p-18
    future = app.client.get("/ui/audit", params={"actor": "pager", "since": "2999-01-01T00:00"})
    assert "No audit entry." in future.text
    assert app.client.get("/ui/audit", params={"since": "yesterday"}).status_code == 400
