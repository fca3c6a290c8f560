"""``edgectl hub acl`` against a real mosquitto: a device can use its own topics and nobody else's."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import stat
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from click.testing import CliRunner
from paho.mqtt.enums import CallbackAPIVersion

from cloud_hub.broker_acl import password_line
from edgectl import root
from edgectl.demo.procs import ManagedBroker

pytestmark = [pytest.mark.integration, pytest.mark.security]


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


# ------------------------------------------------------------------------------ --owner, --sensor, --site


def _acl(*args: str) -> Any:
    return CliRunner().invoke(root, ["hub", "acl", "--no-registered", *args])


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A folder outside pytest's 0700 tmp_path, which the broker's user could not enter."""
    folder = Path(tempfile.mkdtemp(prefix="edgeglm-acl-"))
    folder.chmod(0o777)
    try:
        yield folder
    finally:
        shutil.rmtree(folder)


def test_owner_hands_passwd_and_acl_to_the_brokers_user_and_group(open_dir: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("only root may hand files to another user")
    mosquitto = pwd.getpwnam("mosquitto")
    r = _acl("--out", str(open_dir / "a"), "--device", "box-1", "--owner", "mosquitto")
    assert r.exit_code == 0, r.output
    for name in ("passwd", "acl"):
        st = (open_dir / "a" / name).stat()
        assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (mosquitto.pw_uid, mosquitto.pw_gid, 0o640)
    st = (open_dir / "a").stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (0, mosquitto.pw_gid, 0o750)
    assert (open_dir / "a" / "credentials.json").stat().st_uid == 0

    r = _acl("--out", str(open_dir / "a"), "--device", "box-1", "--owner", ":mosquitto")  # group only
    assert r.exit_code == 0, r.output
    st = (open_dir / "a" / "passwd").stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (0, mosquitto.pw_gid, 0o640)  # the caller's
    assert sorted(p.name for p in (open_dir / "a").iterdir()) == ["acl", "credentials.json", "passwd"]


def test_modes_hold_under_a_strict_umask_and_planted_temp_links_are_not_followed(open_dir: Path) -> None:
    """A umask of 077 must not make passwd and acl 0600 (the broker's group could not read them),
    and a symlink someone planted at a temporary name must not be written through or chowned."""
    out = open_dir / "a"
    out.mkdir()
    victim = open_dir / "victim"
    victim.write_text("precious\n")
    victim.chmod(0o644)
    for name in ("credentials.tmp", "passwd.tmp", "acl.tmp"):
        (out / name).symlink_to(victim)
    old = os.umask(0o077)
    try:
        r = _acl("--out", str(out), "--device", "box-1")
    finally:
        os.umask(old)
    assert r.exit_code == 0, r.output
    assert victim.read_text() == "precious\n" and victim.stat().st_mode & 0o777 == 0o644
    for name, mode in (("passwd", 0o640), ("acl", 0o640), ("credentials.json", 0o600)):
        st = (out / name).lstat()
        assert stat.S_ISREG(st.st_mode) and st.st_mode & 0o777 == mode, name
    assert sorted(p.name for p in out.iterdir()) == ["acl", "credentials.json", "passwd"]


@pytest.mark.parametrize(
    ("owner", "why"),
    [
        ("no-such-user-x", "no user 'no-such-user-x' on this machine"),
        ("mosquitto:no-such-group-x", "no group 'no-such-group-x' on this machine"),
        (":", "':': write USER, USER:GROUP or :GROUP"),
    ],
)
def test_an_owner_this_machine_does_not_have_is_refused_by_name(open_dir: Path, owner: str, why: str) -> None:
    r = _acl("--out", str(open_dir / "a"), "--device", "box-1", "--owner", owner)
    assert r.exit_code == 2 and f"Invalid value for '--owner': {why}" in r.output, r.output
    assert not (open_dir / "a").exists()


def test_an_out_folder_the_broker_cannot_enter_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    r = _acl("--out", str(private / "acl"), "--device", "box-1", "--owner", "mosquitto")
    assert r.exit_code == 2, r.output
    assert f"Error: --out: the broker's user cannot enter {private} (drwx------" in r.output
    assert f"chmod o+x {private}" in r.output
    assert list(private.iterdir()) == []


def test_a_chown_it_may_not_do_is_refused_and_replaces_nothing(open_dir: Path) -> None:
    """As an unprivileged user (a forked child of this root test process)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to become another user")
    nobody = pwd.getpwnam("nobody")
    out = open_dir / "a"
    assert _acl("--out", str(out), "--device", "box-1").exit_code == 0  # root's files, as before
    out.chmod(0o777)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    for p in out.iterdir():
        p.chmod(0o666)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 99
        try:
            os.close(read)
            os.setgroups([])
            os.setgid(nobody.pw_gid)
            os.setuid(nobody.pw_uid)
            r = _acl("--out", str(out), "--device", "box-1", "--device", "box-2", "--owner", "mosquitto")
            os.write(write, r.output.encode())
            code = r.exit_code
        finally:
            os._exit(code)
    os.close(write)
    with os.fdopen(read) as fh:
        output = fh.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 1, output
    assert output.startswith("Error: --owner: may not hand ") and "Operation not permitted" in output
    assert "hint: Run it as root" in output
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # box-2 not added anywhere


def test_site_and_sensor_flags_are_checked() -> None:
    r = _acl("--out", "/nonexistent/x", "--site", "plant-7")
    assert r.exit_code == 2 and "'plant-7': write SITE=DEVICE[,DEVICE...]" in r.output
    r = _acl("--out", "/nonexistent/x", "--device", "box-1", "--sensor", "box-1")
    assert r.exit_code == 1 and "Error: sensor name: 'box-1' is also a device or hub user's name" in r.output


def test_sensors_read_only_their_own_replies_and_cannot_pose_as_devices(tmp_path: Path) -> None:
    out = tmp_path / "acl"
    args = ["--out", str(out), "--device", "box-1", "--sensor", "cam-1", "--sensor", "cam-2"]
    assert _acl(*args, "--site", "lab=box-1").exit_code == 0
    creds = json.loads((out / "credentials.json").read_text())
    settings = [f"password_file {out / 'passwd'}", f"acl_file {out / 'acl'}"]
    broker = ManagedBroker(tmp_path / "broker", settings=settings, anonymous=False)
    broker.start()
    clients: list[paho.Client] = []
    try:
        hub, seen = _client(broker.port, "hub", creds["hub"])
        box, asked = _client(broker.port, "box-1", creds["box-1"])
        cam1, got1 = _client(broker.port, "cam-1", creds["cam-1"])
        cam2, got2 = _client(broker.port, "cam-2", creds["cam-2"])
        clients += [hub, box, cam1, cam2]
        hub.subscribe("edgeglm/v1/#", qos=1)
        hub.subscribe("sensors/#", qos=1)  # the hub does not serve inference: nothing here for it
        box.subscribe("edgeglm/v1/dev/box-1/infer", qos=1)
        box.subscribe("$share/agents/edgeglm/v1/site/lab/infer", qos=1)
        cam1.subscribe("sensors/#", qos=1)  # granted, but only its own replies are delivered
        cam2.subscribe("sensors/cam-2/#", qos=1)
        time.sleep(0.3)
        cam1.publish("edgeglm/v1/dev/box-1/infer", b"ask box-1", qos=1).wait_for_publish(5)
        cam1.publish("edgeglm/v1/site/lab/infer", b"ask the site", qos=1).wait_for_publish(5)
        cam1.publish("edgeglm/v1/dev/cam-1/status", b"a sensor posing as a device", qos=1).wait_for_publish(5)
        cam1.publish("sensors/cam-2/reply", b"a sensor forging a reply", qos=1).wait_for_publish(5)
        box.publish("sensors/cam-1/reply", b"for cam-1", qos=1).wait_for_publish(5)
        box.publish("sensors/cam-2/reply", b"for cam-2", qos=1).wait_for_publish(5)
        box.publish("edgeglm/v1/dev/box-1/desired", b"a device writing its own desired state", qos=1)
        deadline = time.monotonic() + 5
        while (len(asked) < 2 or not got1 or not got2) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)
        assert sorted(asked) == [
            ("edgeglm/v1/dev/box-1/infer", b"ask box-1"),
            ("edgeglm/v1/site/lab/infer", b"ask the site"),
        ]
        assert got1 == [("sensors/cam-1/reply", b"for cam-1")]
        assert got2 == [("sensors/cam-2/reply", b"for cam-2")]
        assert sorted(seen) == sorted(asked)  # the hub sees the requests, nothing else
    finally:
        for c in clients:
            c.loop_stop()
        broker.stop()
