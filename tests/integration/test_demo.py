"""The whole story, end to end: ``edgectl demo`` as a user runs it, and the same story on PostgreSQL.

``test_edgectl_demo_from_the_command_line`` runs the console script exactly as ``make demo`` does
(its own mosquitto, the hub on SQLite, three agents) and reads the summary table and the JSON.
``test_the_story_on_postgresql`` runs the same story with the hub on the real PostgreSQL and a
private mosquitto, then checks the database itself: the audit rows, the deployments, the devices.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

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


def test_edgectl_demo_from_the_command_line(tmp_path: Path) -> None:
    table = subprocess.run(
        [EDGECTL, "demo", "--workdir", str(tmp_path / "t")], capture_output=True, text=True, timeout=600
    )
    assert table.returncode == 0, table.stderr[-3000:]
    for row in ("delta sync", "broken 1.2.0", "canary", "checks", "10 of 10 passed", "processes stopped"):
        assert row in table.stdout, table.stdout
    assert "mosquitto on 127.0.0.1:" in table.stderr  # progress lines go to stderr
    # nothing it started is left running: each had a path under the work folder on its command line
    left = subprocess.run(["pgrep", "-af", str(tmp_path)], capture_output=True, text=True).stdout
    assert left.strip() == "", left


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
