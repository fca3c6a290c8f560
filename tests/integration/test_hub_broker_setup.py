"""docs/hub-production.md's broker setup, followed literally: ``edgectl hub acl`` as the doc writes
it, a mosquitto with the doc's config file that drops to its own user (``mosquitto``) before it
reads the password file and ACL, a device that logs in and is refused on another device's topics,
and a real agent that serves a sensor's MQTT 5 request on that broker.

The doc's paths under ``/etc/mosquitto`` become a folder of the test's own that the ``mosquitto``
user can enter; its listener becomes a free loopback port with certificates made here.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edgectl.demo.procs import Proc, free_port, port_open, require_mosquitto, wait_for
from tests.integration.test_hub_tls import _cert, _pem

pytestmark = [pytest.mark.integration, pytest.mark.security]

DOC = Path(__file__).resolve().parents[2] / "docs" / "hub-production.md"
SECTION = "### TLS and per-device credentials (mosquitto)"
EDGECTL = Path(sys.executable).with_name("edgectl")


def _section() -> str:
    text = DOC.read_text()
    start = text.index(SECTION)
    end = text.find("\n## ", start)
    return text[start : end if end != -1 else len(text)]


def _blocks(text: str) -> list[tuple[str, str]]:
    """Fenced blocks as (language, body)."""
    return [(m[1], m[2]) for m in re.finditer(r"^```(\w*)\n(.*?)^```$", text, re.S | re.M)]


def doc_commands() -> str:
    """The section's ``sh`` block, as the doc gives it."""
    (body,) = [b for lang, b in _blocks(_section()) if lang == "sh"]
    return body


def doc_mosquitto_conf() -> str:
    """The block after "Then in `/etc/mosquitto/conf.d/edgeglm.conf`:"."""
    section = _section()
    after = section[section.index("Then in `/etc/mosquitto/conf.d/edgeglm.conf`:") :]
    return _blocks(after)[0][1]


@pytest.fixture
def etc() -> Iterator[Path]:
    """Stands in for /etc/mosquitto: a folder the broker's user may enter (pytest's tmp_path is
    inside a 0700 folder of root's)."""
    if os.geteuid() != 0:
        pytest.skip("the doc's setup starts mosquitto as root, which then drops to its own user")
    try:
        pwd.getpwnam("mosquitto")
    except KeyError:
        pytest.fail("no 'mosquitto' user: the Debian package 'mosquitto' creates it")
    root = Path(tempfile.mkdtemp(prefix="edgeglm-etc-mosquitto-"))
    root.chmod(0o755)
    try:
        yield root
    finally:
        shutil.rmtree(root)


def _run_doc_commands(etc: Path, db_url: str, *, drop: str = "") -> subprocess.CompletedProcess[str]:
    """The doc's commands through bash, ``/etc/mosquitto`` made ``etc`` and ``drop`` taken out,
    with this venv's ``edgectl`` first on PATH and the hub's database in the environment."""
    script = doc_commands().replace("/etc/mosquitto", str(etc))
    if drop:
        assert drop in script
        script = script.replace(drop, "")
    env = {
        **os.environ,
        "PATH": f"{EDGECTL.parent}:{os.environ['PATH']}",
        "EDGEGLM_HUB_DB": db_url,
        "EDGEGLM_HUB_DATA": str(etc / "hub"),
    }
    return subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script], capture_output=True, text=True, timeout=60, env=env
    )


def _broker(etc: Path, conf_body: str) -> tuple[Proc, int]:
    """mosquitto, started as root, with the doc's config (its paths and listener made local)."""
    port = free_port()
    run = etc / "run"  # where it keeps its persistence file, as /var/lib/mosquitto on Debian
    run.mkdir(exist_ok=True)
    mosquitto = pwd.getpwnam("mosquitto")
    os.chown(run, mosquitto.pw_uid, mosquitto.pw_gid)
    conf = conf_body.replace("/etc/mosquitto", str(etc))
    conf, n = re.subn(r"^listener 8883$", f"listener {port} 127.0.0.1", conf, flags=re.M)
    assert n == 1, conf_body
    path = etc / f"mosquitto-{port}.conf"
    path.write_text(conf + f"persistence_location {run}/\n")
    proc = Proc("mosquitto", [require_mosquitto(), "-c", str(path)], etc / f"mosquitto-{port}.log")
    return proc, port


