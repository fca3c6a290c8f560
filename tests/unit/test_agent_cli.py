"""``edgectl agent``: what the agent facade turns into exit codes and first error lines."""

from __future__ import annotations

import socket

from click.testing import CliRunner

from edgectl import root


def _first_error(res) -> str:
    return next(line for line in res.stderr.splitlines() if line.startswith("Error:"))


def test_agent_serve_on_a_taken_http_port_is_a_config_error_before_any_model_loads(tmp_path):
    """The serving stack binds the HTTP port first (as the daemon's serving.http_listen does)."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        args = ["agent", "serve", str(tmp_path), "--device-id", "box-1", "--broker", "none"]
        res = CliRunner().invoke(root, [*args, "--insecure-unsigned", "--http", f"127.0.0.1:{port}"])
    assert res.exit_code == 78, res.output
    assert _first_error(res).startswith(f"Error: --http: cannot listen on 127.0.0.1:{port}: ")


def test_agent_serve_without_trust_or_the_explicit_flag_refuses_before_anything_loads(tmp_path):
    args = ["agent", "serve", str(tmp_path), "--device-id", "box-1", "--broker", "none"]
    res = CliRunner().invoke(root, args)
    assert res.exit_code == 2, res.output
    assert _first_error(res).startswith("Error: --trust: give the release key BUNDLE must be signed with")
    key = tmp_path / "release.pub"
    key.write_text("not read: the flags contradict each other first")
    res = CliRunner().invoke(root, [*args, "--trust", str(key), "--insecure-unsigned"])
    assert res.exit_code == 2, res.output
    assert _first_error(res).startswith("Error: --insecure-unsigned: contradicts --trust")


def test_agent_serve_http_flags_need_http_and_a_remote_address_needs_its_flag(tmp_path):
    args = [
        "agent",
        "serve",
        str(tmp_path),
        "--device-id",
        "box-1",
        "--broker",
        "none",
        "--insecure-unsigned",
    ]
    res = CliRunner().invoke(root, [*args, "--http-allow-remote"])
    assert res.exit_code == 2, res.output
    assert _first_error(res) == "Error: --http-allow-remote: needs --http HOST:PORT"
    res = CliRunner().invoke(root, [*args, "--http", "0.0.0.0:18080"])
    assert res.exit_code == 78, res.output
    assert _first_error(res).startswith(
        "Error: --http-allow-remote: 0.0.0.0:18080 is reachable beyond this box"
    )
    token = tmp_path / "token"
    token.write_text("short")
    res = CliRunner().invoke(root, [*args, "--http", "127.0.0.1:18081", "--http-token-file", str(token)])
    assert res.exit_code == 78, res.output
    assert _first_error(res).startswith(f"Error: --http-token-file {token}: must hold one token")
    assert "short" not in res.output


def test_agent_status_reads_the_data_folder_through_the_facade(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGE_AGENT_DEVICE_ID", "box-2")
    monkeypatch.setenv("EDGE_AGENT_PROFILE", "cpu-x86-int8")
    monkeypatch.setenv("EDGE_AGENT_DATA_DIR", str(tmp_path / "data"))
    key = tmp_path / "release.pub"
    key.write_text("unused: status reads no signature")
    monkeypatch.setenv("EDGE_AGENT_CONFIG", str(tmp_path / "absent.toml"))
    monkeypatch.setenv("EDGE_AGENT_TRUSTED_KEYS", str(key))
    res = CliRunner().invoke(root, ["agent", "status", "-o", "json"])
    assert res.exit_code == 0, res.output
    assert '"device_id": "box-2"' in res.stdout and '"last_update": null' in res.stdout
