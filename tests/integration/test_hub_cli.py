"""``edgectl hub ...``, ``publish``, ``releases``, ``devices``, ``audit`` against a real hub process."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from edgectl import root
from tests.integration.hub_process import free_port, start_hub

pytestmark = pytest.mark.integration


def _cli(*args: str, token: str | None = None, hub: str | None = None) -> Any:
    env = {"EDGEGLM_TOKEN": token or "", "EDGEGLM_HUB_URL": hub or ""}
    return CliRunner().invoke(root, list(args), env=env, catch_exceptions=False)


@pytest.fixture
def served(tmp_path: Path, publisher: Any) -> Iterator[dict[str, Any]]:
    data = tmp_path / "hub"
    db = f"sqlite:///{data / 'hub.db'}"
    r = _cli("hub", "migrate", "--db", db, "-o", "json")
    assert r.exit_code == 0, r.output
    from cloud_hub.db import head_revision

    assert json.loads(r.output) == {"before": None, "after": head_revision(), "changed": True}
    tokens = {}
    for role in ("viewer", "operator", "admin"):
        r = _cli("hub", "token", "create", f"{role}-1", "--role", role, "--db", db, "-o", "json")
        assert r.exit_code == 0, r.output
        tokens[role] = json.loads(r.output)["token"]
    proc, url = start_hub("--db", db, "--data", str(data), "--trust", str(publisher.public_path))
    try:
        yield {"url": url, "db": db, "tokens": tokens, "data": data}
    finally:
        proc.terminate()
        proc.wait(20)


def test_publish_list_show_pin_and_audit_from_the_command_line(
    served: dict[str, Any], publisher: Any
) -> None:
    url, tok = served["url"], served["tokens"]
    bundle = publisher.bundle("1.0.0")

    r = _cli("publish", str(bundle), "-o", "json", token=tok["viewer"], hub=url)
    assert r.exit_code == 1
    assert r.output.splitlines()[0].startswith("Error: POST /api/v1/uploads: needs role operator")

    r = _cli("publish", str(bundle), "-o", "json", token=tok["operator"], hub=url)
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert out["bytes_sent"] == out["bytes_total"] > 0 and not out["already_published"]
    r = _cli("publish", str(bundle), "-o", "json", token=tok["operator"], hub=url)
    assert json.loads(r.output)["already_published"] is True

    r = _cli("releases", "list", token=tok["viewer"], hub=url)
    assert r.exit_code == 0 and "glm-tiny" in r.output and "1.0.0" in r.output
    r = _cli("releases", "show", "glm-tiny@1.0.0", "-o", "json", token=tok["viewer"], hub=url)
    assert json.loads(r.output)["bundles"][0]["profile"] == "cpu-x86-int4"
    r = _cli("releases", "show", "glm-tiny@9.9.9", token=tok["viewer"], hub=url)
    assert r.exit_code == 1 and r.output.startswith("Error: release glm-tiny@9.9.9: is not in the registry")

    from cloud_hub.db import open_db
    from cloud_hub.models import Device

    db = open_db(served["db"])
    with db.session() as s:
        s.add(Device(id="box-7", profile="cpu-x86-int4"))
    db.dispose()
    assert _cli("devices", "label", "box-7", "site=plant-7", token=tok["operator"], hub=url).exit_code == 0
    assert _cli("devices", "pin", "box-7", "1.0.0", token=tok["operator"], hub=url).exit_code == 0
    r = _cli("devices", "list", "--fleet", "site=plant-7", "-o", "json", token=tok["viewer"], hub=url)
    assert [(d["id"], d["pinned_version"]) for d in json.loads(r.output)] == [("box-7", "1.0.0")]
    r = _cli("devices", "list", "--fleet", "site=elsewhere", "-o", "json", token=tok["viewer"], hub=url)
    assert json.loads(r.output) == []
    r = _cli("devices", "unpin", "box-7", token=tok["viewer"], hub=url)
    assert r.exit_code == 1 and "needs role operator" in r.output

    r = _cli("audit", "list", "-o", "json", token=tok["viewer"], hub=url)
    actions = [e["action"] for e in json.loads(r.output)]
    assert actions[:4] == ["device.pin", "device.label", "release.publish", "upload.begin"]
    assert actions.count("token.create") == 3
    assert "Error:" not in r.output

    r = _cli("devices", "list", token="", hub=url)
    assert r.exit_code == 1 and r.output.startswith("Error: API token: missing")


def test_an_unreachable_hub_exits_69_with_a_hint(tmp_path: Path) -> None:
    r = _cli("releases", "list", token="x", hub=f"http://127.0.0.1:{free_port()}")
    assert r.exit_code == 69
    assert r.output.startswith("Error: hub http://127.0.0.1:") and "hint: Start it" in r.output


def test_serving_an_unmigrated_database_exits_78(tmp_path: Path) -> None:
    r = _cli("hub", "token", "create", "x", "--role", "admin", "--db", f"sqlite:///{tmp_path / 'new.db'}")
    assert r.exit_code == 78 and "edgectl hub migrate" in r.output


# ------------------------------------------------------------------------------ a port already taken


def _run_on_taken_port(argv: list[str]) -> subprocess.CompletedProcess[str]:
    """Run ``edgectl ARGV`` (``{port}`` is a loopback port this test holds) as a real process."""
    edgectl = Path(sys.executable).with_name("edgectl")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        args = [a.format(port=port) for a in argv]
        return subprocess.run([str(edgectl), *args], capture_output=True, text=True, timeout=120)


def test_hub_serve_on_a_taken_port_exits_78_before_it_says_where_it_serves(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'hub.db'}"
    assert _cli("hub", "migrate", "--db", db).exit_code == 0  # else it would exit 78 for the schema
    r = _run_on_taken_port(
        ["hub", "serve", "--db", db, "--data", str(tmp_path), "--listen", "127.0.0.1:{port}"]
    )
    assert r.returncode == 78, r.stderr
    first = r.stderr.splitlines()[0]
    assert first.startswith("Error: --listen: cannot listen on 127.0.0.1:") and "in use" in first, r.stderr
    assert "hint: Stop what holds the port" in r.stderr
    assert "cloud hub on" not in r.stderr and "Traceback" not in r.stderr


def test_hub_serve_refuses_a_port_out_of_range_by_its_flag() -> None:
    r = _cli("hub", "serve", "--listen", "127.0.0.1:70000")
    assert r.exit_code == 2 and "--listen" in r.output


def test_agent_serve_http_on_a_taken_port_exits_78_without_a_traceback(tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"  # the port is bound before the bundle is read
    bundle.mkdir()
    argv = ["agent", "serve", str(bundle), "--device-id", "box-1", "--broker", "none", "--insecure-unsigned"]
    r = _run_on_taken_port([*argv, "--http", "127.0.0.1:{port}"])
    assert r.returncode == 78, r.stderr
    assert "Traceback" not in r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("Error:")]
    assert errors and errors[0].startswith("Error: --http: cannot listen on 127.0.0.1:"), r.stderr
    assert "in use" in errors[0]