def _client(port: int, ca: Path, user: str, password: str) -> tuple[paho.Client, list[paho.MQTTMessage]]:
    got: list[paho.MQTTMessage] = []
    ready = threading.Event()
    c = paho.Client(
        CallbackAPIVersion.VERSION2, client_id=f"{user}-{uuid.uuid4().hex[:6]}", protocol=paho.MQTTv5
    )
    c.username_pw_set(user, password)
    c.tls_set(ca_certs=str(ca))
    c.on_message = lambda _c, _u, m: got.append(m)
    c.on_connect = lambda _c, _u, _f, rc, _p: ready.set() if not rc.is_failure else None
    c.connect("127.0.0.1", port)
    c.loop_start()
    assert ready.wait(10), f"{user} could not log in"
    return c, got


def _certificates(etc: Path) -> Path:
    """The doc's ca.pem, server.pem and server.key (root's, 0600 for the key, as an operator's)."""
    ca_key, srv_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = _cert("edgeglm test CA", ca_key, None, ca_key, True)
    _pem(etc / "server.pem", _cert("localhost", ca_key, ca.subject, srv_key, False))
    _pem(etc / "server.key", srv_key).chmod(0o600)
    return _pem(etc / "ca.pem", ca)


def _register(db_url: str, *devices: str) -> None:
    from cloud_hub.db import migrate, open_db
    from cloud_hub.models import Device

    migrate(db_url)
    db = open_db(db_url)
    with db.session() as s:
        for device in devices:
            s.add(Device(id=device, profile="cpu-x86-int8"))
    db.dispose()


def _doc_devices() -> tuple[str, str, str, str]:
    """(site, a device, another device, the sensor) as the doc's command names them."""
    argv = shlex.split(doc_commands().replace("\\\n", " "), comments=True)
    site, members = argv[argv.index("--site") + 1].split("=")
    me, other = members.split(",")
    return site, me, other, argv[argv.index("--sensor") + 1]


def test_without_owner_the_broker_cannot_read_its_files(etc: Path) -> None:
    """What the doc's ``--owner`` is for: mosquitto reads the files after dropping privileges."""
    _site, me, other, _sensor = _doc_devices()
    db_url = f"sqlite:///{etc / 'hub.db'}"
    _register(db_url, me, other)
    _certificates(etc)
    r = _run_doc_commands(etc, db_url, drop="--owner mosquitto")
    assert r.returncode == 0, r.stderr
    proc, port = _broker(etc, doc_mosquitto_conf())
    proc.start()
    try:
        wait_for(lambda: not proc.alive() or port_open(port), 10, "mosquitto to exit or listen")
        assert not proc.alive(), "mosquitto started with root's 0640 files"
        assert "Unable to open pwfile" in proc.log()
    finally:
        proc.stop()


