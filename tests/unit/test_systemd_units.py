"""The shipped systemd units are hardened and pass ``systemd-analyze verify``."""

from __future__ import annotations

import getpass
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edge_agent.config import AgentConfig

UNITS = Path(__file__).resolve().parents[2] / "systemd"
HARDENING = [
    "NoNewPrivileges=yes",
    "ProtectSystem=strict",
    "ProtectHome=yes",
    "PrivateTmp=yes",
    "PrivateDevices=yes",
    "CapabilityBoundingSet=",
    "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX",
    "SystemCallFilter=@system-service",
    "MemoryDenyWriteExecute=yes",
]
# unit -> (the installed path its ExecStart names, the console script of this venv standing in for it)
EXEC = {
    "cloud-hub.service": "edgectl",
    "edge-agent.service": "edge-agent",
}


def _service(name: str) -> dict[str, list[str]]:
    """The [Service] section of a unit: each key with its values in order (a key may repeat)."""
    section = ""
    out: dict[str, list[str]] = {}
    for raw in (UNITS / name).read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line
        elif section == "[Service]":
            key, _, value = line.partition("=")
            out.setdefault(key, []).append(value)
    return out


@pytest.mark.parametrize("name", sorted(EXEC))
def test_unit_is_hardened_and_verifies(name: str, tmp_path: Path) -> None:
    text = (UNITS / name).read_text()
    for line in HARDENING:
        assert line in text.splitlines(), f"{name} lacks {line}"
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed here")
    # verify checks that ExecStart exists and the user resolves: point both at this machine
    script = Path(sys.executable).with_name(EXEC[name])
    if not script.exists():
        pytest.skip(f"{script} is not installed (no {EXEC[name]!r} console script yet): cannot verify {name}")
    user = getpass.getuser()
    local = text.replace(f"/opt/edgeglm/bin/{EXEC[name]}", str(script))
    local = "\n".join(
        f"User={user}" if ln.startswith("User=") else f"Group={user}" if ln.startswith("Group=") else ln
        for ln in local.splitlines()
    )
    unit = tmp_path / name
    unit.write_text(local + "\n")
    out = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
    assert out.returncode == 0 and out.stderr.strip() == "", out.stderr


def test_agent_unit_notifies_restarts_and_keeps_its_state() -> None:
    svc = _service("edge-agent.service")
    expected = {
        "Type": "notify",
        "NotifyAccess": "main",
        "Restart": "on-failure",
        "RestartPreventExitStatus": "78",  # EX_CONFIG: a bad config must not restart in a loop
        "ReadWritePaths": "/var/lib/edge-agent",
        "StateDirectory": "edge-agent",
        "EnvironmentFile": "-/etc/edge-agent/agent.env",
        "User": "edge-agent",
        "ExecStart": "/opt/edgeglm/bin/edge-agent run --config /etc/edge-agent/agent.toml",
    }
    for key, value in expected.items():
        assert svc.get(key) == [value], f"{key}={svc.get(key)}"
    # data_dir comes from agent.toml alone: no EDGE_AGENT_* setting in the unit overrides it (the
    # environment wins over the file), and the config's default is the unit's writable state dir
    assert not any(v.startswith("EDGE_AGENT_") for v in svc.get("Environment", [])), svc["Environment"]
    assert AgentConfig.model_fields["data_dir"].default == Path("/var/lib/edge-agent")
    # the watchdog is on, and the start timeout leaves room to load a model
    (watchdog,) = svc["WatchdogSec"]
    assert int(watchdog.removesuffix("s")) > 0
    (start,) = svc["TimeoutStartSec"]
    assert int(start.removesuffix("s")) >= 300
