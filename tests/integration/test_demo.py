"""The whole story, end to end: ``edgectl demo`` as a user runs it, and the same story on PostgreSQL.

``test_edgectl_demo_keep_then_stop`` runs the console script as ``make demo`` does (its own
mosquitto, the hub on SQLite, three agents) with ``--keep``, reads the summary table, looks at what
it left running as a person would (the hub with the printed viewer token), then stops it with
``edgectl demo --stop``: one run of the story covers both ways the demo ends.
``test_the_story_on_postgresql`` runs the same story with the hub on the real PostgreSQL and a
private mosquitto, then checks the database itself: the audit rows, the deployments, the devices.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

pytestmark = pytest.mark.integration

EDGECTL = str(Path(sys.executable).with_name("edgectl"))


def _story_checks(data: dict[str, Any]) -> None:
    assert all(ok for _, ok in data["checks"]), data["checks"]
    assert len(data["checks"]) == 10
    assert all(q["passed"] for q in data["quality"].values())
    answers = data["answers"]
    assert set(answers) == set(data["devices"]) and all(
        a["text"] and a["error"] is None for a in answers.values()
    )
    v11 = data["v11"]
    assert v11["state"] == "completed" and [w["size"] for w in v11["waves"]] == [1, 1, 1]
    assert set(v11["modes"].values()) == {"delta"}
    # the fine-tune touched 2 tensors: far less than the full download of 1.0.0 went out
    assert 0 < v11["bytes_sent"] < 0.35 * data["v1"]["bytes_sent"]
    v12 = data["v12"]
    assert v12["state"] == "reverted" and v12["devices"] == {"reverted": 1, "skipped": 2}
    assert "smoke test" in v12["canary"]["detail"] and v12["canary"]["last_step"] in (
        "rolled_back",
        "rolling_back",
        "failed",
    )


def test_edgectl_demo_keep_then_stop(tmp_path: Path) -> None:
    from cloud_hub.db import open_db
    from cloud_hub.models import ApiToken, AuditEntry
    from edgectl.demo.kept import STATE_FILE, identity
    from edgectl.demo.procs import healthy, wait_for
    from edgectl.hub_client import HubClient
    from edgeglm.errors import PermissionDenied

    work = tmp_path / "t"
    table = subprocess.run(
        [EDGECTL, "demo", "--keep", "--workdir", str(work)], capture_output=True, text=True, timeout=600
    )
    try:
        assert table.returncode == 0, table.stderr[-3000:]
        for row in ("delta sync", "broken 1.2.0", "canary", "checks", "10 of 10 passed"):
            assert row in table.stdout, table.stdout
        assert "mosquitto on 127.0.0.1:" in table.stderr  # progress lines go to stderr
        printed = {
            key: re.search(rf"^{key}\s+(\S+)", table.stdout, re.M).group(1)  # type: ignore[union-attr]
            for key in ("dashboard", "viewer token", "hub API", "broker")
        }
        assert f"stop with: edgectl demo --stop --workdir {work}" in table.stdout
        state = json.loads((work / STATE_FILE).read_text())
        hub, token = state["hub_url"], printed["viewer token"]
        assert printed["dashboard"] == f"{hub}/ui/" and printed["hub API"] == f"{hub}/api/v1"
        assert printed["broker"] == f"mqtt://127.0.0.1:{state['broker_port']}"
        assert state["broker_port"] != 1883  # its own broker, not the machine's

        # every recorded process is alive and is the one recorded, each printed with its PID
        procs = state["processes"]
        assert [p["name"] for p in procs] == [
            "mosquitto",
            "cloud-hub",
            *(f"edge-agent {d}" for d in ("demo-box-1", "demo-box-2", "demo-box-3")),
        ]
        for p in procs:
            assert identity(p["pid"]) == (p["started"], p["argv"]), p
            assert f"{p['name']} (PID {p['pid']})" in table.stdout

        # the hub answers; the viewer token lists the agents online and may not deploy
        assert healthy(int(hub.rsplit(":", 1)[1]))
        viewer = HubClient(hub, token)
        wait_for(
            lambda: (
                all(d["online"] for d in viewer.request("GET", "/api/v1/devices"))
                and len(viewer.request("GET", "/api/v1/devices")) == 3
            ),
            30,
            "the three agents online",
        )
        with pytest.raises(PermissionDenied):
            viewer.request("POST", "/api/v1/rollouts", json_body={"release": "demo-glm@1.1.0"})
        # the printed dashboard address answers: without a session, its sign-in page
        dashboard = httpx.get(printed["dashboard"], follow_redirects=True, timeout=10)
        assert dashboard.status_code == 200 and dashboard.url.path == "/ui/login"
        assert 'name="token"' in dashboard.text and "Sign in" in dashboard.text

        # the token was made through the hub's token path: stored hashed, audited, in no file
        db = open_db(state["db_url"])
        try:
            with db.session() as s:
                names = {t.name: t.role for t in s.query(ApiToken)}
                audited = [a.target for a in s.query(AuditEntry).filter_by(action="token.create")]
        finally:
            db.dispose()
        assert names["demo-dashboard-viewer"] == "viewer" and "token/demo-dashboard-viewer" in audited
        for f in work.rglob("*"):
            if f.is_file() and f.suffix in (".log", ".json", ".toml", ".db"):
                assert token.encode() not in f.read_bytes(), f
        assert token not in table.stderr

        # --stop ends every one of them and forgets the demo; a second --stop has nothing to stop
        stopped = subprocess.run(
            [EDGECTL, "demo", "--stop", "--workdir", str(work), "-o", "json"],
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert stopped.returncode == 0, stopped.stderr
        outcomes = {p["name"]: p["outcome"] for p in json.loads(stopped.stdout)["processes"]}
        assert outcomes == {p["name"]: "stopped" for p in procs}, outcomes
        wait_for(lambda: all(identity(p["pid"]) is None for p in procs), 30, "every kept process gone")
        assert not (work / STATE_FILE).exists()
        again = subprocess.run(
            [EDGECTL, "demo", "--stop", "--workdir", str(work)], capture_output=True, text=True, timeout=60
        )
        assert again.returncode == 1
        assert again.stderr.startswith(f"Error: demo: nothing to stop: no kept demo in {work}")
        # nothing it started is left running: each had a path under the work folder on its command line
        left = subprocess.run(["pgrep", "-af", str(tmp_path)], capture_output=True, text=True).stdout
        assert left.strip() == "", left
    finally:
        if (work / STATE_FILE).exists():  # an assertion failed before --stop: leave nothing behind
            subprocess.run([EDGECTL, "demo", "--stop", "--workdir", str(work)], timeout=180)


@pytest.mark.parametrize("hub_db_url", ["postgresql"], indirect=True)
def test_the_story_on_postgresql(tmp_path: Path, hub_db_url: str, private_broker: int) -> None:
    from cloud_hub.db import open_db
    from cloud_hub.models import AuditEntry, Device, DeviceDeployment
    from edgectl.demo.story import run_story

    data = run_story(tmp_path, db_url=hub_db_url, broker_port=private_broker)
    _story_checks(data)
    assert {name for name, _ in data["stopped"]} >= {"cloud-hub", "edge-agent demo-box-1"}
    assert "mosquitto" not in {name for name, _ in data["stopped"]}  # the broker was not ours to stop

    db = open_db(hub_db_url)
    try:
        with db.session() as s:
            devices = {d.id: d for d in s.query(Device)}
            assert {d.current_version for d in devices.values()} == {"1.1.0"}
            assert all(d.labels == {"site": "demo"} for d in devices.values())
            deps = s.query(DeviceDeployment).all()
            assert len(deps) == 3 + 3 + 3
            assert not any(d.active for d in deps)  # every rollout ended, none holds a device
            actions = [a.action for a in s.query(AuditEntry).order_by(AuditEntry.id)]
    finally:
        db.dispose()
    assert actions.count("release.publish") == 3 and actions.count("device.label") == 3
    assert actions.count("rollout.start") == 3 and actions.count("rollout.completed") == 2
    assert actions.count("rollout.reverted") == 1
    assert actions.index("rollout.reverted") > actions.index(
        "rollout.start", actions.index("rollout.completed") + 1
    )
