"""A hub killed (SIGKILL) mid-rollout: a new hub process takes the lease and finishes the rollout."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from edgectl import root
from tests.integration.fleet_sim import SimDevice
from tests.integration.hub_process import start_hub
from tests.integration.test_hub_rollouts import register

pytestmark = pytest.mark.integration


def _hub(db: str, data: Path, broker: int, trust: Path) -> tuple[Any, str]:
    return start_hub(
        "--db",
        db,
        "--data",
        str(data),
        "--broker",
        f"127.0.0.1:{broker}",
        "--trust",
        str(trust),
        "--tick",
        "0.1",
    )


def _cli(url: str, token: str, *args: str) -> Any:
    r = CliRunner().invoke(root, [*args, "-o", "json"], env={"EDGEGLM_HUB_URL": url, "EDGEGLM_TOKEN": token})
    assert r.exit_code == 0, r.output
    return json.loads(r.output)


def test_a_hub_killed_mid_wave_is_replaced_and_the_rollout_completes(
    hub_db_url: str, private_broker: int, publisher: Any, tmp_path: Path
) -> None:
    from cloud_hub.auth import Role, create_token
    from cloud_hub.server import build_context
    from cloud_hub.settings import HubSettings

    data = tmp_path / "hub"
    ctx = build_context(HubSettings(data_dir=data, db_url=hub_db_url, trusted_keys=(publisher.public_path,)))
    with ctx.db.session() as s:
        _, token = create_token(s, "ops", Role.operator, "test")
    register(ctx, publisher.bundle("1.0.0", seed=1))
    register(ctx, publisher.bundle("1.1.0", seed=2))
    ctx.db.dispose()

    devices = [SimDevice(private_broker, f"box-{i:02d}", "1.0.0").start() for i in range(20)]
    first, url = _hub(hub_db_url, data, private_broker, publisher.public_path)
    second = None
    try:
        deadline = time.monotonic() + 30
        while len(_cli(url, token, "devices", "list", "--online")) < 20:
            assert time.monotonic() < deadline, "devices did not register"
            time.sleep(0.2)
        started = _cli(
            url,
            token,
            "deploy",
            "glm-tiny@1.1.0",
            "--waves",
            "10,50,100",
            "--soak",
            "1.5s",
            "--max-failure",
            "0%",
        )
        rid = started["id"]
        deadline = time.monotonic() + 40
        while _cli(url, token, "rollouts", "status", str(rid))["current_wave"] < 1:
            assert time.monotonic() < deadline, "the second wave never started"
            time.sleep(0.1)
        os.kill(first.pid, signal.SIGKILL)  # mid-rollout, no goodbye, lease still held
        first.wait(10)
        second, url = _hub(hub_db_url, data, private_broker, publisher.public_path)
        deadline = time.monotonic() + 60
        while (status := _cli(url, token, "rollouts", "status", str(rid)))["state"] == "running":
            assert time.monotonic() < deadline, f"rollout stuck after the restart: {status}"
            time.sleep(0.3)
        assert status["state"] == "completed", status
        assert [w["state"] for w in status["waves"]] == ["passed", "passed", "passed"]
        assert status["devices"] == {"succeeded": 20}
        assert all(d.version == "1.1.0" for d in devices)
        listed = _cli(url, token, "devices", "list")
        assert {d["current"] for d in listed} == {"glm-tiny@1.1.0"}
    finally:
        for d in devices:
            d.stop()
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                proc.wait(20)
