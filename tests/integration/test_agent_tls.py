"""``edge-agent run`` reaches its cloud broker over TLS (client certificate, or user + password) and
serves sensors on a separate local broker; a mosquitto of the test's own with generated certificates.

Listeners: ``cert`` (TLS, client certificate required, its CN is the user name), ``password``
(TLS, password file + ACL), ``local`` (plain, anonymous: the sensors' side).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from edgectl.demo.agent_box import AgentBox
from edgectl.demo.procs import ManagedBroker, free_port, wait_for
from edgectl.demo.wire import Wire
from tests.integration.test_hub_tls import _cert, _pem

pytestmark = pytest.mark.integration


@pytest.fixture
def tls_broker(tmp_path: Path) -> Any:
    from cloud_hub.broker_acl import write_acl

    ca_key = ec.generate_private_key(ec.SECP256R1())
    srv_key, box_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = _cert("edgeglm test CA", ca_key, None, ca_key, True)
    ca_file = _pem(tmp_path / "ca.pem", ca)
    srv = _pem(tmp_path / "srv.pem", _cert("localhost", ca_key, ca.subject, srv_key, False))
    srv_k = _pem(tmp_path / "srv.key", srv_key)
    box_cert = _pem(tmp_path / "box.pem", _cert("box-cert", ca_key, ca.subject, box_key, False))
    box_k = _pem(tmp_path / "box.key", box_key)
    creds_dir = tmp_path / "acl"
    write_acl(creds_dir, ["box-pw"], ["hub"])
    import json

    creds = json.loads((creds_dir / "credentials.json").read_text())
    ports = {"cert": free_port(), "password": free_port(), "local": free_port()}
    tls = f"cafile {ca_file}\ncertfile {srv}\nkeyfile {srv_k}\n"
    conf = (
        "per_listener_settings true\n"
        f"listener {ports['cert']} 127.0.0.1\n{tls}require_certificate true\nuse_identity_as_username true\n"
        "allow_anonymous false\n"
        f"listener {ports['password']} 127.0.0.1\n{tls}allow_anonymous false\n"
        f"password_file {creds_dir / 'passwd'}\nacl_file {creds_dir / 'acl'}\n"
        f"listener {ports['local']} 127.0.0.1\nallow_anonymous true\n"
    )
    broker = ManagedBroker(tmp_path, ports["local"], listeners=conf).start()
    wait_for(lambda: all(_open(p) for p in ports.values()), 10, "all three listeners")
    try:
        yield {
            "ports": ports,
            "ca": ca_file,
            "cert": box_cert,
            "key": box_k,
            "password": creds["box-pw"],
        }
    finally:
        broker.stop()


def _open(port: int) -> bool:
    import socket

    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


def _agent(tmp_path: Path, tiny_bundle: Any, device: str, cloud: dict[str, Any], local_port: int) -> AgentBox:
    folder, _profile, public = tiny_bundle("fused-int8")
    root = tmp_path / device
    root.mkdir()
    return AgentBox(
        root,
        device,
        0,
        public,
        bootstrap_bundle=str(folder),
        cloud=cloud,
        local={"url": f"mqtt://127.0.0.1:{local_port}"},
    )


def test_cloud_over_tls_with_a_client_certificate_and_sensors_on_the_local_broker(
    tls_broker: Any, tiny_bundle: Any, tmp_path: Path
) -> None:
    b = tls_broker
    cloud = {
        "url": f"mqtts://127.0.0.1:{b['ports']['cert']}",
        "ca_file": str(b["ca"]),
        "cert_file": str(b["cert"]),
        "key_file": str(b["key"]),
    }
    agent = _agent(tmp_path, tiny_bundle, "box-cert", cloud, b["ports"]["local"]).start()
    wire = Wire(b["ports"]["local"], "box-cert")
    try:
        agent.wait_log(r"edge agent \S+ up")
        wait_for(lambda: wire.online("1.0.0"), 30, "the retained status, published over TLS")
        assert wire.ask().error is None  # the request came in on the local broker
        agent.wait_log(rf"MQTT connected to 127\.0\.0\.1:{b['ports']['cert']}")
    finally:
        wire.close()
        agent.stop()


def test_cloud_over_tls_with_a_password_from_the_environment_never_logged(
    tls_broker: Any, tiny_bundle: Any, tmp_path: Path
) -> None:
    b = tls_broker
    cloud = {
        "url": f"mqtts://127.0.0.1:{b['ports']['password']}",
        "ca_file": str(b["ca"]),
        "username": "box-pw",
    }
    agent = _agent(tmp_path, tiny_bundle, "box-pw", cloud, b["ports"]["local"])
    wire = Wire(b["ports"]["local"], "box-pw")
    try:
        agent.start(env={"EDGE_AGENT_CLOUD_PASSWORD": "not-the-password"})
        agent.wait_log(r"edge agent \S+ up")
        agent.wait_log(r"refused", 30)  # wrong password: refused, retried, serving goes on locally
        assert wire.ask().error is None
        agent.stop()
        agent.start(env={"EDGE_AGENT_CLOUD_PASSWORD": b["password"]})
        wait_for(lambda: wire.online("1.0.0"), 30, "the retained status with the right password")
        assert b["password"] not in agent.log() and "not-the-password" not in agent.log()
    finally:
        wire.close()
        agent.stop()


def test_a_bad_config_exits_78_with_one_clear_line(tiny_bundle: Any, tmp_path: Path) -> None:
    agent = _agent(tmp_path, tiny_bundle, "box-bad", {"url": "mqtts://127.0.0.1:1"}, free_port())
    agent.start()  # mqtts without a CA file
    assert agent.wait_exit(30) == 78
    log = agent.log()
    assert "Error: " in log and "ca_file" in log and "Traceback" not in log
    assert os.path.exists(agent.config_path)
