"""``edgectl agent``: what the agent facade turns into exit codes and first error lines."""

from __future__ import annotations

import socket

from click.testing import CliRunner

from edgectl import root


def test_agent_serve_on_a_taken_http_port_is_a_config_error_before_any_model_loads(tmp_path):
    """The serving stack binds the HTTP port first (as the daemon's serving.http_listen does)."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        args = ["agent", "serve", str(tmp_path), "--device-id", "box-1", "--broker", "none"]
        res = CliRunner().invoke(root, [*args, "--http", f"127.0.0.1:{port}"])
    assert res.exit_code == 78, res.output
    error = next(line for line in res.stderr.splitlines() if line.startswith("Error:"))
    assert error.startswith(f"Error: --http: cannot listen on 127.0.0.1:{port}: ")


def test_agent_status_reads_the_data_folder_through_the_facade(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGE_AGENT_DEVICE_ID", "box-2")
    monkeypatch.setenv("EDGE_AGENT_PROFILE", "cpu-x86-int8")
    monkeypatch.setenv("EDGE_AGENT_DATA_DIR", str(tmp_path / "data"))
    key = tmp_path / "release.pub"
    key.write_text("unused: status reads no signature")
    monkeypatch.setenv("EDGE_AGENT_TRUSTED_KEYS", str(key))
    monkeypatch.setenv("EDGE_AGENT_CONFIG", str(tmp_path / "absent.toml"))
    res = CliRunner().invoke(root, ["agent", "status", "-o", "json"])
    assert res.exit_code == 0, res.output
    assert '"device_id": "box-2"' in res.stdout and '"last_update": null' in res.stdout
