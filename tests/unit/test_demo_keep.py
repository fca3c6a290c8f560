"""``edgectl demo --stop`` and the kept demo's state file, on real processes (``sleep``).

A recorded PID is signalled only while it is still the recorded process: a forged start time (a
PID the system gave to another process since) leaves it alone. The end-to-end ``--keep`` run is
``tests/integration/test_demo.py``.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgectl import root
from edgectl.demo.kept import STATE_FILE, KeptProcess, identity, record, running, write_state

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc (Linux)")


@pytest.fixture
def sleeper(tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A ``sleep`` leading its own session and process group, as the demo's processes do."""
    proc = subprocess.Popen(["sleep", "300"], start_new_session=True)
    yield proc
    if proc.poll() is None:
        proc.kill()
    proc.wait(10)


def _stop(workdir: Path, *args: str) -> tuple[int, str]:
    out = CliRunner().invoke(root, ["demo", "--stop", "--workdir", str(workdir), *args])
    return out.exit_code, out.output


def test_stop_ends_a_recorded_process_and_removes_the_state_file(
    tmp_path: Path, sleeper: subprocess.Popen[bytes]
) -> None:
    write_state(tmp_path, [record("sleeper", sleeper.pid, tmp_path / "s.log")], hub_url="http://x")
    assert [p.pid for p in running(tmp_path)] == [sleeper.pid]

    code, out = _stop(tmp_path, "-o", "json")
    assert code == 0, out
    assert json.loads(out)["processes"] == [{"name": "sleeper", "pid": sleeper.pid, "outcome": "stopped"}]
    assert sleeper.wait(5) == -15  # SIGTERM, to its process group
    assert not (tmp_path / STATE_FILE).exists()

    code, out = _stop(tmp_path)
    assert code == 1
    assert "Error: demo: nothing to stop: no kept demo in" in out.splitlines()[0]


def test_stop_leaves_alone_a_pid_whose_start_time_is_not_the_recorded_one(
    tmp_path: Path, sleeper: subprocess.Popen[bytes]
) -> None:
    real = record("sleeper", sleeper.pid, tmp_path / "s.log")
    forged = KeptProcess(real.name, real.pid, real.started + "0", real.argv, real.log)  # a reused PID
    write_state(tmp_path, [forged])
    assert running(tmp_path) == []

    code, out = _stop(tmp_path, "-o", "json")
    assert code == 0, out
    outcome = json.loads(out)["processes"][0]["outcome"]
    assert outcome == "left alone: the PID now belongs to another process"
    time.sleep(0.2)
    assert sleeper.poll() is None and identity(sleeper.pid) == (real.started, real.argv)
    assert not (tmp_path / STATE_FILE).exists()


def test_stop_leaves_alone_a_pid_with_another_command_line(
    tmp_path: Path, sleeper: subprocess.Popen[bytes]
) -> None:
    real = record("sleeper", sleeper.pid, tmp_path / "s.log")
    write_state(tmp_path, [KeptProcess(real.name, real.pid, real.started, ["edge-agent", "run"], real.log)])
    code, out = _stop(tmp_path)
    assert code == 0, out
    assert "left alone" in out
    assert sleeper.poll() is None


def test_a_process_that_is_gone_is_reported_so(tmp_path: Path) -> None:
    gone = subprocess.Popen(["sleep", "0"])
    gone.wait(5)
    write_state(tmp_path, [KeptProcess("gone", gone.pid, "0:0", ["sleep", "0"], "g.log")])
    code, out = _stop(tmp_path)
    assert code == 0, out
    assert "already gone" in out
    assert not (tmp_path / STATE_FILE).exists()


def test_keep_and_stop_together_is_a_usage_error(tmp_path: Path) -> None:
    out = CliRunner().invoke(root, ["demo", "--keep", "--stop", "--workdir", str(tmp_path)])
    assert out.exit_code == 2
    assert "--keep and --stop cannot be used together" in out.output
    out = CliRunner().invoke(root, ["demo", "--stop", "--steps", "60", "--workdir", str(tmp_path)])
    assert out.exit_code == 2 and "--steps has no meaning with --stop" in out.output


def test_keep_is_refused_while_a_kept_demo_runs_in_the_workdir(
    tmp_path: Path, sleeper: subprocess.Popen[bytes]
) -> None:
    write_state(tmp_path, [record("cloud-hub", sleeper.pid, tmp_path / "h.log")], hub_url="http://h")
    for args in (["--keep"], []):
        out = CliRunner().invoke(root, ["demo", *args, "--workdir", str(tmp_path)])
        assert out.exit_code == 1, out.output
        first, hint = out.output.splitlines()[:2]
        assert first == f"Error: demo: a kept demo is already running in {tmp_path} (hub http://h)"
        assert hint == f"hint: Stop it first: edgectl demo --stop --workdir {tmp_path}"
    assert sleeper.poll() is None


def test_a_state_file_that_is_not_one_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / STATE_FILE).write_text('{"version": 1, "processes": [{"pid": "x"}]}')
    code, out = _stop(tmp_path)
    assert code == 78
    assert out.startswith(f"Error: {tmp_path / STATE_FILE}: is not a kept demo's state file")


def test_without_workdir_stop_looks_in_the_state_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    out = CliRunner().invoke(root, ["demo", "--stop"])
    assert out.exit_code == 1
    assert f"nothing to stop: no kept demo in {tmp_path / 'edgeglm' / 'demo'} " in out.output
    monkeypatch.setenv("XDG_STATE_HOME", "relative/dir")  # the XDG spec says: ignore a relative one
    out = CliRunner().invoke(root, ["demo", "--stop"])
    assert str(Path.home() / ".local" / "state" / "edgeglm" / "demo") in out.output
