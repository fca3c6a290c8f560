"""The dashboard at /ui in a real browser (Debian's chromium, driven by Playwright) and a plain HTTP
client, against one hub with a simulated fleet for the whole module.

The hub runs in this process (its app under uvicorn on a loopback port, ingest and the rollout
controller on a private mosquitto, SQLite), six simulated boxes speak the real wire protocol
(``fleet_sim``), and the tests tell one story in order: a viewer and an operator sign in; the
operator deploys glm-tiny 1.1.0 from the dashboard after its dry run, pauses the rollout; the
viewer sees no buttons and a forged POST with the viewer's session is refused; the operator
resumes it and the page follows the waves by itself to the end; the audit page shows the pause
and the resume; cross-site POSTs are refused, in the browser and with httpx.

Screenshots of each page go to ``$EDGEGLM_SCREENSHOTS`` (default: a pytest temporary folder).
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import expect  # auto-waiting assertions after each navigation

from edgectl.demo.procs import wait_for
from tests.integration.conftest import Publisher
from tests.integration.fleet_sim import Behaviour, SimDevice
from tests.integration.hub_process import free_port

pytestmark = [pytest.mark.integration, pytest.mark.browser]

CHROMIUM = Path("/usr/bin/chromium")
N = 6
TIMEOUT_MS = 30_000


@dataclass
class Dash:
    url: str
    ctx: Any
    tokens: dict[str, str]  # role -> secret
    names: dict[str, str]  # role -> token name (the audit actor)
    browser: Any
    shots: Path
    story: dict[str, Any] = field(default_factory=dict)  # what one test leaves the next

    def sign_in(self, role: str) -> Any:
        """A fresh browser context signed in as ``role``; its page is on the fleet page."""
        context = self.browser.new_context(viewport={"width": 1280, "height": 900})
        context.set_default_timeout(TIMEOUT_MS)
        page = context.new_page()
        page.goto(self.url + "/ui/")
        assert "/ui/login" in page.url  # no session: the sign-in form
        page.get_by_label("API token").fill(self.tokens[role])
        page.get_by_role("button", name="Sign in").click()
        page.wait_for_url(self.url + "/ui/")
        return page

    def shot(self, page: Any, name: str) -> None:
        page.screenshot(path=str(self.shots / f"{name}.png"), full_page=True)

    def rollout_state(self, rid: int) -> str:
        from cloud_hub.models import Rollout

        with self.ctx.db.session() as s:
            r = s.get(Rollout, rid)
            assert r is not None
            return r.state


def _bundle(publisher: Publisher, version: str, seed: int) -> Path:
    """A small signed bundle whose manifest records quality metrics, thresholds and a dataset."""
    import numpy as np

    from edgeglm.bundle_files import seal_folder

    folder = publisher.root / f"glm-tiny-{version}"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    (folder / "weights.bin").write_bytes(rng.integers(0, 256, 200_000, dtype=np.uint8).tobytes())
    (folder / "tokenizer.json").write_text('{"version": "1.0"}')
    quality = {
        "passed": True,
        "thresholds": {"max_abs_logit_diff": 0.5, "top1_agreement": 0.95},
        "max_abs_logit_diff": 0.012 * seed,
        "cosine": 0.9999,
        "top1_agreement": 1.0 - 0.01 * seed,
        "kl": 0.0004 * seed,
        "greedy_prefix_agreement": 1.0,
    }
    seal_folder(
        folder,
        publisher.key,
        model="glm-tiny",
        version=version,
        profile="cpu-x86-int4",
        quality=quality,
        dataset_version=f"plant-logs-2025.{seed}",
    )
    return folder


def _serve(app: Any, port: int) -> tuple[Any, threading.Thread]:
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="dashboard-hub", daemon=True)
    thread.start()
    wait_for(lambda: server.started, 20, "the hub's HTTP server")
    return server, thread


@pytest.fixture(scope="module")
def dash(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dash]:
    if not CHROMIUM.exists():
        pytest.skip(f"no chromium binary at {CHROMIUM} (Debian: apt-get install chromium)")
    from playwright.sync_api import sync_playwright  # the dev extra has it: missing is a failure

    expect.set_options(timeout=TIMEOUT_MS)

    from cloud_hub.auth import Role, create_token
    from cloud_hub.db import migrate
    from cloud_hub.inventory import Inventory
    from cloud_hub.models import Device
    from cloud_hub.registry import Registry
    from cloud_hub.server import build_context, load_app, start_controller, start_ingest
    from cloud_hub.settings import HubSettings
    from edgectl.demo.procs import ManagedBroker
    from edgeglm.keys import create_keypair, load_private_key
    from edgeglm.mqtt import BrokerSettings

    tmp = tmp_path_factory.mktemp("dashboard")
    shots = Path(os.environ.get("EDGEGLM_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    shots.mkdir(parents=True, exist_ok=True)
    broker = ManagedBroker(tmp / "broker").start()
    stops: list[Callable[[], None]] = [broker.stop]
    try:
        priv, pub, kid = create_keypair(tmp / "keys", "release")
        publisher = Publisher(tmp / "bundles", load_private_key(priv), pub, kid)
        url = f"sqlite:///{tmp / 'hub.db'}"
        migrate(url)
        ctx = build_context(HubSettings(data_dir=tmp / "hub", db_url=url, trusted_keys=(pub,)))
        stops.append(ctx.db.dispose)
        tokens, names = {}, {}
        with ctx.db.session() as s:
            for role in (Role.viewer, Role.operator):
                names[role.name] = f"{role.name}-ui"
                _, tokens[role.name] = create_token(s, names[role.name], role, "test-setup")
        for version, seed in (("1.0.0", 1), ("1.1.0", 2)):
            with ctx.db.session() as s:
                Registry(s, ctx.store, ctx.trusted).publish_folder(
                    _bundle(publisher, version, seed), "test-setup"
                )
        link, ingest = start_ingest(ctx, BrokerSettings(port=broker.port), "hub-dashboard")
        ingest.flush_s = 0.1
        stops.extend([ingest.stop, link.close])
        controller = start_controller(ctx, "dashboard-controller", tick_s=0.1)
        stops.append(controller.stop)
        port = free_port()
        server, thread = _serve(load_app(ctx), port)

        def stop_server() -> None:
            server.should_exit = True
            thread.join(10)

        stops.append(stop_server)
        newer = {"1.1.0": Behaviour(p95_ms=115.0, error_rate=0.01)}
        sims = [SimDevice(broker.port, f"box-{i:02d}", "1.0.0", behaviours=newer).start() for i in range(N)]
        stops.extend(sim.stop for sim in sims)

        def registered() -> bool:
            with ctx.db.session() as s:
                rows = list(s.query(Device))
                return len(rows) == N and all(d.online and d.health for d in rows)

        wait_for(registered, 30, f"{N} devices registered with health")
        with ctx.db.session() as s:
            for i, sim in enumerate(sims):
                Inventory(s).label(
                    sim.device_id, {"site": "plant-7", "line": str(i % 2 + 1)}, [], "test-setup"
                )
        pw = sync_playwright().start()
        stops.append(pw.stop)
        browser = pw.chromium.launch(executable_path=str(CHROMIUM))
        stops.append(browser.close)
        yield Dash(f"http://127.0.0.1:{port}", ctx, tokens, names, browser, shots)
    finally:
        for stop in reversed(stops):
            stop()


def test_sign_in_as_viewer_shows_the_fleet_releases_and_a_device(dash: Dash) -> None:
    page = dash.sign_in("viewer")
    rows = page.locator("#devices tbody tr")
    assert rows.count() == N
    assert page.locator("#fleet-count").inner_text().startswith(f"{N} devices")  # counted in SQL
    assert page.locator("#devices tbody tr", has_text="box-00").locator("text=online").count() == 1
    assert "100 ms" in page.locator("#devices").inner_text()  # p95 with its unit
    time_el = page.locator("#devices time").first
    assert time_el.get_attribute("datetime")  # relative time, absolute in datetime and title
    assert time_el.get_attribute("title")
    assert page.get_by_role("link", name="Deploy").count() == 0  # a viewer acts on nothing
    dash.shot(page, "fleet")

    page.get_by_label("Selector").fill("line=1")
    page.get_by_role("button", name="Filter").click()
    page.wait_for_url(re.compile(r".*selector=line%3D1.*"))
    assert page.locator("#devices tbody tr").count() == N // 2

    page.get_by_role("link", name="box-00").click()
    page.wait_for_url(dash.url + "/ui/devices/box-00")
    assert "site=plant-7" in page.locator("main").inner_text()
    assert page.locator("main").get_by_text("device.label").count() >= 1  # its audit rows
    dash.shot(page, "device")

    page.get_by_role("link", name="Releases").click()
    page.wait_for_url(dash.url + "/ui/releases")
    expect(page.get_by_role("heading", level=1)).to_contain_text("Releases")
    text = page.locator("main").inner_text()
    assert "glm-tiny@1.1.0" in text and "glm-tiny@1.0.0" in text
    assert re.search(r"\d+(\.\d+)? (B|KiB)", text)  # bytes per profile, with a unit
    assert "dataset plant-logs-2025.2" in text
    assert "top-1 agreement 0.98 / 0.95" in text  # the manifest's metric against its threshold
    dash.shot(page, "releases")
    page.context.close()


def test_operator_deploys_only_after_the_dry_run_and_pauses(dash: Dash) -> None:
    page = dash.sign_in("operator")
    dash.shot(page, "fleet-operator")
    page.get_by_role("link", name="Deploy").click()
    page.wait_for_url(dash.url + "/ui/deploy")
    page.get_by_label("Release").select_option("glm-tiny@1.1.0")
    page.get_by_label("Fleet selector").fill("site=plant-7")
    page.get_by_label("Waves").fill("1n,50,100")
    page.get_by_label("Health gates").fill("p95_ratio<=1.5,error_rate<=0.05")
    page.get_by_label("Soak per wave (s)").fill("2")
    page.get_by_label("Requests before a gate is judged").fill("1")
    dash.shot(page, "deploy")
    page.get_by_role("button", name="Dry run").click()
    page.wait_for_url(dash.url + "/ui/deploy/plan")
    main = page.locator("main")
    expect(main.get_by_role("heading", level=1)).to_contain_text("Dry run: glm-tiny@1.1.0")
    assert main.get_by_role("heading", name=re.compile(r"^Wave 0: 1 device, .*B$")).count() == 1
    assert main.locator("table.plan tbody tr").count() == N
    dash.shot(page, "dry-run")

    page.get_by_role("button", name="Start this rollout").click()
    page.wait_for_url(re.compile(r".*/ui/rollouts/\d+$"))
    rid = int(page.url.rsplit("/", 1)[1])
    dash.story["rollout"] = rid
    page.locator("a[data-action=pause]").click()
    page.wait_for_url(dash.url + f"/ui/rollouts/{rid}/pause")
    expect(page.get_by_role("heading").first).to_have_text(f"Pause rollout {rid}?")
    page.get_by_role("button", name=f"Yes, pause rollout {rid}").click()
    page.wait_for_url(dash.url + f"/ui/rollouts/{rid}")
    assert page.locator("#rollout-state").inner_text() == "paused"
    assert dash.rollout_state(rid) == "paused"
    assert {a.get_attribute("data-action") for a in page.locator("a[data-action]").all()} == {
        "resume",
        "abort",
        "rollback",
    }
    dash.shot(page, "rollout-paused")
    dash.story["operator"] = page


def test_viewer_sees_no_buttons_and_a_forged_post_is_refused(dash: Dash) -> None:
    rid = dash.story["rollout"]
    page = dash.sign_in("viewer")
    page.goto(dash.url + f"/ui/rollouts/{rid}")
    page.wait_for_url(dash.url + f"/ui/rollouts/{rid}")
    assert page.locator("#rollout-state").inner_text() == "paused"
    assert page.locator("a[data-action]").count() == 0
    assert page.locator("button", has_text=re.compile("resume|abort|pause", re.I)).count() == 0
    csrf = page.locator("form.signout input[name=csrf]").get_attribute("value")  # the viewer's own
    for action in ("resume", "abort"):
        forged = page.request.post(
            dash.url + f"/ui/rollouts/{rid}/{action}",
            form={"csrf": csrf, "confirm": action},
            headers={"Origin": dash.url},
            max_redirects=0,
        )
        assert forged.status == 403, forged.text()
        assert "needs role operator" in forged.text()
    assert page.request.get(dash.url + f"/ui/rollouts/{rid}/resume").status == 403  # nor its form
    assert dash.rollout_state(rid) == "paused"
    page.context.close()


def test_rollout_page_follows_the_waves_by_itself(dash: Dash) -> None:
    rid, page = dash.story["rollout"], dash.story["operator"]
    page.locator("a[data-action=resume]").click()
    page.wait_for_url(dash.url + f"/ui/rollouts/{rid}/resume")
    page.get_by_role("button", name=f"Yes, resume rollout {rid}").click()
    page.wait_for_url(dash.url + f"/ui/rollouts/{rid}")
    assert page.locator("#rollout-state").inner_text() == "running"
    assert page.locator("#wave-2 .wave-state").inner_text() == "pending"
    page.evaluate("window.__same_page = 'yes'")  # gone if the page were loaded again
    page.locator("#wave-1 .wave-state").filter(has_text="passed").wait_for(timeout=45_000)
    page.locator("#rollout-state").filter(has_text="completed").wait_for(timeout=60_000)
    assert page.evaluate("window.__same_page") == "yes"
    assert page.locator("#live").get_attribute("data-updated")
    assert [s.inner_text() for s in page.locator(".wave-state").all()] == ["passed"] * 3
    gates = page.locator("#gates").inner_text()
    assert "p95_ratio<=1.5" in gates and "ms" in gates and "%" in gates
    assert page.locator(".chart canvas").count() >= 1  # uPlot drew the latency per wave
    dash.shot(page, "rollout")
    assert {a.get_attribute("data-action") for a in page.locator("a[data-action]").all()} == {"rollback"}
    page.goto(dash.url + (page.locator("#wave-0 a.wave-link").get_attribute("href") or ""))  # wave 0, past
    assert page.locator("#wave-devices tbody tr", has_text="succeeded").count() == 1
    page.get_by_role("link", name="Rollouts").click()
    page.wait_for_url(dash.url + "/ui/rollouts")
    assert page.locator("#rollouts tbody tr", has_text="completed").count() == 1
    dash.shot(page, "rollouts")


def test_audit_page_shows_the_pause_and_the_resume(dash: Dash) -> None:
    rid, page = dash.story["rollout"], dash.story["operator"]
    page.get_by_role("link", name="Audit").click()
    page.wait_for_url(re.compile(r".*/ui/audit$"))
    page.get_by_label("Actor").fill(dash.names["operator"])
    page.get_by_label("Subject starts with").fill(f"rollout/{rid}")
    page.get_by_role("button", name="Filter").click()
    page.wait_for_url(re.compile(r".*/ui/audit\?.*actor=operator-ui.*"))
    actions = [c.inner_text() for c in page.locator("table.audit tbody tr td:nth-child(3)").all()]
    assert actions == ["rollout.running", "rollout.paused", "rollout.start"]  # newest first
    assert page.locator("table.audit tbody th", has_text=dash.names["operator"]).count() == 3
    dash.shot(page, "audit")


def test_cross_site_posts_are_refused_in_the_browser(dash: Dash) -> None:
    """A page on another site posts a form to the hub: the operator's browser holds a session, yet
    the hub refuses it (SameSite keeps the cookie home; the Origin and the missing CSRF token are
    refused on their own)."""
    rid, page = dash.story["rollout"], dash.story["operator"]
    evil = page.context.new_page()
    evil.route(
        "http://evil.test/**",
        lambda route: route.fulfill(
            content_type="text/html",
            body=f'<form id="f" method="post" action="{dash.url}/ui/rollouts/{rid}/rollback">'
            '<input name="confirm" value="rollback"><button>go</button></form>',
        ),
    )
    evil.goto("http://evil.test/")
    with evil.expect_navigation():
        evil.click("button")
    assert "another site" in evil.locator("body").inner_text()
    evil.close()
    no_token = page.request.post(
        dash.url + f"/ui/rollouts/{rid}/rollback", form={"confirm": "rollback"}, max_redirects=0
    )
    assert no_token.status == 403 and "CSRF" in no_token.text()
    assert dash.rollout_state(rid) == "completed"


def _http_session(dash: Dash, role: str, client: httpx.Client) -> tuple[str, str]:
    """Sign in over plain HTTP: (cookie header, the session's CSRF token)."""
    form = client.get("/ui/login")
    nonce = re.search(r"edgeglm_ui_login=([^;]*)", form.headers["set-cookie"])[1]  # type: ignore[index]
    login_csrf = re.search(r'name="csrf" value="([^"]+)"', form.text)[1]  # type: ignore[index]
    done = client.post(
        "/ui/login",
        data={"csrf": login_csrf, "token": dash.tokens[role], "next": "/ui/"},
        headers={"Cookie": f"edgeglm_ui_login={nonce}", "Origin": dash.url},
    )
    assert done.status_code == 303, done.text
    cookie = re.search(r"edgeglm_ui=([^;]+)", done.headers["set-cookie"])[1]  # type: ignore[index]
    assert dash.tokens[role] not in done.headers["set-cookie"]  # never the token itself
    assert all(f in done.headers["set-cookie"] for f in ("Secure", "HttpOnly", "SameSite=Strict", "Max-Age="))
    fleet = client.get("/ui/", headers={"Cookie": f"edgeglm_ui={cookie}"})
    csrf = re.search(r'name="csrf" value="([^"]+)"', fleet.text)[1]  # type: ignore[index]
    return f"edgeglm_ui={cookie}", csrf


def test_cross_site_and_forged_posts_are_refused_over_plain_http(dash: Dash) -> None:
    rid = dash.story["rollout"]
    with httpx.Client(base_url=dash.url, follow_redirects=False) as client:
        op_cookie, op_csrf = _http_session(dash, "operator", client)
        viewer_cookie, viewer_csrf = _http_session(dash, "viewer", client)
        pause = f"/ui/rollouts/{rid}/pause"

        def post(cookie: str, data: dict[str, str], origin: str | None = dash.url) -> httpx.Response:
            headers = {"Cookie": cookie, **({"Origin": origin} if origin else {})}
            return client.post(pause, data=data, headers=headers)

        assert post(op_cookie, {"confirm": "pause"}).status_code == 403  # no CSRF token
        assert post(op_cookie, {"confirm": "pause", "csrf": viewer_csrf}).status_code == 403  # another's
        assert post(op_cookie, {"confirm": "pause", "csrf": op_csrf}, "http://evil.test").status_code == 403
        assert post(op_cookie, {"confirm": "pause", "csrf": op_csrf}, "null").status_code == 403
        forged = post(viewer_cookie, {"confirm": "pause", "csrf": viewer_csrf})
        assert forged.status_code == 403 and "needs role operator" in forged.text
        assert post("edgeglm_ui=s1:1:x", {"confirm": "pause", "csrf": op_csrf}).status_code == 401
        # everything in order reaches the service, which says a completed rollout cannot pause
        allowed = post(op_cookie, {"confirm": "pause", "csrf": op_csrf})
        assert allowed.status_code == 409 and "completed" in allowed.text
        page = client.get(f"/ui/rollouts/{rid}", headers={"Cookie": op_cookie})
        assert page.status_code == 200
        assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
        assert page.headers["x-frame-options"] == "DENY"
        assert dash.rollout_state(rid) == "completed"


def test_a_revoked_token_ends_its_sessions_at_once(dash: Dash) -> None:
    from cloud_hub import tokens
    from cloud_hub.auth import Role, create_token

    with dash.ctx.db.session() as s:
        _, secret = create_token(s, "short-lived", Role.viewer, "test-setup")
    dash.tokens["short"] = secret
    with httpx.Client(base_url=dash.url, follow_redirects=False) as client:
        cookie, _ = _http_session(dash, "short", client)
        assert client.get("/ui/", headers={"Cookie": cookie}).status_code == 200
        with dash.ctx.db.session() as s:
            tokens.revoke(s, "short-lived", "test-setup")
        gone = client.get("/ui/", headers={"Cookie": cookie})
        assert gone.status_code == 303 and gone.headers["location"].startswith("/ui/login")
