"""Device traffic into the hub's inventory over a real mosquitto, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from sqlalchemy import func, select

from cloud_hub.models import Device
from edgeglm.protocol import Health, Heartbeat, Status, encode, heartbeat_topic, status_topic
from tests.integration.hub_process import start_hub

pytestmark = pytest.mark.integration

HEALTH = Health(
    latency_p50_ms=80,
    latency_p95_ms=140,
    tokens_per_s=20,
    error_rate=0.0,
    queue_depth=0,
    rss_mb=900,
    requests=10,
    errors=0,
)


def _status(device: str, state: str = "online", version: str = "1.0.0") -> bytes:
    return encode(
        Status(
            device_id=device,
            state=state,
            profile="cpu-x86-int4",
            model="glm-tiny",
            version=version,
            agent_version="0.1.0",
            ts=time.time(),
        )
    )


def _beat(device: str, seq: int) -> bytes:
    return encode(
        Heartbeat(device_id=device, ts=time.time(), model="glm-tiny", version="1.0.0", health=HEALTH, seq=seq)
    )


def _device(port: int, device: str, *, will: bool = True) -> paho.Client:
    c = paho.Client(CallbackAPIVersion.VERSION2, client_id=device, protocol=paho.MQTTv5)
    if will:
        c.will_set(status_topic(device), _status(device, "offline"), qos=1, retain=True)
    c.connect("127.0.0.1", port)
    c.loop_start()
    return c


def _until(check: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.1)


def _rows(db: Any) -> dict[str, Device]:
    with db.session() as s:
        return {d.id: d for d in s.scalars(select(Device))}


def test_registration_heartbeats_last_will_timeout_and_bad_messages(
    hub_db_url: str, private_broker: int
) -> None:
    from cloud_hub.db import open_db
    from cloud_hub.metrics import HubMetrics
    from cloud_hub.server import HubContext, start_ingest
    from edgeglm.mqtt import BrokerSettings
    from edgeglm.piece_store import PieceStore

    db = open_db(hub_db_url)
    metrics = HubMetrics()
    ctx = HubContext(db=db, store=PieceStore("/tmp/unused-pieces"), trusted={}, metrics=metrics)
    link, ingest = start_ingest(ctx, BrokerSettings(port=private_broker), "hub-test", offline_after_s=2.0)
    ingest.flush_s = 0.1
    try:
        a = _device(private_broker, "box-a")
        b = _device(private_broker, "box-b")
        time.sleep(0.3)  # shared subscriptions get no retained messages: publish after the hub is up
        a.publish(status_topic("box-a"), _status("box-a"), qos=1, retain=True)
        b.publish(status_topic("box-b"), _status("box-b", version="0.9.0"), qos=1, retain=True)
        for seq in range(5):
            a.publish(heartbeat_topic("box-a"), _beat("box-a", seq), qos=0)
        bad = [
            b"{",
            b'{"v": 1}',
            b"\xff\xfe",
            json.dumps({"device_id": "box-b", "ts": 1}).encode(),
            b"x" * 10000,
        ]
        for payload in bad:
            b.publish(heartbeat_topic("box-b"), payload, qos=1)
        a.publish(heartbeat_topic("box-b"), _beat("box-a", 9), qos=1)  # body names another device
        b.publish(heartbeat_topic("box-b"), _beat("box-b", 0), qos=1)  # still served after all that
        _until(
            lambda: (
                _rows(db).get("box-a") is not None
                and _rows(db)["box-a"].heartbeats == 5
                and _rows(db).get("box-b") is not None
                and _rows(db)["box-b"].heartbeats == 1
            )
        )
        rows = _rows(db)
        assert (rows["box-a"].profile, rows["box-a"].current_version, rows["box-a"].online) == (
            "cpu-x86-int4",
            "1.0.0",
            True,
        )
        assert rows["box-a"].health["latency_p95_ms"] == 140
        assert rows["box-b"].current_version == "1.0.0"  # the heartbeat is newer than its status
        assert metrics.value("edgeglm_hub_device_messages_dropped_total", reason="malformed") == len(bad) + 1

        b._sock.close()  # type: ignore[union-attr]  # a power cut: the broker publishes the last will
        _until(lambda: _rows(db)["box-b"].online is False)
        assert _rows(db)["box-a"].online is True
        _until(lambda: _rows(db)["box-a"].online is False, timeout=15)  # silent for > offline_after_s
        a.publish(heartbeat_topic("box-a"), _beat("box-a", 6), qos=1)
        _until(lambda: _rows(db)["box-a"].online is True)
        a.loop_stop()
        b.loop_stop()
    finally:
        link.close()
        ingest.stop()
        db.dispose()


def _metric(url: str, name: str) -> float:
    with urllib.request.urlopen(url + "/metrics", timeout=5) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_two_hub_processes_split_device_traffic_without_double_counting(
    hub_db_url: str, private_broker: int, tmp_path: Path
) -> None:
    from cloud_hub.db import open_db

    hubs, urls = [], []
    for i in range(2):
        proc, url = start_hub(
            "--db", hub_db_url, "--data", str(tmp_path / f"hub{i}"), "--broker", f"127.0.0.1:{private_broker}"
        )
        hubs.append(proc)
        urls.append(url)
    try:
        time.sleep(0.5)
        devices = [f"site-{i:02d}" for i in range(20)]
        clients = [_device(private_broker, d, will=False) for d in devices]
        beats = 10
        for seq in range(beats):
            for d, c in zip(devices, clients, strict=True):
                c.publish(heartbeat_topic(d), _beat(d, seq), qos=1)
        db = open_db(hub_db_url)
        try:

            def stored() -> int:
                with db.session() as s:
                    return int(s.scalar(select(func.coalesce(func.sum(Device.heartbeats), 0))) or 0)

            _until(lambda: stored() >= len(devices) * beats, timeout=30)
            time.sleep(1.0)  # anything double-counted would show up now
            assert stored() == len(devices) * beats
            assert len(_rows(db)) == len(devices)
        finally:
            db.dispose()
        per_hub = [_metric(url, "edgeglm_hub_heartbeats_total") for url in urls]
        assert sum(per_hub) == len(devices) * beats
        assert all(n > 0 for n in per_hub), per_hub  # both replicas took a share
        for c in clients:
            c.loop_stop()
    finally:
        for h in hubs:
            h.terminate()
        for h in hubs:
            h.wait(20)
