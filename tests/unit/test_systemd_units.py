"""The shipped systemd units are hardened and pass ``systemd-analyze verify``."""

from __future__ import annotations

import getpass
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

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


@pytest.mark.parametrize("name", ["cloud-hub.service"])
def test_unit_is_hardened_and_verifies(name: str, tmp_path: Path) -> None:
    text = (UNITS / name).read_text()
    for line in HARDENING:
        assert line in text.splitlines(), f"{name} lacks {line}"
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed here")
    # verify checks that ExecStart exists and the user resolves: point both at this machine
    edgectl = Path(sys.executable).with_name("edgectl")
    user = getpass.getuser()
    local = text.replace("/opt/edgeglm/bin/edgectl", str(edgectl))
    local = "\n".join(
        f"User={user}" if ln.startswith("User=") else f"Group={user}" if ln.startswith("Group=") else ln
        for ln in local.splitlines()
    )
    unit = tmp_path / name
    unit.write_text(local + "\n")
    out = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
    assert out.returncode == 0 and out.stderr.strip() == "", out.stderr
