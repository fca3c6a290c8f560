"""``edgectl hub acl`` against a real mosquitto: a device can use its own topics and nobody else's."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from click.testing import CliRunner
from paho.mqtt.enums import CallbackAPIVersion

from cloud_hub.broker_acl import password_line
from edgectl import root
from edgectl.demo.procs import ManagedBroker

pytestmark = pytest.mark.integration


def test_password_lines_are_what_mosquitto_passwd_checks(tmp_path: Path) -> None:
    line = password_line("alice", "s3cret", salt=b"0123456789ab")
    assert line.startswith("alice:$7$101$")
    assert password_line("alice", "s3cret", salt=b"0123456789ab") == line
    assert password_line("alice", "other", salt=b"0123456789ab") != line


def _client(port: int, user: str, password: str) -> tuple[paho.Client, list[tuple[str, bytes]]]:
    got: list[tuple[str, bytes]] = []
    connected = threading.Event()
    c = paho.Client(
        CallbackAPIVersion.VERSION2, client_id=f"{user}-{time.monotonic_ns()}", protocol=paho.MQTTv5
    )
    c.username_pw_set(user, password)
    c.on_message = lambda _c, _u, m: got.append((m.topic, bytes(m.payload)))
    c.on_connect = lambda _c, _u, _f, rc, _p: connected.set() if not rc.is_failure else None
    c.connect("127.0.0.1", port)
    c.loop_start()
    assert connected.wait(10), f"{user} could not log in"
    return c, got


def test_each_device_may_use_only_its_own_topics(tmp_path: Path) -> None:
    out = tmp_path / "acl"
    r = CliRunner().invoke(
        root,
        [
            "hub",
            "acl",
            "--out",
            str(out),
            "--device",
            "box-1",
            "--device",
            "box-2",
            "--no-registered",
            "-o",
            "json",
        ],
    )
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["devices"] == 2
    creds = json.loads((out / "credentials.json").read_text())
    assert (out / "credentials.json").stat().st_mode & 0o777 == 0o600
    assert "s3cret" not in (out / "passwd").read_text() and creds["box-1"] not in (out / "passwd").read_text()

    settings = [f"password_file {out / 'passwd'}", f"acl_file {out / 'acl'}"]
    broker = ManagedBroker(tmp_path / "broker", settings=settings, anonymous=False)
    port = broker.port
    broker.start()
    try:
        time.sleep(0.5)
        hub, seen = _client(port, "hub", creds["hub"])
        hub.subscribe("edgeglm/v1/dev/+/status", qos=1)
        hub.subscribe("edgeglm/v1/dev/+/fetch", qos=1)
        hub.subscribe("edgeglm/v1/hub/fetch", qos=1)
        box1, got1 = _client(port, "box-1", creds["box-1"])
        box1.subscribe("edgeglm/v1/dev/box-1/desired", qos=1)
        box1.subscribe("edgeglm/v1/dev/box-2/desired", qos=1)  # denied by the broker
        time.sleep(0.3)
        box1.publish("edgeglm/v1/dev/box-1/status", b"mine", qos=1)
        box1.publish("edgeglm/v1/dev/box-2/status", b"forged", qos=1)  # dropped by the broker
        box1.publish("edgeglm/v1/dev/box-1/fetch", b"ask", qos=1)
        box1.publish("edgeglm/v1/dev/box-2/fetch", b"ask as box-2", qos=1)  # dropped by the broker
        box1.publish("edgeglm/v1/hub/fetch", b"the old shared topic", qos=1)  # dropped: gone
        hub.publish("edgeglm/v1/dev/box-1/desired", b"for-1", qos=1)
        hub.publish("edgeglm/v1/dev/box-2/desired", b"for-2", qos=1)
        deadline = time.monotonic() + 5
        while (len(seen) < 2 or len(got1) < 1) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)
        assert sorted(seen) == [
            ("edgeglm/v1/dev/box-1/fetch", b"ask"),
            ("edgeglm/v1/dev/box-1/status", b"mine"),
        ]
        assert got1 == [("edgeglm/v1/dev/box-1/desired", b"for-1")]
        bad = paho.Client(CallbackAPIVersion.VERSION2, client_id="intruder", protocol=paho.MQTTv5)
        bad.username_pw_set("box-1", "wrong password")
        refused = threading.Event()
        bad.on_connect = lambda _c, _u, _f, rc, _p: refused.set() if rc.is_failure else None
        bad.connect("127.0.0.1", port)
        bad.loop_start()
        assert refused.wait(10)
        bad.loop_stop()
        for c in (hub, box1):
            c.loop_stop()
    finally:
        broker.stop()