def test_the_documented_broker_setup_serves_a_sensor_and_keeps_devices_apart(
    etc: Path, tiny_bundle: Any
) -> None:
    bundle, _profile, release_pub = tiny_bundle("fused-int8")  # built once per session
    site, me, other, sensor = _doc_devices()
    db_url = f"sqlite:///{etc / 'hub.db'}"
    _register(db_url, me, other)  # "every registered device"
    ca = _certificates(etc)
    r = _run_doc_commands(etc, db_url)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("2 device(s), 1 sensor(s), 1 hub user(s), 4 new -> "), r.stdout
    out = etc / "edgeglm"
    mosquitto = pwd.getpwnam("mosquitto")
    for name in ("passwd", "acl"):
        st = (out / name).stat()
        assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (mosquitto.pw_uid, mosquitto.pw_gid, 0o640)
    assert (out / "credentials.json").stat().st_uid == 0
    assert (out / "credentials.json").stat().st_mode & 0o777 == 0o600
    creds = json.loads((out / "credentials.json").read_text())

    broker, port = _broker(etc, doc_mosquitto_conf())
    broker.start_until(lambda: port_open(port), 10, "mosquitto with the doc's config")
    clients: list[paho.Client] = []
    agent = None
    try:
        status = Path(f"/proc/{broker.pid}/status").read_text()
        assert re.search(rf"^Uid:\s+{mosquitto.pw_uid}\s", status, re.M), "mosquitto kept root"

        hub, seen = _client(port, ca, "hub", creds["hub"])
        box, got = _client(port, ca, me, creds[me])
        cam, replies = _client(port, ca, sensor, creds[sensor])
        clients += [hub, box, cam]
        hub.subscribe("edgeglm/v1/#", qos=1)
        for kind in ("desired", "infer", "data"):
            box.subscribe(f"edgeglm/v1/dev/{other}/{kind}", qos=1)  # granted, but nothing delivered
        cam.subscribe(f"sensors/{sensor}/#", qos=1)
        time.sleep(0.3)
        for kind in ("status", "report", "fetch", "infer"):
            box.publish(f"edgeglm/v1/dev/{other}/{kind}", b"forged", qos=1).wait_for_publish(5)
        cam.publish(f"edgeglm/v1/dev/{sensor}/status", b"a sensor posing as a device", qos=1)
        box.publish(f"edgeglm/v1/dev/{me}/status", b"mine", qos=1).wait_for_publish(5)
        for kind in ("desired", "infer", "data"):
            hub.publish(f"edgeglm/v1/dev/{other}/{kind}", b"for the other box", qos=1)
        wait_for(lambda: any(m.payload == b"mine" for m in seen), 10, "the device's own status")
        time.sleep(0.5)
        assert [(m.topic, m.payload) for m in seen if m.payload != b"for the other box"] == [
            (f"edgeglm/v1/dev/{me}/status", b"mine")
        ]
        assert got == []

        agent = Proc(
            "edge-agent",
            [
                str(EDGECTL), "agent", "serve", str(bundle), "--trust", str(release_pub),
                "--device-id", me, "--username", me, "--broker", f"127.0.0.1:{port}",
                "--ca-file", str(ca), "--site", site,
            ],
            etc / "agent.log",
            env={"EDGEGLM_MQTT_PASSWORD": creds[me]},
        )  # fmt: skip
        agent.start()
        for topic in (f"edgeglm/v1/dev/{me}/infer", f"edgeglm/v1/site/{site}/infer"):
            reply = _ask(cam, replies, topic, f"sensors/{sensor}/reply", agent)
            assert reply["done"] and reply.get("error") is None, reply
            assert reply["usage"]["completion_tokens"] > 0, reply
        assert agent.alive()
    finally:
        if agent is not None:
            agent.stop()
        for c in clients:
            c.disconnect()
            c.loop_stop()
        broker.stop()


def _ask(cam: paho.Client, replies: list[paho.MQTTMessage], topic: str, reply_topic: str, agent: Proc) -> Any:
    """Ask until the agent (which may still be connecting) answers; the reply that carries this
    request's correlation data."""
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        assert agent.alive(), agent.log()[-2000:]
        correlation = uuid.uuid4().bytes
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = reply_topic
        props.CorrelationData = correlation
        props.MessageExpiryInterval = 30
        body = {"prompt": "The pressure sensor on line three reported", "max_tokens": 4}
        cam.publish(topic, json.dumps(body).encode(), qos=1, properties=props)
        step = time.monotonic() + 3
        while time.monotonic() < step:
            for m in list(replies):
                if getattr(m.properties, "CorrelationData", None) == correlation:
                    assert m.topic == reply_topic
                    return json.loads(m.payload)
            time.sleep(0.05)
    raise AssertionError(f"no reply on {reply_topic} to a request on {topic}: {agent.log()[-2000:]}")
